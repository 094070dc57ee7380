"""Argument helpers shared by the CLI verbs."""

from __future__ import annotations

import argparse
from typing import Any


def add_dataset_args(p: argparse.ArgumentParser, positional: bool = False) -> None:
    """``DATASET`` (positional) or ``--dataset``, ``--root``, ``--category``, ``--option KEY=VALUE`` (repeatable)."""
    if positional:
        p.add_argument("dataset", help="dataset name (see `cirfusion data stats --help`)")
    else:
        p.add_argument("--dataset", required=True, help="dataset name")
    p.add_argument("--root", required=True, help="dataset root directory")
    p.add_argument("--category", default=None, help="FashionIQ/FineCIR category: dress, shirt or toptee")
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra keyword passed to the dataset loader (repeatable), e.g. --option text=fine",
    )


def parse_options(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"cirfusion: --option expects KEY=VALUE, got {pair!r}")
        k, v = pair.split("=", 1)
        out[k.strip()] = v
    return out


def dataset_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kw = parse_options(getattr(args, "option", []) or [])
    if getattr(args, "category", None):
        kw["category"] = args.category
    return kw
