"""How much the DAFM gain depends on the fusion's own seed (issue 4, section 3): on a finished quickstart
directory, fit the fusion of the whole pool on val/fuse (docs/protocol.md) with seeds 0..N-1 and print each seed's
gain over the best single model and over the mean of normalised scores on test (Rmean on synthetic, mAP@10 on the
catalog). Every fit is chosen on val/fuse (its held-out fifth picks the epoch); test only reports.

    python benchmarks/dafm_seeds.py --dir quickstart --seeds 5

The seed draws the held-out fifth of the fit (val/fuse) queries that picks the epoch, the network's initial weights,
the batch order and the random negatives; the base models are the directory's, unchanged. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=Path("bench-dafm"))
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--min-steps", type=int, default=None, help="fusion training steps at least (default: FusionConfig's)")
    p.add_argument("--holdout", type=float, default=None,
                   help="share of the fit (val) queries that picks the epoch (default: FusionConfig's)")
    args = p.parse_args()

    import numpy as np
    import torch

    from cirfusion.fusion import FusionConfig, baseline_model, evaluate_base, evaluate_fused, fuse
    from cirfusion.quickstart import headline_metric, pool_tables

    torch.set_num_threads(2)
    # Only what was given on the command line: everything else is FusionConfig's default (cirfusion fuse's too).
    overrides = {k: v for k, v in (("min_steps", args.min_steps), ("holdout", args.holdout)) if v is not None}
    t0 = time.perf_counter()
    figures: dict[str, object] = {"dir": str(args.dir), "seeds": args.seeds}
    for bench, (_, tables) in pool_tables(args.dir, ("val/fuse", "test")).items():
        tables["val"] = tables["val/fuse"]
        names = tables["val"].names
        single = {n: evaluate_base(tables["test"], k) for k, n in enumerate(names)}
        metric = headline_metric(bench, single[names[0]])
        best = max(v[metric] for v in single.values())
        mean = evaluate_fused(baseline_model(tables["test"]), tables["test"])[metric] - best
        gains: list[float] = []
        for seed in range(args.seeds):
            cfg = FusionConfig(**overrides, val_metric=metric, seed=seed)
            model, _ = fuse(tables["val"], None, cfg)
            gains.append(evaluate_fused(model, tables["test"])[metric] - best)
        print(f"{bench} ({metric}, fitted on {tables['val'].dataset.key}, {tables['test'].num_queries} test queries): "
              f"gain of the full fusion over the best "
              f"single model per seed " + ", ".join(f"{g:+.2f}" for g in gains)
              + f"; min {min(gains):+.2f}, mean {np.mean(gains):+.2f}; mean of normalised scores {mean:+.2f}; "
              f"learned - mean: mean {np.mean(gains) - mean:+.2f}", flush=True)
        figures[bench] = {"metric": metric, "best_single": best, "gains": gains, "min": min(gains),
                          "mean": float(np.mean(gains)), "mean_normalised_gain": mean}
    figures["wall_s"] = time.perf_counter() - t0
    print(json.dumps(figures, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
