"""What a fitted fusion tells: per-query model weights and exact Shapley contributions (explanations) and the
incremental analysis of the paper's Figure 3 (every order of adding models to a starting one, the metric after each
addition), with its plot."""

from __future__ import annotations

import io
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..embeddings import rows_of
from ..evaluation import pick_val_metric
from ..io import atomic_write_bytes
from .fit import FusionConfig, fuse
from .kernels import FusionError
from .shapley import contribution_summary
from .tables import SplitTable, evaluate_base, evaluate_fused

if TYPE_CHECKING:  # pragma: no cover
    from ..methods.dafm import DAFM


# ---------------------------------------------------------------------------------------------------------------------
# Explanations
# ---------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def explain(model: DAFM, table: SplitTable, query_rows: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
    """``[B, K]`` effective weight of each base model for each query row (the gate's softmax: sums to 1). The fused
    score only sees model k through ``w_k * z_k``, so a weight near 0 means the model is ignored for that query."""
    rows = torch.as_tensor(np.asarray(query_rows, dtype=np.int64))
    return model.explain(table.query_bundle(rows), table.gallery_bundle(model.score_dtype))


@torch.no_grad()
def explain_all(model: DAFM, table: SplitTable, chunk: int = 256) -> torch.Tensor:
    """:func:`explain` for every query of the table, ``chunk`` queries at a time."""
    g = table.gallery_bundle(model.score_dtype)
    parts = [model.explain(table.query_bundle(slice(s, min(table.num_queries, s + chunk))), g)
             for s in range(0, table.num_queries, chunk)]
    return torch.cat(parts)


def target_columns(table: SplitTable, rows: np.ndarray) -> torch.Tensor:
    """``[B]`` each query row's target column (its first positive in gallery order); a query without one is refused."""
    cols = []
    for r in rows:
        pos = table.positives[int(r)]
        if not len(pos):
            raise FusionError(f"{table.dataset.key}: query {table.dataset.queries[int(r)].qid!r} has no target in the "
                              "gallery (other than its reference): give the gallery column to explain")
        cols.append(int(pos[0]))
    return torch.tensor(cols, dtype=torch.int64)


@torch.no_grad()
def shapley_contributions(model: DAFM, table_or_bundles: SplitTable | tuple[Mapping[str, Any], Mapping[str, Any]],
                          rows: Sequence[int] | np.ndarray | torch.Tensor,
                          cols: Sequence[int] | np.ndarray | torch.Tensor | None = None) -> torch.Tensor:
    """``[B, K]`` each base model's exact Shapley contribution to the fused score of gallery column ``cols[b]`` for
    query row ``rows[b]`` (default: the query's target, from a table) -- 2^K fused evaluations per query, K <= 8;
    an absent model scores every candidate alike (:mod:`cirfusion.fusion.shapley` says why). Each row sums to the
    fused score minus the no-information baseline ``v(empty)`` (:meth:`DAFM.contributions` returns both).

    ``table_or_bundles``: a :class:`SplitTable` holding the model's bases in its order, or ``(query_bundle,
    gallery_bundle)`` as ``DAFM.encode_query`` / ``encode_gallery`` return them (then ``cols`` is required)."""
    idx = np.asarray(rows, dtype=np.int64).reshape(-1)
    ri = torch.from_numpy(idx)
    q: Mapping[str, Any]
    g: Mapping[str, Any]
    if isinstance(table_or_bundles, SplitTable):
        q, g = table_or_bundles.query_bundle(ri), table_or_bundles.gallery_bundle(model.score_dtype)
        c = target_columns(table_or_bundles, idx) if cols is None else torch.as_tensor(np.asarray(cols, np.int64))
    else:
        qb, g = table_or_bundles
        if cols is None:
            raise FusionError("shapley_contributions: give the gallery columns to explain (bundles carry no targets)")
        q = {"q": tuple(rows_of(x, ri) for x in qb["q"]), "fp": rows_of(qb["fp"], ri)}
        c = torch.as_tensor(np.asarray(cols, np.int64))
    was = model.training
    model.eval()
    try:
        return model.contributions(q, g, c.reshape(-1))[0]
    finally:
        model.train(was)


