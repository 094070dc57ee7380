"""Exact search by brute force over numpy arrays: the input checks and the float64 scoring that every index kind
also uses to rescore its candidates, so an exact index and brute force give bit-identical scores and ids (see
``cirfusion.index`` for the scoring and metric conventions)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CirfusionError

METRICS = ("ip", "cosine")
# fp16-cached unit vectors have norms within ~1e-3 of 1; an un-normalised embedding is far off.
NORM_TOLERANCE = 1e-2
_SCORE_CHUNK = 1 << 22  # float64 products per brute-force step (32 MiB)
_SCORE_BLOCK = 1 << 24  # float32 query x gallery scores held at once by brute force (64 MiB)


class CIRIndexError(CirfusionError, ValueError):
    """Bad index input or a bad index directory. The message names the file (when there is one) and the problem."""

    def __init__(self, problem: str, file: str | Path | None = None) -> None:
        self.file = None if file is None else str(file)
        self.problem = problem
        super().__init__(problem if file is None else f"{file}: {problem}")


# ----------------------------------------------------------------------------------------------------------------
# input checks and exact scoring (shared by the index and brute force, so both give bit-identical scores)


def as_vectors(x: Any, what: str, metric: str, dim: int | None = None) -> np.ndarray:
    """Validate embeddings ``[N, D]`` / ``[N, M, D]`` and return them as a C-contiguous float32 ``[N, M, D]``."""
    if metric not in METRICS:
        raise CIRIndexError(f"metric must be one of {METRICS}, got {metric!r}")
    arr = np.asarray(x)
    if arr.dtype.kind != "f":
        raise CIRIndexError(f"{what} must be a floating-point array, got dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[:, None, :]
    elif arr.ndim != 3:
        raise CIRIndexError(f"{what} must have shape [N, D] or [N, M, D], got shape {tuple(arr.shape)}")
    n, m, d = arr.shape
    if m == 0 or d == 0:
        raise CIRIndexError(f"{what} has an empty dimension: shape {tuple(arr.shape)}")
    if dim is not None and d != dim:
        raise CIRIndexError(f"{what} have dimension {d} but the index has dimension {dim}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if n == 0:
        return arr
    norms = np.sqrt(np.einsum("nmd,nmd->nm", arr, arr))  # [N, M]; no float64 copy of a large gallery
    if not np.isfinite(norms).all():
        row, tok = np.argwhere(~np.isfinite(norms))[0]
        raise CIRIndexError(f"{what}: row {row} (vector {tok}) contains NaN or infinity (or overflows float32)")
    if (norms == 0).any():
        row, tok = np.argwhere(norms == 0)[0]
        raise CIRIndexError(f"{what}: row {row} (vector {tok}) is all zeros and has no direction")
    if metric == "cosine":
        return np.ascontiguousarray((arr / norms[:, :, None]).astype(np.float32))
    bad = np.abs(norms - 1.0) > NORM_TOLERANCE
    if bad.any():
        row, tok = np.argwhere(bad)[0]
        raise CIRIndexError(
            f"{what}: row {row} (vector {tok}) has L2 norm {norms[row, tok]:.6g}; metric 'ip' expects unit vectors "
            f"(tolerance {NORM_TOLERANCE}). Normalise the embeddings or use metric='cosine'."
        )
    return arr


def check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise CIRIndexError(f"k must be a positive integer, got {k!r}")
    return int(k)


def exclude_rows(exclude: Sequence[Sequence[str]] | None, n_queries: int, row_of: dict[str, int]) -> list[np.ndarray]:
    """Per query, the sorted gallery rows to drop. Ids that are not in the gallery are ignored."""
    if exclude is None:
        return [np.empty(0, np.int64)] * n_queries
    if isinstance(exclude, (str, bytes)) or len(exclude) != n_queries:
        got = "a string" if isinstance(exclude, (str, bytes)) else f"{len(exclude)} lists"
        raise CIRIndexError(f"exclude must hold one list of ids per query ({n_queries}), got {got}")
    out = []
    for b, ids in enumerate(exclude):
        if isinstance(ids, (str, bytes)):
            raise CIRIndexError(f"exclude[{b}] must be a list of ids, got the string {ids!r}")
        out.append(np.array(sorted({row_of[i] for i in ids if i in row_of}), dtype=np.int64))
    return out


def check_enough(k: int, n_items: int, excl: list[np.ndarray]) -> None:
    if k > n_items:
        raise CIRIndexError(f"k={k} exceeds the {n_items} items in the gallery")
    for b, rows in enumerate(excl):
        if k > n_items - rows.size:
            raise CIRIndexError(f"query {b}: k={k} but only {n_items - rows.size} gallery items remain after exclusions")


def exact_scores(q: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Max-max inner products: q ``[B, Mq, D]``, g ``[C, M, D]`` -> ``[B, C]`` float32.

    float64 accumulation then one rounding to float32: the result does not depend on BLAS blocking, so the index's
    rescoring of candidates and brute force over the whole gallery agree bit for bit.
    """
    b, mq, d = q.shape
    c, m, _ = g.shape
    s = g.reshape(c * m, d).astype(np.float64) @ q.reshape(b * mq, d).astype(np.float64).T  # [C*M, B*Mq]
    return s.reshape(c, m, b, mq).max(axis=(1, 3)).T.astype(np.float32)


