"""`cirfusion data stats DATASET --root DIR --split S`: counts of a dataset split, read from its annotations only
(no image is opened), and optionally the query/gallery order that score matrices follow (--ids OUT.json)."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from ..data.registry import load_dataset
from ..data.schema import CIRDataset
from ..io import atomic_write_json
from ._common import loader_options


def _summary(values: list[int]) -> dict[str, float | int] | None:
    if not values:
        return None
    return {"min": min(values), "mean": round(sum(values) / len(values), 4), "max": max(values)}


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


def compute_stats(ds: CIRDataset, dataset: str | None = None) -> dict[str, Any]:
    """Counts and distributions of one split (JSON-serialisable)."""
    qs = ds.queries
    with_t = [q for q in qs if q.targets]
    with_sub = [q for q in qs if q.subset is not None]
    with_fine = [q for q in qs if q.finemt is not None]
    used: set[str] = set()
    for q in qs:
        used.add(q.reference)
        used.update(q.targets)
        used.update(q.subset or ())
    return {
        "dataset": dataset or ds.name,
        "key": ds.key,
        "split": ds.split,
        "category": ds.category,
        "queries": len(qs),
        "gallery": len(ds.gallery),
        "queries_with_targets": len(with_t),
        "targets": sum(len(q.targets) for q in qs),
        "targets_per_query": _summary([len(q.targets) for q in with_t]),
        "queries_with_subset": len(with_sub),
        "subset_size": _summary([len(q.subset or ()) for q in with_sub]),
        "subset_sizes": {str(k): v for k, v in sorted(Counter(len(q.subset or ()) for q in with_sub).items())},
        "captions_per_query": _summary([len(q.captions) for q in qs]),
        "queries_with_finemt": len(with_fine),
        "finemt_items_per_query": _summary([len(q.finemt or ()) for q in with_fine]),
        "queries_with_scene_graph": sum(q.scene_graph is not None for q in qs),
        "empty_texts": sum(not q.text.strip() for q in qs),
        "mean_text_words": round(sum(len(q.text.split()) for q in qs) / len(qs), 3) if qs else None,
        "unique_references": len({q.reference for q in qs}),
        "reference_in_targets": sum(q.reference in q.targets for q in qs),
        "gallery_images_used": len(used),
        "exclude_reference": ds.exclude_reference,
        "text_policy": ds.text_policy,
        "files": [str(f) for f in ds.files],
        "meta": _jsonable(ds.meta),
    }


def _print_human(stats: dict[str, Any], out: Any) -> None:
    for k, v in stats.items():
        if v is None or v == {} or v == []:
            continue
        if isinstance(v, (dict, list)):
            v = json.dumps(v, ensure_ascii=False)
        print(f"{k}: {v}", file=out)


def handler(args: argparse.Namespace) -> int:
    kwargs = loader_options(args.dataset, args.option or [], category=args.category, which=args.which)
    ds = load_dataset(args.dataset, args.root, args.split, **kwargs)  # a bad split or option: an OptionError
    ds.validate()  # a DataError names the file and entry; cli.main prints it in one line (exit 2)
    stats = compute_stats(ds, args.dataset)
    if args.ids is not None:
        atomic_write_json(args.ids, {"queries": [q.qid for q in ds.queries], "gallery": list(ds.gallery.ids)}, indent=None)
        stats["ids_written"] = str(args.ids)
    if args.json:
        print(json.dumps(stats, indent=2, ensure_ascii=False))
    else:
        _print_human(stats, sys.stdout)
    return 0


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser(
        "stats",
        help="query/gallery counts of a dataset split (annotations only, no image needed)",
        description="Load a dataset split from its annotation files and print its counts. "
        "--ids writes the query order (rows) and gallery order (columns) that score matrices follow.",
    )
    p.add_argument("dataset", help="registered dataset name (cirr, fashioniq, shoes, circo, finecir, custom, ...)")
    p.add_argument("--root", required=True, type=Path, help="dataset folder")
    p.add_argument("--split", required=True, help="split name (train, val, test1, ...)")
    p.add_argument("--category", help="FashionIQ category (dress, shirt, toptee); also for finecir --which fiq")
    p.add_argument("--which", help="finecir: cirr or fiq")
    p.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE",
                   help="extra loader keyword argument, repeatable; VALUE is JSON (true, 3, \"x\") or a bare word, "
                        "checked against what the loader accepts")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--ids", type=Path, metavar="OUT.json", help='write {"queries": [qid...], "gallery": [id...]}')
    p.set_defaults(func=handler)
