"""`cirfusion data ...`: dataset utilities. Each sub-verb lives in its own module with ``register(subparsers)``."""

from __future__ import annotations

import argparse
import importlib

DATA_SUBCOMMAND_MODULES = [
    "cirfusion.commands.data_stats",
    "cirfusion.commands.data_verify",
    "cirfusion.commands.data_synthetic",
    "cirfusion.commands.data_catalog",
]


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("data", help="dataset statistics, verification and the embedded benchmarks")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    for name in DATA_SUBCOMMAND_MODULES:
        importlib.import_module(name).register(dsub)
