"""Fitting a fused model: only the fusion network trains; the base models are frozen.

The loss is InfoNCE over the gallery with several positives (``-log sum_{p in P} exp(f_p/tau) + log sum_{j}
exp(f_j/tau)``, the reference column masked). Two ways to take the gallery:

- ``negatives="shortlist"`` (default): one pass over the training queries (the *setup pass*, tiles of queries vs the
  whole gallery) stores each query's normalisation statistics and the z-scores of its positives and of its ``hard``
  hardest candidates (highest z of any model, i.e. whatever some model ranks high). Each step adds ``random``
  gallery columns drawn uniformly (shared by the tile), whose exp-logits are weighted by
  ``(#rest of the gallery) / (#valid random columns)``: an unbiased estimate of the rest of the gallery's share of
  the softmax denominator. The fusion network therefore never runs on the whole gallery during training: memory
  O(Q x (hard + positives) x K) for the shortlists, O(tile x N x K) for the setup pass.
- ``negatives="full"``: every step scores its queries against the whole gallery (exact InfoNCE; gradients are
  accumulated over sub-tiles so memory stays O(tile x N x K)).

When ``hard + random`` covers the whole gallery the two losses are equal (tested).

**Dynamic temperature.** The paper updates the temperature from the loss: ``tau_t = tau_{t-1} * (1 - L_{t-1} / s)``.
We apply it at every optimisation step (``L_{t-1}`` = the mean loss of the previous step), starting from
``tau0 = 0.02`` and clamping to ``[tau_min, tau_max]`` after every update (a factor <= 0, i.e. ``L >= s``, gives
``tau_min``). A large loss shrinks tau fast (sharper softmax, more weight on the hardest negatives).
``dynamic_tau=False`` keeps ``tau0`` (the ablation, ``cirfusion fuse --fixed-tau``). The parameters are
``FusionConfig.s``, ``tau0``, ``tau_min`` and ``tau_max`` (``cirfusion fuse --s --tau0 --tau-min --tau-max``).

What it does in practice: the factor ``1 - L/s`` is below 1 at every step (the loss never goes negative), so tau
only ever falls: it is a loss-driven decay towards ``tau_min``, never a schedule that rises again. With ``s = 1000``
and the losses seen here (4-14 nats), tau loses 0.4-1.4 % per step. In the quickstart (``runs/*/dafm/log.json``)
it reaches ``tau_min = 0.005`` at step 290 of 504 on the synthetic benchmark (loss 13.9 -> 3.3) and is at 0.0124
after 300 of 510 steps on the catalog (loss 4.5 -> 1.0).

**Which queries to fit on.** The network learns from the base models' scores how far to trust each model per
query. Base models score the queries they were trained on far better than unseen ones (on the embedded synthetic
benchmark, Rmean +20 to +34 points on their training split), so a fusion fitted there learns to trust whichever
model overfits most, and can end up below the plain mean of the normalised scores on test. Fit it on queries the
bases did not train on: ``cirfusion fuse`` fits on ``val`` by default and holds :attr:`FusionConfig.holdout` of it out
to pick the epoch; it measures the gap and warns when told to fit on the bases' training split.

Determinism: the network initialisation, the epoch order and the random columns of each step are drawn from
generators seeded by ``seed`` (and the epoch / step: :func:`cirfusion.seeding.step_seed`), so a run is a pure
function of its inputs. The optimiser and the learning-rate schedule are the training loop's
(:mod:`cirfusion.optim`), and so is the choice of the validation metric (:func:`cirfusion.evaluation.pick_val_metric`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.schema import DataError, reference_mask
from ..evaluation import pick_val_metric
from ..methods.registry import get_method_class
from ..optim import lr_at, make_optimizer
from ..options import OptionError
from ..seeding import seed_everything, step_seed
from ..threads import threads_for, torch_threads
from .kernels import NUM_STATS, block_rows, normalise_scores, standardise
from .tables import SplitTable, evaluate_fused

if TYPE_CHECKING:  # pragma: no cover
    from ..methods.dafm import DAFM

POSITIVE_LOSSES = ("sum", "each")


@dataclass
class FusionConfig:
    """How a fusion network is fitted. These defaults are the only ones: ``cirfusion fuse`` reads its option defaults
    from them and the quickstart uses them as they are."""

    epochs: int = 4
    # Train at least this many steps: more epochs when the fit set is small (the usual fit split, val, is; 0 = just
    # ``epochs``).
    min_steps: int = 500
    # Without a validation table, hold this share of the fit queries out to pick the epoch (0 = keep the last one).
    holdout: float = 0.2
    keep_initial: bool = True  # the untrained network (mean of normalised scores) competes in the epoch selection
    batch_size: int = 64  # queries per optimisation step
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup: float = 0.05
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    tau0: float = 0.02
    dynamic_tau: bool = True
    s: float = 1000.0  # the paper's s in tau_t = tau_{t-1} * (1 - L_{t-1} / s)
    tau_min: float = 0.005
    tau_max: float = 0.05
    negatives: str = "shortlist"  # "shortlist" (hard + random, see module docstring) or "full"
    positives: str = "sum"  # several positives: "sum" (one softmax, their mass summed) or "each" (see multi_positive_nce)
    hard: int = 256  # hard candidates per training query (shortlist)
    random: int = 512  # random gallery columns per step (shortlist)
    tile: int = 128  # queries per block in full-gallery passes (fewer when the gallery is large)
    eval_chunk: int = 256  # queries scored at once in evaluation
    val_metric: str = "auto"  # metric selecting the best epoch ("auto": cirfusion.evaluation.pick_val_metric)
    progress: bool = False

    def __post_init__(self) -> None:
        if self.positives not in POSITIVE_LOSSES:
            raise OptionError(f"positives must be one of {POSITIVE_LOSSES}, got {self.positives!r}")
        if self.negatives not in ("shortlist", "full"):
            raise OptionError(f"negatives must be 'shortlist' or 'full', got {self.negatives!r}")
        if not (0 < self.tau_min <= self.tau0 <= self.tau_max):
            raise OptionError(f"need 0 < tau_min <= tau0 <= tau_max, got {self.tau_min}, {self.tau0}, {self.tau_max}")
        if self.s <= 0:
            raise OptionError(f"s must be positive, got {self.s}")
        if not 0 <= self.holdout < 1:
            raise OptionError(f"holdout must be in [0, 1), got {self.holdout}")
        if self.epochs < 1 or self.batch_size < 1 or self.tile < 1 or self.hard < 0 or self.random < 0 or self.min_steps < 0:
            raise OptionError("epochs, batch_size and tile must be >= 1; hard, random and min_steps >= 0")

    def epochs_for(self, steps_per_epoch: int) -> int:
        """``epochs``, raised so that at least ``min_steps`` optimisation steps run."""
        return max(self.epochs, -(-self.min_steps // max(1, steps_per_epoch)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def next_tau(tau: float, loss: float, cfg: FusionConfig) -> float:
    """The dynamic temperature update ``tau * (1 - loss / s)``, clamped to ``[tau_min, tau_max]`` (fixed tau:
    unchanged)."""
    if not cfg.dynamic_tau:
        return tau
    return float(min(cfg.tau_max, max(cfg.tau_min, tau * (1.0 - loss / cfg.s))))


def multi_positive_nce(logits: torch.Tensor, positive: torch.Tensor, valid: torch.Tensor, mode: str = "sum") -> torch.Tensor:
    """InfoNCE of rows with one or more positive columns; ``logits`` may already hold log-weights (importance-sampled
    columns). ``mode="sum"``: mean over rows of ``-logsumexp(logits[positives]) + logsumexp(logits[valid])`` (one
    softmax, the positives' mass summed: satisfied once any positive is on top). ``mode="each"``: every positive
    against the negatives alone, ``softplus(logsumexp(logits[negatives]) - logit_p)``, averaged over the row's
    positives, then over rows (all positives must rank above the negatives: what mAP@k rewards). The two are equal
    for rows with one positive."""
    neg_inf = torch.finfo(logits.dtype).min
    if mode == "sum":
        allv = logits.masked_fill(~valid, neg_inf)
        posv = logits.masked_fill(~(positive & valid), neg_inf)
        return (torch.logsumexp(allv, dim=1) - torch.logsumexp(posv, dim=1)).mean()
    if mode != "each":
        raise ValueError(f"positive loss mode must be one of {POSITIVE_LOSSES}, got {mode!r}")
    pv = positive & valid
    neg_lse = torch.logsumexp(logits.masked_fill(~(valid & ~positive), neg_inf), dim=1)
    per = F.softplus(neg_lse[:, None] - logits).masked_fill(~pv, 0.0)
    return (per.sum(1) / pv.sum(1).clamp(min=1)).mean()


# ---------------------------------------------------------------------------------------------------------------------
# Shortlists (the setup pass) and the two losses
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Shortlists:
    """What the setup pass stores per training query: normalisation statistics and the z-scores of its candidates
    (its positives first, then its hardest candidates)."""

    rows: np.ndarray  # [Q'] table rows of the trainable queries
    mean: torch.Tensor  # [Q', K]
    std: torch.Tensor  # [Q', K]
    stats: torch.Tensor  # [Q', K, S]
    cand: torch.Tensor  # [Q', W] gallery columns (-1 = empty slot)
    cand_z: torch.Tensor  # [Q', K, W]
    cand_pos: torch.Tensor  # [Q', W] bool
    n_total: torch.Tensor  # [Q'] gallery columns that count (all but the excluded reference)


def _positive_matrix(table: SplitTable, rows: np.ndarray) -> tuple[torch.Tensor, int]:
    width = max(1, max(len(table.positives[r]) for r in rows))
    out = torch.full((len(rows), width), -1, dtype=torch.int64)
    for i, r in enumerate(rows):
        p = table.positives[r]
        out[i, : len(p)] = torch.from_numpy(p)
    return out, width


def loss_mask(table: SplitTable, rows: np.ndarray, n: int) -> torch.Tensor:
    """``[B, N]`` True where a column is not a candidate for the loss (the excluded reference, by image id, as the
    metrics leave it out)."""
    return torch.from_numpy(reference_mask(table.ref_col.numpy()[rows], n))


def prepare_shortlists(model: DAFM, table: SplitTable, cfg: FusionConfig) -> Shortlists:
    """The setup pass: every trainable query against the whole gallery, once, in tiles."""
    rows_all = table.trainable_rows()
    if len(rows_all) == 0:
        raise DataError(table.dataset.files[0] if table.dataset.files else None, None,
                        f"split {table.dataset.key} has no query with a retrievable target: nothing to train the fusion on")
    k_models, n = table.num_models, table.num_gallery
    pos_all, p_width = _positive_matrix(table, rows_all)
    hard = min(cfg.hard, n)
    width = p_width + hard
    q = len(rows_all)
    out = Shortlists(rows_all, torch.empty(q, k_models), torch.empty(q, k_models), torch.empty(q, k_models, NUM_STATS),
                     torch.full((q, width), -1, dtype=torch.int64), torch.zeros(q, k_models, width),
                     torch.zeros(q, width, dtype=torch.bool), torch.empty(q, dtype=torch.int64))
    tile = block_rows(n, k_models, cfg.tile)
    topk, beta, excl_ref = model.hparams["topk"], model.hparams["beta"], model.hparams["exclude_reference"]
    for s in tqdm(range(0, q, tile), desc=f"setup {table.dataset.key}", disable=not cfg.progress, leave=False):
        e = min(q, s + tile)
        rows = rows_all[s:e]
        rt = torch.from_numpy(rows)
        raw = table.raw_scores(rt, dtype=model.score_dtype)
        norm = normalise_scores(raw, table.exclusion(rt, excl_ref), topk, beta)
        out.mean[s:e], out.std[s:e], out.stats[s:e] = norm.mean, norm.std, norm.stats
        pos = pos_all[s:e]
        lmask = loss_mask(table, rows, n)
        out.n_total[s:e] = n - lmask.sum(1)
        crit = norm.z.amax(1)  # what any model ranks high
        if norm.valid is not None:
            crit = crit.masked_fill(~norm.valid, float("-inf"))
        crit = crit.masked_fill(lmask, float("-inf"))
        has_pos = pos >= 0
        crit[torch.nonzero(has_pos)[:, 0], pos[has_pos]] = float("-inf")
        cand = pos.clone()
        cand_pos = has_pos.clone()
        if hard:
            hv, hi = crit.topk(hard, dim=1)
            hi = hi.masked_fill(~torch.isfinite(hv), -1)
            cand = torch.cat([cand, hi], 1)
            cand_pos = torch.cat([cand_pos, torch.zeros_like(hi, dtype=torch.bool)], 1)
        ok = cand >= 0
        z = torch.gather(norm.z, 2, cand.clamp(min=0)[:, None, :].expand(-1, k_models, -1))
        out.cand[s:e] = cand
        out.cand_z[s:e] = z.masked_fill(~ok[:, None, :], 0.0)
        out.cand_pos[s:e] = cand_pos
    return out


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(step_seed(seed, 7, step))


def shortlist_loss(model: DAFM, table: SplitTable, sl: Shortlists, idx: np.ndarray, tau: float, cfg: FusionConfig,
                   step: int) -> torch.Tensor:
    """InfoNCE of the queries ``idx`` (positions in the shortlists) over their candidates + random columns."""
    n = table.num_gallery
    rows = sl.rows[idx]
    it = torch.from_numpy(idx)
    cand, zc, pos = sl.cand[it], sl.cand_z[it], sl.cand_pos[it]
    valid_c = cand >= 0
    z_parts, valid_parts, pos_parts, logw_parts = [zc], [valid_c], [pos], [torch.zeros(cand.shape)]
    r = min(cfg.random, n)
    if r:
        cols = torch.randperm(n, generator=_step_generator(cfg.seed, step))[:r]
        raw = table.raw_scores(torch.from_numpy(rows), cols, model.score_dtype)
        zr = standardise(raw, sl.mean[it], sl.std[it])
        taken = loss_mask(table, rows, n)
        has = valid_c
        taken[torch.nonzero(has)[:, 0], cand[has]] = True
        vr = ~taken[:, cols]
        n_rand = vr.sum(1)
        n_rest = sl.n_total[it] - valid_c.sum(1)
        logw = torch.where(n_rand > 0, torch.log(n_rest.clamp(min=1).double() / n_rand.clamp(min=1).double()),
                           torch.zeros(len(idx), dtype=torch.float64)).float()
        vr &= (n_rest > 0)[:, None]
        z_parts.append(zr)
        valid_parts.append(vr)
        pos_parts.append(torch.zeros_like(vr))
        logw_parts.append(logw[:, None].expand(-1, r))
    z = torch.cat(z_parts, 2)
    f = model.fusion(z, sl.stats[it])
    logits = f / tau + torch.cat(logw_parts, 1)
    return multi_positive_nce(logits, torch.cat(pos_parts, 1), torch.cat(valid_parts, 1), cfg.positives)


def full_loss(model: DAFM, table: SplitTable, rows: np.ndarray, tau: float, positives: str = "sum") -> torch.Tensor:
    """Exact InfoNCE of the table ``rows`` against the whole gallery."""
    rt = torch.from_numpy(rows)
    raw = table.raw_scores(rt, dtype=model.score_dtype)
    hp = model.hparams
    norm = normalise_scores(raw, table.exclusion(rt, hp["exclude_reference"]), hp["topk"], hp["beta"])
    f = model.fusion(norm.z, norm.stats)
    n = table.num_gallery
    pos = torch.zeros(len(rows), n, dtype=torch.bool)
    for i, r in enumerate(rows):
        pos[i, torch.from_numpy(table.positives[r])] = True
    return multi_positive_nce(f / tau, pos, ~loss_mask(table, rows, n), positives)


# ---------------------------------------------------------------------------------------------------------------------
# The fit loop
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class FitResult:
    best_epoch: int
    val_metric: str | None
    best_metric: float | None
    val: dict[str, float]  # validation metrics of the kept epoch
    epochs: list[dict[str, Any]]
    steps: list[dict[str, float]]  # per step: loss, tau (the tau used), lr
    tau_final: float
    wall_s: float
    setup_s: float


def fit(model: DAFM, train: SplitTable, val: SplitTable | None = None, cfg: FusionConfig | None = None,
        log: Callable[[dict[str, Any]], None] | None = None, threads: int | None = None) -> FitResult:
    """Train ``model.fusion`` on ``train`` (a table holding exactly the model's bases, in order); keep the epoch with
    the best validation metric (the last one without ``val``). The bases stay frozen. Torch runs on ``threads``
    threads (default: :func:`cirfusion.threads.threads_for` ``("fuse")``, one); the caller's count is restored."""
    with torch_threads(threads_for("fuse", threads)):
        return _fit(model, train, val, cfg, log)


def _fit(model: DAFM, train: SplitTable, val: SplitTable | None, cfg: FusionConfig | None,
         log: Callable[[dict[str, Any]], None] | None) -> FitResult:
    cfg = cfg or FusionConfig()
    if train.num_models != model.num_models:
        raise ValueError(f"fit: the table holds {train.num_models} models, the fused model {model.num_models}")
    t0 = time.perf_counter()
    seed_everything(cfg.seed)  # the training loop's seeding; the draws below use their own seeded generators
    sl = prepare_shortlists(model, train, cfg)
    # Standardise the gate's inputs with the training queries' statistics.
    st = sl.stats.double()
    model.fusion.set_stat_norm(st.mean(0).float(), st.std(0, unbiased=False).float())
    setup_s = time.perf_counter() - t0

    named = [(n, p) for n, p in model.fusion.named_parameters()]
    for _, p in named:
        p.requires_grad_(True)
    params = [p for _, p in named]
    opt = make_optimizer(named, cfg.lr, cfg.weight_decay)
    q = len(sl.rows)
    bs = min(cfg.batch_size, q)
    steps_per_epoch = max(1, q // bs)
    n_epochs = cfg.epochs_for(steps_per_epoch)
    total = n_epochs * steps_per_epoch
    tau = cfg.tau0
    step = 0
    steps: list[dict[str, float]] = []
    epochs: list[dict[str, Any]] = []
    best: tuple[float, int, dict[str, torch.Tensor], dict[str, float], float] | None = None
    metric_name: str | None = None
    n = train.num_gallery
    if val is not None and cfg.keep_initial:
        # Epoch -1: the untrained network, i.e. the mean of the normalised scores. Training only replaces it when
        # the held-out metric says the learned weights generalise.
        metrics = evaluate_fused(model, val, cfg.eval_chunk)
        metric_name = pick_val_metric(cfg.val_metric, metrics, val.dataset)
        best = (metrics[metric_name], -1, {k: v.detach().clone() for k, v in model.fusion.state_dict().items()},
                metrics, tau)
        epochs.append({"epoch": -1, "val": metrics, "tau": tau, "best": True})
    for epoch in range(n_epochs):
        order = np.random.default_rng([cfg.seed, epoch]).permutation(q)
        model.fusion.train()
        losses = []
        bar = tqdm(range(steps_per_epoch), desc=f"fusion epoch {epoch + 1}/{n_epochs}", disable=not cfg.progress, leave=False)
        for b in bar:
            idx = np.sort(order[b * bs : (b + 1) * bs])
            lr = lr_at(step, total, cfg.lr, cfg.warmup, cfg.min_lr_ratio)
            for g in opt.param_groups:
                g["lr"] = lr
            opt.zero_grad(set_to_none=True)
            if cfg.negatives == "shortlist":
                loss = shortlist_loss(model, train, sl, idx, tau, cfg, step)
                loss.backward()
                loss_v = float(loss.detach())
            else:
                # Gradient accumulation over sub-tiles: memory O(sub-tile x N x max(K, hidden)).
                sub = block_rows(n, max(model.num_models, model.hparams["hidden"]), cfg.tile)
                loss_v = 0.0
                for s in range(0, len(idx), sub):
                    part = idx[s : s + sub]
                    li = full_loss(model, train, sl.rows[part], tau, cfg.positives) * (len(part) / len(idx))
                    li.backward()
                    loss_v += float(li.detach())
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            steps.append({"step": step, "epoch": epoch, "loss": loss_v, "tau": tau, "lr": lr})
            if log:
                log({"type": "step", **steps[-1]})
            losses.append(loss_v)
            tau = next_tau(tau, loss_v, cfg)
            step += 1
            bar.set_postfix(loss=f"{loss_v:.3f}", tau=f"{tau:.4f}")
        rec: dict[str, Any] = {"epoch": epoch, "train_loss": float(np.mean(losses)), "tau": tau}
        if val is not None:
            metrics = evaluate_fused(model, val, cfg.eval_chunk)
            metric_name = pick_val_metric(cfg.val_metric, metrics, val.dataset)
            rec["val"] = metrics
            if best is None or metrics[metric_name] > best[0]:
                best = (metrics[metric_name], epoch, {k: v.detach().clone() for k, v in model.fusion.state_dict().items()},
                        metrics, tau)
                rec["best"] = True
        epochs.append(rec)
        if log:
            log({"type": "epoch", **rec})
    if best is not None:
        model.fusion.load_state_dict(best[2])
        best_metric, best_epoch, val_metrics, tau_best = best[0], best[1], best[3], best[4]
    else:
        best_metric, best_epoch, val_metrics, tau_best = None, n_epochs - 1, {}, tau
    model.tau.fill_(tau_best)
    model.fusion.eval()
    return FitResult(best_epoch, metric_name, best_metric, val_metrics, epochs, steps, tau_best,
                     time.perf_counter() - t0, setup_s)


# ---------------------------------------------------------------------------------------------------------------------
# Building a fused model and fitting it
# ---------------------------------------------------------------------------------------------------------------------
def fused_model(table: SplitTable, hparams: Mapping[str, Any] | None = None,
                base_info: Sequence[Mapping[str, Any]] | None = None) -> DAFM:
    """An untrained DAFM over the table's models (in its order), with the dataset's reference exclusion.

    The class comes from the method registry, as a checkpoint's does: ``methods/dafm.py`` imports this package's
    kernels and network, so this package never imports it (that would be an import cycle)."""
    cls = cast("type[DAFM]", get_method_class("dafm"))
    return cls.from_bases(table.bases, names=table.names, base_info=base_info,
                          exclude_reference=table.dataset.exclude_reference, **dict(hparams or {}))


def fuse(train: SplitTable, val: SplitTable | None, cfg: FusionConfig | None = None, members: Sequence[int] | None = None,
         hparams: Mapping[str, Any] | None = None, base_info: Sequence[Mapping[str, Any]] | None = None,
         log: Callable[[dict[str, Any]], None] | None = None) -> tuple[DAFM, FitResult]:
    """Build a DAFM over the tables' models ``members`` (default all) and train it. ``val`` may hold more models
    (the same pool): it is narrowed to ``members`` too. Without ``val``, ``cfg.holdout`` of the fit queries (if > 0)
    pick the epoch."""
    cfg = cfg or FusionConfig()
    members = list(range(train.num_models)) if members is None else list(members)
    if val is None and cfg.holdout > 0:
        train, val = train.split_queries(cfg.holdout, cfg.seed)
    tr = train.select(members)
    va = None if val is None else val.select(members)
    info = None if base_info is None else [base_info[i] for i in members]
    seed_everything(cfg.seed)
    model = fused_model(tr, hparams, info)
    res = fit(model, tr, va, cfg, log)
    return model, res


def baseline_model(table: SplitTable, members: Sequence[int] | None = None, hparams: Mapping[str, Any] | None = None) -> DAFM:
    """The untrained fusion network: the mean of the normalised scores (see :mod:`cirfusion.fusion.network`)."""
    return fused_model(table if members is None else table.select(members), hparams)


__all__ = [
    "POSITIVE_LOSSES",
    "FitResult",
    "FusionConfig",
    "Shortlists",
    "baseline_model",
    "fit",
    "full_loss",
    "fuse",
    "fused_model",
    "loss_mask",
    "multi_positive_nce",
    "next_tau",
    "prepare_shortlists",
    "shortlist_loss",
]
