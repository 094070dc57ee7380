"""DAFM accuracy on the embedded benchmarks under the validation protocol (docs/protocol.md), end to end and
re-runnable:

    python benchmarks/dafm_accuracy.py --dir bench-dafm --photos ../shared/data/clothing-small
    python benchmarks/dafm_accuracy.py --dir bench-dafm --no-photos --data-from /work/cache/qs   # reuse data + cache
    python benchmarks/dafm_accuracy.py --dir bench-dafm --benchmarks catalog --photos ../shared/data/clothing-small

Steps, per benchmark (``--benchmarks``, default both; ``--no-photos`` = ``--benchmarks synthetic``):

1. base models: every pool method (CLIP4CIR, BLIP4CIR+Bi, TG-CIR, SPRC) on each backbone of ``--backbones``
   (``embedded`` and ``colour``), trained on train, best epoch chosen on **val/select**; a finished run in
   ``DIR/runs/BENCH/METHOD@BACKBONE`` that chose on val/select is reused (delete it to retrain);
2. the pool -- which methods, and the backbone of each -- chosen on **val/fuse** (the half of val the base models
   did not choose on) by the mean of normalised scores of every pool (every backbone assignment x every subset of two
   or more methods: 72 pools for 4 methods and 2 backbones, no fitting needed);
3. the fusion settings among ``FUSION_CANDIDATES``, chosen by the learned fusion's figure cross-fitted over two folds
   of val/fuse (fit on one, score the other, both ways; each fit picks its epoch on its own held-out fifth, where the
   untrained network -- the mean of normalised scores -- competes), and whether the learned fusion beats the mean
   there at all;
4. **test, read once** for the reported tables: every base model alone (beside its val/fuse figure), every single
   model, pair, triple and the full pool (learned and mean of normalised scores), every order of adding the models
   over ``--order-seeds`` seeds with the spread of every figure (``--orders-on``: the chosen pool, and/or the
   all-``embedded`` pool, which always has four models and so 24 orders), the learned-vs-static diagnostics
   (gate-weight variance across queries, per-query oracle model and weighting, best static weighting), and beside it
   the all-``embedded`` pool's table with its own learned-vs-mean cross-fit on val/fuse.

Every figure is printed with the split it came from; every choice goes to ``DIR/selection-BENCH.json``; the whole
result to ``DIR/dafm_accuracy.json`` and, last, one JSON line. Headline metric: Rmean on synthetic, mAP@10 on the
catalog.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BACKBONES = ("embedded", "colour")
BENCHMARKS = ("synthetic", "catalog")
# Fusion settings tried on val/fuse (cross-fitted); the first is FusionConfig's default.
FUSION_CANDIDATES: dict[str, dict[str, Any]] = {
    "default": {},
    "min_steps=100": {"min_steps": 100},
    "min_steps=100,weight_decay=0.05": {"min_steps": 100, "weight_decay": 0.05},
    "lr=1e-3": {"lr": 1e-3},
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=Path("bench-dafm"))
    p.add_argument("--data-from", type=Path, default=None,
                   help="a quickstart directory whose data/ and cache/ are copied into --dir when it has none")
    p.add_argument("--photos", type=Path, default=REPO.parent / "shared" / "data" / "clothing-small")
    p.add_argument("--no-photos", action="store_true", help="synthetic benchmark only (= --benchmarks synthetic)")
    p.add_argument("--benchmarks", nargs="+", choices=list(BENCHMARKS), default=None,
                   help="which benchmarks to run, in this order (default: both; synthetic only with --no-photos); "
                        "a benchmark not named is neither built nor trained, so one half re-runs alone")
    p.add_argument("--n-images", type=int, default=2500)
    p.add_argument("--eval-queries-per-image", type=float, default=3.0)
    p.add_argument("--epochs", type=int, default=4, help="base-model epochs (synthetic)")
    p.add_argument("--catalog-epochs", type=int, default=2)
    p.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    p.add_argument("--order-seeds", type=int, default=3, help="seeds of the order-of-addition fits")
    p.add_argument("--orders-on", nargs="*", choices=["chosen", "all-embedded"], default=["chosen"],
                   help="pools whose every order of addition is fitted (the all-embedded pool always has 4 models, "
                        "24 orders; the chosen one may have fewer)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.benchmarks is None:
        args.benchmarks = ["synthetic"] if args.no_photos else list(BENCHMARKS)
    elif args.no_photos and "catalog" in args.benchmarks:
        p.error("--no-photos contradicts --benchmarks catalog: the catalog benchmark is built from --photos")
    args.benchmarks = list(dict.fromkeys(args.benchmarks))  # a name given twice runs once
    if "catalog" in args.benchmarks and not args.photos.is_dir():
        p.error(f"--photos {args.photos} is not a folder; the catalog benchmark is built from it")

    import numpy as np
    import torch

    from cirfusion.api import load
    from cirfusion.backbones import create_backbone
    from cirfusion.backbones.multi import fusion_backbone
    from cirfusion.data.registry import load_dataset
    from cirfusion.features import FeatureCache
    from cirfusion.fusion import (
        FusionConfig,
        SplitTable,
        baseline_model,
        evaluate_base,
        evaluate_fused,
        fuse,
        fusion_diagnostics,
        oracle_predictability,
        order_of_addition,
        plot_incremental,
    )
    from cirfusion.io import atomic_write_json
    from cirfusion.methods.registry import create_method
    from cirfusion.quickstart import POOL, QuickstartConfig, headline_metric, make_catalog, make_synthetic
    from cirfusion.seeding import seed_everything
    from cirfusion.selection import SelectionRecord, base_selection, data_part, describe_split
    from cirfusion.train import TrainConfig, train
    from cirfusion.views import load_split_data

    torch.set_num_threads(2)
    t_start = time.perf_counter()
    out: Path = args.dir
    out.mkdir(parents=True, exist_ok=True)
    if args.data_from is not None:
        for part in ("data", "cache"):
            if not (out / part).exists() and (args.data_from / part).is_dir():
                shutil.copytree(args.data_from / part, out / part)
    qcfg = QuickstartConfig(out=out, photos=args.photos if "catalog" in args.benchmarks else None, seed=args.seed,
                            n_images=args.n_images, eval_queries_per_image=args.eval_queries_per_image, progress=False)
    # Only the named benchmarks are built: the catalog half must not rebuild (or retrain on) the synthetic one.
    makers = {"synthetic": make_synthetic, "catalog": make_catalog}
    benches = {b: makers[b](out, qcfg) for b in args.benchmarks}
    cache_dir = out / "cache"
    caches: dict[str, FeatureCache] = {}

    def cache_for(name: str) -> FeatureCache:
        if name not in caches:
            caches[name] = FeatureCache(create_backbone(name), cache_dir)
        return caches[name]

    def say(msg: str) -> None:
        print(msg, flush=True)

    results: dict[str, Any] = {"dir": str(out), "protocol": "docs/protocol.md", "benchmarks_run": args.benchmarks}
    # A run of some benchmarks keeps the others' results from an earlier run in the same --dir (named as such).
    prev_path = out / "dafm_accuracy.json"
    if prev_path.is_file():
        prev = json.loads(prev_path.read_text(encoding="utf-8"))
        kept = [b for b in BENCHMARKS if b not in args.benchmarks and b in prev]
        for b in kept:
            results[b] = prev[b]
        if kept:
            results["kept_from_earlier_run"] = kept
    for bench, root in benches.items():
        sel = SelectionRecord({"benchmark": bench})
        epochs = args.catalog_epochs if bench == "catalog" else args.epochs
        # -- 1. base models, epoch chosen on val/select ---------------------------------------------------------------
        ckpts: dict[str, Path] = {}
        for method in POOL:
            for bb in args.backbones:
                key = f"{method}@{bb}"
                run_dir = out / "runs" / bench / key
                best = run_dir / "best"
                done = (best / "config.json").is_file() and (run_dir / "manifest.json").is_file()
                if done:
                    man = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
                    done = (man.get("datasets", {}).get("val", {}).get("split") == "val:select"
                            and man.get("config", {}).get("epochs") == epochs and man.get("seed") == args.seed)
                if not done:
                    if run_dir.exists():
                        shutil.rmtree(run_dir)
                    t0 = time.perf_counter()
                    cache = cache_for(bb)
                    data = {s: load_split_data(cache, load_dataset(bench, root, s), training=(s == "train"))
                            for s in ("train", "val")}
                    seed_everything(args.seed)
                    m = create_method(method, cache.backbone)
                    info = {"id": cache.backbone.backbone_id, "weights_hash": cache.backbone.weights_hash(),
                            "preprocess_id": cache.backbone.preprocess_id(), "cache_dir": str(cache_dir)}
                    train(m, data["train"], data_part(data["val"], "select"), run_dir,
                          TrainConfig(epochs=epochs, seed=args.seed, progress=False), backbone_info=info)
                    say(f"{bench}: trained {key} ({time.perf_counter() - t0:.0f} s)")
                ckpts[key] = best
                cfg_json = json.loads((best / "config.json").read_text(encoding="utf-8"))
                man = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
                bs = base_selection(cfg_json, man)
                sel.choose(f"epoch of {key}", bs["epoch"], describe_split("val", "select"), bs["metric"], bs["figure"])
        keys = list(ckpts)
        models = [load(ckpts[k]) for k in keys]
        mcache = FeatureCache(fusion_backbone([m.backbone for m in models]), cache_dir)
        t0 = time.perf_counter()
        tables = {s: SplitTable.build([m.method for m in models], keys,
                                      load_split_data(mcache, load_dataset(bench, root, s)))
                  for s in ("val/select", "val/fuse", "test")}
        say(f"\n{bench}: tables of {len(keys)} base models built ({time.perf_counter() - t0:.0f} s): "
            + ", ".join(f"{s} {t.num_queries} queries" for s, t in tables.items()))
        vsel, vfuse, test = tables["val/select"], tables["val/fuse"], tables["test"]
        metric = headline_metric(bench, evaluate_base(vsel, 0))
        base_cfg = FusionConfig(val_metric=metric, seed=args.seed)
        # two folds of val/fuse, by a seeded query permutation
        folds = vfuse.split_queries(0.5, seed=args.seed + 11)
        say(f"{bench}: metric {metric}; val/select chose the base models' epochs; val/fuse fits the fusion")

        def crossfit(members: list[int], cfg: FusionConfig) -> tuple[float, float]:
            """(learned, mean) on val/fuse: each fold scored by the fusion fitted on the other, averaged."""
            learned, mean = [], []
            for a, b in ((0, 1), (1, 0)):
                model, _ = fuse(folds[a], None, cfg, members)
                learned.append(evaluate_fused(model, folds[b].select(members))[metric])
                mean.append(evaluate_fused(baseline_model(folds[b], members), folds[b].select(members))[metric])
            return float(np.mean(learned)), float(np.mean(mean))

        cv_split = "val/fuse (2-fold cross-fit)"
        # -- 2. the pool: backbone of each method and which methods, by the mean of normalised scores on val/fuse -----
        # The mean has no parameters, so every (assignment, subset) pair is scored on all of val/fuse at no fitting
        # cost; the learned fusion starts at the mean and only leaves it where its held-out queries say so.
        t0 = time.perf_counter()
        pools: dict[str, float] = {}
        for combo in itertools.product(args.backbones, repeat=len(POOL)):
            for r in range(2, len(POOL) + 1):
                for sub in itertools.combinations(range(len(POOL)), r):
                    pk = [f"{POOL[i]}@{combo[i]}" for i in sub]
                    label = " + ".join(pk)
                    if label not in pools:
                        idx = [keys.index(k) for k in pk]
                        pools[label] = evaluate_fused(baseline_model(vfuse, idx), vfuse.select(idx))[metric]
        best_pool = max(pools, key=lambda k: (pools[k], -k.count("+")))
        pool = best_pool.split(" + ")
        sel.choose("pool (methods and backbones)", pool, "val/fuse", f"{metric} of the mean of normalised scores",
                   pools[best_pool], pools, note=f"{len(pools)} pools: every backbone assignment x every subset of 2+")
        top = sorted(pools.items(), key=lambda kv: -kv[1])[:5]
        say(f"{bench}: pool chosen on val/fuse by the mean of normalised scores ({len(pools)} pools, "
            f"{time.perf_counter() - t0:.0f} s): {best_pool} ({metric} {pools[best_pool]:.2f}); next: "
            + "; ".join(f"{k} {v:.2f}" for k, v in top[1:]))
        emb_label = " + ".join(f"{m}@embedded" for m in POOL)
        if emb_label in pools:
            say(f"{bench}: all-embedded pool on val/fuse: {pools[emb_label]:.2f}")
        # -- 3. fusion settings ---------------------------------------------------------------------------------------
        members = [keys.index(k) for k in pool]
        fcands: dict[str, float] = {}
        cv_mean = 0.0
        t0 = time.perf_counter()
        for label, kw in FUSION_CANDIDATES.items():
            fcands[label], cv_mean = crossfit(members, replace(base_cfg, **kw))
            say(f"  {label}: learned {fcands[label]:.2f}, mean {cv_mean:.2f} ({cv_split}; {time.perf_counter() - t0:.0f} s)")
        best_f = max(fcands, key=lambda k: fcands[k])
        cfg = replace(base_cfg, **FUSION_CANDIDATES[best_f])
        sel.choose("fusion settings", best_f, cv_split, metric, fcands[best_f], fcands,
                   note=f"the mean of normalised scores on the same folds: {cv_mean:.2f}")
        sel.choose("learned fusion or the mean", "learned" if fcands[best_f] > cv_mean else "mean", cv_split, metric,
                   max(fcands[best_f], cv_mean), {"learned": fcands[best_f], "mean": cv_mean})
        sel.write(out / f"selection-{bench}.json")
        say(f"{bench}: fusion settings chosen on {cv_split}: {best_f} ({metric} learned "
            + ", ".join(f"{k} {v:.2f}" for k, v in fcands.items()) + f"; mean of normalised scores {cv_mean:.2f})")

        # -- 4. test, read once ---------------------------------------------------------------------------------------
        def pool_table(pkeys: list[str], label: str, learned_subsets: bool = True) -> dict[str, Any]:
            idx = [keys.index(k) for k in pkeys]
            single = {k: evaluate_base(test, keys.index(k)) for k in pkeys}
            rows: list[dict[str, Any]] = [{"models": [k], "kind": "single", metric: single[k][metric]} for k in pkeys]
            full_model = None
            for r in range(2, len(idx) + 1):
                for sub in itertools.combinations(idx, r):
                    t_sub = test.select(list(sub))
                    mean = evaluate_fused(baseline_model(test, list(sub)), t_sub)[metric]
                    if not learned_subsets and len(sub) < len(idx):
                        rows.append({"models": [keys[i] for i in sub], "kind": "mean", metric: mean, "mean": mean,
                                     "best_single": max(single[keys[i]][metric] for i in sub)})
                        continue
                    model, res = fuse(vfuse, None, cfg, list(sub))
                    fused = evaluate_fused(model, t_sub)[metric]
                    best = max(single[keys[i]][metric] for i in sub)
                    rows.append({"models": [keys[i] for i in sub], "kind": "fused", metric: fused, "mean": mean,
                                 "best_single": best, "gain_over_mean": fused - mean,
                                 "gain_over_best_single": fused - best, "fusion_epoch": res.best_epoch})
                    if len(sub) == len(idx):
                        full_model = model
            sel.report(f"{label}: singles, pairs, triples, full, mean", f"{bench}/test")
            say(f"\n{bench}, {label} (fusion fitted on val/fuse with '{best_f}', epoch on its held-out fifth; "
                f"every figure on test; {metric})")
            say(f"  {'models':<60}{metric:>8}{'mean':>8}{'best1':>8}{'-mean':>8}{'-best1':>8}{'epoch':>6}")
            for row in rows:
                if row["kind"] == "mean":
                    say(f"  {' + '.join(row['models']) + ' (mean only)':<60}{row[metric]:>8.2f}{row['mean']:>8.2f}"
                        f"{row['best_single']:>8.2f}")
                    continue
                extra = "" if row["kind"] == "single" else (
                    f"{row['mean']:>8.2f}{row['best_single']:>8.2f}{row['gain_over_mean']:>+8.2f}"
                    f"{row['gain_over_best_single']:>+8.2f}{row['fusion_epoch']:>6}")
                say(f"  {' + '.join(row['models']):<60}{row[metric]:>8.2f}{extra}")
            out_t: dict[str, Any] = {"pool": pkeys, "rows": rows}
            if full_model is not None:
                dg = fusion_diagnostics(test.select(idx), full_model, metric)
                out_t["diagnostics"] = dg
                h = dg["headroom"]
                say(f"  diagnostics (test): over the mean {dg['mean']:.2f}: learned {h['learned']:+.2f}; best static "
                    f"weighting {h['static_best']:+.2f} ({', '.join(f'{k} {v:.2f}' for k, v in dg['static_best']['weights'].items())}); "
                    f"per-query oracle model {h['oracle_single']:+.2f}, per-query oracle weighting "
                    f"{h['oracle_weights']:+.2f}")
                g = dg["gate"]
                say("  gate weights across test queries: mean " + ", ".join(f"{k} {v:.2f}" for k, v in g["mean_weight"].items())
                    + "; std " + ", ".join(f"{k} {v:.3f}" for k, v in g["std_weight"].items())
                    + f"; mean distance from the average weights {g['mean_distance_from_average']:.3f}; the gate's "
                    f"heaviest model is the oracle's in {100 * g['argmax_is_oracle_single']:.0f} % of queries")
            return out_t

        bench_out: dict[str, Any] = {"metric": metric, "choices": sel.to_dict()["choices"]}
        # every base model alone (each method on each backbone), beside its val/fuse figure: what the pool chose from
        singles_all = {k: evaluate_base(test, i)[metric] for i, k in enumerate(keys)}
        singles_vfuse = {k: evaluate_base(vfuse, i)[metric] for i, k in enumerate(keys)}
        sel.report("every single base model", f"{bench}/test")
        say(f"\n{bench}, every base model alone ({metric}; epoch chosen on val/select): val/fuse | test")
        for k in keys:
            say(f"  {k:<28}{singles_vfuse[k]:>8.2f}{singles_all[k]:>8.2f}")
        bench_out["singles"] = {"test": singles_all, "val/fuse": singles_vfuse}
        bench_out["chosen"] = pool_table(pool, f"chosen pool {' + '.join(pool)}")
        results[bench] = bench_out
        atomic_write_json(out / "dafm_accuracy.partial.json", results)
        if len(pool) >= 2:
            op = oracle_predictability(vfuse.select(members), test.select(members), metric)
            bench_out["chosen"]["oracle_predictability"] = op
            say(f"  can the gate's inputs tell the per-query best model? a logistic regression fitted on val/fuse, "
                f"applied to test: accuracy {100 * op['accuracy']:.1f} % (always {op['majority_model']}: "
                f"{100 * op['majority_accuracy']:.1f} %); ranking each query by its predicted model {op['predicted_choice']:.2f} "
                f"vs best single {op['best_single']:.2f}, oracle {op['oracle_choice']:.2f}")
        if "embedded" in args.backbones:
            emb = [f"{m}@embedded" for m in POOL]
            if emb != pool:
                # learned vs mean for this pool too, on validation (same cross-fit and settings as the chosen pool),
                # so its test gain can be read against what the protocol would have decided for it
                emb_idx = [keys.index(k) for k in emb]
                emb_learned, emb_mean = crossfit(emb_idx, cfg)
                sel.choose("all-embedded pool: learned fusion or the mean", "learned" if emb_learned > emb_mean
                           else "mean", cv_split, metric, max(emb_learned, emb_mean),
                           {"learned": emb_learned, "mean": emb_mean}, note=f"settings '{best_f}' (chosen pool's)")
                say(f"\n{bench}: all-embedded pool on {cv_split} with '{best_f}': learned {emb_learned:.2f}, "
                    f"mean {emb_mean:.2f} ({emb_learned - emb_mean:+.2f})")
                bench_out["all_embedded"] = pool_table(emb, "all-embedded pool (not chosen; shown beside)",
                                                      learned_subsets=False)
                bench_out["all_embedded"]["crossfit"] = {"split": cv_split, "learned": emb_learned, "mean": emb_mean}
                atomic_write_json(out / "dafm_accuracy.partial.json", results)

        def orders_of(pkeys: list[str], label: str) -> dict[str, Any]:
            t0 = time.perf_counter()
            idx = [keys.index(k) for k in pkeys]
            say(f"\n{bench}, {label}: every order of adding the models, seeds 0..{args.order_seeds - 1} "
                f"(fitted on val/fuse with '{best_f}', test):")
            figs = order_of_addition(vfuse.select(idx), None, test.select(idx), cfg,
                                     tuple(range(args.order_seeds)), metric=metric, report=say)
            sel.report(f"order of addition, {label}", f"{bench}/test")
            suffix = "" if label == "chosen pool" else "-" + label.replace(" ", "-")
            atomic_write_json(out / f"incremental-{bench}{suffix}.json", figs)
            plot_incremental(figs, out / f"incremental-{bench}{suffix}.png")
            say(f"  every order of adding the models, {label} ({len(figs['orders'])} orders x {len(figs['seeds'])} "
                f"seeds, {figs['fits']} fits, {time.perf_counter() - t0:.0f} s; test):")
            for pos in figs["positions"]:
                say(f"    {pos['models']} model(s): min {pos['min']:.2f}, median {pos['median']:.2f}, max {pos['max']:.2f}, "
                    f"std {pos['std']:.2f} (n {pos['n']})")
            fin = figs["final"]
            say(f"    final: std over orders {fin['std_over_orders']:.2f}, over seeds {fin['std_over_seeds']:.2f}")
            return figs

        emb_pool = [f"{m}@embedded" for m in POOL]
        if "chosen" in args.orders_on and len(pool) >= 2:
            bench_out["orders"] = orders_of(pool, "chosen pool")
            atomic_write_json(out / "dafm_accuracy.partial.json", results)
        # The chosen pool may have fewer than four models (3! = 6 orders); the all-embedded pool always has four.
        if "all-embedded" in args.orders_on and "embedded" in args.backbones and emb_pool != pool:
            bench_out.setdefault("all_embedded", {})["orders"] = orders_of(emb_pool, "all-embedded pool")
        sel.write(out / f"selection-{bench}.json")
        results[bench] = bench_out
    results["wall_s"] = time.perf_counter() - t_start
    atomic_write_json(out / "dafm_accuracy.json", results)
    print(json.dumps(results, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
