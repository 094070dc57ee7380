"""`cirfusion data make-catalog --photos DIR --out DIR --seed S`: embedded benchmark B from a labelled catalog."""

from __future__ import annotations

import argparse
import json
import sys
import time

from ..data.catalog import (
    EDIT_KINDS,
    QUERY_KINDS,
    CatalogConfig,
    benchmark_stats,
    build_catalog,
    format_stats,
)
from ..options import OptionError


def _kinds(value: str, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    ks = tuple(k.strip() for k in value.split(",") if k.strip())
    bad = [k for k in ks if k not in allowed]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(bad)}; choose from {', '.join(allowed)}")
    return ks


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser(
        "make-catalog",
        help="build CIR triplets (category/colour/edit queries) from a folder of photos labelled by category",
        description="Reads <photos>/<split>/<category>/*.jpg (split folders train, val|validation|valid|dev, test), "
        "<photos>/<category>/*.jpg, or a CSV path,category[,split]; photos without a split get one from their "
        "content hash (80/10/10). Estimates each item's named dominant colour, writes resized photos and "
        "programmatic edits to a reusable cache, and writes queries of four kinds: category change, colour "
        "change, both, and edit (target = an edit of the reference; subset = reference + its edits). "
        "Kinds category/colour/both list every matching gallery image as a target. Read it back with "
        "dataset name 'catalog' (--root OUT). Building again into the same --out replaces its annotations/ folder, "
        "but only one that make-catalog wrote; the photo and edit cache is reused.",
    )
    p.add_argument("--photos", help="photo folder (or the base folder for relative paths in --csv)")
    p.add_argument("--csv", help="CSV listing path,category[,split] (optional header row)")
    p.add_argument("--out", required=True, help="output directory (annotations/ and, by default, cache/)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", help="where resized photos and edits are cached (default OUT/cache); reused across builds")
    p.add_argument("--image-size", type=int, default=256, help="shorter side of cached photos and edits in pixels (default 256)")
    p.add_argument(
        "--edit-fraction",
        type=float,
        default=0.15,
        help="share of each split's photos (per category, at least one) that get one edit of every kind (default 0.15)",
    )
    p.add_argument(
        "--kinds",
        type=lambda v: _kinds(v, QUERY_KINDS, "query kind"),
        default=QUERY_KINDS,
        help=f"comma-separated query kinds (default {','.join(QUERY_KINDS)}); without 'edit' no edits are made",
    )
    p.add_argument(
        "--edit-kinds",
        type=lambda v: _kinds(v, EDIT_KINDS, "edit kind"),
        default=EDIT_KINDS,
        help=f"comma-separated edit kinds (default {','.join(EDIT_KINDS)})",
    )
    p.add_argument("--min-positives", type=int, default=2, help="minimum matching images (besides the reference's own) for a category/colour/both target (default 2)")
    p.add_argument("--max-per-category", type=int, help="keep at most N photos per split and category (seeded sample)")
    p.add_argument("--limit", type=int, help="keep at most N photos in total (seeded sample)")
    p.add_argument("--skip-bad", action="store_true", help="leave out unreadable photos (listed in the manifest) instead of failing")
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.photos and not args.csv:
        raise OptionError("make-catalog: give --photos DIR or --csv FILE")
    cfg = CatalogConfig(  # a bad value is an OptionError: one line, exit 2 (cli.main)
        seed=args.seed,
        image_size=args.image_size,
        edit_fraction=args.edit_fraction,
        kinds=args.kinds,
        edit_kinds=args.edit_kinds,
        min_positives=args.min_positives,
        max_per_category=args.max_per_category,
        limit=args.limit,
        skip_bad=args.skip_bad,
    )
    t0 = time.time()
    m = build_catalog(
        args.out, photos=args.photos, csv_path=args.csv, config=cfg, cache_dir=args.cache_dir,
        workers=args.workers, progress=not args.no_progress,
    )
    stats = benchmark_stats(args.out)
    if args.json:
        print(json.dumps(stats, indent=2))
    else:
        print(format_stats(stats))
        print(f"wrote {args.out}/annotations ({time.time() - t0:.1f} s)")
    for s in m.get("skipped", []):
        print(f"cirfusion: skipped bad photo {s['path']}: {s['error']}", file=sys.stderr)
    return 0
