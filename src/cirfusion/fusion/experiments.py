"""What a fitted fusion tells: per-query model weights and exact Shapley contributions (explanations); the
incremental analysis of the paper's Figure 3 (every order of adding models to a starting one, the metric after each
addition), with its plot; the order-of-addition analysis (every order of adding all K models, each prefix fitted as
its own fusion with its channels in that order, over several seeds, and the spread of every figure); and the
diagnostics of learned against static fusion (how much the query-aware weights move across queries, the per-query
oracle choice of a base model or of a weighting, and what a per-query choice could gain at most)."""

from __future__ import annotations

import dataclasses
import io
import itertools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..embeddings import rows_of
from ..evaluation import pick_val_metric
from ..io import atomic_write_bytes
from ..metrics import RetrievalMetrics
from .fit import FusionConfig, baseline_model, fuse
from .kernels import FusionError, normalise_scores
from .shapley import contribution_summary
from .tables import SplitTable, evaluate_base, evaluate_fused, per_query_base, per_query_fused

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
    out_orders: list[dict[str, Any]] = []
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
    ax.set_title(f"Incremental fusion from {figures['start']}" if figures.get("start") else "Every order of addition")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


# ---------------------------------------------------------------------------------------------------------------------
# Order of addition: every order of adding all the models, over seeds
# ---------------------------------------------------------------------------------------------------------------------
def addition_orders(names: Sequence[str], start: str | None = None, max_orders: int = 24, seed: int = 0) -> list[list[str]]:
    """Every order of adding the models (all K! when K! <= ``max_orders``: 24 for K = 4; beyond, ``max_orders`` drawn
    at random, seeded, sorted); with ``start``, only the orders beginning with it (:func:`incremental_orders`)."""
    if start is not None:
        return incremental_orders(names, start, max_orders, seed)
    if len(set(names)) != len(names) or not names:
        raise FusionError(f"order of addition: the model names must be distinct and non-empty, got {list(names)}")
    if math.factorial(len(names)) <= max_orders:
        return [list(p) for p in itertools.permutations(names)]
    rng = np.random.default_rng(seed)
    seen: set[tuple[str, ...]] = set()
    while len(seen) < max_orders:
        seen.add(tuple(rng.permutation(list(names)).tolist()))
    return [list(p) for p in sorted(seen)]


def spread(values: Sequence[float] | np.ndarray) -> dict[str, float]:
    """``n``, ``min``, ``median``, ``max``, ``mean`` and the population ``std`` of some figures."""
    a = np.asarray(values, dtype=np.float64).reshape(-1)
    if not len(a):
        raise FusionError("spread of no figures")
    return {"n": len(a), "min": float(a.min()), "median": float(np.median(a)), "max": float(a.max()),
            "mean": float(a.mean()), "std": float(a.std())}


