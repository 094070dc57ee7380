"""Retrieval quality of ``embedded`` features extracted in fp32 vs bf16, on both embedded benchmarks (issue 11).

For each benchmark (the quickstart's synthetic one; the catalog one when ``--photos`` is given), each precision and
each seed: the features of train/val come from the feature cache of ``embedded:precision=P``; a pool method is
trained on train for the quickstart's epochs, its best epoch kept on ``val/select`` (as the quickstart does), and it
is evaluated on ``val/fuse`` (queries no choice was made on) and on the whole of ``val``. Test is never read.

Prints, per benchmark and method, the headline metric's mean and standard deviation over seeds for each precision,
the difference of the means, and the seed noise it is judged against; then the agreement of the features themselves
(cosine of bf16 to fp32 global vectors, relative error of tokens) and the time each precision took to fill the
cache. Ends with one JSON line.

    python benchmarks/feature_precision.py --out /tmp/bf16-study --photos ../shared/data/clothing-small
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PHOTOS = REPO.parent / "shared" / "data" / "clothing-small"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="benchmarks, feature cache and runs go here")
    ap.add_argument("--photos", type=Path, default=None, help="photo folder of the catalog benchmark (omit: synthetic only)")
    ap.add_argument("--benchmarks", default="synthetic,catalog")
    ap.add_argument("--methods", default="clip4cir")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--data-seed", type=int, default=0, help="the benchmarks' generation seed (the quickstart's)")
    args = ap.parse_args()

    import numpy as np
    import torch

    from cirfusion.backbones import create_backbone
    from cirfusion.checkpoint import load_checkpoint
    from cirfusion.data.registry import load_dataset
    from cirfusion.evaluation import evaluate
    from cirfusion.features import FeatureCache
    from cirfusion.methods.registry import create_method
    from cirfusion.quickstart import QuickstartConfig, headline_metric, make_catalog, make_synthetic
    from cirfusion.seeding import seed_everything
    from cirfusion.selection import data_part
    from cirfusion.train import TrainConfig, train
    from cirfusion.views import load_split_data

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    qc = QuickstartConfig(out=out, photos=args.photos, seed=args.data_seed, progress=False)
    roots: dict[str, Path] = {}
    for name in args.benchmarks.split(","):
        if name == "synthetic":
            roots[name] = make_synthetic(out, qc)
        elif name == "catalog":
            if args.photos is None:
                print("catalog: skipped (no --photos)")
                continue
            roots[name] = make_catalog(out, qc)
        else:
            raise SystemExit(f"unknown benchmark {name!r}")
    precisions = args.precisions.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    results: dict[str, Any] = {"load_avg_at_start": os.getloadavg()[0], "torch": torch.__version__, "benchmarks": {}}

    for bench, root in roots.items():
        ds = {s: load_dataset(bench, root, s) for s in ("train", "val")}
        epochs = qc.catalog_epochs if bench == "catalog" else qc.epochs
        rec: dict[str, Any] = {"epochs": epochs, "features_s": {}, "runs": {}}
        data: dict[str, dict[str, Any]] = {}
        for p in precisions:
            backbone = create_backbone("embedded", precision=p)
            cache = FeatureCache(backbone, out / "cache")
            t = time.perf_counter()
            data[p] = {s: load_split_data(cache, d, training=(s == "train")) for s, d in ds.items()}
            rec["features_s"][p] = round(time.perf_counter() - t, 1)  # 0-ish when the cache was already filled
            data[p]["backbone"] = backbone
        if {"fp32", "bf16"} <= set(precisions):
            a, b = data["fp32"]["val"].images, data["bf16"]["val"].images
            ga, gb = (torch.from_numpy(np.asarray(x.global_, dtype=np.float32)) for x in (a, b))
            cos = torch.nn.functional.cosine_similarity(ga, gb)
            ta, tb = (torch.from_numpy(np.asarray(x.tokens, dtype=np.float32)) for x in (a, b))
            rel = ((ta - tb).norm(dim=-1) / ta.norm(dim=-1).clamp_min(1e-6)).mean()
            at, bt = data["fp32"]["val"].texts, data["bf16"]["val"].texts
            tcos = torch.nn.functional.cosine_similarity(
                torch.from_numpy(np.asarray(at.global_, dtype=np.float32)), torch.from_numpy(np.asarray(bt.global_, dtype=np.float32)))
            rec["agreement_val"] = {"image_global_cos_min": round(float(cos.min()), 4), "image_global_cos_mean": round(float(cos.mean()), 5),
                                    "image_tokens_rel_err_mean": round(float(rel), 4),
                                    "text_global_cos_min": round(float(tcos.min()), 4), "text_global_cos_mean": round(float(tcos.mean()), 5)}
        for m in methods:
            for p in precisions:
                for seed in seeds:
                    t = time.perf_counter()
                    seed_everything(seed)
                    method = create_method(m, data[p]["backbone"])
                    run_dir = out / "runs" / bench / m / f"{p}-seed{seed}"
                    res = train(method, data[p]["train"], data_part(data[p]["val"], "select"), run_dir,
                                TrainConfig(epochs=epochs, seed=seed, progress=False), overwrite=True)
                    best = load_checkpoint(res.best_dir)
                    fuse = evaluate(best, data_part(data[p]["val"], "fuse"))
                    whole = evaluate(best, data[p]["val"])
                    metric = headline_metric(bench, whole)
                    rec["runs"][f"{m}/{p}/{seed}"] = {"metric": metric, "val_fuse": fuse, "val": whole,
                                                     "best_epoch": res.best_epoch, "wall_s": round(time.perf_counter() - t, 1)}
                    print(f"{bench} {m} {p} seed {seed}: {metric} val/fuse {fuse[metric]:.2f}, val {whole[metric]:.2f} "
                          f"(epoch {res.best_epoch}, {time.perf_counter() - t:.0f} s)", flush=True)
        results["benchmarks"][bench] = rec

    print(f"\n{'benchmark':10s} {'method':10s} {'metric':7s} {'split':9s} " + " ".join(f"{p + ' mean±sd':>16s}" for p in precisions)
          + f" {'diff':>7s} {'seed sd':>8s}")
    for bench, rec in results["benchmarks"].items():
        summary: dict[str, Any] = {}
        for m in methods:
            for split in ("val_fuse", "val"):
                vals = {p: [r[split][r["metric"]] for k, r in rec["runs"].items() if k.startswith(f"{m}/{p}/")] for p in precisions}
                metric = next(r["metric"] for k, r in rec["runs"].items() if k.startswith(f"{m}/"))
                stats = {p: (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0) for p, v in vals.items()}
                diff = stats[precisions[-1]][0] - stats[precisions[0]][0]
                # Seed noise: the pooled standard deviation of one run (the difference of two means of n runs has
                # sd = pooled * sqrt(2 / n)).
                pooled = (sum(s[1] ** 2 for s in stats.values()) / len(stats)) ** 0.5
                se_diff = pooled * (2 / len(seeds)) ** 0.5
                summary[f"{m}/{split}"] = {"metric": metric, "values": vals, "diff": round(diff, 3), "seed_sd": round(pooled, 3),
                                           "se_diff": round(se_diff, 3)}
                print(f"{bench:10s} {m:10s} {metric:7s} {split.replace('_', '/'):9s} "
                      + " ".join(f"{s[0]:>9.2f}±{s[1]:<6.2f}" for s in stats.values())
                      + f" {diff:>+7.2f} {pooled:>8.2f}  (sd of the difference {se_diff:.2f})")
        rec["summary"] = summary
        if "agreement_val" in rec:
            print(f"{bench}: bf16 vs fp32 features on val: {rec['agreement_val']}")
        print(f"{bench}: cache fill time per precision (s, 0 when reused): {rec['features_s']}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
