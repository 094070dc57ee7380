"""`cirfusion fuse CKPT1 CKPT2 [...] --dataset D --root DIR --out DIR`: DAFM fusion of K >= 2 trained checkpoints.

The base models stay frozen; only a tiny fusion network (~1-2 k parameters) trains, on their similarity scores
computed on the fly from embeddings encoded once from the feature cache (see `cirfusion.fusion`). Base models
trained on different datasets or different data files (galleries) are refused. Base models may read different
backbones (DAFM's own pool does): the fused model then reads them side by side (a multi: backbone), and the
features of that composite are cached like any backbone's.

Writes into --out:

    best/            the fused checkpoint (config.json + model.safetensors + bases/NN-NAME/ copies of the base
                     checkpoints): `cirfusion eval`, `cirfusion.load` work on it like on any checkpoint
    metrics.json     per split: every base model, the mean of the normalised scores, the best single model and the
                     fused model (and the fixed-tau fusion with --compare-tau); training history (loss, tau per
                     step); per-query model-weight summary (explanations)
    incremental.json, incremental.png   with --incremental: every order of adding the models (those starting
                     with --base if given), each prefix fitted as its own fusion over --incremental-seeds seeds, the
                     metric after each addition and the spread over orders and seeds (the paper's Figure 3)
    selection.json   every choice (each base model's epoch and the split it was chosen on, the fusion's epoch) with
                     the validation figure behind it
    log.json         every training step (loss, tau, lr) and epoch record

By default the fusion is fitted on val/fuse, the half of the val split (by reference image) that the base models
neither trained on nor chose their epochs on (`cirfusion train` chooses on val/select; docs/protocol.md), with a
fifth of it held out to pick the epoch, and reported on test: `--split-train val/fuse --split-val none --split-test
test`. `selection.json` in --out records every choice and the validation figure behind it. Pass `--split-test none` for a dataset without a
labelled test split. Fitting on the bases' training split (`--split-train train --split-val val`) makes the command
compare the bases' training-split and validation metrics and warn when the gap is large.

`--fixed-tau` trains with a constant temperature (the ablation); `--compare-tau` trains both and reports both
(the dynamic one is saved). `--negatives full` scores each step's queries against the whole gallery instead of
shortlists of hard + random candidates. Option defaults are those of the library (cirfusion.fusion.FusionConfig,
cirfusion.fusion.FuseSplits): the quickstart fuses with the same ones.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..fusion import FuseSplits, FusionConfig, fuse_checkpoints
from ..options import OptionError
from ..threads import set_override
from ._common import add_dataset_args, dataset_kwargs
from ._features import add_backbone_access_args, add_feature_args, default_cache_dir


def _split(value: str) -> str | None:
    return None if value.lower() == "none" else value


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    d, sp = FusionConfig(), FuseSplits()
    p = sub.add_parser("fuse", help="DAFM fusion of several trained checkpoints (frozen) with a tiny learned network",
                       description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", type=Path, help="two or more checkpoint directories (e.g. runs/x/best)")
    add_dataset_args(p, positional=False)
    p.add_argument("--split-train", default=sp.fit, help=f"split the fusion is fitted on (default: {sp.fit})")
    p.add_argument("--split-val", default=str(sp.val).lower(),
                   help=f"split that selects the best epoch, or 'none' to hold --holdout of the fit split out "
                        f"(default: {str(sp.val).lower()})")
    p.add_argument("--split-test", default=str(sp.test).lower(),
                   help=f"split to report on, or 'none' (default: {str(sp.test).lower()})")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing fused checkpoint in --out")
    add_feature_args(p)
    add_backbone_access_args(p)
    g = p.add_argument_group("fusion training (defaults: cirfusion.fusion.FusionConfig)")
    g.add_argument("--epochs", type=int, default=d.epochs, help=f"at least this many epochs (default {d.epochs})")
    g.add_argument("--holdout", type=float, default=d.holdout,
                   help=f"with --split-val none: share of the fit queries held out to pick the epoch (default "
                        f"{d.holdout}; 0: keep the last epoch)")
    g.add_argument("--min-steps", type=int, default=d.min_steps,
                   help=f"train at least this many steps, adding epochs when the fit split is small (default "
                        f"{d.min_steps}; 0: off)")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help=f"queries per step (default {d.batch_size})")
    g.add_argument("--lr", type=float, default=d.lr, help=f"learning rate (default {d.lr})")
    g.add_argument("--seed", type=int, default=d.seed, help=f"seed (default {d.seed})")
    g.add_argument("--tau0", type=float, default=d.tau0, help=f"initial temperature (default {d.tau0})")
    g.add_argument("--s", type=float, default=d.s,
                   help=f"s of the dynamic update tau_t = tau_(t-1) (1 - L_(t-1)/s) (default {d.s})")
    g.add_argument("--tau-min", type=float, default=d.tau_min, help=f"default {d.tau_min}")
    g.add_argument("--tau-max", type=float, default=d.tau_max, help=f"default {d.tau_max}")
    g.add_argument("--fixed-tau", action="store_true", help="keep tau = tau0 (ablation)")
    g.add_argument("--compare-tau", action="store_true", help="train with fixed and dynamic tau and report both")
    g.add_argument("--negatives", choices=("shortlist", "full"), default=d.negatives, help=f"default {d.negatives}")
    g.add_argument("--hard", type=int, default=d.hard, help=f"hard candidates per training query, shortlist (default {d.hard})")
    g.add_argument("--random", type=int, default=d.random,
                   help=f"random gallery columns per step, shortlist (default {d.random})")
    g.add_argument("--hidden", type=int, default=None,
                   help="width of the residual 1x1 convolutions (default: the dafm method's)")
    g.add_argument("--blocks", type=int, default=None, help="residual refinement blocks, >= 1 (default: the dafm method's)")
    g.add_argument("--val-metric", default=d.val_metric, help=f"metric selecting the best epoch (default: {d.val_metric})")
    g.add_argument("--chunk", type=int, default=d.eval_chunk,
                   help=f"queries scored at once in evaluation (default {d.eval_chunk})")
    p.add_argument("--incremental", action="store_true",
                   help="fit every order of adding the models (each prefix its own fusion) and report the spread")
    p.add_argument("--base", default=None,
                   help="with --incremental: only the orders starting with this model (name, index or checkpoint path)")
    p.add_argument("--incremental-seeds", type=int, default=1,
                   help="with --incremental: fit every order with seeds 0..N-1 (default 1)")
    p.add_argument("--json", action="store_true", help="print the metrics JSON")
    p.set_defaults(func=run)


def _table(results: dict[str, dict[str, float]], metrics: list[str]) -> str:
    width = max(len(k) for k in results) + 2
    lines = ["  " + "model".ljust(width) + "".join(f"{m:>10}" for m in metrics)]
    for name, res in results.items():
        lines.append("  " + name.ljust(width) + "".join(f"{res.get(m, float('nan')):>10.2f}" for m in metrics))
    return "\n".join(lines)


def _say_nothing(msg: str) -> None:
    """--json: the report is the only output."""


def run(args: argparse.Namespace) -> int:
    if args.threads:
        set_override(args.threads)
    hparams: dict[str, Any] = {}
    for name in ("hidden", "blocks"):
        v = getattr(args, name)
        if v is not None:
            if v < 1:
                raise OptionError(f"--{name} must be >= 1, got {v}")
            hparams[name] = v
    cfg = FusionConfig(  # a bad value is an OptionError: one line, exit 2 (cli.main)epochs=args.epochs, min_steps=args.min_steps, holdout=args.holdout, batch_size=args.batch_size,
                       lr=args.lr, seed=args.seed, tau0=args.tau0, dynamic_tau=not args.fixed_tau, s=args.s,
                       tau_min=args.tau_min, tau_max=args.tau_max, negatives=args.negatives, hard=args.hard,
                       random=args.random, eval_chunk=args.chunk, val_metric=args.val_metric,
                       progress=not args.no_progress)
    kw = dataset_kwargs(args)
    splits = FuseSplits(fit=args.split_train, val=_split(args.split_val), test=_split(args.split_test))
    if args.incremental_seeds < 1:
        raise OptionError(f"--incremental-seeds must be >= 1, got {args.incremental_seeds}")
    incremental = (args.base or "all") if args.incremental else None
    run_ = fuse_checkpoints(
        args.checkpoints, args.dataset, args.root, args.out, cfg, cache_dir=args.cache_dir or default_cache_dir(),
        splits=splits, dataset_options=kw, hparams=hparams, compare_tau=args.compare_tau,
        incremental=incremental, incremental_seeds=tuple(range(args.incremental_seeds)), backbone_dirs=args.backbone_dir,
        allow_download=args.allow_download, feature_batch_size=args.feature_batch_size,
        workers=args.workers, overwrite=args.overwrite, progress=not args.no_progress,
        say=_say_nothing if args.json else print)
    report = run_.report
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    names = [b["name"] for b in report["bases"]]
    for split, entry in report["splits"].items():
        mets = [m for m in ("R@1", "R@5", "R@10", "R@50", "Rsubset@1", "Rmean", "mAP@10") if m in entry["fused"]]
        rows = {**{f"{n}": entry["bases"][n] for n in names}, "mean of normalised": entry["mean_normalised"],
                **{label: entry[label] for label in run_.variants}}
        print(f"{split} ({entry['dataset']}); best single: {entry['best_single']['name']}; "
              f"fused - best single: {entry['gain_over_best_single']:+.2f} {entry['metric']}")
        print(_table(rows, mets))
        ex = entry["explanation"]
        print("  mean model weight per query: " + ", ".join(f"{n} {w:.2f}" for n, w in ex["mean_weight"].items()))
        dg = entry.get("diagnostics")
        if dg:
            h = dg["headroom"]
            print(f"  {dg['metric']} over the mean of normalised scores: learned {h['learned']:+.2f}; best static "
                  f"weighting {h['static_best']:+.2f}; per-query oracle model {h['oracle_single']:+.2f}, weighting "
                  f"{h['oracle_weights']:+.2f}; gate weights' distance from their average "
                  f"{dg['gate']['mean_distance_from_average']:.3f}")
    out_dir: Path = args.out
    print(f"fused checkpoint: {out_dir / 'best'}; metrics: {out_dir / 'metrics.json'}"
          + (f"; incremental plot: {out_dir / 'incremental.png'}" if args.incremental else "")
          + f"; choices: {out_dir / 'selection.json'}"
          + f" ({report['wall_s']:.1f} s)")
    return 0