def order_of_addition(fit_table: SplitTable, val: SplitTable | None, evaluate_on: SplitTable, cfg: FusionConfig,
                      seeds: Sequence[int] = (0, 1, 2), start: str | None = None,
                      hparams: Mapping[str, Any] | None = None, metric: str | None = None, max_orders: int = 24,
                      report: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The paper's claim that the gain does not depend on the order of adding models, measured: for every order of
    adding the models (:func:`addition_orders`) and every seed, each prefix of two or more models is fitted as its
    own fusion, its channels in the order of addition (the network is not symmetric in its inputs: the gate's first
    layer and the blocks' weights are drawn per channel), with ``cfg`` at that seed (which also draws the held-out
    queries, the batches and the random negatives), and scored on ``evaluate_on``. A prefix shared by several orders
    is fitted once per seed (its figures are the same fusion), so K = 4 costs 12 + 24 + 24 = 60 fits per seed.

    Returns JSON-ready figures: per order its values per seed (and their mean, ``values``, for the plot); per
    position (number of models fused) the spread over all orders and seeds; the final figure's spread, with the part
    due to the order (std over orders, averaged over seeds) and the part due to the seed (std over seeds, averaged
    over orders); per subset of models the spread over the orders of its members and the seeds."""
    if not seeds:
        raise FusionError("order of addition: give at least one seed")
    t0 = time.perf_counter()
    names = fit_table.names
    orders = addition_orders(names, start, max_orders, cfg.seed)
    single = {n: evaluate_base(evaluate_on, k, cfg.eval_chunk) for k, n in enumerate(names)}
    metric = metric or pick_val_metric(cfg.val_metric, single[names[0]], evaluate_on.dataset)
    fitted: dict[tuple[tuple[str, ...], int], float] = {}

    def value(prefix: Sequence[str], seed: int) -> float:
        if len(prefix) == 1:
            return float(single[prefix[0]][metric])
        key = (tuple(prefix), int(seed))
        if key not in fitted:
            members = [names.index(x) for x in prefix]  # the order of addition is the order of the channels
            model, _ = fuse(fit_table, val, dataclasses.replace(cfg, seed=int(seed)), members, hparams)
            fitted[key] = float(evaluate_fused(model, evaluate_on.select(members), cfg.eval_chunk)[metric])
        return fitted[key]

    out_orders: list[dict[str, Any]] = []
    for order in orders:
        by_seed = {str(sd): [value(order[:j], sd) for j in range(1, len(order) + 1)] for sd in seeds}
        mean_vals = [float(np.mean([by_seed[str(sd)][j] for sd in seeds])) for j in range(len(order))]
        out_orders.append({"order": list(order), "values": mean_vals, "seeds": by_seed})
        if report:
            for j in range(1, len(order) + 1):
                vals = [by_seed[str(sd)][j - 1] for sd in seeds]
                report(f"  {' + '.join(order[:j])}: {metric} = " + ", ".join(f"{v:.2f}" for v in vals)
                       + (f" (seeds {', '.join(str(sd) for sd in seeds)})" if len(seeds) > 1 else ""))
    n_pos = len(orders[0])
    positions = [{"models": j + 1, **spread([o["seeds"][str(sd)][j] for o in out_orders for sd in seeds])}
                 for j in range(n_pos)]
    final = np.array([[o["seeds"][str(sd)][-1] for sd in seeds] for o in out_orders])  # [orders, seeds]
    by_subset: dict[frozenset[str], list[float]] = {}
    for (prefix, _), v in fitted.items():
        by_subset.setdefault(frozenset(prefix), []).append(v)
    subsets: list[dict[str, Any]] = [{"models": [n for n in names if n in key], **spread(v)} for key, v in by_subset.items()]
    subsets.sort(key=lambda d: (len(d["models"]), d["models"]))
    return {"metric": metric, "split": evaluate_on.dataset.key, "fit": fit_table.dataset.key, "start": start,
            "seeds": [int(sd) for sd in seeds], "orders": out_orders, "positions": positions,
            "final": {**spread(final), "std_over_orders": float(final.std(0).mean()),
                      "std_over_seeds": float(final.std(1).mean())},
            "singles": {n: float(single[n][metric]) for n in names}, "subsets": subsets, "fits": len(fitted),
            "wall_s": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------------------------------------
# Learned against static fusion: diagnostics
# ---------------------------------------------------------------------------------------------------------------------
def _evaluated(pq: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Rows with targets (what R@K and mAP@K average over) and rows with a subset (Rsubset@K)."""
    return pq["rank"] != -1, pq["subset_rank"] != -1


def query_scores(pq: Mapping[str, np.ndarray], metric: str) -> np.ndarray:
    """Each query's share of ``metric`` (in [0, 1]; 0 for a query the metric does not count): R@K -> hit at K,
    Rsubset@K -> subset hit at K, Rmean -> (hit at 5 + subset hit at 1) / 2, mAP@K -> AP@K. A per-query choice that
    maximises it maximises the metric (for Rmean exactly when every evaluated query has a subset, as on the
    synthetic benchmark and CIRR)."""
    ev, sub = _evaluated(pq)
    rank, srank = pq["rank"], pq["subset_rank"]
    if metric.startswith("R@"):
        return (ev & (rank <= int(metric[2:]))).astype(np.float64)
    if metric.startswith("Rsubset@"):
        return (sub & (srank <= int(metric[8:]))).astype(np.float64)
    if metric == "Rmean":
        return 0.5 * (ev & (rank <= 5)) + 0.5 * (sub & (srank <= 1))
    if metric.startswith("mAP@"):
        return np.where(ev, pq[f"AP@{metric[4:]}"], 0.0).astype(np.float64)
    raise FusionError(f"no per-query form of metric {metric!r} (R@K, Rsubset@K, Rmean, mAP@K)")


def metric_from_per_query(pq: Mapping[str, np.ndarray], metric: str) -> float:
    """``metric`` (percent) from per-query results, as :meth:`RetrievalMetrics.compute` averages them."""
    ev, sub = _evaluated(pq)
    if metric == "Rmean":
        return (metric_from_per_query(pq, "R@5") + metric_from_per_query(pq, "Rsubset@1")) / 2.0
    rows = sub if metric.startswith("Rsubset@") else ev
    if not rows.any():
        raise FusionError(f"no query counts for {metric!r}")
    return 100.0 * float(query_scores(pq, metric)[rows].mean())


def pick_per_query(pqs: Sequence[Mapping[str, np.ndarray]], choice: np.ndarray) -> dict[str, np.ndarray]:
    """Per-query results where query ``q`` takes candidate ``choice[q]``'s results."""
    rows = np.arange(len(choice))
    return {k: np.stack([pq[k] for pq in pqs], 1)[rows, choice] for k in pqs[0]}


def oracle_choice(pqs: Sequence[Mapping[str, np.ndarray]], metric: str) -> np.ndarray:
    """Per query, the candidate with the best per-query score (:func:`query_scores`; the first on ties)."""
    return np.stack([query_scores(pq, metric) for pq in pqs], 1).argmax(1)


def simplex_grid(k: int, steps: int) -> np.ndarray:
    """``[M, k]`` every weighting ``c / steps`` with non-negative integers ``c`` summing to ``steps``, plus the
    uniform weighting if the grid lacks it (the plain mean)."""
    if k < 1 or steps < 1:
        raise FusionError(f"simplex grid needs k >= 1 and steps >= 1, got {k}, {steps}")
    pts = [np.array(c, dtype=np.float64) / steps
           for c in itertools.product(range(steps + 1), repeat=k) if sum(c) == steps]
    grid = np.stack(pts)
    uni = np.full(k, 1.0 / k)
    if not np.isclose(grid, uni).all(1).any():
        grid = np.vstack([grid, uni])
    return grid


@torch.no_grad()
def weighted_per_query(table: SplitTable, weights: np.ndarray, hparams: Mapping[str, Any], chunk: int = 256,
                       dtype: torch.dtype = torch.float32) -> list[dict[str, np.ndarray]]:
    """Per-query results of every static weighting ``weights [M, K]`` of the per-query normalised scores (the z-scores
    the fusion reads, from raw scores computed in ``dtype`` as a fused model scoring in it does; the uniform
    weighting is the mean of normalised scores), in one pass over the table."""
    w = torch.as_tensor(weights, dtype=torch.float32)
    mets = [RetrievalMetrics(table.dataset) for _ in range(len(w))]
    for s in range(0, table.num_queries, chunk):
        rows = slice(s, min(table.num_queries, s + chunk))
        raw = table.raw_scores(rows, dtype=dtype)
        z = normalise_scores(raw, table.exclusion(rows, bool(hparams["exclude_reference"])), int(hparams["topk"]),
                             float(hparams["beta"])).z
        fused = torch.einsum("mk,bkn->mbn", w, z)
        for m, f in zip(mets, fused, strict=True):
            m.update(s, f.numpy())
    return [m.per_query() for m in mets]


def fusion_diagnostics(table: SplitTable, model: DAFM | None = None, metric: str | None = None, grid_steps: int = 4,
                       chunk: int = 256) -> dict[str, Any]:
    """Why a learned, query-aware fusion does or does not beat the plain mean, measured on ``table`` (a split the
    fusion was not fitted on):

    - ``singles``, ``mean`` (the mean of normalised scores), ``learned`` (``model``, if given): the metric;
    - ``oracle_single``: each query ranked by whichever base model (its own scores) serves it best -- the most a
      per-query *choice of a model* can give; ``oracle_single_share``: how often each model is that choice;
    - ``static_best``: the best single weighting of the z-scores on the grid (``grid_steps`` per unit), chosen with
      hindsight for all queries at once -- the most a *static* reweighting can give;
    - ``oracle_weights``: each query ranked by its own best weighting on the grid -- the most *query-aware weights*
      of this form can give (an upper bound: picking the best of many per query also rewards luck);
    - ``headroom``: each of these minus the mean;
    - ``gate`` (with ``model``): the learned weights' mean, their standard deviation across queries per model, the
      mean distance of a query's weights from the average weights (half the L1 distance, 0..1), and how often the
      gate's heaviest model is the per-query oracle's model."""
    names = table.names
    k = len(names)
    base = baseline_model(table) if model is None else model
    hp = base.hparams
    singles = [per_query_base(table, i, chunk) for i in range(k)]
    grid = simplex_grid(k, grid_steps)
    weighted = weighted_per_query(table, grid, hp, chunk, base.score_dtype)
    metric = metric or pick_val_metric("auto", evaluate_base(table, 0, chunk), table.dataset)
    uni = int(np.flatnonzero(np.isclose(grid, 1.0 / k).all(1))[0])
    per_w = [metric_from_per_query(pq, metric) for pq in weighted]
    best_static = int(np.argmax(per_w))
    mean = per_w[uni]
    o_single = oracle_choice(singles, metric)
    o_weights = oracle_choice(weighted, metric)
    ev = singles[0]["rank"] != -1
    out: dict[str, Any] = {
        "metric": metric, "split": table.dataset.key, "num_queries": int(table.num_queries),
        "singles": {n: metric_from_per_query(singles[i], metric) for i, n in enumerate(names)},
        "mean": mean,
        "oracle_single": metric_from_per_query(pick_per_query(singles, o_single), metric),
        "oracle_single_share": {n: float((o_single[ev] == i).mean()) if ev.any() else 0.0 for i, n in enumerate(names)},
        "static_best": {"weights": {n: float(grid[best_static, i]) for i, n in enumerate(names)},
                        "value": per_w[best_static]},
        "oracle_weights": metric_from_per_query(pick_per_query(weighted, o_weights), metric),
        "grid_steps": grid_steps, "grid_size": len(grid),
    }
    if model is not None:
        out["learned"] = metric_from_per_query(per_query_fused(model, table, chunk), metric)
        w = explain_all(model, table, chunk).double()
        w_bar = w.mean(0)
        arg = w.argmax(1).numpy()
        out["gate"] = {"mean_weight": {n: float(w_bar[i]) for i, n in enumerate(names)},
                       "std_weight": {n: float(w[:, i].std(unbiased=False)) for i, n in enumerate(names)},
                       "mean_distance_from_average": float(0.5 * (w - w_bar).abs().sum(1).mean()),
                       "argmax_is_oracle_single": float((arg[ev] == o_single[ev]).mean()) if ev.any() else 0.0}
    heads = {"oracle_single": out["oracle_single"], "static_best": out["static_best"]["value"],
             "oracle_weights": out["oracle_weights"]}
    if "learned" in out:
        heads["learned"] = out["learned"]
    out["headroom"] = {key: v - mean for key, v in heads.items()}
    return out


@torch.no_grad()
def score_statistics(table: SplitTable, hparams: Mapping[str, Any], chunk: int = 256) -> torch.Tensor:
    """``[Q, K, S]`` the gate's inputs for every query of the table: each model's score-distribution statistics
    (:func:`~cirfusion.fusion.kernels.normalise_scores`)."""
    parts = []
    for s in range(0, table.num_queries, chunk):
        rows = slice(s, min(table.num_queries, s + chunk))
        raw = table.raw_scores(rows, dtype=torch.float32)
        parts.append(normalise_scores(raw, table.exclusion(rows, bool(hparams["exclude_reference"])),
                                      int(hparams["topk"]), float(hparams["beta"])).stats)
    return torch.cat(parts)


def oracle_predictability(fit: SplitTable, evaluate_on: SplitTable, metric: str, steps: int = 300,
                          weight_decay: float = 1e-3, seed: int = 0, chunk: int = 256) -> dict[str, Any]:
    """Can the gate's inputs tell which base model serves a query best? A multinomial logistic regression from the
    standardised statistics (``[K * S]`` per query, what the gate reads) to the per-query oracle model
    (:func:`oracle_choice`) is fitted on ``fit`` and applied to ``evaluate_on``: its accuracy against the oracle and
    against always answering the most frequent model, and the metric when each query is ranked by the model it
    predicts (``predicted_choice``) beside the oracle's, the mean's and the best single model's. A predicted choice
    no better than the best single model means the statistics carry no usable per-query signal of which model is
    right -- so no gate reading them can beat static weights by much."""
    names = fit.names
    hp = baseline_model(fit).hparams
    labels = {}
    pqs = {}
    for key, t in (("fit", fit), ("eval", evaluate_on)):
        pqs[key] = [per_query_base(t, k, chunk) for k in range(len(names))]
        labels[key] = oracle_choice(pqs[key], metric)
    x_fit = score_statistics(fit, hp, chunk).flatten(1).double()
    x_ev = score_statistics(evaluate_on, hp, chunk).flatten(1).double()
    mu, sd = x_fit.mean(0), x_fit.std(0).clamp(min=1e-6)
    x_fit, x_ev = (x_fit - mu) / sd, (x_ev - mu) / sd
    # only queries some model serves (otherwise the oracle's choice is arbitrary: every model scores 0)
    served = np.stack([query_scores(pq, metric) for pq in pqs["fit"]], 1).max(1) > 0
    y = torch.from_numpy(labels["fit"][served])
    xs = x_fit[torch.from_numpy(served)]
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(xs.shape[1], len(names)).double()
    with torch.no_grad():
        lin.weight.copy_(0.01 * torch.randn(lin.weight.shape, generator=g, dtype=torch.float64))
        lin.bias.zero_()
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(xs), y) + weight_decay * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    if len(y):
        opt.step(closure)
    with torch.no_grad():
        pred = lin(x_ev).argmax(1).numpy()
    served_ev = np.stack([query_scores(pq, metric) for pq in pqs["eval"]], 1).max(1) > 0
    majority = int(np.bincount(labels["fit"][served], minlength=len(names)).argmax()) if served.any() else 0
    singles = {n: metric_from_per_query(pqs["eval"][i], metric) for i, n in enumerate(names)}
    return {
        "metric": metric, "fit": fit.dataset.key, "split": evaluate_on.dataset.key,
        "accuracy": float((pred[served_ev] == labels["eval"][served_ev]).mean()) if served_ev.any() else 0.0,
        "majority_model": names[majority],
        "majority_accuracy": float((labels["eval"][served_ev] == majority).mean()) if served_ev.any() else 0.0,
        "predicted_choice": metric_from_per_query(pick_per_query(pqs["eval"], pred), metric),
        "oracle_choice": metric_from_per_query(pick_per_query(pqs["eval"], labels["eval"]), metric),
        "best_single": max(singles.values()), "singles": singles,
        "predicted_share": {n: float((pred == i).mean()) for i, n in enumerate(names)},
    }


__all__ = ["addition_orders", "contribution_summary", "explain", "explain_all", "explanation_summary",
           "fusion_diagnostics", "incremental_analysis", "incremental_orders", "metric_from_per_query",
           "oracle_choice", "oracle_predictability", "order_of_addition", "pick_per_query", "plot_incremental", "query_scores", "score_statistics",
           "shapley_contributions", "simplex_grid", "spread", "target_columns", "weighted_per_query"]
