"""The explanation panel of one query: why each result ranks where it does, as far as the method can say.

- **DAFM (fused) checkpoints**: each base model's *exact* Shapley contribution to each shown result's fused score
  (:meth:`cirfusion.methods.dafm.DAFM.contributions`: 2^K fused evaluations per result, no sampling), the
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

from ..embeddings import Embedding, rows_of


def explain(method: Any, q: Embedding, g: Embedding | None, rows: Sequence[int] | np.ndarray, ids: Sequence[str],
            text: str) -> dict[str, Any]:
    """The explanation dict of one query ``q`` (a batch of one) whose shown results are gallery ``rows`` (``ids``)."""
    name = str(getattr(method, "method_name", "") or type(method).__name__)
    if hasattr(method, "contributions") and hasattr(method, "base_names") and g is not None:
        return _fused(method, q, g, np.asarray(rows, dtype=np.int64), list(ids), name)
    hook = getattr(method, "explain_query", None)
    if callable(hook):
        out = dict(hook(q, text))
        out.setdefault("kind", "branches")
        out.setdefault("method", name)
        return out
    return {"kind": "similarity", "method": name,
            "label": "single model: each score is the similarity of the query embedding (reference + text) and the "
                     "image embedding; this method reports no per-part breakdown"}


def _fused(method: Any, q: Embedding, g: Embedding, rows: np.ndarray, ids: list[str], name: str) -> dict[str, Any]:
    names = list(method.base_names)
    out: dict[str, Any] = {"kind": "shapley", "method": name, "models": names,
                           "label": "exact Shapley contribution of each base model to the fused score (all 2^K "
                                    "coalitions; an absent model scores every candidate alike)"}
    weights = method.explain(q, g)[0]
    out["gate_weights"] = {n: round(float(w), 6) for n, w in zip(names, weights, strict=True)}
    if rows.size == 0:
        out["results"] = []
        return out
    same = torch.zeros(rows.size, dtype=torch.int64)  # the one query, once per explained result
    qr = {"q": tuple(rows_of(x, same) for x in q["q"]), "fp": rows_of(q["fp"], same)}
    phi, values = method.contributions(qr, g, torch.from_numpy(rows))
    out["baseline"] = round(float(values[0, 0]), 6)
    out["results"] = [{"id": i, "score": round(float(values[j, -1]), 6),
                       "contributions": {n: round(float(phi[j, m]), 6) for m, n in enumerate(names)}}
                      for j, i in enumerate(ids)]
    return out
