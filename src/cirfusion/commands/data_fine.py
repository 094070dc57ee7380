"""`cirfusion data make-fine DATASET --root DIR --out OUT`: coarse -> fine modification texts in the released
Fine-CIRR / Fine-FashionIQ layout (see cirfusion.data.fine)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..backbones import create_backbone
from ..data.fine import (
    KNOWN_EDITS,
    LAYOUTS,
    BackboneRetrieval,
    gallery_base,
    known_finemt,
    make_fine_generated,
    write_fine,
)
from ..data.fine_hf import HFFineGenerator
from ..data.registry import load_dataset
from ..io import atomic_write_json
from ..methods import create_method
from ..options import OptionError
from ._common import add_dataset_args, dataset_kwargs
from ._features import add_feature_args, make_cache


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser(
        "make-fine",
        help="coarse -> fine modification texts (numbered atomic edits) in the Fine-CIRR / Fine-FashionIQ layout",
        description="The synthetic and catalog benchmarks: finemt from the known edits. Any other dataset: the "
        "FineCIR annotation pipeline with local models: select pairs, draft with an image-text-to-text model "
        "(--vlm DIR) and clean with an LLM (--llm DIR), drop texts that text-only or image-only retrieval with "
        "--backbone (aligned) already solves, compress to the text encoder's length. Read the result with "
        "--dataset finecir --root OUT (generated benchmarks: --option image_dir=<their root>).",
    )
    add_dataset_args(p, positional=True)
    p.add_argument("--out", required=True, type=Path, help="output directory (captions/, image_splits/, fine.json)")
    p.add_argument("--splits", default="train,val,test", help="comma-separated splits (default train,val,test)")
    p.add_argument("--layout", choices=LAYOUTS, default=None,
                   help="cirr (pairid/reference/target_hard/img_set) or fiq (candidate/target); default: fiq for "
                        "fashioniq, else cirr")
    p.add_argument("--vlm", type=Path, help="image-text-to-text model directory (real datasets)")
    p.add_argument("--llm", type=Path, help="causal LLM directory (real datasets)")
    p.add_argument("--backbone", default=None, help="aligned backbone for the step-3 retrieval filter (real datasets)")
    p.add_argument("--max-pairs", type=int, default=None, help="step 1: at most N pairs per split (seeded sample)")
    p.add_argument("--solved-k", type=int, default=1, help="step 3: drop a text whose target text-only or image-only "
                                                            "retrieval ranks within the top K (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=96)
    add_feature_args(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    if not splits:
        raise OptionError("make-fine: --splits names no split")
    kwargs = dataset_kwargs(args)
    known = args.dataset in KNOWN_EDITS
    layout = args.layout or ("fiq" if args.dataset == "fashioniq" else "cirr")
    if known and layout != "cirr":
        raise OptionError(f"make-fine: {args.dataset} is written in the cirr layout (it has no FashionIQ category)")
    gen: Any = None
    if not known:
        if args.vlm is None or args.llm is None or args.backbone is None:
            raise OptionError(f"make-fine: dataset {args.dataset!r} has no known edits; give --vlm DIR, --llm DIR and "
                              "an aligned --backbone for the generator pipeline")
        gen = HFFineGenerator(args.vlm, args.llm, max_new_tokens=args.max_new_tokens)
        cache = make_cache(args, create_backbone(args.backbone))
    report: dict[str, Any] = {"source": {"dataset": args.dataset, "root": str(Path(args.root).resolve()), **kwargs},
                              "layout": layout, "pipeline": "known edits" if known else "generator", "splits": {}}
    datasets = {split: load_dataset(args.dataset, args.root, split, **kwargs) for split in splits}
    base = gallery_base(list(datasets.values())) if known else None
    for split, ds in datasets.items():
        if known:
            fine, info = known_finemt(ds), {"queries": len(ds.queries)}
        else:
            retrieval = BackboneRetrieval(cache, ds, create_method("image-only", cache.backbone))
            fine, info = make_fine_generated(ds, gen, retrieval, args.max_pairs, args.seed, args.solved_k)
        files = write_fine(args.out, ds, fine, layout, write_gallery=known, base_dir=base)
        report["splits"][split] = {**info, "written": len(fine), "files": [str(f) for f in files]}
    if base is not None:
        report["image_dir"] = str(base)
        report["read_back"] = f"--dataset finecir --root {args.out} --option image_dir={base}"
    atomic_write_json(args.out / "fine.json", report)
    if args.json:
        print(json.dumps(report))
    else:
        for split, r in report["splits"].items():
            print(f"{split}: {r['written']} fine texts -> {', '.join(r['files'])}", file=sys.stdout)
    return 0