def explanation_summary(weights: torch.Tensor, names: Sequence[str]) -> dict[str, Any]:
    """Mean, standard deviation and argmax share of the per-query model weights."""
    w = weights.double()
    arg = w.argmax(1)
    return {
        "num_queries": int(w.shape[0]),
        "mean_weight": {n: float(w[:, i].mean()) for i, n in enumerate(names)},
        "std_weight": {n: float(w[:, i].std(unbiased=False)) for i, n in enumerate(names)},
        "argmax_share": {n: float((arg == i).double().mean()) for i, n in enumerate(names)},
    }


# ---------------------------------------------------------------------------------------------------------------------
# Incremental analysis (the paper's Figure 3)
# ---------------------------------------------------------------------------------------------------------------------
def incremental_orders(names: Sequence[str], start: str, max_orders: int = 24, seed: int = 0) -> list[list[str]]:
    """Every order of adding the other models after ``start`` (all of them for up to 4 others' permutations =
    24; beyond, ``max_orders`` drawn at random, seeded)."""
    if start not in names:
        raise FusionError(f"--base {start!r} is not one of the base models {list(names)}")
    others = [n for n in names if n != start]
    if math.factorial(len(others)) <= max_orders:
        return [[start, *p] for p in itertools.permutations(others)]
    rng = np.random.default_rng(seed)
    seen: set[tuple[str, ...]] = set()
    while len(seen) < max_orders:
        seen.add(tuple(rng.permutation(others).tolist()))
    return [[start, *p] for p in sorted(seen)]


def incremental_analysis(train: SplitTable, val: SplitTable | None, evaluate_on: SplitTable, start: str, cfg: FusionConfig,
                         hparams: Mapping[str, Any] | None = None, metric: str | None = None,
                         trained: Mapping[frozenset[str], float] | None = None,
                         report: Callable[[str], None] | None = None) -> dict[str, Any]:
    """For every order of adding the other models to ``start``: the metric of the fusion of each prefix on
    ``evaluate_on`` (one fusion trained per distinct subset, reused across orders; ``trained`` may pre-fill subsets
    already measured; without ``val`` each fusion picks its epoch on ``cfg.holdout`` of ``train``). Returns the
    figures as JSON-ready data."""
    names = train.names
    orders = incremental_orders(names, start, seed=cfg.seed)
    values: dict[frozenset[str], float] = dict(trained or {})
    k0 = names.index(start)
    single = evaluate_base(evaluate_on, k0, cfg.eval_chunk)
    metric = metric or pick_val_metric(cfg.val_metric, single, evaluate_on.dataset)
    values.setdefault(frozenset([start]), single[metric])
    out_orders = []
    for order in orders:
        vals = []
        for j in range(1, len(order) + 1):
            key = frozenset(order[:j])
            if key not in values:
                members = [names.index(x) for x in names if x in key]  # pool order: one model per subset
                model, _ = fuse(train, val, cfg, members, hparams)
                values[key] = evaluate_fused(model, evaluate_on.select(members), cfg.eval_chunk)[metric]
            vals.append(values[key])
            if report:
                report(f"  {' + '.join(order[:j])}: {metric} = {values[key]:.2f}")
        out_orders.append({"order": order, "values": vals})
    subsets: list[dict[str, Any]] = [{"models": [n for n in names if n in key], "value": v} for key, v in values.items()]
    subsets.sort(key=lambda d: (len(d["models"]), d["models"]))
    return {"start": start, "metric": metric, "split": evaluate_on.dataset.key, "orders": out_orders, "subsets": subsets}


def plot_incremental(figures: Mapping[str, Any], path: str | Path) -> Path:
    """The Figure-3-style plot: x = number of models, one line per order of addition (PNG, written atomically)."""
    import matplotlib  # lazy: heavy, needed only for this plot (cirfusion fuse --incremental)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: as above

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for o in figures["orders"]:
        xs = list(range(1, len(o["values"]) + 1))
        ax.plot(xs, o["values"], marker="o", label=" \u2192 ".join(o["order"]))
    n = max(len(o["values"]) for o in figures["orders"])
    ax.set_xticks(list(range(1, n + 1)))
    ax.set_xlabel("number of models fused")
    ax.set_ylabel(f"{figures['metric']} ({figures['split']})")
    ax.set_title(f"Incremental fusion from {figures['start']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


__all__ = ["contribution_summary", "explain", "explain_all", "explanation_summary", "incremental_analysis",
           "incremental_orders", "plot_incremental", "shapley_contributions", "target_columns"]
