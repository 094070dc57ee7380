"""`cirfusion quickstart [--photos DIR] [--out DIR]`: the main job on the embedded default, no arguments needed.

Generates the synthetic scene-graph benchmark (and, with --photos, the real-photo catalog benchmark), trains the
DAFM base pool (CLIP4CIR, BLIP4CIR+Bi, TG-CIR, SPRC) next to the image-only baseline on cached EfficientNet-Lite0 +
MiniLM features, fuses the pool with DAFM, trains DetailFusion and FineCIR next to the pool (not fused; on the
synthetic benchmark they read the fine text), evaluates everything on the test splits and writes into --out:

    report.html      metrics tables and sample queries (reference, text, top-5, target marked, fusion weights,
                     DetailFusion's branch weights alpha, FineCIR's parsed scene graph)
    results.json     benchmark -> method -> metric -> value
    manifest.json    backbone, weights hash, data file hashes, seed, timings, checkpoints
    runs/B/M/best    every checkpoint (`cirfusion eval`, `cirfusion search`, `cirfusion.load`)

A re-run reuses the generated benchmarks and the feature cache and retrains (same seed, same numbers).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..quickstart import POOL, QuickstartConfig, format_results, parse_pool_backbones, run_quickstart


def parse_stage_epochs(items: list[str]) -> dict[str, int] | None:
    """``["STAGE=N", ...]`` -> ``{stage: n}`` (None when none is given: the defaults)."""
    if not items:
        return None
    out: dict[str, int] = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not k.strip() or not v.strip().isdigit():
            raise ValueError(f"--detailfusion-stage-epochs expects STAGE=N, got {item!r}")
        out[k.strip()] = int(v)
    return out


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    d = QuickstartConfig()
    p = sub.add_parser("quickstart", help="build the embedded benchmarks, train the pool and DAFM, write a report",
                       description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(d.out), help=f"output directory (default: {d.out})")
    p.add_argument("--photos", type=Path, default=None,
                   help="labelled photo folder <split>/<category>/*.jpg for the catalog benchmark "
                        "(e.g. ../shared/data/clothing-small); without it only the synthetic benchmark runs")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--n-images", type=int, default=d.n_images, help=f"synthetic benchmark images (default {d.n_images})")
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"epochs per base method (default {d.epochs})")
    p.add_argument("--catalog-epochs", type=int, default=d.catalog_epochs,
                   help=f"epochs per base method on the catalog benchmark (default {d.catalog_epochs})")
    p.add_argument("--fusion-epochs", type=int, default=d.fusion_epochs)
    p.add_argument("--fusion-min-steps", type=int, default=d.fusion_min_steps,
                   help=f"at least this many fusion training steps (default {d.fusion_min_steps})")
    p.add_argument("--methods", default=",".join(POOL), help=f"comma-separated base pool (default {','.join(POOL)})")
    p.add_argument("--backbone", default=d.backbone, help=f"backbone name (default {d.backbone})")
    p.add_argument("--pool-backbone", action="append", default=[], metavar="METHOD=BACKBONE",
                   help="train this base method on another backbone (repeatable), e.g. tg-cir=colour; the fused "
                        "model reads the backbones side by side. Default with the embedded backbone: "
                        "clip4cir=colour tg-cir=colour sprc=colour; 'none': every method on --backbone")
    p.add_argument("--no-fuse", action="store_true", help="skip the DAFM fusion")
    p.add_argument("--no-detailfusion", action="store_true", help="skip DetailFusion")
    p.add_argument("--no-finecir", action="store_true", help="skip FineCIR")
    p.add_argument("--detailfusion-stage-epochs", action="append", default=[], metavar="STAGE=N",
                   help="DetailFusion epochs of a stage (di-pretrain, joint, compositor; repeatable); default "
                        "di-pretrain=2 joint=3 compositor=1 (catalog: 1 each)")
    p.add_argument("--finecir-epochs", type=int, default=None, help="FineCIR epochs (default 2; catalog 1)")
    p.add_argument("--extra-text", choices=("fine", "coarse"), default=d.extra_text,
                   help=f"the synthetic text DetailFusion and FineCIR read (default {d.extra_text}; the pool reads coarse)")
    p.add_argument("--catalog-limit", type=int, default=None, help="use at most N photos (seeded sample)")
    p.add_argument("--cache-dir", type=Path, default=None, help="feature cache (default: OUT/cache)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads for everything the command does (default: per workload, "
                        "1 for training and fusion fitting, every core for backbone features; see cirfusion.threads)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    try:
        pool_backbones = parse_pool_backbones(args.pool_backbone, methods)
    except ValueError as exc:
        print(f"cirfusion quickstart: error: {exc}", file=sys.stderr)
        return 2
    try:
        stage_epochs = parse_stage_epochs(args.detailfusion_stage_epochs)
    except ValueError as exc:
        print(f"cirfusion quickstart: error: {exc}", file=sys.stderr)
        return 2
    cfg = QuickstartConfig(out=args.out, photos=args.photos, seed=args.seed, n_images=args.n_images, epochs=args.epochs, catalog_epochs=args.catalog_epochs,
                           fusion_epochs=args.fusion_epochs, fusion_min_steps=args.fusion_min_steps, methods=methods, backbone=args.backbone,
                           pool_backbones=pool_backbones, cache_dir=args.cache_dir,
                           catalog_limit=args.catalog_limit, fuse=not args.no_fuse, progress=not args.no_progress,
                           detailfusion=not args.no_detailfusion, finecir=not args.no_finecir,
                           detailfusion_stage_epochs=stage_epochs, finecir_epochs=args.finecir_epochs,
                           extra_text=args.extra_text,
                           threads=args.threads)
    t0 = time.perf_counter()
    try:
        summary = run_quickstart(cfg)
    except KeyError as exc:  # unknown method name
        print(f"cirfusion quickstart: error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    results = json.loads((Path(args.out) / "results.json").read_text(encoding="utf-8"))
    print()
    print(format_results(results))
    print(f"report: {summary['report']}")
    print(f"results: {Path(args.out) / 'results.json'}; manifest: {Path(args.out) / 'manifest.json'}")
    print(f"quickstart wall time: {time.perf_counter() - t0:.1f} s")
    return 0
