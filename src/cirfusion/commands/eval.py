"""`cirfusion eval CHECKPOINT --dataset D --root DIR --split S`: retrieval metrics of a trained checkpoint.

The checkpoint's backbone (recorded in its config.json, weights hash checked) encodes the split through the
feature cache; the whole gallery is scored in query chunks. Prints a metrics table (--json: JSON; --save FILE:
also write the JSON). --category dress,shirt,toptee evaluates several FashionIQ categories and adds their
average. Test splits of CIRR and CIRCO have no targets: their validated test-server submission files are written
to --submission-dir (default submissions/) instead.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..api import load
from ..data.registry import load_dataset
from ..data.schema import DataError
from ..evaluation import evaluate, score_blocks
from ..io import atomic_write_json
from ..metrics import fashioniq_summary
from ..submission import write_circo_submission, write_cirr_submission
from ..threads import set_override
from ..views import FeatureView
from ._common import add_dataset_args, dataset_kwargs, format_metrics
from ._features import add_backbone_access_args, add_feature_args, make_cache, split_data

__all__ = ["SUBMISSION_DATASETS", "register", "run"]

SUBMISSION_DATASETS = ("cirr", "circo")


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("eval", help="metrics of a checkpoint on a dataset split (test splits: submission files)",
                       description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="checkpoint directory (e.g. runs/clip4cir-synthetic-train/best)")
    add_dataset_args(p, positional=False)
    p.add_argument("--split", required=True, help="split to evaluate, e.g. val or test1")
    add_feature_args(p)
    add_backbone_access_args(p)
    p.add_argument("--chunk", type=int, default=512, help="queries scored at once")
    p.add_argument("--submission-dir", type=Path, default=Path("submissions"),
                   help="where CIRR/CIRCO test-split submission files go (default: submissions/)")
    p.add_argument("--save", type=Path, default=None, metavar="FILE.json", help="also write the results JSON here")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.threads:
        set_override(args.threads)
    progress = not args.no_progress
    # a CheckpointError names the file; cli.main prints it in one line. The checkpoint's backbone is read only from
    # the checkpoint, --backbone-dir or files shipped with cirfusion (the hub with --allow-download)
    model = load(args.checkpoint, backbone_dirs=args.backbone_dir, allow_download=args.allow_download)
    backbone = model.backbone
    method = model.method
    cache = make_cache(args, backbone)
    kw = dataset_kwargs(args)
    categories = [c.strip() for c in kw.pop("category").split(",")] if "category" in kw else [None]

    results = []
    for cat in categories:
        ds = load_dataset(args.dataset, args.root, args.split, **kw, **({"category": cat} if cat else {}))
        data = split_data(cache, ds, training=False, progress=progress)
        entry: dict[str, Any] = {"dataset": ds.key, "category": cat, "num_queries": len(ds.queries), "num_gallery": len(ds.gallery)}
        if ds.has_targets:
            entry["metrics"] = evaluate(method, data, chunk=args.chunk, progress=progress)
        elif args.dataset in SUBMISSION_DATASETS:
            name = f"{model.config['method']}-{ds.split}"
            blocks = ((s, b.numpy()) for s, b in score_blocks(method, FeatureView(data.images, data.texts), ds, args.chunk, progress))
            paths: tuple[Path, ...]
            if args.dataset == "cirr":
                paths = write_cirr_submission(blocks, ds, args.submission_dir, name)
            else:
                paths = (write_circo_submission(blocks, ds, args.submission_dir, name),)
            entry["submission"] = [str(p) for p in paths]
        else:
            raise DataError(ds.files[0] if ds.files else None, None,
                            f"{ds.key} has no targets: nothing to evaluate (submission files exist for {SUBMISSION_DATASETS})")
        results.append(entry)

    out: dict[str, Any] = {"checkpoint": str(args.checkpoint), "method": model.config["method"],
                           "backbone": model.backbone_id, "split": args.split, "results": results}
    if len(results) > 1 and all("metrics" in r for r in results):
        out["average"] = fashioniq_summary({r["category"]: r["metrics"] for r in results})
    if args.save:
        atomic_write_json(args.save, out)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    for r in results:
        if "metrics" in r:
            print(format_metrics(f"{out['method']} on {r['dataset']} ({r['num_queries']} queries, {r['num_gallery']} images)", r["metrics"]))
        else:
            print(f"{out['method']} on {r['dataset']}: test split without targets; submission written to:")
            for p in r["submission"]:
                print(f"  {p}")
        print()
    if "average" in out:
        print(format_metrics("average over categories", out["average"]))
    return 0
