"""The one training loop every method uses (read it top to bottom).

Inputs are cached backbone features (an image table and a text table per split, see ``cirfusion.features``); the
method turns them into embeddings. Per stage of ``method.stages()``: AdamW on the stage's parameters, linear
warm-up then cosine decay, gradient clipping, InfoNCE (or the stage's own loss) on batches gathered from the tables
-- in-batch targets as negatives (other positives of a query masked out), plus, with ``hard_negatives=k``, k images
per query mined among its reference's nearest neighbours -- the validation metric after each epoch (full gallery,
scored in query chunks), the best checkpoint kept.

Run directory::

    RUN_DIR/manifest.json     config, seed, method, backbone, data file hashes, code version
    RUN_DIR/metrics.jsonl     one JSON record per logged step / epoch
    RUN_DIR/best/             the best checkpoint (config.json + model.safetensors) -- what `cirfusion eval` takes
    RUN_DIR/last/             the latest checkpoint + the training state (optimizer, counters, RNG), for --resume
    RUN_DIR/train.lock        held while a run writes here: a second run into the same directory fails at once

Every directory is written atomically (temporary directory + rename). A run without ``resume`` starts in an empty
directory (``overwrite`` removes an old run first); see :mod:`cirfusion.rundir`. Determinism: the epoch order, the sampled
target of multi-target queries and the training text are drawn from generators seeded by (seed, stage, epoch), and
the torch RNG (dropout) is re-seeded from (seed, rank, step) before every step, so a run resumed from ``last/``
continues exactly where the interrupted one would have: same batches, same dropout masks, same weights.

Distributed: under ``torchrun`` (WORLD_SIZE > 1, gloo on CPU) each rank takes an equal shard of every epoch's
order; gradients are averaged with one all-reduce per step (InfoNCE negatives stay local to a rank's batch);
rank 0 alone validates and writes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .allocator import keep_freed_memory
from .checkpoint import (
    CheckpointError,
    load_state_strict,
    optimizer_state_from_safe,
    optimizer_state_to_safe,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_checkpoint_files,
)
from .distributed import allreduce_gradients, distributed_context
from .evaluation import evaluate, pick_val_metric
from .examples import Examples, shard_batches
from .io import atomic_directory, recover_directory
from .manifest import build_manifest, write_manifest
from .methods.base import CIRMethod, HardNegativesUnsupported, stage_parameters
from .optim import lr_at, make_optimizer
from .options import OptionError
from .rundir import METRICS_FILE, RunDirError, RunLock, append_metrics, check_fresh, clear_run_dir, truncate_metrics
from .seeding import seed_everything, step_seed
from .threads import threads_for, torch_threads
from .views import FeatureView, SplitData

STATE_FILE = "state.json"
__all__ = ["METRICS_FILE", "STATE_FILE", "NothingToResume", "TrainConfig", "TrainResult", "check_trainable",
           "load_state", "save_state", "train"]


# ---------------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    epochs: int = 10  # per stage, unless the stage fixes its own or ``stage_epochs`` names it
    batch_size: int = 128  # per process
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: float = 0.05  # fraction of a stage's steps spent warming up linearly
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    hard_negatives: int = 0  # mined negatives per query (see Examples); 0 = in-batch only
    hard_negative_pool: int = 32  # "neighbours": drawn from this many nearest neighbours of the reference
    # Where hard negatives come from: "neighbours" (of the reference, frozen global features) or "subset" (the query's
    # annotated subset: the reference and the near-duplicates it is ranked against; neighbours when it has none).
    hard_negative_source: str = "neighbours"
    seed: int = 0
    val_metric: str = "auto"  # metric name, or "auto": Rmean if subsets exist, else mAP@10 (several positives), else R@10
    eval_chunk: int = 512  # query rows scored at once at validation
    log_every: int = 10  # steps between step records in metrics.jsonl
    save_every_steps: int = 0  # also write last/ every N steps (0: only at epoch ends)
    stop_after_steps: int = 0  # stop (state saved) once this many global steps are done; 0 = run to the end
    stage_epochs: dict[str, int] = field(default_factory=dict)  # per-stage epoch overrides by stage name
    # "bf16": the training steps' forward runs under bfloat16 autocast (matmuls in bf16, reductions and the loss in
    # fp32; weights, gradients and the optimizer stay fp32). On avx512_bf16 cores a FineCIR step (loss + backward) ran
    # 1.5x faster, but a whole run only ~1.1x (dropout and attention with dropout gain nothing); without native bf16
    # it is slower. Validation and the saved weights are fp32 either way.
    precision: str = "fp32"
    progress: bool = True

    PRECISIONS = ("fp32", "bf16")

    # Fields that may differ between an interrupted run and its resumption (they do not change the result).
    RESUME_FREE = ("save_every_steps", "stop_after_steps", "progress", "log_every", "eval_chunk")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class TrainResult:
    run_dir: Path
    best_dir: Path
    best_metric: float | None
    best_epoch: int | None
    val_metric: str | None
    final_metrics: dict[str, float]
    completed: bool  # False when stopped early by ``stop_after_steps``
    global_step: int



# ---------------------------------------------------------------------------------------------------------------------
# Training state (resume)
# ---------------------------------------------------------------------------------------------------------------------
def save_state(last_dir: Path, method: CIRMethod, optimizer: torch.optim.Optimizer | None, state: dict[str, Any], dataset_key: str) -> None:
    """``last/``: a loadable checkpoint plus optimizer moments and RNG states (safetensors) and counters (JSON)."""
    with atomic_directory(last_dir) as tmp:
        write_checkpoint_files(method, tmp, dataset=dataset_key, extra={"training_state": True})
        opt_meta: dict[str, Any] | None = None
        if optimizer is not None:
            tensors, opt_meta = optimizer_state_to_safe(optimizer)
            save_file(tensors, str(tmp / "optimizer.safetensors"))
        rng_t, rng_meta = rng_state()
        save_file(rng_t, str(tmp / "rng.safetensors"))
        (tmp / STATE_FILE).write_text(json.dumps({**state, "optimizer": opt_meta, "rng": rng_meta}, indent=1) + "\n")


class NothingToResume(CheckpointError):
    """``resume`` of a run that never saved a training state (killed before its first save, or never started)."""


def load_state(last_dir: Path) -> dict[str, Any]:
    """The counters, config and method record saved in ``last/`` (:class:`NothingToResume` when there are none)."""
    last_dir = Path(last_dir)
    if last_dir.parent.is_dir():
        recover_directory(last_dir)
    path = last_dir / STATE_FILE
    if not path.is_file():
        raise NothingToResume(f"{last_dir.parent}: nothing to resume: no training state was saved ({path} is missing; "
                              "the run stopped before its first save, or never started). Start it again with --overwrite")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc})") from exc


def check_trainable(method: CIRMethod, cfg: TrainConfig) -> None:
    """Refuse, before anything is written, a configuration the method cannot honour."""
    if cfg.hard_negatives > 0 and method.trainable and not method.supports_hard_negatives:
        raise HardNegativesUnsupported(f"method {method.method_name!r} cannot use mined hard negatives "
                                       f"(--hard-negatives {cfg.hard_negatives}); train it with --hard-negatives 0")


# ---------------------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------------------
def train(
    method: CIRMethod,
    train_data: SplitData,
    val_data: SplitData | None,
    run_dir: str | Path,
    config: TrainConfig | None = None,
    resume: bool = False,
    extra_splits: Mapping[str, SplitData] | None = None,
    backbone_info: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    threads: int | None = None,
) -> TrainResult:
    """Train ``method`` and write the run directory (see the module docstring). ``extra_splits`` holds the splits
    that stages name in ``Stage.split`` (e.g. edit pairs). Returns where the best checkpoint is and its metric.

    ``resume`` continues the run saved in ``run_dir/last``; otherwise ``run_dir`` must be empty or missing, or
    ``overwrite`` removes the old run in it first. Rank 0 holds the directory's lock for the whole run. Torch runs on
    ``threads`` threads (default: :func:`cirfusion.threads.threads_for` ``("train")``, one) and the caller's count is
    restored afterwards."""
    cfg = config or TrainConfig()
    run_dir = Path(run_dir)
    check_trainable(method, cfg)
    keep_freed_memory()  # every step allocates the same large blocks: reuse them (see cirfusion.allocator)
    rank, world, own_group = distributed_context()
    if resume:
        load_state(run_dir / "last")  # nothing to resume: say so before creating anything
    elif rank == 0:  # (only rank 0 writes: the other ranks may start after it has begun)
        check_fresh(run_dir, overwrite)  # refuses a non-empty directory, or one with files a run does not write
    with RunLock(run_dir) if rank == 0 else nullcontext(), torch_threads(threads_for("train", threads)):
        if rank == 0 and not resume:
            clear_run_dir(run_dir)  # under the lock: never another live run's files
        return _train(method, train_data, val_data, run_dir, cfg, resume, extra_splits, backbone_info,
                      rank, world, own_group)


def _train(method: CIRMethod, train_data: SplitData, val_data: SplitData | None, run_dir: Path, cfg: TrainConfig,
           resume: bool, extra_splits: Mapping[str, SplitData] | None, backbone_info: Mapping[str, Any] | None,
           rank: int, world: int, own_group: bool) -> TrainResult:
    """The loop itself (``run_dir`` is locked and ready)."""
    is_main = rank == 0
    last_dir, best_dir, log_path = run_dir / "last", run_dir / "best", run_dir / METRICS_FILE
    if cfg.precision not in TrainConfig.PRECISIONS:
        raise OptionError(f"precision must be one of {', '.join(TrainConfig.PRECISIONS)}, got {cfg.precision!r}")
    device_type = next((p.device.type for p in method.parameters()), "cpu")

    def autocast() -> torch.autocast:
        return torch.autocast(device_type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")

    seed_everything(cfg.seed)
    prev_deterministic = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    if torch.cuda.is_available():
        # The CPU kernels the methods use are deterministic already, and this call imports torch._inductor
        # (~6 s on 2 cores), so it is only made where it matters.
        torch.use_deterministic_algorithms(True, warn_only=True)
    ds_key = train_data.dataset.key

    # -- counters, possibly restored ----------------------------------------------------------------------------------
    state: dict[str, Any] = {"stage": 0, "epoch": 0, "step_in_epoch": 0, "global_step": 0,
                             "best_metric": None, "best_epoch": None, "val_metric": None, "done": False,
                             "epoch_loss": [0.0, 0]}
    saved: dict[str, Any] | None = None
    if resume:
        saved = load_state(last_dir)
        old = TrainConfig.from_dict(saved["config"])
        diffs = [f.name for f in fields(TrainConfig)
                 if f.name not in TrainConfig.RESUME_FREE and getattr(old, f.name) != getattr(cfg, f.name)]
        if diffs:
            raise RunDirError(f"{last_dir}: cannot resume with a different configuration ({', '.join(diffs)}); "
                             f"saved: {{{', '.join(f'{d}={getattr(old, d)!r}' for d in diffs)}}}")
        if saved["method"] != method.config():
            raise RunDirError(f"{last_dir}: the saved run trained {saved['method']['method']!r} with other "
                             "hyper-parameters or features; cannot resume it with this method")
        load_state_strict(method, load_file(str(last_dir / "model.safetensors")), last_dir)
        state.update({k: saved[k] for k in state})
        if is_main:
            truncate_metrics(log_path, state["global_step"])

    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not (resume and (run_dir / "manifest.json").exists()):
            roles = {"train": train_data.dataset, **({"val": val_data.dataset} if val_data else {}),
                     **{k: v.dataset for k, v in (extra_splits or {}).items()}}
            backbone = dict(backbone_info or {"id": method.dims.backbone_id, "weights_hash": method.dims.weights_hash,
                                              "preprocess_id": method.dims.preprocess_id})
            write_manifest(run_dir, build_manifest({**cfg.to_dict(), "world_size": world, "stages": [s.to_dict() for s in method.stages()]},
                                                   cfg.seed, method.config(), backbone, roles))

    val_view = FeatureView(val_data.images, val_data.texts) if val_data is not None else None
    final_metrics: dict[str, float] = {}

    def validate() -> dict[str, float]:
        assert val_data is not None and val_view is not None
        return evaluate(method, val_data, cfg.eval_chunk, progress=False, view=val_view)

    def finish(completed: bool) -> TrainResult:
        if torch.cuda.is_available():
            torch.use_deterministic_algorithms(prev_deterministic[0], warn_only=prev_deterministic[1])
        if own_group:
            dist.barrier()
            dist.destroy_process_group()
        return TrainResult(run_dir, best_dir, state["best_metric"], state["best_epoch"], state["val_metric"],
                           final_metrics, completed, state["global_step"])

    # -- methods without parameters: nothing to optimise, still a checkpoint and its validation numbers ----------------
    if not method.trainable or not any(True for _ in method.parameters()):
        if is_main:
            if val_data is not None:
                final_metrics = validate()
                state["val_metric"] = pick_val_metric(cfg.val_metric, final_metrics, val_data.dataset)
                state["best_metric"] = final_metrics[state["val_metric"]]
                append_metrics(log_path, {"type": "epoch", "stage": "none", "epoch": 0, "global_step": 0, "val": final_metrics})
            save_checkpoint(method, best_dir, dataset=ds_key, extra={"val": final_metrics})
            state["done"] = True
            save_state(last_dir, method, None, {**state, "config": cfg.to_dict(), "method": method.config()}, ds_key)
        return finish(True)

    if state["done"]:
        return finish(True)
    stages = method.stages()
    for si in range(state["stage"], len(stages)):
        stage = stages[si]
        is_last_stage = si == len(stages) - 1
        data = train_data if stage.split is None else (extra_splits or {}).get(stage.split)
        if data is None:
            raise OptionError(f"stage {stage.name!r} trains on split {stage.split!r}, which was not provided")
        view = FeatureView(data.images, data.texts)
        examples = Examples(data, view, cfg.hard_negatives, cfg.hard_negative_pool, cfg.hard_negative_source)
        epochs = cfg.stage_epochs.get(stage.name, stage.epochs if stage.epochs is not None else cfg.epochs)
        steps_per_epoch = len(shard_batches(np.arange(len(examples)), cfg.batch_size, rank, world))
        total_steps = epochs * steps_per_epoch

        # Only this stage's parameters train; the rest are frozen.
        named = stage_parameters(method, stage)
        trainable = {id(p) for _, p in named}
        for p in method.parameters():
            p.requires_grad_(id(p) in trainable)
        params = [p for _, p in named]
        optimizer = make_optimizer(named, cfg.lr * stage.lr_scale, cfg.weight_decay)
        loss_fn = getattr(method, stage.loss)

        start_epoch, start_step = 0, 0
        if saved is not None and si == saved["stage"]:
            start_epoch, start_step = state["epoch"], state["step_in_epoch"]
            if saved.get("optimizer") is not None:
                optimizer.load_state_dict(optimizer_state_from_safe(load_file(str(last_dir / "optimizer.safetensors")), saved["optimizer"]))
            rng_t = load_file(str(last_dir / "rng.safetensors"))
            set_rng_state(rng_t, saved["rng"])

        # (si, optimizer bound now: this stage's)
        def checkpoint_state(epoch: int, step_in_epoch: int, si: int = si, optimizer: torch.optim.Optimizer = optimizer) -> None:
            state.update(stage=si, epoch=epoch, step_in_epoch=step_in_epoch)
            if is_main:
                save_state(last_dir, method, optimizer, {**state, "config": cfg.to_dict(), "method": method.config()}, ds_key)

        for epoch in range(start_epoch, epochs):
            order, targets, texts = examples.epoch_plan(cfg.seed, si, epoch)
            negatives = examples.epoch_negatives(cfg.seed, si, epoch)
            batches = shard_batches(order, cfg.batch_size, rank, world)
            method.train()
            bar = tqdm(range(start_step, len(batches)), desc=f"{stage.name} epoch {epoch + 1}/{epochs}",
                       disable=not (cfg.progress and is_main), leave=False)
            for b in bar:
                stage_step = epoch * steps_per_epoch + b
                lr = lr_at(stage_step, total_steps, cfg.lr * stage.lr_scale, cfg.warmup, cfg.min_lr_ratio)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                torch.manual_seed(step_seed(cfg.seed, rank, state["global_step"]))  # dropout masks, resumable

                batch = examples.batch(batches[b], targets, texts, method, negatives)
                with autocast():
                    loss, logs = loss_fn(batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if world > 1:
                    allreduce_gradients(params, world)
                # (max_norm=inf: no clipping, but the norm is still measured for the log)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf")))
                optimizer.step()

                state["global_step"] += 1
                state["epoch_loss"] = [state["epoch_loss"][0] + float(loss.detach()), state["epoch_loss"][1] + 1]
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}", lr=f"{lr:.2e}")
                if is_main and state["global_step"] % cfg.log_every == 0:
                    append_metrics(log_path, {"type": "step", "stage": stage.name, "epoch": epoch, "global_step": state["global_step"],
                                    "lr": lr, "grad_norm": grad_norm, **logs})
                done_here = cfg.stop_after_steps and state["global_step"] >= cfg.stop_after_steps
                if b + 1 < len(batches) and (done_here or (cfg.save_every_steps and state["global_step"] % cfg.save_every_steps == 0)):
                    checkpoint_state(epoch, b + 1)
                    if done_here:
                        return finish(False)
            start_step = 0

            # -- end of epoch: validate, keep the best, save the state ------------------------------------------------
            record: dict[str, Any] = {"type": "epoch", "stage": stage.name, "epoch": epoch, "global_step": state["global_step"],
                                      "train_loss": state["epoch_loss"][0] / max(1, state["epoch_loss"][1])}
            if is_main and val_data is not None and stage.validate:
                final_metrics = validate()
                record["val"] = final_metrics
                if is_last_stage:
                    name = state["val_metric"] = pick_val_metric(cfg.val_metric, final_metrics, val_data.dataset)
                    if state["best_metric"] is None or final_metrics[name] > state["best_metric"]:
                        state["best_metric"], state["best_epoch"] = final_metrics[name], epoch
                        save_checkpoint(method, best_dir, dataset=ds_key,
                                        extra={"val": final_metrics, "val_metric": name, "epoch": epoch, "stage": stage.name})
                        record["best"] = True
            if is_main:
                append_metrics(log_path, record)
            if world > 1:
                dist.barrier()
            last_epoch = epoch + 1 == epochs
            if last_epoch and is_last_stage and (val_data is None or not stage.validate):
                # Nothing to select on: the final weights are the result.
                if is_main:
                    save_checkpoint(method, best_dir, dataset=ds_key, extra={"epoch": epoch, "stage": stage.name})
                state["best_epoch"] = epoch
            state["epoch_loss"] = [0.0, 0]
            if last_epoch and not is_last_stage:
                # The next stage starts from scratch (fresh optimizer): save its starting point.
                state.update(stage=si + 1, epoch=0, step_in_epoch=0)
                if is_main:
                    save_state(last_dir, method, None, {**state, "config": cfg.to_dict(), "method": method.config()}, ds_key)
            else:
                state["done"] = last_epoch and is_last_stage
                checkpoint_state(epoch + 1, 0)
            if cfg.stop_after_steps and state["global_step"] >= cfg.stop_after_steps and not state["done"]:
                return finish(False)
        saved = None  # later stages start fresh

    return finish(True)
