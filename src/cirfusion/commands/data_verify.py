"""`cirfusion data verify DATASET --root DIR [--split S]`."""

from __future__ import annotations

import argparse
import json
import sys

from ..data.registry import load_dataset
from ..data.verify import verify_dataset
from ._common import add_dataset_args, dataset_kwargs


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser(
        "verify",
        help="check every image a split needs and every cross-reference; exit 1 on any problem",
        description="Decodes every gallery image of the split (EXIF, RGB, size limit) and checks that every "
        "reference, target and subset member is in the gallery. Keeps going past bad files, prints a summary "
        "and each problem, and exits non-zero if there is any.",
    )
    add_dataset_args(p, positional=True)
    p.add_argument("--split", action="append", help="split(s) to check (repeatable; default: val)")
    p.add_argument("--no-images", action="store_true", help="check the annotations' cross-references only")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    splits = args.split or ["val"]
    reports = []
    for split in splits:
        ds = load_dataset(args.dataset, args.root, split, **dataset_kwargs(args))
        reports.append(verify_dataset(ds, check_images=not args.no_images, progress=not args.no_progress))
    if args.json:
        print(json.dumps([r.to_dict() for r in reports], indent=2))
    else:
        for r in reports:
            for prob in r.problems:
                print(prob)
            print(r.summary())
    bad = any(not r.ok for r in reports)
    if bad:
        print("cirfusion data verify: problems found", file=sys.stderr)
    return 1 if bad else 0
