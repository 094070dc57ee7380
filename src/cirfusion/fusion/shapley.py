"""Exact Shapley values of the K base models in a fused score: each model's contribution to one candidate's fused
score for one query, by the exact formula over all 2^K coalitions (no sampling).

**The game.** For a query and a gallery column ``c``, ``v(S)`` is the fused score of ``c`` when only the models in
``S`` are present. A model outside ``S`` is *absent* in the one way the fusion network can evaluate exactly on a real
input: its scores are a constant row, i.e. it tells no candidates apart. Its normalised scores are then exactly 0
(:func:`~cirfusion.fusion.kernels.normalise_scores`) and its statistics are those of a constant row (top1 = margin
= top-k gap = 0, normalised entropy 1 (0 with a single candidate), log-std 0), computed by the same kernel
(:func:`~cirfusion.fusion.kernels.score_stats`). Why this and not, say, the training mean of the statistics:

- every ``v(S)`` is the network's output on an input it can actually receive (a pool where the absent models were
  replaced by uninformative ones), not on a mix of one model's z = 0 with another query's typical statistics;
- a model whose scores really are constant for a query is then exactly absent, so it gets exactly 0 (the dummy
  axiom holds through the gate, the residual blocks and the head alike);
- ``v(empty)`` is the fused score of a pool that tells nothing apart: the same value for every candidate of the
  query, so the contributions explain how the target's score rises above (or falls below) a no-information baseline,
  and the contribution to a score *difference* between two candidates is the difference of their contributions.

The values satisfy efficiency exactly (up to float rounding): ``sum_k phi_k = v(all) - v(empty)``, and ``v(all)`` is
the fused score :meth:`~cirfusion.methods.dafm.DAFM.similarity` gives. Cost: 2^K evaluations of the network on one
candidate per query (the per-query statistics over the gallery are computed once), all in one batched pass; K is
limited to :data:`MAX_MODELS`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .kernels import FusionError, Normalised, score_stats
from .network import FusionNet

MAX_MODELS = 8  # 2^8 = 256 network evaluations per query and column


def check_num_models(k: int) -> None:
    if k > MAX_MODELS:
        raise FusionError(f"exact Shapley values need 2^K fused evaluations per query: K = {k} models is over the "
                          f"limit of {MAX_MODELS}; explain a fusion of at most {MAX_MODELS} models")
    if k < 1:
        raise FusionError("exact Shapley values need at least one model")


def coalition_masks(k: int) -> torch.Tensor:
    """``[2^K, K]`` bool: row ``s`` holds the models of coalition ``s`` (model ``i`` present iff bit ``i`` of s)."""
    check_num_models(k)
    s = torch.arange(1 << k)[:, None]
    return (s >> torch.arange(k)[None, :]) & 1 == 1


def shapley_matrix(k: int) -> torch.Tensor:
    """``[2^K, K]`` float64 ``M`` with ``phi = v @ M`` for coalition values ``v [.., 2^K]``: the exact formula
    ``phi_i = sum_{S not i} |S|! (K-|S|-1)! / K! (v(S + i) - v(S))`` written as one signed weight per coalition
    (``+w(|S|-1)`` where ``i`` is in ``S``, ``-w(|S|)`` where it is not)."""
    m = coalition_masks(k)
    size = m.sum(1, keepdim=True).double()
    w = [math.factorial(s) * math.factorial(k - s - 1) / math.factorial(k) for s in range(k)]
    wt = torch.tensor([*w, 0.0], dtype=torch.float64)  # w(K) never used (no coalition of K models lacks one)
    inside = wt[(size - 1).clamp(min=0).long()]
    outside = -wt[size.long()]
    return torch.where(m, inside, outside)


def absent_stats(norm: Normalised, topk: int, beta: float) -> torch.Tensor:
    """``[B, 1, S]`` statistics of a constant score row for each query of the tile (what an absent model shows the
    gate), from the same kernel as the real statistics and with the same excluded columns."""
    b, _, n = norm.z.shape
    exclude = None if norm.valid is None else ~norm.valid
    return score_stats(torch.zeros(b, 1, n, dtype=norm.z.dtype), torch.ones(b, 1, dtype=norm.std.dtype), exclude, topk,
                       beta)


def coalition_values(net: FusionNet, z: torch.Tensor, stats: torch.Tensor, absent: torch.Tensor) -> torch.Tensor:
    """``[B, 2^K]`` fused score of one candidate per query under every coalition, in one batched pass.

    ``z [B, K]``: each model's normalised score of the candidate; ``stats [B, K, S]``; ``absent [B, 1 or K, S]``:
    the statistics an absent model shows."""
    b, k = z.shape
    m = coalition_masks(k).to(z.device)  # [2^K, K]
    zs = z[None] * m[:, None, :].to(z.dtype)  # [2^K, B, K]: an absent model's normalised scores are exactly 0
    ss = torch.where(m[:, None, :, None], stats[None], absent[None].expand_as(stats[None]))  # [2^K, B, K, S]
    out = net(zs.reshape(-1, k, 1), ss.reshape(-1, k, stats.shape[-1]))  # [2^K * B, 1]
    return out.view(1 << k, b).transpose(0, 1)


def shapley_values(net: FusionNet, norm: Normalised, cols: torch.Tensor, topk: int, beta: float,
                   absent: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(phi [B, K], values [B, 2^K])``: exact Shapley value of each model in the fused score of column ``cols[b]``
    for query ``b`` of a tile (see the module docstring), and the coalition values (``values[:, 0]`` = v(empty),
    ``values[:, -1]`` = v(all)). ``absent``: :func:`absent_stats` of the tile when the caller has them (several
    columns of one query share them: computing them once saves a top-k over the gallery per column)."""
    b, k, _ = norm.z.shape
    check_num_models(k)
    cols = torch.as_tensor(cols, dtype=torch.int64)
    if cols.shape != (b,):
        raise FusionError(f"shapley: one gallery column per query expected ({b}), got shape {tuple(cols.shape)}")
    zc = norm.z[torch.arange(b), :, cols]  # [B, K]
    v = coalition_values(net, zc, norm.stats, absent_stats(norm, topk, beta) if absent is None else absent)
    phi = (v.double() @ shapley_matrix(k).to(v.device)).to(v.dtype)
    return phi, v


