"""`cirfusion` command line. Each verb lives in its own module under ``cirfusion.commands`` and exposes
``register(subparsers)``; the handler is stored as ``func`` on the parsed namespace and returns an exit code."""

from __future__ import annotations

import argparse
import importlib
import sys

from .data.images import ImageLoadError
from .data.schema import DataError

# Order here is the order in `cirfusion --help`.
COMMAND_MODULES = [
    "cirfusion.commands.quickstart",
    "cirfusion.commands.data",
    "cirfusion.commands.eval_scores",
    "cirfusion.commands.train",
    "cirfusion.commands.eval",
    "cirfusion.commands.fuse",
    "cirfusion.commands.index",
    "cirfusion.commands.search",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cirfusion", description="Composed image retrieval: train, evaluate, fuse, search.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"cirfusion {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except (DataError, ImageLoadError, FileNotFoundError) as exc:
        print(f"cirfusion: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cirfusion: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