def topk_rows(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best k by score, ties broken by the lower row."""
    if scores.size > k:
        kth = np.partition(scores, scores.size - k)[scores.size - k]
        keep = np.flatnonzero(scores >= kth)  # every item tied with the k-th competes on row
        scores, rows = scores[keep], rows[keep]
    order = np.lexsort((rows, -scores))[:k]
    return scores[order], rows[order]


def brute_force_rows(q: np.ndarray, g: np.ndarray, k: int, excl: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k rows for validated q ``[B, Mq, D]`` against g ``[N, M, D]``.

    Queries go in blocks whose float32 score rows fit ``_SCORE_BLOCK``; within a block the gallery goes in chunks
    whose float64 products fit ``_SCORE_CHUNK``, so memory stays bounded whatever B and N are.
    """
    n, m = g.shape[0], g.shape[1]
    mq = q.shape[1]
    out_s = np.empty((q.shape[0], k), np.float32)
    out_r = np.empty((q.shape[0], k), np.int64)
    q_block = max(1, min(q.shape[0], _SCORE_BLOCK // n))
    g_chunk = max(1, _SCORE_CHUNK // (q_block * mq * m))
    all_rows = np.arange(n, dtype=np.int64)
    for b0 in range(0, q.shape[0], q_block):
        qb = q[b0 : b0 + q_block]
        s = np.empty((qb.shape[0], n), np.float32)
        for i in range(0, n, g_chunk):
            s[:, i : i + g_chunk] = exact_scores(qb, g[i : i + g_chunk])
        for j in range(qb.shape[0]):
            s[j, excl[b0 + j]] = -np.inf
            out_s[b0 + j], out_r[b0 + j] = topk_rows(s[j], all_rows, k)
    return out_s, out_r


def brute_force_search(
    queries: np.ndarray,
    gallery: np.ndarray,
    k: int,
    exclude: Sequence[Sequence[str]] | None = None,
    ids: Sequence[str] | None = None,
    metric: str = "ip",
) -> tuple[np.ndarray, list[list[str]]]:
    """Reference search by scoring every gallery item (numpy, float64 accumulation).

    ``queries`` ``[B, D]`` / ``[B, Mq, D]``, ``gallery`` ``[N, D]`` / ``[N, M, D]``; max-max scoring as in the
    module doc. ``ids`` names the gallery rows (default: the row number as a string); ``exclude[b]`` lists ids that
    query b must not return. Returns float32 scores ``[B, k]`` (descending; ties by lower row) and the ids.
    """
    k = check_k(k)
    g = as_vectors(gallery, "gallery embeddings", metric)
    q = as_vectors(queries[None] if np.ndim(queries) == 1 else queries, "queries", metric, dim=g.shape[2])
    names = [str(i) for i in range(g.shape[0])] if ids is None else check_ids(ids, g.shape[0])
    excl = exclude_rows(exclude, q.shape[0], {name: i for i, name in enumerate(names)})
    check_enough(k, g.shape[0], excl)
    scores, rows = brute_force_rows(q, g, k, excl)
    return scores, [[names[r] for r in row] for row in rows]


def check_ids(ids: Sequence[str], n: int, file: str | Path | None = None) -> list[str]:
    if isinstance(ids, (str, bytes)) or (not isinstance(ids, Sequence) and not isinstance(ids, np.ndarray)):
        raise CIRIndexError(f"ids must be a list of strings, got {type(ids).__name__}", file)
    ids = list(ids)
    if len(ids) != n:
        raise CIRIndexError(f"{len(ids)} ids for {n} embeddings", file)
    seen: dict[str, int] = {}
    for i, name in enumerate(ids):
        if not isinstance(name, str) or not name:
            raise CIRIndexError(f"id at position {i} must be a non-empty string, got {name!r}", file)
        if name in seen:
            raise CIRIndexError(f"duplicate id {name!r} at positions {seen[name]} and {i}", file)
        seen[name] = i
    return [str(name) for name in ids]
