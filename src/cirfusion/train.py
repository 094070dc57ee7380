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

Every directory is written atomically (temporary directory + rename). Determinism: the epoch order, the sampled
target of multi-target queries and the training text are drawn from generators seeded by (seed, stage, epoch), and
the torch RNG (dropout) is re-seeded from (seed, rank, step) before every step, so a run resumed from ``last/``
continues exactly where the interrupted one would have: same batches, same dropout masks, same weights.

Distributed: under ``torchrun`` (WORLD_SIZE > 1, gloo on CPU) each rank takes an equal shard of every epoch's
order; gradients are averaged with one all-reduce per step (InfoNCE negatives stay local to a rank's batch);
rank 0 alone validates and writes.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .backbones.base import ImageFeatures, TextFeatures
from .checkpoint import (
    CheckpointError,
    atomic_directory,
    load_state_strict,
    optimizer_state_from_safe,
    optimizer_state_to_safe,
    recover_directory,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_checkpoint_files,
)
from .data.schema import CIRDataset, DataError, Query
from .manifest import build_manifest, write_manifest
from .methods.base import Batch, CIRMethod, Embedding, Stage, cat_embeddings, stage_parameters
from .metrics import RetrievalMetrics

STATE_FILE = "state.json"
METRICS_FILE = "metrics.jsonl"


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
    progress: bool = True

    # Fields that may differ between an interrupted run and its resumption (they do not change the result).
    RESUME_FREE = ("save_every_steps", "stop_after_steps", "progress", "log_every", "eval_chunk")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class SplitData:
    """A split with its cached features: ``images`` covers every image the split names, ``texts`` every text it
    can use (query texts, and for training every text ``training_text`` can return)."""

    dataset: CIRDataset
    images: Any  # ImageFeatureTable: .ids, .global_ [N,D], .tokens [N,T,Dt], .index(id)
    texts: Any  # TextFeatureTable: .global_ [M,D], .tokens [M,L,Dt], .mask [M,L], .index(text)


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


def load_split_data(cache: Any, dataset: CIRDataset, training: bool = False, progress: bool = False,
                    all_texts: bool = False) -> SplitData:
    """A split's cached features (computed on first use): its gallery and the texts its queries use; with
    ``training`` also every text a training step can draw (:func:`training_texts`). ``all_texts`` adds every caption
    variant and fine-grained text the annotations carry (:func:`cirfusion.features.dataset_texts`), for methods that
    read them; encoding only what is used keeps text encoding (the slow part on CPU) to one text per query."""
    from .features import dataset_texts

    images = cache.image_features(dataset.gallery.ids, dataset.gallery.paths, progress=progress)
    texts = list(dict.fromkeys(q.text for q in dataset.queries))
    if all_texts:
        texts += dataset_texts(dataset)
    if training:
        texts += training_texts(dataset)
    return SplitData(dataset, images, cache.text_features(texts, progress=progress))


# ---------------------------------------------------------------------------------------------------------------------
# Features -> tensors
# ---------------------------------------------------------------------------------------------------------------------
class FeatureView:
    """Fast row gathering from a split's feature tables. Global vectors are held as float32 tensors. Tokens are
    only read when the method uses them: the first such read loads that table's tokens into memory (fp16; random
    row gathers from a memory map are slow), e.g. 64 x 112 per image is 14 KB, 10k images 140 MB."""

    def __init__(self, images: Any, texts: Any) -> None:
        self.images, self.texts = images, texts
        self.img_global = torch.from_numpy(np.asarray(images.global_, dtype=np.float32))
        self.txt_global = torch.from_numpy(np.asarray(texts.global_, dtype=np.float32))
        self._img_tokens: np.ndarray | None = None
        self._txt_tokens: tuple[np.ndarray, np.ndarray] | None = None

    def image_row(self, image_id: str) -> int:
        try:
            return int(self.images.index(image_id))
        except (KeyError, ValueError, IndexError, DataError):
            raise DataError(None, image_id, "image id has no cached features (not in the split's image table)") from None

    def text_row(self, text: str) -> int:
        try:
            return int(self.texts.index(text))
        except (KeyError, ValueError, IndexError, DataError):
            raise DataError(None, text, "text has no cached features (not in the split's text table)") from None

    def image(self, rows: np.ndarray, tokens: bool) -> ImageFeatures:
        rows = np.asarray(rows, dtype=np.int64)
        g = self.img_global[torch.from_numpy(rows)]
        if tokens:
            if self._img_tokens is None:
                self._img_tokens = np.ascontiguousarray(self.images.tokens)
            t = torch.from_numpy(self._img_tokens[rows].astype(np.float32))
        else:
            t = torch.zeros(len(rows), 0, self.images.tokens.shape[-1])
        return ImageFeatures(global_=g, tokens=t)

    def text(self, rows: np.ndarray, tokens: bool) -> TextFeatures:
        rows = np.asarray(rows, dtype=np.int64)
        g = self.txt_global[torch.from_numpy(rows)]
        if tokens:
            if self._txt_tokens is None:
                self._txt_tokens = np.ascontiguousarray(self.texts.tokens), np.ascontiguousarray(self.texts.mask, dtype=bool)
            t = torch.from_numpy(self._txt_tokens[0][rows].astype(np.float32))
            m = torch.from_numpy(self._txt_tokens[1][rows])
        else:
            t = torch.zeros(len(rows), 0, self.texts.tokens.shape[-1])
            m = torch.zeros(len(rows), 0, dtype=torch.bool)
        return TextFeatures(global_=g, tokens=t, mask=m)


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation: full-gallery scores in query chunks
# ---------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def encode_gallery(method: CIRMethod, view: FeatureView, ids: list[str], chunk: int = 1024) -> Embedding:
    rows = np.array([view.image_row(i) for i in ids], dtype=np.int64)
    parts = [method.encode_gallery(view.image(rows[s : s + chunk], method.uses_image_tokens)) for s in range(0, len(rows), chunk)]
    return cat_embeddings(parts)


@torch.no_grad()
def score_blocks(
    method: CIRMethod, view: FeatureView, dataset: CIRDataset, chunk: int = 512, progress: bool = False
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(row_start, scores [rows, N])`` over every query of ``dataset`` against its whole gallery."""
    was_training = method.training
    method.eval()
    try:
        g = encode_gallery(method, view, dataset.gallery.ids)
        queries = dataset.queries
        bar = tqdm(range(0, len(queries), chunk), desc=f"scoring {dataset.key}", disable=not progress, leave=False)
        for s in bar:
            qs = queries[s : s + chunk]
            ref = view.image(np.array([view.image_row(q.reference) for q in qs]), method.uses_image_tokens)
            text = view.text(np.array([view.text_row(q.text) for q in qs]), method.uses_text_tokens)
            yield s, method.similarity(method.encode_query(ref, text), g).float()
    finally:
        method.train(was_training)


def evaluate(method: CIRMethod, data: SplitData, chunk: int = 512, progress: bool = False, view: FeatureView | None = None) -> dict[str, float]:
    """Retrieval metrics (percent) of ``method`` on a split, computed block by block."""
    view = view or FeatureView(data.images, data.texts)
    metrics = RetrievalMetrics(data.dataset)
    for start, block in score_blocks(method, view, data.dataset, chunk, progress):
        metrics.update(start, block.numpy())
    return metrics.compute()


def pick_val_metric(name: str, metrics: Mapping[str, float], dataset: CIRDataset) -> str:
    if name != "auto":
        if name not in metrics:
            raise KeyError(f"validation metric {name!r} is not computed on {dataset.key}; available: {sorted(metrics)}")
        return name
    if "Rmean" in metrics:
        return "Rmean"
    if any(len(set(q.targets)) > 1 for q in dataset.queries) and "mAP@10" in metrics:
        return "mAP@10"
    return "R@10"


# ---------------------------------------------------------------------------------------------------------------------
# Training examples and batches
# ---------------------------------------------------------------------------------------------------------------------
def candidate_training_texts(dataset: CIRDataset, q: Query) -> list[str]:
    """Every text ``dataset.training_text(q, rng)`` can return (so they can all be encoded up front)."""
    from .data.schema import join_fashioniq

    if dataset.text_policy == "fashioniq" and len(q.captions) >= 2:
        c1, c2 = q.captions[0], q.captions[1]
        return list(dict.fromkeys([join_fashioniq(c1, c2), join_fashioniq(c2, c1), join_fashioniq(c1, ""), join_fashioniq(c2, "")]))
    if dataset.text_policy == "random" and q.captions:
        return list(dict.fromkeys(q.captions))
    return [q.text]


def training_texts(dataset: CIRDataset) -> list[str]:
    """The union of every query's candidate training texts, in a stable order."""
    out: dict[str, None] = {}
    for q in dataset.queries:
        if q.targets:
            out.update(dict.fromkeys(candidate_training_texts(dataset, q)))
    return list(out)


def reference_neighbours(global_: torch.Tensor, rows: np.ndarray, k: int, chunk: int = 1024) -> np.ndarray:
    """``[len(rows), k]``: for each image row, its ``k`` most similar other images (cosine of the frozen global
    features), most similar first."""
    g = torch.nn.functional.normalize(global_.float(), dim=-1)
    k = min(k, g.shape[0] - 1)
    out = []
    for s in range(0, len(rows), chunk):
        r = torch.from_numpy(rows[s : s + chunk])
        sims = g[r] @ g.T
        sims[torch.arange(len(r)), r] = float("-inf")  # not itself
        out.append(sims.topk(k, dim=1).indices.numpy())
    return np.concatenate(out) if out else np.zeros((0, k), dtype=np.int64)


class Examples:
    """The trainable queries of a split (those with targets) as image-table rows.

    ``hard_negatives=k > 0``: each example also gets ``k`` hard negatives per epoch, its positives excluded, drawn
    from (``source``) ``"neighbours"``: the ``pool`` images most similar to its reference (frozen global features), or
    ``"subset"``: its annotated subset (CIRR's ``img_set``, the synthetic benchmark's one-detail variants -- the
    reference included), falling back to the neighbours for a query without one. In-batch negatives are mostly
    unrelated images, so a model trained on them alone learns to find the right scene rather than the detail that
    separates the target from its near-duplicates. (On the synthetic benchmark neither source has lifted held-out
    Rsubset@1 above chance yet: the models fit the subsets of their training queries and do not generalise.)
    """

    SOURCES = ("neighbours", "subset")

    def __init__(self, data: SplitData, view: FeatureView, hard_negatives: int = 0, pool: int = 32,
                 source: str = "neighbours") -> None:
        if source not in self.SOURCES:
            raise ValueError(f"hard_negative_source must be one of {self.SOURCES}, got {source!r}")
        self.data, self.view = data, view
        self.queries = [q for q in data.dataset.queries if q.targets]
        if not self.queries:
            raise DataError(data.dataset.files[0] if data.dataset.files else None, None,
                            f"split {data.dataset.key} has no query with a target: nothing to train on")
        self.ref_rows = np.array([view.image_row(q.reference) for q in self.queries], dtype=np.int64)
        self.positives = [np.unique(np.array([view.image_row(t) for t in q.targets], dtype=np.int64)) for q in self.queries]
        self.hard_negatives = int(hard_negatives)
        self.candidates: np.ndarray | None = None
        if self.hard_negatives > 0:
            refs, inv = np.unique(self.ref_rows, return_inverse=True)
            cand = reference_neighbours(view.img_global, refs, max(pool, self.hard_negatives))[inv]
            if source == "subset":
                cand = self._subset_candidates(cand)
            for i, p in enumerate(self.positives):
                cand[i, np.isin(cand[i], p)] = -1
            self.candidates = cand

    def _subset_candidates(self, neighbours: np.ndarray) -> np.ndarray:
        """Per example, its subset members' image rows (padded with -1), or its reference's neighbours without one."""
        rows = []
        for i, q in enumerate(self.queries):
            if q.subset:
                rows.append(np.array([self.view.image_row(m) for m in dict.fromkeys(q.subset)], dtype=np.int64))
            else:
                rows.append(neighbours[i])
        width = max(len(r) for r in rows)
        out = np.full((len(rows), width), -1, dtype=np.int64)
        for i, r in enumerate(rows):
            out[i, : len(r)] = r
        return out

    def __len__(self) -> int:
        return len(self.queries)

    def epoch_plan(self, seed: int, stage: int, epoch: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(order, target row per example, text per example) for one epoch; a pure function of its arguments
        (what makes a resumed run identical to an uninterrupted one)."""
        rng = np.random.default_rng([seed, stage, epoch])
        order = rng.permutation(len(self.queries))
        targets = np.array([p[rng.integers(len(p))] if len(p) > 1 else p[0] for p in self.positives], dtype=np.int64)
        text_rng = random.Random(f"{seed}/{stage}/{epoch}")
        texts = [self.data.dataset.training_text(q, text_rng) for q in self.queries]
        return order, targets, texts

    def epoch_negatives(self, seed: int, stage: int, epoch: int) -> np.ndarray | None:
        """``[n, k]`` image rows of this epoch's mined hard negatives per example (-1 = none), or ``None``."""
        if self.candidates is None:
            return None
        rng = np.random.default_rng([seed, stage, epoch, 1])
        keys = rng.random(self.candidates.shape)
        keys[self.candidates < 0] = np.inf  # excluded candidates sort last
        pick = np.argsort(keys, axis=1)[:, : self.hard_negatives]
        return np.take_along_axis(self.candidates, pick, axis=1)

    def batch(self, idx: np.ndarray, targets: np.ndarray, texts: list[str], method: CIRMethod,
              negatives: np.ndarray | None = None) -> Batch:
        """The batch of examples ``idx`` given an epoch's plan (and mined negatives)."""
        t = [texts[i] for i in idx]
        ref_rows, tgt_rows = self.ref_rows[idx], targets[idx]
        neg_feats = neg_rows = None
        if negatives is not None:
            neg = np.unique(negatives[idx])
            neg = neg[neg >= 0]
            neg_feats, neg_rows = self.view.image(neg, method.uses_image_tokens), torch.from_numpy(neg)
        return Batch(
            ref=self.view.image(ref_rows, method.uses_image_tokens),
            text=self.view.text(np.array([self.view.text_row(x) for x in t]), method.uses_text_tokens),
            target=self.view.image(tgt_rows, method.uses_image_tokens),
            ref_rows=torch.from_numpy(ref_rows),
            target_rows=torch.from_numpy(tgt_rows),
            positives=[self.positives[i] for i in idx],
            texts=t,
            queries=[self.queries[i] for i in idx],
            negatives=neg_feats,
            negative_rows=neg_rows,
        )


def shard_batches(order: np.ndarray, batch_size: int, rank: int, world: int) -> list[np.ndarray]:
    """This rank's batches of an epoch: an equal share of ``order`` per rank, cut into full batches (the last
    partial batch is dropped: a tiny batch gives InfoNCE almost no negatives) -- unless the split is smaller than
    one batch, then it is one batch."""
    n = (len(order) // world) * world
    mine = order[:n][rank::world]
    if len(mine) < batch_size:
        return [mine] if len(mine) > 1 else []
    return [mine[s : s + batch_size] for s in range(0, len(mine) - batch_size + 1, batch_size)]


# ---------------------------------------------------------------------------------------------------------------------
# Optimisation helpers
# ---------------------------------------------------------------------------------------------------------------------
def lr_at(step: int, total: int, base: float, warmup: float, min_ratio: float) -> float:
    """Linear warm-up over ``warmup * total`` steps, then cosine from ``base`` to ``base * min_ratio``."""
    w = max(1, int(round(warmup * total)))
    if step < w:
        return base * (step + 1) / w
    progress = min(1.0, (step - w) / max(1, total - w))
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(named: list[tuple[str, torch.nn.Parameter]], lr: float, weight_decay: float) -> torch.optim.AdamW:
    # No weight decay on biases, norms, embeddings-like vectors and the logit scale (any tensor with < 2 dims).
    decay = [p for _, p in named if p.dim() >= 2]
    no_decay = [p for _, p in named if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.98), eps=1e-6)


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and python's global generators (call before building a method: its initial weights)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def step_seed(seed: int, rank: int, step: int) -> int:
    """A well-mixed 63-bit seed for (seed, rank, step) (splitmix64)."""
    x = (seed * 0x9E3779B97F4A7C15 + rank * 0xBF58476D1CE4E5B9 + step * 0x94D049BB133111EB + 1) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


def allreduce_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    """Average gradients over ranks with a single all-reduce. A missing gradient counts as zeros so every rank
    makes the same call; it stays missing when no rank had one (the optimizer then skips it, as on one process)."""
    had = [p.grad is not None for p in params]
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world
    off = 0
    for p, h in zip(params, had):
        g = flat[off : off + p.numel()].view_as(p)
        off += p.numel()
        p.grad = g.clone() if (h or bool(g.any())) else None


def distributed_context() -> tuple[int, int, bool]:
    """(rank, world size, whether this call initialised the process group). Starts gloo under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    created = False
    if not dist.is_initialized():
        dist.init_process_group("gloo")
        created = True
    return dist.get_rank(), dist.get_world_size(), created


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


def load_state(last_dir: Path) -> dict[str, Any]:
    recover_directory(last_dir)
    path = last_dir / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{last_dir}: no training state to resume from ({STATE_FILE} missing)")
    return json.loads(path.read_text())


def _log(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def _truncate_log(path: Path, global_step: int) -> None:
    """On resume, drop records the interrupted run logged after its last saved state (they are redone)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            if rec.get("global_step", 0) <= global_step:
                keep.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(k + "\n" for k in keep), encoding="utf-8")
    os.replace(tmp, path)


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
) -> TrainResult:
    """Train ``method`` and write the run directory (see the module docstring). ``extra_splits`` holds the splits
    that stages name in ``Stage.split`` (e.g. edit pairs). Returns where the best checkpoint is and its metric."""
    cfg = config or TrainConfig()
    run_dir = Path(run_dir)
    rank, world, own_group = distributed_context()
    is_main = rank == 0
    last_dir, best_dir, log_path = run_dir / "last", run_dir / "best", run_dir / METRICS_FILE
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
            raise ValueError(f"{last_dir}: cannot resume with a different configuration ({', '.join(diffs)}); "
                             f"saved: {{{', '.join(f'{d}={getattr(old, d)!r}' for d in diffs)}}}")
        if saved["method"] != method.config():
            raise ValueError(f"{last_dir}: the saved run trained {saved['method']['method']!r} with other "
                             "hyper-parameters or features; cannot resume it with this method")
        load_state_strict(method, load_file(str(last_dir / "model.safetensors")), last_dir)
        state.update({k: saved[k] for k in state})
        if is_main:
            _truncate_log(log_path, state["global_step"])

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
                _log(log_path, {"type": "epoch", "stage": "none", "epoch": 0, "global_step": 0, "val": final_metrics})
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
            raise ValueError(f"stage {stage.name!r} trains on split {stage.split!r}, which was not provided")
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

        def checkpoint_state(epoch: int, step_in_epoch: int) -> None:
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
                    _log(log_path, {"type": "step", "stage": stage.name, "epoch": epoch, "global_step": state["global_step"],
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
                _log(log_path, record)
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
