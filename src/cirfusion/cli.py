"""The ``cirfusion`` command line.

Each command lives in its own module under ``cirfusion.commands`` and exposes ``register(subparsers)``; its handler
is stored as ``func`` on the parsed namespace and returns an exit code. The table below names every command, its
module and its one-line help: ``cirfusion --help`` is built from the table alone (no command module, no torch), and
only the chosen command's module is imported (see ``cirfusion.commands._lazy``).

Exit codes: 0 success; 1 a bug (a traceback is printed) or a command's own "problems found"; 2 a usage error or
an expected error (any ``CirfusionError``, or a missing / unreadable user path), printed as one line on stderr;
130 interrupted.
"""

from __future__ import annotations

import argparse
import errno
import sys
import traceback
from collections.abc import Sequence

from . import __version__
from .commands._lazy import Command, add_lazy_subcommands
from .errors import CirfusionError

# Order here is the order in `cirfusion --help`.
COMMANDS: tuple[Command, ...] = (
    Command("quickstart", "cirfusion.commands.quickstart",
            "build the embedded benchmarks, train the pool and DAFM, write a report"),
    Command("list", "cirfusion.commands.listing", "the registered methods, backbones and datasets"),
    Command("data", "cirfusion.commands.data", "dataset statistics, verification and the embedded benchmarks"),
    Command("eval-scores", "cirfusion.commands.eval_scores",
            "metrics (Recall@K, Recall_subset@K, Rmean, mAP@K) of a saved (queries x gallery) score matrix"),
    Command("train", "cirfusion.commands.train",
            "train a method (or write a baseline's checkpoint) on cached features"),
    Command("eval", "cirfusion.commands.eval",
            "metrics of a checkpoint on a dataset split (test splits: submission files)"),
    Command("fuse", "cirfusion.commands.fuse",
            "DAFM fusion of several trained checkpoints (frozen) with a tiny learned network"),
    Command("index", "cirfusion.commands.index", "build a faiss index of a gallery for cirfusion search"),
    Command("search", "cirfusion.commands.search",
            "top-k gallery images for a reference image + text (index or checkpoint)"),
    Command("parse", "cirfusion.commands.parse",
            "parse modification texts into scene graphs (entities, attributes, relations, edits)"),
)

# OSErrors that are about the user's files or machine, not about cirfusion: reported in one line, exit 2.
_USER_OS_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)
_USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.ELOOP, errno.ENAMETOOLONG, errno.EROFS}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser; each command's own arguments are added when argparse reaches its name."""
    parser = argparse.ArgumentParser(prog="cirfusion",
                                     description="Composed image retrieval: train, evaluate, fuse, search.")
    parser.add_argument("--version", action="version", version=f"cirfusion {__version__}")
    add_lazy_subcommands(parser, COMMANDS, dest="command", metavar="COMMAND")
    return parser


def is_expected(exc: BaseException) -> bool:
    """Whether ``exc`` is a known failure (bad input, a missing or unreadable path, a full disk), not a bug."""
    if isinstance(exc, CirfusionError):
        return True
    if isinstance(exc, OSError):
        return isinstance(exc, _USER_OS_ERRORS) or exc.errno in _USER_ERRNOS
    return False


def error_line(exc: BaseException) -> str:
    """The message of an expected error as one line: the file and what is wrong with it."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        text = f"{exc.filename}: {exc.strerror}"
        if exc.filename2 is not None:
            text = f"{exc.filename} -> {exc.filename2}: {exc.strerror}"
    else:
        text = str(exc) or type(exc).__name__
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (see the module docstring)."""
    try:
        parser = build_parser()
        args = parser.parse_args(argv)  # usage errors and --help exit here (SystemExit 2 / 0)
        rc = args.func(args)
    except KeyboardInterrupt:
        print("cirfusion: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if is_expected(exc):
            print(f"cirfusion: error: {error_line(exc)}", file=sys.stderr)
            return 2
        traceback.print_exc()
        print("cirfusion: internal error: this is a bug; please report it with the traceback above", file=sys.stderr)
        return 1
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
