"""DetailFusion ablation (issue 12): one table per benchmark, every choice on val, test read once at the end.

Rows: GM only, DI only, DI without the reference negative, DI without stage-1 pre-training, static fusion
(alpha = 0.5), adaptive fusion (full DetailFusion), the best pool model (chosen on val among ``--pool``).

- The full model is trained once per ``--gammas`` value; gamma is chosen on val (Rmean on synthetic, mAP@10 on the
  catalog). Its GM branch, its DI branch and its static fusion (the same branches, alpha = 0.5) are the "gm",
  "static" rows; "detailfusion" is its adaptive fusion.
- The DI rows are DI trained alone (``branches=di``) with and without the reference negative and pre-training;
  ``--seeds`` seeds each for DI and DI without the reference negative (the spread is printed: the paper's claim that
  the reference negative helps is measured, not assumed).
- Synthetic: the benchmark of ``--synthetic`` (made here when missing: ``--n-images`` images, seed 0, val/test
  queries per image ``--eval-queries-per-image``, plus ``--pretrain-scenes`` stage-1 scenes); fine texts
  (``--text``): with them the target is the only subset member consistent with the text.
- Catalog: ``--catalog`` (a ``make-catalog`` output); stage 1 on its train split's photo edits.
- ``--diversity 140,280``: the DI branch (no pre-training) on benchmarks whose train split has that many base scenes
  of ``--scene-images`` images each (val and test unchanged), val Rsubset@1 per value: the diversity curve.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/detailfusion_ablation.py --out bench-df --cache-dir CACHE

The last line of output is one JSON object (the issue's format) with every number, ``selection_split`` and ``seconds``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

METRICS = {"rsubset1": "Rsubset@1", "rmean": "Rmean", "r10": "R@10", "map10": "mAP@10"}


def pick(metrics: dict[str, float]) -> dict[str, float]:
    return {k: round(float(metrics[v]), 2) for k, v in METRICS.items() if v in metrics}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench-detailfusion"))
    p.add_argument("--cache-dir", type=Path, default=None, help="feature cache (default OUT/cache)")
    p.add_argument("--synthetic", type=Path, default=None, help="a synthetic benchmark (default: OUT/data/synthetic, made)")
    p.add_argument("--n-images", type=int, default=2500)
    p.add_argument("--eval-queries-per-image", type=float, default=3.0)
    p.add_argument("--pretrain-scenes", type=int, default=400)
    p.add_argument("--text", choices=("fine", "coarse"), default="fine")
    p.add_argument("--catalog", type=Path, default=None, help="a make-catalog output (optional)")
    p.add_argument("--backbone", default="embedded")
    p.add_argument("--epochs", type=int, default=6, help="epochs of the joint / DI-alone stage")
    p.add_argument("--pretrain-epochs", type=int, default=2)
    p.add_argument("--compositor-epochs", type=int, default=2)
    p.add_argument("--gammas", default="1.0", help="comma-separated gamma values, chosen on val")
    p.add_argument("--seeds", type=int, default=3, help="seeds of DI with / without the reference negative")
    p.add_argument("--pool", default="clip4cir", help="comma-separated pool methods; the best on val is reported")
    p.add_argument("--diversity", default="", help="comma-separated train scene counts for the DI diversity curve")
    p.add_argument("--scene-images", type=int, default=12)
    p.add_argument("--parts", default="full,di,noref,nopre,pool",
                   help="rows to train (to spread the work over processes): full (gm, static, detailfusion), di, noref, "
                        "nopre, pool")
    p.add_argument("--only-diversity", action="store_true", help="only the diversity curve (a second process)")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: synthetic, catalog")
    args = p.parse_args()
    torch.set_num_threads(1)  # 2 shared cores: 1 thread measured far faster than 2

    from cirfusion.backbones import create_backbone
    from cirfusion.checkpoint import load_checkpoint
    from cirfusion.data.registry import load_dataset
    from cirfusion.data.synthetic import generate
    from cirfusion.evaluation import evaluate
    from cirfusion.features import FeatureCache
    from cirfusion.methods.detailfusion import describe_alpha
    from cirfusion.methods.detailfusion_run import edit_pair_dataset, query_alphas, train_detailfusion
    from cirfusion.methods.registry import create_method
    from cirfusion.seeding import seed_everything
    from cirfusion.train import TrainConfig, train
    from cirfusion.views import load_split_data

    t_start = time.perf_counter()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    cache = FeatureCache(create_backbone(args.backbone), args.cache_dir or out / "cache")
    skip = {s for s in args.skip.split(",") if s}
    gammas = [float(g) for g in args.gammas.split(",") if g]
    parts = set(args.parts.split(","))
    result: dict[str, Any] = {}

    def say(msg: str) -> None:
        print(f"[detailfusion-ablation {time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    def stage_cfg(seed: int, **stage_epochs: int) -> TrainConfig:
        return TrainConfig(epochs=args.epochs, seed=seed, progress=False, stage_epochs=dict(stage_epochs))

    def run_benchmark(name: str, root: Path, opts: dict[str, Any]) -> dict[str, Any]:
        data = {s: load_split_data(cache, load_dataset(name, root, s, **opts), training=(s == "train"))
                for s in ("train", "val", "test")}
        data["edit_pairs"] = load_split_data(cache, edit_pair_dataset(name, root), training=True)
        say(f"{name}: features ready ({len(data['train'].dataset)} train queries, "
            f"{len(data['edit_pairs'].dataset)} edit pairs)")
        metric = "Rmean" if name == "synthetic" else "mAP@10"  # the benchmark's headline metric (as the quickstart's)
        runs_dir = out / "runs" / name
        ep = {"di-pretrain": args.pretrain_epochs, "joint": args.epochs, "compositor": args.compositor_epochs}

        # Full model per gamma, gamma chosen on val.
        full: dict[float, Any] = {}
        for g in gammas if "full" in parts else []:
            full[g] = train_detailfusion(name, root, cache, runs_dir / f"full-gamma{g}", hparams={"gamma": g},
                                         config=stage_cfg(0, **ep), splits=data, test=False)
            say(f"{name}: full gamma={g}: val " + json.dumps({o: pick(v) for o, v in full[g].val.items()}))
        best_g = max(full, key=lambda g: full[g].val["fused"][metric]) if full else None

        # DI alone: with / without the reference negative over seeds, without pre-training.
        def di(tag: str, seed: int, **hp: Any) -> Any:
            e = {"di-pretrain": args.pretrain_epochs, "di": args.epochs}
            r = train_detailfusion(name, root, cache, runs_dir / f"{tag}-seed{seed}", hparams={"branches": "di", **hp},
                                   config=stage_cfg(seed, **e), splits=data, test=False)
            say(f"{name}: {tag} seed {seed}: val {pick(r.val['di'])}")
            return r

        seeds = list(range(args.seeds))
        di_runs = [di("di", s) for s in seeds] if "di" in parts else []
        noref_runs = [di("di-no-ref-negative", s, ref_negative=False) for s in seeds] if "noref" in parts else []
        nopre = di("di-no-pretrain", 0, pretrain_split="none") if "nopre" in parts else None

        # Pool models, the best on val.
        pool: dict[str, Any] = {}
        for mname in [m for m in args.pool.split(",") if m and "pool" in parts]:
            seed_everything(0)
            m = create_method(mname, cache.backbone)
            res = train(m, data["train"], data["val"], runs_dir / mname, stage_cfg(0), overwrite=True)
            pool[mname] = load_checkpoint(res.best_dir)
            say(f"{name}: {mname}: val {pick(res.final_metrics)} (best epoch {res.best_epoch})")
        best_pool = max(pool, key=lambda k: evaluate(pool[k], data["val"], progress=False)[metric]) if pool else None

        # Test, read once for the chosen configurations.
        test: dict[str, dict[str, float]] = {}
        f = full[best_g] if best_g is not None else None
        if f is not None:
            for row, out_name in (("gm", "gm"), ("static", "static"), ("detailfusion", "fused")):
                test[row] = pick(evaluate(f.model.use_output(out_name), data["test"], progress=False))
            f.model.use_output("fused")
        spread = {}
        for row, runs in (("di", di_runs), ("di_no_ref_negative", noref_runs)):
            if not runs:
                continue
            per_seed = [pick(evaluate(r.model, data["test"], progress=False)) for r in runs]
            test[row] = per_seed[0]
            spread[row] = {k: {"mean": round(statistics.mean(x[k] for x in per_seed), 2),
                               "std": round(statistics.pstdev(x[k] for x in per_seed), 2),
                               "per_seed": [x[k] for x in per_seed]} for k in per_seed[0]}
            spread[row]["val_per_seed"] = [pick(r.val["di"]) for r in runs]
        if nopre is not None:
            test["di_no_pretrain"] = pick(evaluate(nopre.model, data["test"], progress=False))
        if best_pool is not None:
            test["best_pool"] = {**pick(evaluate(pool[best_pool], data["test"], progress=False)), "method": best_pool}
        alpha = {} if f is None else {k: round(v, 4) for k, v in describe_alpha(query_alphas(f.model, data["test"])).items()}
        print(f"\n{name} (test split; every choice on val: gamma={best_g}, best pool={best_pool})")
        keys = [k for k in ("rsubset1", "rmean", "r10", "map10") if any(k in v for v in test.values())]
        print("  " + "row".ljust(22) + "".join(f"{METRICS[k]:>11}" for k in keys))
        for row in ("gm", "di", "di_no_ref_negative", "di_no_pretrain", "static", "detailfusion", "best_pool"):
            if row in test:
                print("  " + row.ljust(22) + "".join(f"{test[row].get(k, float('nan')):>11.2f}" for k in keys))
        print(f"  seeds {seeds}: " + json.dumps({r: {k: v for k, v in s.items() if k in ('rsubset1', 'rmean')}
                                                 for r, s in spread.items()}))
        print(f"  alpha on test: {alpha}")
        return {**test, "seed_spread": spread, "gamma": best_g, "alpha": alpha,
                **({"di_no_pretrain_val": pick(nopre.val["di"])} if nopre is not None else {}),
                "val": {"full": {str(g): {o: pick(v) for o, v in r.val.items()} for g, r in full.items()}}}

    if "synthetic" not in skip:
        root = args.synthetic or out / "data" / "synthetic"
        if not (root / "manifest.json").is_file():
            generate(root, seed=0, n_images=args.n_images, eval_queries_per_image=args.eval_queries_per_image,
                     pretrain_scenes=args.pretrain_scenes, workers=1)
        result["synthetic"] = {} if args.only_diversity else run_benchmark("synthetic", root, {"text": args.text})
        curve = {}
        for n in [int(x) for x in args.diversity.split(",") if x]:
            droot = out / "data" / f"synthetic-scenes{n}"
            if not (droot / "manifest.json").is_file():
                generate(droot, seed=0, n_images=args.n_images, eval_queries_per_image=args.eval_queries_per_image,
                         train_scenes=n, train_scene_images=args.scene_images, workers=1)
            r = train_detailfusion("synthetic", droot, cache, out / "runs" / f"diversity-{n}",
                                   hparams={"branches": "di", "pretrain_split": "none"},
                                   config=stage_cfg(0, di=args.epochs), dataset_options={"text": args.text}, test=False)
            curve[n] = pick(r.val["di"])
            say(f"diversity: {n} train scenes: val {curve[n]}")
        if curve:  # the benchmark's own train split (its natural scene count) is the curve's first point
            if "di_no_pretrain_val" in result["synthetic"]:
                scenes = len({q.meta["cluster"] for q in load_dataset("synthetic", root, "train").queries})
                curve = {scenes: result["synthetic"]["di_no_pretrain_val"], **curve}
            result["synthetic"]["diversity_val"] = curve
    if args.catalog is not None and "catalog" not in skip:
        result["catalog"] = run_benchmark("catalog", args.catalog, {})
    result["selection_split"] = "val"
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
