"""DetailFusion ablation (issue 12): one table per benchmark, every choice on val, test read once at the end.

Rows: GM only, DI only, DI without the reference negative, DI without stage-1 pre-training, static fusion
(alpha = 0.5), adaptive fusion (full DetailFusion), the best pool model (chosen on val among ``--pool``).

- The full model is trained once per ``--gammas`` value; gamma is chosen on val (Rmean on synthetic, mAP@10 on the
  catalog). Its GM branch, its static fusion (the same branches, alpha = 0.5) and its adaptive fusion are the "gm",
  "static" and "detailfusion" rows.
- The DI rows are DI trained alone (``branches=di``) with and without the reference negative and pre-training;
  ``--seeds`` seeds each for DI and DI without the reference negative (the spread is printed: the paper's claim that
  the reference negative helps is measured, not assumed).
- Every trainable row mines ``--hard-negatives`` negatives per query from ``--hard-negative-source`` (``subset``: the
  query's annotated one-detail variants; the stage-1 edit pairs, which have none, take their reference's nearest
  neighbours), as well as the in-batch targets (and the reference, where the row uses it).
- Synthetic: the benchmark of ``--synthetic`` (made here when missing: ``--n-images`` images, seed 0, val/test
  queries per image ``--eval-queries-per-image``; its train split is ``--train-scenes`` distinct base scenes of
  ``--scene-images`` images each, plus ``--pretrain-scenes`` stage-1 scenes; the test split is the one every
  synthetic benchmark of that seed and size has). Fine texts (``--text``): with them the target is the only subset
  member consistent with the text.
- Diversity curve (``--diversity 71,146,...``, off by default): DI alone, no pre-training, trained on the queries of the first N base
  scenes of that train split only (same val), val Rsubset@1 per N.
- Catalog: ``--catalog`` (a ``make-catalog`` output); stage 1 on its train split's photo edits.
- The training runs are independent: ``--jobs`` processes (1 torch thread each) run them side by side, longest
  first, sharing the split data this process loaded before they forked; the test split is scored here, once, after
  every choice is made. Each run leaves ``ablation-job.json`` (the job and its result) in its run dir, and
  ``--reuse`` takes a finished run's result instead of retraining it (an interrupted ablation resumes).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/detailfusion_ablation.py --out bench-df --catalog CATALOG

The last line of output is one JSON object (the issue's format) with every number, ``selection_split`` and ``seconds``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from _preload import preload, preloaded

from cirfusion.io import atomic_write_json

METRICS = {"rsubset1": "Rsubset@1", "rmean": "Rmean", "r10": "R@10", "map10": "mAP@10"}
ROWS = ("gm", "di", "di_no_ref_negative", "di_no_pretrain", "static", "detailfusion", "best_pool")


def pick(metrics: dict[str, float]) -> dict[str, float]:
    return {k: round(float(metrics[v]), 2) for k, v in METRICS.items() if v in metrics}


def first_scenes(dataset: Any, n: int) -> Any:
    """``dataset`` (a synthetic train split) restricted to the queries of its first ``n`` base scenes (clusters)."""
    clusters = sorted({q.meta["cluster"] for q in dataset.queries})
    if n > len(clusters):
        raise SystemExit(f"--diversity {n}: the train split has only {len(clusters)} base scenes")
    keep = set(clusters[:n])
    return dataclasses.replace(dataset, queries=[q for q in dataset.queries if q.meta["cluster"] in keep],
                               meta={**dataset.meta, "train_scenes": n})


# Split data loaded once by the main process before the workers fork (they share it copy-on-write): loading a
# synthetic train split and its edit pairs took ~40 s per job when every job loaded its own.
RESULT_FILE = "ablation-job.json"  # in a job's run dir: the job and what it returned


def reused(job: dict[str, Any]) -> dict[str, Any] | None:
    """The saved result of exactly this job (same benchmark, data, hyper-parameters and schedule), if its run dir
    holds one whose checkpoint still exists."""
    path = Path(job["run_dir"]) / RESULT_FILE
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if saved.get("job") != job or not Path(saved["result"]["checkpoint"]).is_dir():
        return None
    return {**saved["result"], "reused": True}


def job_cost(job: dict[str, Any]) -> float:
    """A job's relative training time, for scheduling (measured: on synthetic a full model ~730 s, DI with stage 1
    ~450 s, a pool model ~270 s, DI alone ~200 s; a catalog run ~1/4 of that)."""
    hp = job["hparams"]
    if job["method"] != "detailfusion":
        cost = 270.0
    elif hp.get("branches", "both") == "both":
        cost = 730.0
    else:
        cost = 200.0 + (250.0 if hp.get("pretrain_split") != "none" else 0.0)
    return cost * (0.25 if job["benchmark"] == "catalog" else 1.0)


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """One training run (in a worker process): returns its best checkpoint and its val metrics per output, and
    writes both, with the job, to ``RESULT_FILE`` in its run dir (``--reuse`` skips a job that has one)."""
    torch.set_num_threads(1)  # 2 shared cores: 1 thread per process measured far faster than 2
    from cirfusion.backbones import create_backbone
    from cirfusion.checkpoint import load_checkpoint
    from cirfusion.data.registry import load_dataset
    from cirfusion.evaluation import evaluate
    from cirfusion.features import FeatureCache
    from cirfusion.methods.detailfusion_run import train_detailfusion
    from cirfusion.methods.registry import create_method
    from cirfusion.seeding import seed_everything
    from cirfusion.train import TrainConfig, train
    from cirfusion.views import load_split_data

    t0 = time.perf_counter()
    cache = FeatureCache(create_backbone(job["backbone"]), job["cache"])
    name, root, opts = job["benchmark"], Path(job["root"]), job["options"]
    data = {s: d for s in ("train", "val", "edit_pairs")
            if (d := preloaded(name, root, s, opts)) is not None}
    if job.get("scenes") or "train" not in data:
        train_ds = load_dataset(name, root, "train", **opts)
        if job.get("scenes"):
            train_ds = first_scenes(train_ds, job["scenes"])
        data["train"] = load_split_data(cache, train_ds, training=True)
    if "val" not in data:
        data["val"] = load_split_data(cache, load_dataset(name, root, "val", **opts))
    cfg = TrainConfig(**job["config"])
    if job["method"] == "detailfusion":
        r = train_detailfusion(name, root, cache, job["run_dir"], hparams=job["hparams"], config=cfg,
                               splits=data, dataset_options=opts, test=False)
        out = {"checkpoint": str(r.checkpoint), "val": {o: pick(v) for o, v in r.val.items()}, "best_epoch": r.best_epoch}
    else:
        seed_everything(cfg.seed)
        m = create_method(job["method"], cache.backbone, **job["hparams"])
        res = train(m, data["train"], data["val"], job["run_dir"], cfg, overwrite=True)
        best = load_checkpoint(res.best_dir)
        out = {"checkpoint": str(res.best_dir), "val": {"model": pick(evaluate(best, data["val"], progress=False))},
               "best_epoch": res.best_epoch}
    result = {**out, "tag": job["tag"], "seconds": round(time.perf_counter() - t0, 1)}
    atomic_write_json(Path(job["run_dir"]) / RESULT_FILE, {"job": job, "result": result})
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench-detailfusion"))
    p.add_argument("--cache-dir", type=Path, default=None, help="feature cache (default OUT/cache)")
    p.add_argument("--synthetic", type=Path, default=None, help="a synthetic benchmark (default: OUT/data/synthetic, made)")
    p.add_argument("--n-images", type=int, default=2500)
    p.add_argument("--eval-queries-per-image", type=float, default=3.0)
    p.add_argument("--train-scenes", type=int, default=1000,
                   help="distinct base scenes of the synthetic train split (default chosen on val: the diversity curve)")
    p.add_argument("--scene-images", type=int, default=12, help="images per train base scene")
    p.add_argument("--pretrain-scenes", type=int, default=1500, help="stage-1 base scenes (edit pairs only)")
    p.add_argument("--text", choices=("fine", "coarse"), default="fine")
    p.add_argument("--catalog", type=Path, default=None, help="a make-catalog output (optional)")
    p.add_argument("--backbone", default="embedded")
    p.add_argument("--epochs", type=int, default=3,
                   help="epochs of the joint / DI-alone stage (and of the pool models); 3 keeps the whole ablation "
                        "within 45 min on 2 cores (6 measured better on val, at twice the time)")
    p.add_argument("--pretrain-epochs", type=int, default=1)
    p.add_argument("--compositor-epochs", type=int, default=1)
    p.add_argument("--catalog-epochs", type=int, default=2, help="epochs of every catalog stage")
    p.add_argument("--hard-negatives", type=int, default=4, help="mined negatives per query (0: in-batch only)")
    p.add_argument("--hard-negative-source", choices=("subset", "neighbours"), default="subset")
    p.add_argument("--gammas", default="1,2", help="comma-separated gamma values, chosen on val")
    p.add_argument("--seeds", type=int, default=3, help="seeds of DI with / without the reference negative")
    p.add_argument("--catalog-seeds", type=int, default=1, help="the same on the catalog")
    p.add_argument("--pool", default="clip4cir", help="comma-separated pool methods; the best on val is reported")
    p.add_argument("--diversity", default="",
                   help="comma-separated train scene counts for the DI diversity curve (subsets of the train split), "
                        "e.g. 71,146,292,500 (not in the default run: it chose the default --train-scenes once)")
    p.add_argument("--diversity-pretrain", action="store_true",
                   help="also train each diversity point with stage 1 (pre-training on every edit pair) first")
    p.add_argument("--parts", default="full,di,noref,nopre,pool",
                   help="rows to train: full (gm, static, detailfusion), di, noref, nopre, pool")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: synthetic, catalog")
    p.add_argument("--jobs", type=int, default=2, help="training runs side by side (1 torch thread each)")
    p.add_argument("--reuse", action="store_true",
                   help="do not retrain a run whose run dir holds the result of the identical job (e.g. after an "
                        "interruption); its recorded training seconds are reported, 'seconds' is this invocation's")
    args = p.parse_args()
    # the data phase (features, parses) and the test scoring run in this process alone: the cores the jobs share
    torch.set_num_threads(max(1, args.jobs))

    from cirfusion.backbones import create_backbone
    from cirfusion.checkpoint import load_checkpoint
    from cirfusion.data.registry import load_dataset
    from cirfusion.data.synthetic import generate
    from cirfusion.evaluation import evaluate
    from cirfusion.features import FeatureCache
    from cirfusion.methods.detailfusion import DetailFusion, describe_alpha
    from cirfusion.methods.detailfusion_run import edit_pair_dataset, query_alphas
    from cirfusion.views import load_split_data

    t_start = time.perf_counter()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = args.cache_dir or out / "cache"
    cache = FeatureCache(create_backbone(args.backbone), cache_dir)
    skip = {s for s in args.skip.split(",") if s}
    gammas = [float(g) for g in args.gammas.split(",") if g]
    parts = set(args.parts.split(","))
    result: dict[str, Any] = {}

    def say(msg: str) -> None:
        print(f"[detailfusion-ablation {time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    def bench_seeds(name: str) -> list[int]:
        return list(range(args.catalog_seeds if name == "catalog" else args.seeds))

    benchmarks: list[tuple[str, Path, dict[str, Any]]] = []
    if "synthetic" not in skip:
        root = args.synthetic or out / "data" / "synthetic"
        if not (root / "manifest.json").is_file():
            generate(root, seed=0, n_images=args.n_images, eval_queries_per_image=args.eval_queries_per_image,
                     train_scenes=args.train_scenes or None, train_scene_images=args.scene_images,
                     pretrain_scenes=args.pretrain_scenes, workers=2)
            say(f"synthetic benchmark made: {root}")
        benchmarks.append(("synthetic", root, {"text": args.text}))
    if args.catalog is not None and "catalog" not in skip:
        benchmarks.append(("catalog", args.catalog, {}))

    # Features first, in this process: the workers, forked afterwards, share these splits (_preload).
    for name, root, opts in benchmarks:
        for s in ("train", "val", "test"):
            preload(name, root, s, opts, load_split_data(cache, load_dataset(name, root, s, **opts), training=(s == "train")))
        pairs = preload(name, root, "edit_pairs", opts, load_split_data(cache, edit_pair_dataset(name, root), training=True))
        say(f"{name}: features ready ({len(pairs.dataset)} stage-1 edit pairs)")

    # Every training run, as independent jobs.
    jobs: list[dict[str, Any]] = []
    for name, root, opts in benchmarks:
        cat = name == "catalog"
        e = args.catalog_epochs if cat else args.epochs
        pre = args.catalog_epochs if cat else args.pretrain_epochs
        comp = args.catalog_epochs if cat else args.compositor_epochs

        def job(tag: str, method: str, seed: int, stage_epochs: dict[str, int], scenes: int = 0,
                name: str = name, root: Path = root, opts: dict[str, Any] = opts, e: int = e, **hp: Any) -> None:
            cfg = {"epochs": e, "seed": seed, "progress": False, "stage_epochs": stage_epochs,
                   "hard_negatives": args.hard_negatives, "hard_negative_source": args.hard_negative_source}
            jobs.append({"tag": f"{name}/{tag}", "benchmark": name, "root": str(root), "options": opts,
                         "backbone": args.backbone, "cache": str(cache_dir), "method": method, "hparams": hp,
                         "config": cfg, "scenes": scenes, "run_dir": str(out / "runs" / name / tag)})

        for g in gammas if "full" in parts else []:
            job(f"full-gamma{g}", "detailfusion", 0, {"di-pretrain": pre, "joint": e, "compositor": comp}, gamma=g)
        for seed in bench_seeds(name) if "di" in parts else []:
            job(f"di-seed{seed}", "detailfusion", seed, {"di-pretrain": pre, "di": e}, branches="di")
        for seed in bench_seeds(name) if "noref" in parts else []:
            job(f"di-no-ref-negative-seed{seed}", "detailfusion", seed, {"di-pretrain": pre, "di": e}, branches="di",
                ref_negative=False)
        if "nopre" in parts:
            job("di-no-pretrain", "detailfusion", 0, {"di": e}, branches="di", pretrain_split="none")
        for m in [m for m in args.pool.split(",") if m and "pool" in parts]:
            job(f"pool-{m}", m, 0, {})
        if name == "synthetic":
            for n in [int(x) for x in args.diversity.split(",") if x]:
                job(f"diversity-{n}", "detailfusion", 0, {"di": e}, scenes=n, branches="di", pretrain_split="none")
                if args.diversity_pretrain:
                    job(f"diversity-{n}-pretrained", "detailfusion", 0, {"di-pretrain": pre, "di": e}, scenes=n,
                        branches="di")
    # Longest first, so that the workers finish together (the short catalog runs fill the gaps at the end).
    jobs.sort(key=lambda j: -job_cost(j))
    say(f"{len(jobs)} training runs on {args.jobs} processes")
    done: dict[str, dict[str, Any]] = {}
    if args.reuse:
        for j in jobs:
            if (r := reused(j)) is not None:
                done[r["tag"]] = r
                say(f"{r['tag']}: reused ({r['seconds']:.0f} s when trained), val {json.dumps(r['val'])}")
    torch.set_num_threads(1)  # before forking: one thread per job (2 shared cores)
    with ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=multiprocessing.get_context("fork")) as pool:
        for r in pool.map(run_job, [j for j in jobs if j["tag"] not in done]):
            done[r["tag"]] = r
            say(f"{r['tag']}: {r['seconds']:.0f} s, best epoch {r['best_epoch']}, val {json.dumps(r['val'])}")

    torch.set_num_threads(max(1, args.jobs))
    # Choices on val; test read once per reported row.
    for name, root, opts in benchmarks:
        metric = "rmean" if name == "synthetic" else "map10"  # the benchmark's headline metric (as the quickstart's)
        test_data = preloaded(name, root, "test", opts)

        def run(tag: str, name: str = name) -> dict[str, Any] | None:
            return done.get(f"{name}/{tag}")

        def score(r: dict[str, Any], output: str | None = None, test_data: Any = test_data) -> dict[str, float]:
            model = load_checkpoint(r["checkpoint"])
            if output is not None:
                assert isinstance(model, DetailFusion)
                model.use_output(output)
            return pick(evaluate(model, test_data, progress=False))

        test: dict[str, dict[str, Any]] = {}
        full = {g: r for g in gammas if (r := run(f"full-gamma{g}")) is not None}
        best_g = max(full, key=lambda g: full[g]["val"]["fused"][metric]) if full else None
        alpha: dict[str, float] = {}
        if best_g is not None:
            f = full[best_g]
            for row, o in (("gm", "gm"), ("static", "static"), ("detailfusion", "fused")):
                test[row] = score(f, o)
            fm = load_checkpoint(f["checkpoint"])
            assert isinstance(fm, DetailFusion)
            alpha = {k: round(v, 4) for k, v in describe_alpha(query_alphas(fm, test_data)).items()}
        spread: dict[str, Any] = {}
        for row, tag in (("di", "di"), ("di_no_ref_negative", "di-no-ref-negative")):
            runs = [r for s in bench_seeds(name) if (r := run(f"{tag}-seed{s}"))]
            if not runs:
                continue
            per_seed = [score(r) for r in runs]
            test[row] = per_seed[0]
            spread[row] = {k: {"mean": round(statistics.mean(x[k] for x in per_seed), 2),
                               "std": round(statistics.pstdev(x[k] for x in per_seed), 2),
                               "per_seed": [x[k] for x in per_seed]} for k in per_seed[0]}
            spread[row]["val_per_seed"] = [r["val"]["di"] for r in runs]
        if (nopre := run("di-no-pretrain")) is not None:
            test["di_no_pretrain"] = score(nopre)
        pool_runs = {m: r for m in args.pool.split(",") if m and (r := run(f"pool-{m}"))}
        best_pool = max(pool_runs, key=lambda m: pool_runs[m]["val"]["model"][metric]) if pool_runs else None
        if best_pool is not None:
            test["best_pool"] = {**score(pool_runs[best_pool]), "method": best_pool}
        curve = {n: r["val"]["di"] for n in [int(x) for x in args.diversity.split(",") if x]
                 if (r := run(f"diversity-{n}"))}
        curve_pre = {n: r["val"]["di"] for n in [int(x) for x in args.diversity.split(",") if x]
                     if (r := run(f"diversity-{n}-pretrained"))}
        if curve or curve_pre:  # the whole train split is the curve's last point (a synthetic split: clusters)
            scenes = len({q.meta["cluster"] for q in load_dataset(name, root, "train", **opts).queries})
            if curve and nopre is not None:
                curve[scenes] = nopre["val"]["di"]
            if curve_pre and (di0 := run("di-seed0")) is not None:
                curve_pre[scenes] = di0["val"]["di"]

        print(f"\n{name} (test split; every choice on val: gamma={best_g}, best pool={best_pool})")
        keys = [k for k in METRICS if any(k in v for v in test.values())]
        print("  " + "row".ljust(22) + "".join(f"{METRICS[k]:>11}" for k in keys))
        for row in ROWS:
            if row in test:
                print("  " + row.ljust(22) + "".join(f"{test[row].get(k, float('nan')):>11.2f}" for k in keys))
        print(f"  seeds {bench_seeds(name)}: " + json.dumps({r: {k: v for k, v in s.items() if k in ('rsubset1', 'rmean')}
                                                 for r, s in spread.items()}))
        print(f"  alpha on test: {alpha}")
        if curve:
            print("  diversity (DI alone, no stage 1; val): " + json.dumps(curve))
        if curve_pre:
            print("  diversity (DI alone, after stage 1; val): " + json.dumps(curve_pre))
        result[name] = {**test, "seed_spread": spread, "gamma": best_g, "alpha": alpha,
                        **({"diversity_val": curve} if curve else {}),
                        **({"diversity_pretrained_val": curve_pre} if curve_pre else {}),
                        "val": {tag.split("/", 1)[1]: r["val"] for tag, r in done.items() if tag.startswith(name + "/")},
                        "train_seconds": {tag.split("/", 1)[1]: r["seconds"] for tag, r in done.items()
                                          if tag.startswith(name + "/")}}
    result["selection_split"] = "val"
    result["reused_runs"] = sorted(t for t, r in done.items() if r.get("reused"))
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
