"""`cirfusion data ...`: dataset utilities. Each sub-verb lives in its own module with ``register(subparsers)``,
imported only when chosen (``cirfusion data --help`` lists them from the table below)."""

from __future__ import annotations

import argparse

from ._lazy import Command, add_lazy_subcommands

DATA_COMMANDS: tuple[Command, ...] = (
    Command("stats", "cirfusion.commands.data_stats",
            "query/gallery counts of a dataset split (annotations only, no image needed)"),
    Command("verify", "cirfusion.commands.data_verify",
            "check every image a split needs and every cross-reference; exit 1 on any problem"),
    Command("make-synthetic", "cirfusion.commands.data_synthetic",
            "generate the synthetic scene-graph CIR benchmark (rendered scenes, fine/coarse texts, subsets, edit pairs)"),
    Command("make-catalog", "cirfusion.commands.data_catalog",
            "build CIR triplets (category/colour/edit queries) from a folder of photos labelled by category"),
    Command("make-fine", "cirfusion.commands.data_fine",
            "coarse -> fine modification texts (numbered atomic edits) in the Fine-CIRR / Fine-FashionIQ layout"),
)


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("data", help="dataset statistics, verification and the embedded benchmarks")
    add_lazy_subcommands(p, DATA_COMMANDS, dest="data_command", metavar="DATA_COMMAND")
