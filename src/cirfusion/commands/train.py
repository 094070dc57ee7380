"""`cirfusion train METHOD --dataset D --root DIR`: train a registered method on cached backbone features.

Features are computed once per backbone into the feature cache (``--cache-dir``, default
``$CIRFUSION_CACHE_DIR`` or ``~/.cache/cirfusion/features``) and reused by every later run. The run directory
(``--out``, default ``runs/METHOD-DATASET``) receives ``manifest.json``, ``metrics.jsonl``, ``best/`` (the
checkpoint to give `cirfusion eval`) and ``last/`` (the state `--resume` continues from: same result as an
uninterrupted run). Under ``torchrun --nproc_per_node=N`` the run uses N processes (gloo on CPU).

Method hyper-parameters: ``--hparam KEY=VALUE`` (repeatable; VALUE parsed as JSON when it can be), e.g.
``--hparam image_encoder=tokens``. ``cirfusion train --list`` prints the methods and their hyper-parameters.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from ._common import add_dataset_args, dataset_kwargs


def default_cache_dir() -> Path:
    env = os.environ.get("CIRFUSION_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "cirfusion" / "features"


def add_feature_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="feature cache directory (default: $CIRFUSION_CACHE_DIR or ~/.cache/cirfusion/features)")
    p.add_argument("--feature-batch-size", type=int, default=64, help="images per backbone forward pass")
    p.add_argument("--workers", type=int, default=0, help="image decoding threads while the backbone encodes")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def parse_hparams(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ValueError(f"--hparam expects KEY=VALUE with a Python identifier as KEY, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("train", help="train a method (or write a baseline's checkpoint) on cached features",
                       description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("method", nargs="?", help="registered method name (see --list)")
    p.add_argument("--list", action="store_true", help="print the registered methods and their hyper-parameters")
    add_dataset_args(p, positional=False)
    for action in p._actions:  # --list needs no dataset; run() checks them otherwise
        if action.dest in ("dataset", "root"):
            action.required = False
    p.add_argument("--split-train", default="train", help="training split (default: train)")
    p.add_argument("--split-val", default="val", help="validation split, or 'none' (default: val)")
    p.add_argument("--backbone", default="embedded", help="backbone name (default: embedded)")
    add_feature_args(p)
    p.add_argument("--out", type=Path, default=None, help="run directory (default: runs/METHOD-DATASET)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last saved state")
    p.add_argument("--hparam", action="append", default=[], metavar="KEY=VALUE", help="method hyper-parameter")
    g = p.add_argument_group("optimisation (defaults: cirfusion.train.TrainConfig)")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int, help="per process")
    g.add_argument("--lr", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--warmup", type=float, help="fraction of each stage's steps")
    g.add_argument("--min-lr-ratio", type=float)
    g.add_argument("--grad-clip", type=float)
    g.add_argument("--hard-negatives", type=int,
                   help="per query, this many hard negatives (see --hard-negative-source) join the batch")
    g.add_argument("--hard-negative-pool", type=int, help="... drawn from this many nearest neighbours (default 32)")
    g.add_argument("--hard-negative-source", choices=("neighbours", "subset"),
                   help="neighbours: of the reference (default); subset: the query's annotated subset, e.g. CIRR's "
                        "img_set (neighbours for a query without one)")
    g.add_argument("--seed", type=int)
    g.add_argument("--val-metric", help="metric that selects the best epoch (default: auto)")
    g.add_argument("--stage-epochs", action="append", default=[], metavar="STAGE=N", help="epochs of one stage")
    g.add_argument("--save-every-steps", type=int, help="also save the training state every N steps")
    g.add_argument("--stop-after-steps", type=int, help="stop (state saved, resumable) after N steps")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def list_methods_text() -> str:
    from ..methods.registry import get_method_class, list_methods

    lines = []
    for name in list_methods():
        cls = get_method_class(name)
        doc = " ".join((cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").split("\n\n")[0].split())
        doc = doc.split(". ")[0].rstrip(".") + "."
        lines.append(f"{name}{'' if cls.trainable else ' (no parameters)'}: {doc}")
        for k, v in cls.default_hparams.items():
            lines.append(f"    {k} = {json.dumps(v)}")
    return "\n".join(lines)


def make_cache(args: argparse.Namespace, backbone: Any) -> Any:
    from ..features import FeatureCache

    return FeatureCache(backbone, args.cache_dir or default_cache_dir(), batch_size=args.feature_batch_size,
                        num_workers=args.workers)


def split_data(cache: Any, dataset: Any, training: bool, progress: bool) -> Any:
    """Cached features of a split (see :func:`cirfusion.views.load_split_data`)."""
    from ..views import load_split_data

    return load_split_data(cache, dataset, training=training, progress=progress)


def _config(args: argparse.Namespace, saved: dict[str, Any] | None) -> Any:
    from ..train import TrainConfig

    cfg = TrainConfig.from_dict(saved) if saved else TrainConfig()
    for name in ("epochs", "batch_size", "lr", "weight_decay", "warmup", "min_lr_ratio", "grad_clip", "hard_negatives",
                 "hard_negative_pool", "hard_negative_source", "seed", "val_metric", "save_every_steps", "stop_after_steps"):
        v = getattr(args, name)
        if v is not None:
            setattr(cfg, name, v)
    for item in args.stage_epochs:
        stage, sep, n = item.partition("=")
        if not sep or not n.strip().isdigit():
            raise ValueError(f"--stage-epochs expects STAGE=N, got {item!r}")
        cfg.stage_epochs = {**cfg.stage_epochs, stage.strip(): int(n)}
    cfg.progress = not args.no_progress
    return cfg


def run(args: argparse.Namespace) -> int:
    if args.list:
        print(list_methods_text())
        return 0
    if not args.method or not args.dataset or not args.root:
        print("cirfusion train: error: give METHOD, --dataset and --root (methods: `cirfusion train --list`)", file=sys.stderr)
        return 2
    import torch

    from ..backbones import create_backbone
    from ..data.registry import load_dataset
    from ..methods.registry import create_method, get_method_class
    from ..seeding import seed_everything
    from ..train import load_state, train

    try:
        get_method_class(args.method)
        hparams = parse_hparams(args.hparam)
    except (KeyError, ValueError) as exc:
        print(f"cirfusion train: error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    progress = not args.no_progress
    kw = dataset_kwargs(args)
    ds_train = load_dataset(args.dataset, args.root, args.split_train, **kw)
    out = args.out or Path("runs") / f"{args.method}-{ds_train.key.replace('/', '-')}"

    saved = None
    if args.resume:
        saved = load_state(out / "last")
        if saved["method"]["method"] != args.method:
            print(f"cirfusion train: error: {out} is a run of {saved['method']['method']!r}, not {args.method!r}", file=sys.stderr)
            return 2
        hparams = {**saved["method"]["hparams"], **hparams}
    elif (out / "last").exists() or (out / "best").exists():
        print(f"cirfusion train: error: {out} already holds a run; continue it with --resume or choose another --out",
              file=sys.stderr)
        return 2
    try:
        cfg = _config(args, saved["config"] if saved else None)
    except ValueError as exc:
        print(f"cirfusion train: error: {exc}", file=sys.stderr)
        return 2

    backbone = create_backbone(args.backbone)
    seed_everything(cfg.seed)  # the method's initial weights
    try:
        method = create_method(args.method, backbone, **hparams)
    except ValueError as exc:
        print(f"cirfusion train: error: {exc}", file=sys.stderr)
        return 2
    cache = make_cache(args, backbone)
    train_data = split_data(cache, ds_train, training=True, progress=progress)
    val_data = None
    if args.split_val.lower() != "none":
        val_data = split_data(cache, load_dataset(args.dataset, args.root, args.split_val, **kw), False, progress)
    extra = {}
    for stage in method.stages():
        if stage.split is not None and stage.split not in extra:
            extra[stage.split] = split_data(cache, load_dataset(args.dataset, args.root, stage.split, **kw), True, progress)
    backbone_info = {"id": backbone.backbone_id, "weights_hash": backbone.weights_hash(),
                     "preprocess_id": backbone.preprocess_id(), "cache_dir": str(cache.cache_dir)}
    try:
        res = train(method, train_data, val_data, out, cfg, resume=args.resume, extra_splits=extra, backbone_info=backbone_info)
    except ValueError as exc:  # e.g. a resume with a changed configuration
        print(f"cirfusion train: error: {exc}", file=sys.stderr)
        return 2
    summary = {"run_dir": str(res.run_dir), "checkpoint": str(res.best_dir), "completed": res.completed,
               "global_step": res.global_step, "val_metric": res.val_metric, "best": res.best_metric,
               "best_epoch": res.best_epoch, "val": res.final_metrics}
    if args.json:
        print(json.dumps(summary, indent=2))
    elif int(os.environ.get("RANK", "0")) == 0:
        state = "finished" if res.completed else f"stopped after {res.global_step} steps (continue with --resume)"
        print(f"{args.method} on {ds_train.key}: {state}; run directory {res.run_dir}")
        if res.best_metric is not None:
            print(f"best {res.val_metric} = {res.best_metric:.2f} (epoch {res.best_epoch}); checkpoint {res.best_dir}")
        if res.final_metrics:
            from .eval import format_metrics

            print(format_metrics(f"last validation ({val_data.dataset.key if val_data else ''})", res.final_metrics))
    return 0
