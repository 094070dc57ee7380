"""The explanation panel of one query: why each result ranks where it does, as far as the method can say.

- **DAFM (fused) checkpoints**: each base model's *exact* Shapley contribution to each shown result's fused score
  (the computation of :meth:`cirfusion.methods.dafm.DAFM.contributions`: 2^K fused evaluations per result, no
  sampling; :func:`fused_rank_batch` ranks and explains from one pass of base scores), the
  no-information baseline they add up from (``v(empty)``: the fused score of a pool that tells no candidates apart,
  the same for every candidate of the query) and the gate's weight of each model for this query. For every result,
  ``baseline + sum(contributions) == score`` up to float rounding.
- **A method with an ``explain_query(query_embedding, text) -> dict`` hook** (how a branch-fusing method such as
  DetailFusion or FineCIR reports its branch weights and parsed modification): that dict, as the method gives it.
- **Any other single model**: labelled as such: the score is the similarity of the query and image embeddings,
  which has no per-part breakdown.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..embeddings import Embedding, rows_of, tree_map
from ..exact_search import topk_rows
from ..fusion.kernels import SMALL_BATCH, Normalised
from ..fusion.shapley import absent_stats, shapley_values


def explain(method: Any, q: Embedding, text: str) -> dict[str, Any]:
    """The explanation of one query ``q`` (a batch of one) of a single (not fused) model; fused models are
    explained by :func:`fused_rank_batch`."""
    name = str(getattr(method, "method_name", "") or type(method).__name__)
    hook = getattr(method, "explain_query", None)
    if callable(hook):
        out = dict(hook(q, text))
        out.setdefault("kind", "branches")
        out.setdefault("method", name)
        return out
    return {"kind": "similarity", "method": name,
            "label": "single model: each score is the similarity of the query embedding (reference + text) and the "
                     "image embedding; this method reports no per-part breakdown"}


def is_fused(method: Any) -> bool:
    """Whether ``method`` is a DAFM-style fusion (base models, a fusion network, exact Shapley contributions)."""
    return hasattr(method, "contributions") and hasattr(method, "base_names") and hasattr(method, "normalised_tiles")


def _query_vectors(q: Embedding) -> int:
    """The most vectors any part of a (bundled) query embedding gives one query (1 for single-vector models)."""
    counts: list[int] = []

    def count(t: torch.Tensor) -> torch.Tensor:
        counts.append(int(t.shape[1]) if t.dim() == 3 else 1)  # [B, M, D]: M vectors per query
        return t

    tree_map(count, q)
    return max(counts or [1])


@torch.no_grad()
def fused_rank_batch(method: Any, q: Embedding, g: Embedding, ks: Sequence[int], excludes: Sequence[int | None],
                     explain_top: int, with_explanation: Sequence[bool]) -> list[tuple[np.ndarray, np.ndarray, dict[str, Any]]]:
    """Rank and explain a batch of queries of a fused model from ONE pass of base scores over the gallery.

    ``DAFM.normalised_tiles`` (the method's own scoring, not a copy of it) gives the queries' normalised scores and
    statistics once; the fused scores (what ``DAFM.similarity`` returns), the gate weights (``DAFM.explain``) and
    the exact Shapley values of each query's top ``explain_top`` results (``DAFM.contributions``, through
    :func:`cirfusion.fusion.shapley.shapley_values`) are all read from it, instead of three full passes. The queries
    are scored in chunks of at most ``SMALL_BATCH`` query vectors, where reduced-precision gallery products are
    computed row by row as for a lone query: an answer does not depend on the other queries of its batch."""
    b = len(ks)
    chunk = max(1, SMALL_BATCH // _query_vectors(q))
    out: list[tuple[np.ndarray, np.ndarray, dict[str, Any]]] = []
    for s in range(0, b, chunk):
        rows = slice(s, min(b, s + chunk))
        for norm in method.normalised_tiles(rows_of(q, rows), g):
            fused = method.fusion(norm.z, norm.stats).float().numpy()
            for j in range(fused.shape[0]):
                i = len(out)
                out.append(_rank_one(method, norm, j, fused[j].copy(), ks[i], excludes[i], explain_top,
                                     with_explanation[i]))
    return out


def _rank_one(method: Any, norm: Normalised, j: int, fused: np.ndarray, k: int, exclude: int | None, explain_top: int,
              with_explanation: bool) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    if exclude is not None:
        fused[exclude] = -np.inf
    scores, rows = topk_rows(fused, np.arange(fused.shape[0], dtype=np.int64), k)
    if not with_explanation:
        return scores, rows, {}
    names = list(method.base_names)
    out: dict[str, Any] = {"kind": "shapley", "method": str(method.method_name or "dafm"), "models": names,
                           "label": "exact Shapley contribution of each base model to the fused score (all 2^K "
                                    "coalitions; an absent model scores every candidate alike)"}
    one = slice(j, j + 1)
    alone = Normalised(z=norm.z[one], mean=norm.mean[one], std=norm.std[one], stats=norm.stats[one],
                       valid=None if norm.valid is None else norm.valid[one])
    weights = method.fusion.weights(alone.stats)[0]
    out["gate_weights"] = {n: round(float(w), 6) for n, w in zip(names, weights, strict=True)}
    top = rows[:explain_top]
    if top.size:
        b = int(top.size)
        # the query's tile repeated once per explained column (views, no copies)
        rep = Normalised(z=alone.z.expand(b, -1, -1), mean=alone.mean.expand(b, -1), std=alone.std.expand(b, -1),
                         stats=alone.stats.expand(b, -1, -1),
                         valid=None if alone.valid is None else alone.valid.expand(b, -1))
        h = method.params
        absent = absent_stats(alone, h.topk, h.beta).expand(b, -1, -1)  # the same for every column of the query
        phi, values = shapley_values(method.fusion, rep, torch.from_numpy(top), h.topk, h.beta, absent)
        out["baseline"] = round(float(values[0, 0]), 6)
        out["results"] = [{"row": int(r), "score": round(float(values[j2, -1]), 6),
                           "contributions": {n: round(float(phi[j2, m]), 6) for m, n in enumerate(names)}}
                          for j2, r in enumerate(top)]
    else:
        out["results"] = []
    return scores, rows, out
