"""`cirfusion eval-scores`: metrics of a saved score matrix, so any model's scores can be evaluated (and our
metric code cross-checked) without cirfusion producing them.

The matrix is a 2-D .npy file: rows follow the query order of the captions file, columns the image order of the
split file (CIRR: keys of split.rc2.S.json in file order; FashionIQ: the split.CATEGORY.S.json list), i.e. the
order of CIRDataset.queries and CIRDataset.gallery; cirfusion data stats ... --ids OUT.json writes both orders.
It is memory-mapped and read in row blocks, never loaded whole.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..data.registry import load_dataset
from ..data.schema import CIRDataset, DataError
from ..metrics import ScoresError, evaluate_scores, fashioniq_summary
from ._common import format_metrics, loader_options


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser(
        "eval-scores",
        help="metrics (Recall@K, Recall_subset@K, Rmean, mAP@K) of a saved (queries x gallery) score matrix",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dataset", required=True, help="dataset name (cirr, fashioniq, circo, shoes, ...)")
    p.add_argument("--root", required=True, help="dataset root directory")
    p.add_argument("--split", required=True, help="split whose queries/gallery the matrix follows, e.g. val")
    p.add_argument("--scores", required=True, action="append", metavar="FILE.npy",
                   help="score matrix (higher = better); repeat together with --category to evaluate several "
                   "FashionIQ categories and print their average")
    p.add_argument("--category", action="append", default=None,
                   help="FashionIQ/FineCIR category (dress, shirt, toptee); one per --scores, in the same order")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="extra keyword passed to the dataset loader (repeatable); VALUE is JSON or a bare word, "
                   "checked against what the loader accepts")
    p.add_argument("--exclude-reference", dest="exclude_reference", action=argparse.BooleanOptionalAction,
                   default=None, help="remove each query's reference image from its ranking (default: the "
                   "dataset's convention, e.g. on for CIRR)")
    p.add_argument("--chunk", type=int, default=1024, help="rows per block (memory ~ 4 x chunk x gallery floats)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=run)


def load_scores(path: str | Path) -> np.ndarray:
    """Memory-map a 2-D numeric ``.npy`` (never unpickles); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: score file does not exist")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(path, None, f"not a readable numeric .npy file: {exc}") from exc
    if not isinstance(arr, np.ndarray):
        raise DataError(path, None, "expected a single .npy array (got an .npz archive?)")
    if arr.dtype.kind not in "fiu":
        raise DataError(path, None, f"scores must be real numbers, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise DataError(path, None, f"score matrix must be 2-D (queries x gallery), got shape {arr.shape}")
    return arr


def evaluate_file(path: str | Path, ds: CIRDataset, exclude_reference: bool | None, chunk: int) -> dict[str, float]:
    """Metrics of the score file ``path`` for ``ds``; every problem is a :class:`DataError` naming the file."""
    scores = load_scores(path)
    want = (len(ds.queries), len(ds.gallery))
    if scores.shape != want:
        raise DataError(path, None, f"score matrix has shape {scores.shape} but {ds.key} needs {want} "
                        f"({want[0]} queries in captions-file order x {want[1]} gallery images in split-file order)")
    try:
        res = evaluate_scores(scores, ds, chunk=chunk, exclude_reference=exclude_reference)
    except ScoresError as exc:
        raise DataError(path, None, str(exc)) from exc
    if res["num_queries_evaluated"] == 0:
        raise DataError(path, None, f"{ds.key} has no targets (a test split?): nothing to evaluate; write a "
                        "test-server submission instead (cirfusion.submission)")
    return res


def run(args: argparse.Namespace) -> int:
    cats = args.category or [None]
    if len(cats) != len(args.scores):
        print(f"cirfusion eval-scores: error: give one --scores per --category "
              f"(got {len(args.scores)} --scores and {len(cats)} --category)", file=sys.stderr)
        return 2
    if len(set(cats)) != len(cats):
        print(f"cirfusion eval-scores: error: a --category is repeated: {cats}", file=sys.stderr)
        return 2
    results = []
    for cat, path in zip(cats, args.scores, strict=True):
        kw = loader_options(args.dataset, args.option, category=cat)
        ds = load_dataset(args.dataset, args.root, args.split, **kw)
        excl = ds.exclude_reference if args.exclude_reference is None else args.exclude_reference
        metrics = evaluate_file(path, ds, excl, args.chunk)
        results.append({"dataset": ds.key, "category": cat, "scores": str(path), "exclude_reference": excl,
                        "metrics": metrics})
    average = fashioniq_summary({r["category"]: r["metrics"] for r in results}) if len(results) > 1 else None

    if args.json:
        out: dict[str, Any] = results[0] if average is None else {"results": results, "average": average}
        print(json.dumps(out, indent=2))
        return 0
    for r in results:
        m = r["metrics"]
        title = (f"{r['dataset']}  scores={r['scores']}  reference "
                 f"{'excluded from' if r['exclude_reference'] else 'kept in'} the ranking")
        print(format_metrics(title, m))
        print()
    if average is not None:
        print(format_metrics("FashionIQ average over categories", average))
    return 0
