"""Argument helpers shared by the CLI verbs: the dataset arguments, the loader's ``--option KEY=VALUE`` checked
against the loader's signature, and the metrics table."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from ..data.registry import dataset_loader
from ..options import OptionError, accepted_options, check_options, describe_accepted, parse_pairs

# Every loader is called as loader(root, split, **options): those two come from --root and --split.
LOADER_POSITIONAL = ("root", "split")


def add_dataset_args(p: argparse.ArgumentParser, positional: bool = False) -> None:
    """``DATASET`` (positional) or ``--dataset``, ``--root``, ``--category``, ``--option KEY=VALUE`` (repeatable)."""
    if positional:
        p.add_argument("dataset", help="dataset name (see cirfusion list)")
    else:
        p.add_argument("--dataset", required=True, help="dataset name (see cirfusion list)")
    p.add_argument("--root", required=True, help="dataset root directory")
    p.add_argument("--category", default=None, help="FashionIQ/FineCIR category: dress, shirt or toptee")
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra keyword passed to the dataset loader (repeatable); VALUE is JSON (true, 3, \"x\") or a bare "
        "word, checked against what the loader accepts, e.g. --option text=fine (a text that looks like a number "
        "is quoted: --option 'name=\"123\"')",
    )


def loader_options(dataset: str, items: Sequence[str], **flags: Any) -> dict[str, Any]:
    """The keyword arguments for dataset ``dataset``'s loader: ``--option`` items (JSON values) plus the options
    given by their own flags (``category=...``; ``None`` = not given), each checked against the loader's signature.
    An unknown key or a wrong type raises :class:`OptionError` listing the valid keys and their types, so
    ``exclude_reference=false`` is ``False`` and ``exclude_reference=0`` or ``=flase`` is refused."""
    accepted = accepted_options(dataset_loader(dataset), skip=LOADER_POSITIONAL)
    opts = check_options(parse_pairs(items, "--option"), accepted, f"--option for dataset {dataset!r}")
    given = {k: v for k, v in flags.items() if v is not None}
    refused = sorted(k for k in given if k not in accepted)
    if refused:
        raise OptionError(f"dataset {dataset!r} does not take these options {refused}; "
                          f"valid options: {describe_accepted(accepted)}")
    for k in given:
        if k in opts:
            raise OptionError(f"--{k} and --option {k}=... are both given")
    opts.update(check_options(given, accepted, f"dataset {dataset!r}"))
    return opts


def dataset_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The loader keyword arguments of ``add_dataset_args``' flags (``--option`` items and ``--category``)."""
    return loader_options(args.dataset, getattr(args, "option", None) or [], category=getattr(args, "category", None))


def format_metrics(title: str, metrics: dict[str, Any]) -> str:
    """A two-column table; metric values as percentages with 2 decimals, counts as integers."""
    width = max((len(k) for k in metrics), default=6)
    lines = [title, f"  {'metric':<{width}}  value"]
    for k, v in metrics.items():
        s = str(v) if isinstance(v, int) or k.startswith("num_") else f"{v:.2f}"
        lines.append(f"  {k:<{width}}  {s:>6}")
    return "\n".join(lines)
