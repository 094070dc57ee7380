"""`cirfusion list`: the registered methods, backbones and datasets (built-in ones and any plug-in's), i.e. the
values that METHOD, --backbone and --dataset accept."""

from __future__ import annotations

import argparse
import json

from ..backbones import list_backbones
from ..data.registry import list_datasets
from ..methods.registry import list_methods


def registered() -> dict[str, list[str]]:
    """``{"methods": [...], "trainable_methods": [...], "backbones": [...], "datasets": [...]}``, each sorted."""
    return {"methods": list_methods(), "trainable_methods": list_methods(trainable=True),
            "backbones": list_backbones(), "datasets": list_datasets()}


def format_listing(reg: dict[str, list[str]]) -> str:
    trainable = set(reg["trainable_methods"])
    lines = ["methods (cirfusion train METHOD; 'no parameters': a baseline without training):"]
    lines += [f"  {m}" + ("" if m in trainable else "  (no parameters)") for m in reg["methods"]]
    lines.append("backbones (--backbone NAME; hf-clip, hf-blip2 and multi take NAME:ARGUMENT, see the README):")
    lines += [f"  {b}" for b in reg["backbones"]]
    lines.append("datasets (--dataset NAME):")
    lines += [f"  {d}" for d in reg["datasets"]]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    reg = registered()
    print(json.dumps(reg, indent=2) if args.json else format_listing(reg))
    return 0


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("list", help="the registered methods, backbones and datasets",
                       description="Print the registered methods, backbones and datasets: the values METHOD, "
                                   "--backbone and --dataset accept.")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)
