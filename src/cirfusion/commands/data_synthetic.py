"""`cirfusion data make-synthetic`: generate embedded benchmark A (synthetic scene-graph CIR)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from ..data.synthetic import generate


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser(
        "make-synthetic",
        help="generate the synthetic scene-graph CIR benchmark (rendered scenes, fine/coarse texts, subsets, edit pairs)",
        description="Render the synthetic scene-graph CIR benchmark into --out. Deterministic given --seed and the "
        "size options. Read it back with --dataset synthetic --root OUT (text: coarse by default, or fine).",
    )
    p.add_argument("--out", required=True, help="output directory (must be absent or empty unless --overwrite)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--n-images", type=int, default=6000, help="total images over train/val/test (default 6000)")
    p.add_argument("--image-size", type=int, default=128, help="image side in pixels (default 128)")
    p.add_argument("--splits", default="0.7,0.1,0.2", help="train,val,test fractions of the images (default 0.7,0.1,0.2)")
    p.add_argument("--train-queries-per-image", type=float, default=2.0, help="train queries per train image (default 2)")
    p.add_argument("--eval-queries-per-image", type=float, default=1.0, help="val/test queries per image (default 1)")
    p.add_argument("--edit-pairs-per-image", type=float, default=1.0, help="edit pairs per image, every split (default 1)")
    p.add_argument("--n-held-out", type=int, default=6, help="colour x shape combinations held out of train/val (default 6)")
    p.add_argument("--held-out-test-share", type=float, default=0.4,
                   help="share of test clusters built around a held-out combination (default 0.4)")  # fmt: skip
    p.add_argument("--train-scenes", type=int, default=None,
                   help="train split made of this many distinct base scenes (default: --splits' share of the images)")
    p.add_argument("--train-scene-images", type=int, default=None, help="at most this many images per train scene")
    p.add_argument("--pretrain-scenes", type=int, default=0,
                   help="extra base scenes (split 'pretrain') carrying only stage-1 atomic edit pairs (default 0)")
    p.add_argument("--pretrain-scene-images", type=int, default=12, help="images per pretrain scene (default 12)")
    p.add_argument("--pretrain-pairs-per-image", type=float, default=4.0, help="edit pairs per pretrain image (default 4)")
    p.add_argument("--workers", type=int, default=None, help="rendering processes (default: min(2, CPUs))")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory (only one written by make-synthetic)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the statistics as one JSON object only")
    p.set_defaults(func=handler)


def _fractions(text: str) -> list[float]:
    try:
        fr = [float(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"--splits must be three comma-separated numbers, got {text!r}") from None
    return fr


def handler(args: argparse.Namespace) -> int:
    try:
        fr = _fractions(args.splits)
        t0 = time.perf_counter()
        stats = generate(
            args.out,
            seed=args.seed,
            n_images=args.n_images,
            image_size=args.image_size,
            split_fractions=fr,
            train_queries_per_image=args.train_queries_per_image,
            eval_queries_per_image=args.eval_queries_per_image,
            edit_pairs_per_image=args.edit_pairs_per_image,
            n_held_out=args.n_held_out,
            held_out_test_share=args.held_out_test_share,
            train_scenes=args.train_scenes,
            train_scene_images=args.train_scene_images,
            pretrain_scenes=args.pretrain_scenes,
            pretrain_scene_images=args.pretrain_scene_images,
            pretrain_pairs_per_image=args.pretrain_pairs_per_image,
            workers=args.workers,
            overwrite=args.overwrite,
            progress=not args.no_progress and not args.json,
        )
        wall = time.perf_counter() - t0
    except ValueError as exc:
        # DataError is a ValueError too and names the file; both are user errors, not crashes.
        print(f"cirfusion data make-synthetic: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(stats))
        return 0
    print(format_stats(stats))
    n = sum(s["images"] for s in stats["splits"].values())
    print(f"generated {n} images in {wall:.1f} s ({n / wall:.0f} images/s) -> {args.out}")
    return 0


def format_stats(stats: dict[str, Any]) -> str:
    """A readable summary of cirfusion.data.synthetic.benchmark_stats."""
    lines = [f"synthetic benchmark v{stats['generator_version']}  seed={stats['seed']}  image_size={stats['image_size']}"]
    lines.append("held-out colour x shape: " + ", ".join(f"{c} {s}" for c, s in stats["held_out_combos"]))
    for split, s in stats["splits"].items():
        lines.append(
            f"[{split}] images={s['images']} clusters={s['clusters']} queries={s['queries']} "
            f"edit_pairs={s['edit_pairs']} held_out_share={s['held_out_share']:.3f}"
        )
        lines.append("   edits/query: " + "  ".join(f"{k}:{v}" for k, v in s["edits_per_query"].items()))
        lines.append("   edit kinds:  " + "  ".join(f"{k}:{v}" for k, v in s["edit_kinds"].items()))
        lines.append("   subset sizes: " + "  ".join(f"{k}:{v}" for k, v in s["subset_sizes"].items())
                     + "   distractors differ in: " + "  ".join(f"{k}:{v}" for k, v in s["distractor_details"].items()))  # fmt: skip
        lines.append(
            f"   words/text: coarse {s['words_per_text']['coarse']}, fine {s['words_per_text']['fine']};"
            f" coarse text omits an edit in {s['coarse_omits_an_edit_share']:.1%} of queries"
        )
    return "\n".join(lines)
