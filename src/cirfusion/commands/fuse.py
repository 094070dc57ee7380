"""`cirfusion fuse CKPT1 CKPT2 [...] --dataset D --root DIR --out DIR`: DAFM fusion of K >= 2 trained checkpoints.

The base models stay frozen; only a tiny fusion network (~1-2 k parameters) trains, on their similarity scores
computed on the fly from embeddings encoded once from the feature cache (see `cirfusion.fusion`). Base models
trained on different datasets or different data files (galleries) are refused. Base models may read different
backbones (DAFM's own pool does): the fused model then reads them side by side (a ``multi:`` backbone), and the
features of that composite are cached like any backbone's.

Writes into --out:

    best/            the fused checkpoint (config.json + model.safetensors + bases/NN-NAME/ copies of the base
                     checkpoints): `cirfusion eval`, `cirfusion.load` work on it like on any checkpoint
    metrics.json     per split: every base model, the mean of the normalised scores, the best single model and the
                     fused model (and the fixed-tau fusion with --compare-tau); training history (loss, tau per
                     step); per-query model-weight summary (explanations)
    incremental.json, incremental.png   with --incremental: every order of adding the other models to --base, the
                     metric after each addition (the paper's Figure 3)
    log.json         every training step (loss, tau, lr) and epoch record

Fit the fusion on queries the base models were not trained on: their scores on their own training queries overstate
their reliability (the command compares the bases' training-split and validation metrics and warns when the gap is
large). With the usual train/val/test splits: `--split-train val --split-val none --split-test test`.

`--fixed-tau` trains with a constant temperature (the ablation); `--compare-tau` trains both and reports both
(the dynamic one is saved). `--negatives full` scores each step's queries against the whole gallery instead of
shortlists of hard + random candidates.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from ._common import add_dataset_args, dataset_kwargs
from .train import add_feature_args, make_cache, split_data


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("fuse", help="DAFM fusion of several trained checkpoints (frozen) with a tiny learned network",
                       description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", type=Path, help="two or more checkpoint directories (e.g. runs/x/best)")
    add_dataset_args(p, positional=False)
    p.add_argument("--split-train", default="train", help="split the fusion trains on (default: train)")
    p.add_argument("--split-val", default="val", help="split that selects the best epoch, or 'none' (default: val)")
    p.add_argument("--split-test", default="none", help="also report this split, e.g. test (default: none)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing fused checkpoint in --out")
    add_feature_args(p)
    g = p.add_argument_group("fusion training (defaults: cirfusion.fusion.FusionConfig)")
    g.add_argument("--epochs", type=int, default=4)
    g.add_argument("--holdout", type=float, default=0.2,
                   help="with --split-val none: share of the fit queries held out to pick the epoch (default 0.2; 0: "
                        "keep the last epoch)")
    g.add_argument("--min-steps", type=int, default=500,
                   help="train at least this many steps, adding epochs when the fit split is small (default 500; 0: off)")
    g.add_argument("--batch-size", type=int, default=64, help="queries per step")
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--tau0", type=float, default=0.02, help="initial temperature")
    g.add_argument("--s", type=float, default=1000.0, help="s of the dynamic update tau_t = tau_{t-1} (1 - L_{t-1}/s)")
    g.add_argument("--tau-min", type=float, default=0.005)
    g.add_argument("--tau-max", type=float, default=0.05)
    g.add_argument("--fixed-tau", action="store_true", help="keep tau = tau0 (ablation)")
    g.add_argument("--compare-tau", action="store_true", help="train with fixed and dynamic tau and report both")
    g.add_argument("--negatives", choices=("shortlist", "full"), default="shortlist")
    g.add_argument("--hard", type=int, default=256, help="hard candidates per training query (shortlist)")
    g.add_argument("--random", type=int, default=512, help="random gallery columns per step (shortlist)")
    g.add_argument("--hidden", type=int, default=16, help="width of the residual 1x1 convolutions")
    g.add_argument("--blocks", type=int, default=1, help="residual refinement blocks (>= 1)")
    g.add_argument("--val-metric", default="auto", help="metric selecting the best epoch (default: auto)")
    g.add_argument("--chunk", type=int, default=256, help="queries scored at once in evaluation")
    p.add_argument("--incremental", action="store_true", help="evaluate every order of adding the models to --base")
    p.add_argument("--base", default=None, help="starting model of --incremental (name, index or checkpoint path)")
    p.add_argument("--json", action="store_true", help="print the metrics JSON")
    p.set_defaults(func=run)


OVERFIT_GAP = 10.0  # metric points between the base models' training-split and validation scores worth a warning


def split_is_distinct(args: argparse.Namespace) -> bool:
    return args.split_train != args.split_val


def _err(msg: str) -> int:
    print(f"cirfusion fuse: error: {msg}", file=sys.stderr)
    return 2


def _read_bases(paths: list[Path]) -> list[dict[str, Any]]:
    from ..checkpoint import read_config

    out: list[dict[str, Any]] = []
    used: set[str] = set()
    seen: dict[Path, Path] = {}
    for p in paths:
        real = p.resolve()
        if real in seen:
            raise ValueError(f"{p}: the same checkpoint is given twice (also as {seen[real]})")
        seen[real] = p
        cfg = read_config(p)
        man = None
        mp = p.parent / "manifest.json"
        if mp.is_file():
            try:
                man = json.loads(mp.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                man = None
        name, j = cfg["method"], 2
        while name in used:
            name, j = f"{cfg['method']}-{j}", j + 1
        used.add(name)
        out.append({"name": name, "path": str(p), "config": cfg, "manifest": man})
    return out


def _pick_base(bases: list[dict[str, Any]], spec: str | None) -> str:
    if spec is None:
        raise ValueError("--incremental needs --base NAME (one of: " + ", ".join(b["name"] for b in bases) + ")")
    for b in bases:
        if spec == b["name"] or Path(spec).resolve() == Path(b["path"]).resolve():
            return b["name"]
    if spec.isdigit() and int(spec) < len(bases):
        return bases[int(spec)]["name"]
    raise ValueError(f"--base {spec!r} is none of the base models: " + ", ".join(f"{b['name']} ({b['path']})" for b in bases))


def _table(results: dict[str, dict[str, float]], metrics: list[str]) -> str:
    width = max(len(k) for k in results) + 2
    lines = ["  " + "model".ljust(width) + "".join(f"{m:>10}" for m in metrics)]
    for name, res in results.items():
        lines.append("  " + name.ljust(width) + "".join(f"{res.get(m, float('nan')):>10.2f}" for m in metrics))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..api import load
    from ..checkpoint import CheckpointError, write_checkpoint_files
    from ..data.registry import load_dataset
    from ..evaluation import pick_val_metric
    from ..fusion import (
        FusionConfig,
        FusionError,
        SplitTable,
        baseline_model,
        check_compatible,
        evaluate_base,
        evaluate_fused,
        explain_all,
        explanation_summary,
        fuse,
        fusion_backbone,
        incremental_analysis,
        plot_incremental,
    )
    from ..io import atomic_directory, atomic_write_json

    if args.threads:
        torch.set_num_threads(args.threads)
    progress = not args.no_progress
    quiet = args.json
    say = (lambda *a, **k: None) if quiet else print
    t_start = time.perf_counter()
    out_dir: Path = args.out
    if (out_dir / "best").exists() and not args.overwrite:
        return _err(f"{out_dir / 'best'} already exists; choose another --out or pass --overwrite")

    # -- the base checkpoints: readable, compatible -------------------------------------------------------------------
    kw = dataset_kwargs(args)
    try:
        bases_info = _read_bases(args.checkpoints)
        ds_train = load_dataset(args.dataset, args.root, args.split_train, **kw)
        notes = check_compatible(bases_info, ds_train)
        start = _pick_base(bases_info, args.base) if args.incremental else None
        cfg = FusionConfig(epochs=args.epochs, min_steps=args.min_steps, holdout=args.holdout, batch_size=args.batch_size, lr=args.lr, seed=args.seed, tau0=args.tau0,
                           dynamic_tau=not args.fixed_tau, s=args.s, tau_min=args.tau_min, tau_max=args.tau_max,
                           negatives=args.negatives, hard=args.hard, random=args.random, eval_chunk=args.chunk,
                           val_metric=args.val_metric, progress=progress)
    except (CheckpointError, FusionError, ValueError) as exc:
        return _err(str(exc))
    for n in notes:
        say(f"note: {n}")
    if args.hidden < 1 or args.blocks < 1:
        return _err(f"--hidden and --blocks must be >= 1, got {args.hidden} and {args.blocks}")
    hparams = {"hidden": args.hidden, "blocks": args.blocks}

    models = [load(b["path"]) for b in bases_info]
    backbone = fusion_backbone([m.backbone for m in models])  # bases on several backbones: a multi: composite
    methods = [m.method for m in models]
    names = [b["name"] for b in bases_info]
    info = [{"dataset": b["config"].get("dataset"), "source": str(Path(b["path"]).resolve())} for b in bases_info]
    cache = make_cache(args, backbone)

    def table(split: str) -> SplitTable:
        ds = ds_train if split == args.split_train else load_dataset(args.dataset, args.root, split, **kw)
        data = split_data(cache, ds, training=False, progress=progress)
        return SplitTable.build(methods, names, data, progress=progress)

    t0 = time.perf_counter()
    tables = {"train": table(args.split_train)}
    if args.split_val.lower() != "none":
        tables["val"] = table(args.split_val)
    if args.split_test.lower() != "none":
        tables["test"] = table(args.split_test)
    encode_s = time.perf_counter() - t0
    val = tables.get("val")
    say(f"encoded {', '.join(f'{k} ({t.dataset.key}: {t.num_queries} queries, {t.num_gallery} images)' for k, t in tables.items())} "
        f"with {len(methods)} base models in {encode_s:.1f} s")

    # -- train the fusion ---------------------------------------------------------------------------------------------
    log: list[dict[str, Any]] = []
    variants = [("fused", cfg)]
    if args.compare_tau:
        other = FusionConfig(**{**cfg.to_dict(), "dynamic_tau": not cfg.dynamic_tau})
        variants.append(("fused_fixed_tau" if cfg.dynamic_tau else "fused_dynamic_tau", other))
    fused: dict[str, Any] = {}
    for label, c in variants:
        say(f"training {label} ({'dynamic' if c.dynamic_tau else 'fixed'} tau, {c.negatives} negatives, {c.epochs} epochs)")
        model, res = fuse(tables["train"], val, c, hparams=hparams, base_info=info,
                          log=lambda r, label=label: log.append({"model": label, **r}))
        fused[label] = (model, res)
        say(f"  {res.wall_s:.1f} s (setup {res.setup_s:.1f} s); best epoch {res.best_epoch}"
            + (f", {res.val_metric} = {res.best_metric:.2f}" if res.best_metric is not None else "")
            + f"; final tau {res.tau_final:.4f}")
    model, res = fused["fused"]

    # -- evaluate: bases, mean of normalised scores, best single, fused -----------------------------------------------
    report: dict[str, Any] = {"dataset": ds_train.key, "bases": [{"name": b["name"], "checkpoint": b["path"],
                              "method": b["config"]["method"], "trained_on": b["config"].get("dataset")} for b in bases_info],
                              "notes": notes, "config": cfg.to_dict(), "hparams": hparams,
                              "num_parameters": sum(p.numel() for p in model.fusion.parameters()), "splits": {}}
    baseline = baseline_model(tables["train"], hparams=hparams)
    metric_name = None
    for split, t in tables.items():
        if split == "train":
            continue
        entry: dict[str, Any] = {"dataset": t.dataset.key, "bases": {}}
        for k, n in enumerate(names):
            entry["bases"][n] = evaluate_base(t, k, args.chunk)
        metric_name = metric_name or pick_val_metric(args.val_metric, entry["bases"][names[0]], t.dataset)
        entry["metric"] = metric_name
        best = max(names, key=lambda n: entry["bases"][n][metric_name])
        entry["best_single"] = {"name": best, metric_name: entry["bases"][best][metric_name]}
        entry["mean_normalised"] = evaluate_fused(baseline, t, args.chunk)
        for label, (m, _) in fused.items():
            entry[label] = evaluate_fused(m, t, args.chunk)
        entry["gain_over_best_single"] = entry["fused"][metric_name] - entry["bases"][best][metric_name]
        entry["explanation"] = explanation_summary(explain_all(model, t, args.chunk), names)
        report["splits"][split] = entry
    # The fusion learns how far to trust each model from its scores on the training queries. Base models that scored
    # those very queries far better than unseen ones (they were trained on them) teach it the wrong trust.
    if "val" in report["splits"] and split_is_distinct(args):
        vb = report["splits"]["val"]["bases"]
        tb = {n: evaluate_base(tables["train"], k, args.chunk) for k, n in enumerate(names)}
        gaps = {n: tb[n][metric_name] - vb[n][metric_name] for n in names}
        report["overfit_check"] = {"metric": metric_name, "train": {n: tb[n][metric_name] for n in names},
                                   "val": {n: vb[n][metric_name] for n in names}, "gap": gaps}
        if max(gaps.values()) > OVERFIT_GAP:
            msg = (f"warning: the base models score much higher on the fusion's training queries than on validation "
                   f"({metric_name} train - val: " + ", ".join(f"{n} {g:+.1f}" for n, g in gaps.items()) + "): they were "
                   "trained on those queries, so their scores there overstate their reliability and the fusion learns the "
                   "wrong trust. Fit the fusion on queries the base models did not train on (e.g. --split-train val "
                   "--split-val none, with a test split to report).")
            report["notes"].append(msg)
            print(msg, file=sys.stderr)
    report["training"] = {label: {"wall_s": r.wall_s, "setup_s": r.setup_s, "best_epoch": r.best_epoch,
                                  "val_metric": r.val_metric, "best": r.best_metric, "tau_final": r.tau_final,
                                  "epochs": r.epochs, "steps": r.steps, "dynamic_tau": c.dynamic_tau}
                          for (label, (m, r)), (_, c) in zip(fused.items(), variants)}
    report["encode_s"] = encode_s

    # -- the fused checkpoint -----------------------------------------------------------------------------------------
    extra = {"fusion": {"tau_final": res.tau_final, "best_epoch": res.best_epoch, "val_metric": res.val_metric,
                        "val": res.val, "config": cfg.to_dict()}}
    with atomic_directory(out_dir / "best") as tmp:
        write_checkpoint_files(model, tmp, dataset=ds_train.key, extra=extra)
    report["checkpoint"] = str(out_dir / "best")

    if args.incremental:
        assert start is not None
        ev = tables.get("test") or val
        if ev is None or val is None:
            return _err("--incremental needs a validation split (--split-val)")
        say(f"incremental fusion from {start} on {ev.dataset.key} ({metric_name}):")
        done = {frozenset(names): report["splits"]["test" if "test" in tables else "val"]["fused"][metric_name]}
        figs = incremental_analysis(tables["train"], val, ev, start, cfg, hparams, metric_name, done, say)
        atomic_write_json(out_dir / "incremental.json", figs)
        plot_incremental(figs, out_dir / "incremental.png")
        report["incremental"] = {**figs, "json": str(out_dir / "incremental.json"), "plot": str(out_dir / "incremental.png")}
    report["wall_s"] = time.perf_counter() - t_start
    atomic_write_json(out_dir / "metrics.json", report)
    atomic_write_json(out_dir / "log.json", log)

    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for split, entry in report["splits"].items():
        mets = [m for m in ("R@1", "R@5", "R@10", "R@50", "Rsubset@1", "Rmean", "mAP@10") if m in entry["fused"]]
        rows = {**{f"{n}": entry["bases"][n] for n in names}, "mean of normalised": entry["mean_normalised"],
                **{label: entry[label] for label in fused}}
        print(f"{split} ({entry['dataset']}); best single: {entry['best_single']['name']}; "
              f"fused - best single: {entry['gain_over_best_single']:+.2f} {entry['metric']}")
        print(_table(rows, mets))
        ex = entry["explanation"]
        print("  mean model weight per query: " + ", ".join(f"{n} {w:.2f}" for n, w in ex["mean_weight"].items()))
    print(f"fused checkpoint: {out_dir / 'best'}; metrics: {out_dir / 'metrics.json'}"
          + (f"; incremental plot: {out_dir / 'incremental.png'}" if args.incremental else "")
          + f" ({report['wall_s']:.1f} s)")
    return 0
