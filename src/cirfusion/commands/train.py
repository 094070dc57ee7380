"""`cirfusion train METHOD --dataset D --root DIR`: train a registered method on cached backbone features.

Features are computed once per backbone into the feature cache (--cache-dir, default $CIRFUSION_CACHE_DIR or
~/.cache/cirfusion/features) and reused by every later run. The run directory (--out, default
runs/METHOD-DATASET) receives manifest.json, metrics.jsonl, best/ (the checkpoint to give `cirfusion eval`) and
last/ (the state --resume continues from: same result as an uninterrupted run). A directory that already holds a
run is refused unless --resume continues it or --overwrite replaces it; two runs never write into one directory at
the same time. Under `torchrun --nproc_per_node=N` the run uses N processes (gloo on CPU).

Method hyper-parameters: --hparam KEY=VALUE (repeatable; VALUE is JSON, a bare word is a string), e.g.
--hparam image_encoder=global. `cirfusion train --list` prints every method's hyper-parameters with their types,
defaults and meaning; an unknown name or a value of the wrong type is refused with that list.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from ..backbones import create_backbone
from ..data.registry import load_dataset
from ..methods.base import CIRMethod, params_help
from ..methods.registry import create_method, get_method_class, list_methods
from ..options import OptionError, parse_options
from ..rundir import RunDirError, check_fresh, check_unlocked
from ..seeding import seed_everything
from ..threads import set_override
from ..train import TrainConfig, check_trainable, load_state, train
from ._common import add_dataset_args, dataset_kwargs, format_metrics
from ._features import add_feature_args, make_cache, split_data

# Re-exported for the commands that still import them from here (eval, fuse, index, search); their home is
# cirfusion.commands._features.
__all__ = ["list_methods_text", "parse_hparams", "register", "run"]


def parse_hparams(items: list[str], cls: type[CIRMethod]) -> dict[str, Any]:
    """``--hparam KEY=VALUE`` items, checked against the method's hyper-parameter dataclass (names and types)."""
    return parse_options(items, cls.Params, what=f"--hparam ({cls.method_name})")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    p.add_argument("--split-val", default="val/select",
                   help="split (or part) that chooses the best epoch, or 'none' (default: val/select, the half of val "
                        "the fusion does not fit on; docs/protocol.md)")
    p.add_argument("--backbone", default="embedded", help="backbone name (default: embedded)")
    add_feature_args(p)
    p.add_argument("--allow-download", action="store_true",
                   help="let --backbone hf-clip:ID / hf-blip2:ID fetch a hub id from the Hugging Face hub (default: local only)")
    p.add_argument("--out", type=Path, default=None, help="run directory (default: runs/METHOD-DATASET)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last saved state")
    p.add_argument("--overwrite", action="store_true",
                   help="start again in an --out that holds an old run: its files are removed first (a directory "
                        "holding anything else is refused)")
    p.add_argument("--hparam", action="append", default=[], metavar="KEY=VALUE",
                   help="method hyper-parameter (repeatable; see --list)")
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
    g.add_argument("--precision", choices=("fp32", "bf16"),
                   help="bf16: training steps under bfloat16 autocast (on CPUs with native bf16, e.g. avx512_bf16, "
                        "steps up to 1.5x faster, whole runs ~1.1x; weights and validation stay fp32). Default fp32")
    g.add_argument("--seed", type=int)
    g.add_argument("--val-metric", help="metric that selects the best epoch (default: auto)")
    g.add_argument("--stage-epochs", action="append", default=[], metavar="STAGE=N", help="epochs of one stage")
    g.add_argument("--save-every-steps", type=int, help="also save the training state every N steps")
    g.add_argument("--stop-after-steps", type=int, help="stop (state saved, resumable) after N steps")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def _summary_line(cls: type[CIRMethod]) -> str:
    doc = " ".join((cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").split("\n\n")[0].split())
    return doc.split(". ")[0].rstrip(".") + "."


def list_methods_text() -> str:
    """Every registered method, and each hyper-parameter as ``name (type) = default: help`` from its dataclass."""
    lines = []
    for name in list_methods():
        cls = get_method_class(name)
        lines.append(f"{name}{'' if cls.trainable else ' (no parameters)'}: {_summary_line(cls)}")
        for field_name, tp, default, help_text in params_help(cls.Params):
            lines.append(f"    {field_name} ({tp}) = {json.dumps(default)}{': ' + help_text if help_text else ''}")
    return "\n".join(lines)


def _config(args: argparse.Namespace, saved: dict[str, Any] | None) -> TrainConfig:
    cfg = TrainConfig.from_dict(saved) if saved else TrainConfig()
    for name in ("epochs", "batch_size", "lr", "weight_decay", "warmup", "min_lr_ratio", "grad_clip", "hard_negatives",
                 "hard_negative_pool", "hard_negative_source", "precision", "seed", "val_metric", "save_every_steps",
                 "stop_after_steps"):
        v = getattr(args, name)
        if v is not None:
            setattr(cfg, name, v)
    for item in args.stage_epochs:
        stage, sep, n = item.partition("=")
        if not sep or not n.strip().isdigit():
            raise OptionError(f"--stage-epochs expects STAGE=N, got {item!r}")
        cfg.stage_epochs = {**cfg.stage_epochs, stage.strip(): int(n)}
    cfg.progress = not args.no_progress
    return cfg


def run(args: argparse.Namespace) -> int:
    if args.list:
        print(list_methods_text())
        return 0
    if not args.method or not args.dataset or not args.root:
        raise OptionError("give METHOD, --dataset and --root (methods: cirfusion train --list)")
    return _run(args)  # expected failures are CirfusionErrors: cli.main prints them in one line (exit 2)


def _run(args: argparse.Namespace) -> int:
    cls = get_method_class(args.method)
    hparams = parse_hparams(args.hparam, cls)
    if args.resume and args.overwrite:
        raise OptionError("--resume continues the run in --out, --overwrite replaces it: give one of them")
    if args.threads:
        set_override(args.threads)
    progress = not args.no_progress
    kw = dataset_kwargs(args)
    ds_train = load_dataset(args.dataset, args.root, args.split_train, **kw)
    out = args.out or Path("runs") / f"{args.method}-{ds_train.key.replace('/', '-')}"

    # Refuse an unusable run directory now, before the (possibly long) feature computation.
    saved = None
    if args.resume:
        saved = load_state(out / "last")
        if saved["method"]["method"] != args.method:
            raise RunDirError(f"{out} is a run of {saved['method']['method']!r}, not {args.method!r}")
        hparams = {**saved["method"]["hparams"], **hparams}
    else:
        check_fresh(out, args.overwrite)
    check_unlocked(out)
    cfg = _config(args, saved["config"] if saved else None)

    backbone = create_backbone(args.backbone, allow_download=args.allow_download)
    seed_everything(cfg.seed)  # the method's initial weights
    method = create_method(args.method, backbone, **hparams)
    check_trainable(method, cfg)
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
    res = train(method, train_data, val_data, out, cfg, resume=args.resume, extra_splits=extra,
                backbone_info=backbone_info, overwrite=args.overwrite)
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
            print(format_metrics(f"last validation ({val_data.dataset.key if val_data else ''})", res.final_metrics))
    return 0