def contribution_summary(phi: torch.Tensor, names: Sequence[str], weights: torch.Tensor | None = None) -> dict[str, Any]:
    """Per model over queries: the mean Shapley contribution, the mean |contribution|, the mean share of the total
    |contribution| and how often the model contributes most; with the gate ``weights`` ``[B, K]``, their mean too,
    side by side (JSON-ready)."""
    p = phi.double()
    if p.dim() != 2 or p.shape[1] != len(names):
        raise FusionError(f"contribution_summary: contributions {tuple(p.shape)} for {len(names)} models")
    share = p.abs() / p.abs().sum(1, keepdim=True).clamp(min=1e-30)
    arg = p.argmax(1)
    out: dict[str, Any] = {
        "num_queries": int(p.shape[0]),
        "mean_contribution": {n: float(p[:, i].mean()) for i, n in enumerate(names)},
        "mean_abs_contribution": {n: float(p[:, i].abs().mean()) for i, n in enumerate(names)},
        "abs_share": {n: float(share[:, i].mean()) for i, n in enumerate(names)},
        "argmax_share": {n: float((arg == i).double().mean()) for i, n in enumerate(names)},
    }
    if weights is not None:
        out["mean_gate_weight"] = {n: float(weights[:, i].double().mean()) for i, n in enumerate(names)}
    return out


def as_named(rows: torch.Tensor, names: Sequence[str]) -> list[Mapping[str, float]]:
    """``[B, K]`` -> one ``{name: value}`` per row (for reports)."""
    return [{n: float(r[i]) for i, n in enumerate(names)} for r in rows]


__all__ = ["MAX_MODELS", "absent_stats", "as_named", "check_num_models", "coalition_masks", "coalition_values",
           "contribution_summary", "shapley_matrix", "shapley_values"]
