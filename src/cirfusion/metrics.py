"""Retrieval metrics computed from a score matrix in row blocks.

A score matrix has one row per query (the order of ``CIRDataset.queries``) and one column per gallery image (the
order of ``CIRDataset.gallery``); higher means more relevant. It is never sorted whole: rows are processed in blocks
of ``chunk`` rows, so memory is O(chunk x N) and a ``.npy`` opened with ``np.load(mmap_mode="r")`` is read block by
block. Callers that compute scores on the fly (fusion, tiled search) feed the blocks themselves::

    m = RetrievalMetrics(dataset)
    for start in range(0, len(dataset), tile):
        m.update(start, scores_for_rows(start, start + tile))
    results = m.compute()          # {"R@1": 41.2, ..., "num_queries_evaluated": 4181}

Definitions (every metric value is a percentage, 0-100):

- ``R@K``: share of queries with at least one positive (target) among the first K ranked gallery images. With
  ``exclude_reference`` the query's reference image is removed from its ranking (the CIRR convention); a target
  equal to the reference then cannot be retrieved and the query counts as a miss. With ``recall_target="first"``
  (CIRCO; ``CIRDataset.recall_target``) only the query's first target counts, CIRCO's ``target_img_id``, as in
  the official ``src/evaluation.py`` of miccunifi/CIRCO; the other ground truths rank like any other image there,
  and the any-target figure is reported as ``Rgt@K``.
- ``Rsubset@K``: the same, ranking only the query's subset members (CIRR ``img_set.members``) minus its reference
  (always removed here: it is part of the metric's definition), averaged over the queries that have a subset
  (``num_queries_subset``).
- ``Rmean = (R@5 + Rsubset@1) / 2`` when subsets exist (and both ingredients are computed).
- ``mAP@K`` (the CIRCO definition): AP@K = (1 / min(K, |G|)) * sum_{k<=K} P@k * rel(k), with G the query's distinct
  positives (every ground truth, minus the reference when it is excluded), averaged over queries.
- Which target a benchmark scores is the loader's choice: CIRR scores ``target_hard`` (as CLIP4Cir and SPRC do;
  the CIRR authors' own validation code scores ``target_soft``, see :mod:`cirfusion.data.cirr`).
- Queries without targets (test splits) are skipped and counted in ``num_queries_skipped``.

**Ties: one rule everywhere.** The ranking is score descending, equal scores by the **lower gallery column**
(the order of ``CIRDataset.gallery``), the very ranking that :func:`topk_ids`, ``cirfusion search`` / the index and
the CIRR/CIRCO submission files use. So the metrics equal what a test server computes from the written files, and
a position is 1 + the number of rankable images with a higher score or an equal score at a lower column. On tied
scores the figures therefore depend on the gallery's column order (a constant score matrix ranks the gallery in
file order); that is the price of agreeing with the files that are submitted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from .data.schema import CIRDataset, DataError, Query, reference_mask
from .errors import CirfusionError

DEFAULT_KS: tuple[int, ...] = (1, 5, 10, 50)
DEFAULT_SUBSET_KS: tuple[int, ...] = (1, 2, 3)
DEFAULT_MAP_KS: tuple[int, ...] = (5, 10, 25, 50)

# Rank stored for a query whose positives can never appear in its ranking (e.g. its only target is its excluded
# reference): larger than any real rank.
_NEVER = np.iinfo(np.int64).max
_NO_TARGET = -1
# Column stored for padding in per-row column matrices: after every real column, so it never wins a tie.
_NO_COL = np.iinfo(np.int64).max
RECALL_TARGETS = ("any", "first")
# Up to this many positives per row, mAP counts the negatives above each positive with a full-width comparison;
# beyond it, among the max(map_ks) best negatives found by np.partition.
_EXACT_COUNT_MAX = 8


class ScoresError(CirfusionError, ValueError):
    """A score matrix or block that cannot be evaluated (wrong shape, NaN/inf, rows given twice or missing)."""


def as_score_array(block: Any) -> np.ndarray:
    """A 2-D floating numpy view/copy of ``block`` (numpy array, memmap or torch tensor of any float dtype).

    float16/bfloat16 become float32 (comparisons stay exact, numpy's partition is slow on float16); integers become
    float64; float32/float64 are kept as they are.
    """
    if hasattr(block, "detach") and hasattr(block, "cpu"):  # a torch tensor; torch is not imported here
        t = block.detach().cpu()
        if not t.is_floating_point() or t.element_size() < 4:
            t = t.float() if t.is_floating_point() else t.double()
        block = t.numpy()
    arr = np.asarray(block)
    if arr.dtype.kind == "f":
        if arr.dtype.itemsize < 4:
            arr = arr.astype(np.float32)
    elif arr.dtype.kind in "iub":
        arr = arr.astype(np.float64)
    else:
        raise ScoresError(f"scores must be real numbers, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ScoresError(f"a score block must be 2-D (rows = queries, columns = gallery), got shape {arr.shape}")
    return arr


def _check_finite(block: np.ndarray, row_start: int, queries: Sequence[Query] | None = None,
                  col_names: Sequence[str] | None = None) -> None:
    finite = np.isfinite(block)
    if finite.all():
        return
    r, c = (int(x[0]) for x in np.nonzero(~finite))
    row = row_start + r
    what = f"row {row}" + (f" (query {queries[row].qid!r})" if queries is not None else "")
    what += f", column {c}" + (f" (image {col_names[c]!r})" if col_names is not None else "")
    n_bad = int((~finite).sum())
    raise ScoresError(f"score is {block[r, c]} at {what}; {n_bad} non-finite value(s) in rows "
                      f"{row_start}..{row_start + block.shape[0] - 1}: scores must be finite")


def _resolve(source: CIRDataset | tuple[Sequence[Query], Sequence[str]]
             ) -> tuple[list[Query], list[str], dict[str, int], Any, bool, str]:
    """(queries, gallery ids, id -> column, file for error messages, default exclude_reference, default
    recall_target)."""
    if isinstance(source, CIRDataset):
        g = source.gallery
        columns = {gid: i for i, gid in enumerate(g.ids)}
        src = source.files[0] if source.files else (g.source or source.key)
        return list(source.queries), list(g.ids), columns, src, source.exclude_reference, source.recall_target
    try:
        queries, gallery_ids = source
    except (TypeError, ValueError):
        raise TypeError("expected a CIRDataset or a (queries, gallery_ids) pair") from None
    ids = [str(i) for i in gallery_ids]
    index: dict[str, int] = {}
    for pos, gid in enumerate(ids):
        if gid in index:
            raise DataError(None, gid, "duplicate image id in gallery_ids")
        index[gid] = pos
    return list(queries), ids, index, None, True, "any"


def _check_ks(ks: Iterable[int], name: str) -> tuple[int, ...]:
    out = tuple(sorted({int(k) for k in ks}))
    if any(k < 1 for k in out):
        raise ValueError(f"{name} must be positive integers, got {tuple(ks)}")
    return out


def _csr(lists: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    ptr = np.zeros(len(lists) + 1, dtype=np.int64)
    ptr[1:] = np.cumsum([len(x) for x in lists])
    flat = np.fromiter((c for x in lists for c in x), dtype=np.int64, count=int(ptr[-1]))
    return ptr, flat


def _padded(ptr: np.ndarray, r0: int, r1: int, values: np.ndarray, fill: float) -> np.ndarray:
    """Scatter the CSR rows r0..r1 of ``values`` into a (b, max_len) matrix padded with ``fill``."""
    counts = np.diff(ptr[r0:r1 + 1])
    b = r1 - r0
    rows = np.repeat(np.arange(b), counts)
    within = np.arange(len(values)) - np.repeat(ptr[r0:r1] - ptr[r0], counts)
    width = int(counts.max()) if b and len(values) else 0
    mat = np.full((b, width), fill, dtype=values.dtype if values.dtype.kind in "fi" else np.float64)
    mat[rows, within] = values
    return mat


def _rank_order(scores: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row of (scores, their gallery columns) into ranking order: score descending, ties by the lower
    column (padding, -inf at column _NO_COL, goes last)."""
    order = np.lexsort((cols, -scores), axis=1)
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(cols, order, axis=1)


def _ahead(values: np.ndarray, cols: np.ndarray, s: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Per row, how many entries of ``values`` (at gallery columns ``cols``) rank before a candidate scoring
    ``s`` at column ``c``: a higher score, or the same score and a lower column (the tie rule of the module)."""
    n = (values > s[:, None]).sum(axis=1)
    eq = values == s[:, None]
    tied = np.flatnonzero(eq.any(axis=1))  # ties are rare with real-valued scores: count them on those rows only
    if len(tied):
        n[tied] += (eq[tied] & (cols[tied] < c[tied, None])).sum(axis=1)
    return n


def _first_columns(work: np.ndarray, k: int) -> np.ndarray:
    """Columns of the ``k`` first entries of each row in ranking order (score descending, ties by the lower
    column), unordered; ``0 < k <= work.shape[1]``."""
    n = work.shape[1]
    idx = np.argpartition(work, n - k, axis=1)[:, n - k:]  # the k largest, unordered (faster than on -work)
    kth = np.take_along_axis(work, idx, axis=1).min(axis=1)
    # argpartition picks arbitrarily among ties at the k-th value; make those rows follow the tie rule.
    for row in np.flatnonzero((work >= kth[:, None]).sum(axis=1) > k):
        above = np.flatnonzero(work[row] > kth[row])
        tied = np.flatnonzero(work[row] == kth[row])[: k - len(above)]
        idx[row] = np.concatenate([above, tied])
    return idx


class RetrievalMetrics:
    """Streaming accumulator of retrieval metrics over row blocks of a (queries x gallery) score matrix.

    ``source`` is a :class:`CIRDataset` or a ``(queries, gallery_ids)`` pair. ``exclude_reference`` defaults to
    ``dataset.exclude_reference`` (``True`` for a pair). Feed every row exactly once with :meth:`update`, in any order
    and any block sizes; :meth:`compute` returns the metrics as percentages (see the module docstring). Blocks larger
    than ``chunk`` rows are processed ``chunk`` rows at a time, so the working memory stays O(chunk x N).
    """

    def __init__(
        self,
        source: CIRDataset | tuple[Sequence[Query], Sequence[str]],
        ks: Iterable[int] = DEFAULT_KS,
        subset_ks: Iterable[int] = DEFAULT_SUBSET_KS,
        map_ks: Iterable[int] = DEFAULT_MAP_KS,
        exclude_reference: bool | None = None,
        chunk: int = 1024,
        recall_target: str | None = None,
    ) -> None:
        queries, ids, index, src, default_excl, default_recall = _resolve(source)
        self.queries = queries
        self.gallery_ids = ids
        self.exclude_reference = default_excl if exclude_reference is None else bool(exclude_reference)
        self.recall_target = default_recall if recall_target is None else recall_target
        if self.recall_target not in RECALL_TARGETS:
            raise ValueError(f"recall_target must be one of {RECALL_TARGETS}, got {self.recall_target!r}")
        self.ks = _check_ks(ks, "ks")
        self.subset_ks = _check_ks(subset_ks, "subset_ks")
        self.map_ks = _check_ks(map_ks, "map_ks")
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.chunk = int(chunk)
        self.num_queries = len(queries)
        self.num_gallery = len(ids)

        ref_col = np.full(self.num_queries, -1, dtype=np.int64)
        first_col = np.full(self.num_queries, -1, dtype=np.int64)  # rankable column of targets[0], else -1
        has_targets = np.zeros(self.num_queries, dtype=bool)
        has_subset = np.zeros(self.num_queries, dtype=bool)
        pos_lists: list[list[int]] = []
        sub_lists: list[list[int]] = []
        sub_pos_lists: list[list[bool]] = []
        for qi, q in enumerate(queries):
            ref = index.get(q.reference, -1)  # a reference outside the gallery has nothing to remove
            if self.exclude_reference:
                ref_col[qi] = ref
            cols: list[int] = []
            for t in dict.fromkeys(q.targets):
                if t not in index:
                    raise DataError(src, q.qid, f"target {t!r} is not in the gallery")
                cols.append(index[t])
            has_targets[qi] = bool(cols)
            pos = [c for c in cols if not (self.exclude_reference and c == ref)]
            pos_lists.append(pos)
            if cols and cols[0] in pos:
                first_col[qi] = cols[0]
            members: list[int] = []
            flags: list[bool] = []
            if q.subset is not None and has_targets[qi]:
                for m in dict.fromkeys(q.subset):
                    if m not in index:
                        raise DataError(src, q.qid, f"subset member {m!r} is not in the gallery")
                    if m != q.reference:
                        members.append(index[m])
                tset = set(cols)
                flags = [c in tset for c in members]
                if members and not any(flags):
                    raise DataError(src, q.qid, "no target is among the subset members (minus the reference), "
                                    "so Recall_subset is undefined for this query")
                has_subset[qi] = bool(members)
            sub_lists.append(members)
            sub_pos_lists.append(flags)
        self._ref = ref_col
        self._first_col = first_col
        self._has_targets = has_targets
        self._has_subset = has_subset
        self._pos_ptr, self._pos_col = _csr(pos_lists)
        self._sub_ptr, self._sub_col = _csr(sub_lists)
        self._sub_pos = np.fromiter((f for x in sub_pos_lists for f in x), dtype=bool, count=len(self._sub_col))
        self.reset()

    def reset(self) -> None:
        """Forget every block fed so far."""
        self._seen = np.zeros(self.num_queries, dtype=bool)
        self._rank = np.full(self.num_queries, _NO_TARGET, dtype=np.int64)
        self._gt_rank = np.full(self.num_queries, _NO_TARGET, dtype=np.int64)
        self._sub_rank = np.full(self.num_queries, _NO_TARGET, dtype=np.int64)
        self._ap = np.zeros((self.num_queries, len(self.map_ks)), dtype=np.float64)

    # ------------------------------------------------------------------ feeding
    def update(self, row_start: int, scores_block: Any) -> None:
        """Add the scores of queries ``row_start .. row_start + len(scores_block) - 1`` (all gallery columns)."""
        block = as_score_array(scores_block)
        b, n = block.shape
        row_start = int(row_start)
        if n != self.num_gallery:
            raise ScoresError(f"score block has {n} columns but the gallery has {self.num_gallery} images")
        if row_start < 0 or row_start + b > self.num_queries:
            raise ScoresError(f"rows {row_start}..{row_start + b - 1} are outside the {self.num_queries} queries")
        if self._seen[row_start:row_start + b].any():
            dup = row_start + int(np.argmax(self._seen[row_start:row_start + b]))
            raise ScoresError(f"row {dup} (query {self.queries[dup].qid!r}) was already scored")
        for s in range(0, b, self.chunk):
            part = block[s:s + self.chunk]
            _check_finite(part, row_start + s, self.queries, self.gallery_ids)
            self._process(row_start + s, part)
        self._seen[row_start:row_start + b] = True

    def _process(self, r0: int, block: np.ndarray) -> None:
        b = block.shape[0]
        r1 = r0 + b
        if not self._has_targets[r0:r1].any():
            return  # test-split rows: nothing to measure
        rows = np.arange(b)
        ninf = -np.inf
        work = np.array(block, copy=True)

        # Subset ranks use the raw scores (the reference is not among the stored members).
        if self._has_subset[r0:r1].any():
            s0, s1 = self._sub_ptr[r0], self._sub_ptr[r1]
            cols = self._sub_col[s0:s1]
            flags = self._sub_pos[s0:s1]
            sc = block[np.repeat(rows, np.diff(self._sub_ptr[r0:r1 + 1])), cols]
            pos_m = _padded(self._sub_ptr, r0, r1, np.where(flags, sc, ninf), ninf)
            pcol_m = _padded(self._sub_ptr, r0, r1, np.where(flags, cols, _NO_COL), _NO_COL)
            neg_m = _padded(self._sub_ptr, r0, r1, np.where(flags, ninf, sc), ninf)
            ncol_m = _padded(self._sub_ptr, r0, r1, np.where(flags, _NO_COL, cols), _NO_COL)
            if pos_m.shape[1]:
                pos_m, pcol_m = _rank_order(pos_m, pcol_m)
                srank = _ahead(neg_m, ncol_m, pos_m[:, 0], pcol_m[:, 0]) + 1
                m = self._has_subset[r0:r1]
                self._sub_rank[r0:r1][m] = srank[m]

        # Remove the reference, pull the positives out: `work` then holds only rankable negatives.
        ref = self._ref[r0:r1]
        has_ref = ref >= 0
        work[rows[has_ref], ref[has_ref]] = ninf
        p0, p1 = self._pos_ptr[r0], self._pos_ptr[r1]
        pcols = self._pos_col[p0:p1]
        pcount = np.diff(self._pos_ptr[r0:r1 + 1])
        prow = np.repeat(rows, pcount)
        pscore = work[prow, pcols]
        work[prow, pcols] = ninf
        pos_m = _padded(self._pos_ptr, r0, r1, pscore, ninf)
        pcol_m = _padded(self._pos_ptr, r0, r1, pcols, _NO_COL)
        # Column i is the (i+1)-th positive of the ranking: by score, ties by the lower gallery column.
        pos_m, pcol_m = _rank_order(pos_m, pcol_m)
        tgt = self._has_targets[r0:r1]
        all_cols = np.broadcast_to(np.arange(work.shape[1]), work.shape)

        if pos_m.shape[1]:
            n_above_best = _ahead(work, all_cols, pos_m[:, 0], pcol_m[:, 0])
        else:
            n_above_best = np.zeros(b, dtype=np.int64)
        rank = n_above_best + 1
        rank[pcount == 0] = _NEVER
        self._gt_rank[r0:r1][tgt] = rank[tgt]
        if self.recall_target == "first":
            # R@K follows the query's first target only; the other ground truths rank like any other image.
            t = self._first_col[r0:r1]
            ok = t >= 0
            ts = np.full(b, ninf)
            ts[ok] = block[rows[ok], t[ok]]
            pos_before = ((pos_m > ts[:, None]) | ((pos_m == ts[:, None]) & (pcol_m < t[:, None]))).sum(axis=1)
            trank = _ahead(work, all_cols, ts, t) + pos_before + 1
            trank[~ok] = _NEVER
            self._rank[r0:r1][tgt] = trank[tgt]
        else:
            self._rank[r0:r1][tgt] = rank[tgt]

        if self.map_ks and pos_m.shape[1]:
            kmax = self.map_ks[-1]
            n = work.shape[1]
            kp = min(kmax, pos_m.shape[1])
            top_pos, top_col = pos_m[:, :kp], pcol_m[:, :kp]
            # Position of the i-th positive = i + #negatives ranked before it (higher score, or equal score and
            # lower gallery column).
            i = np.arange(1, kp + 1)
            if kp <= _EXACT_COUNT_MAX:
                # Few positives (CIRR, FashionIQ, most CIRCO rows): one cheap full-width comparison per positive.
                above = [n_above_best] + [_ahead(work, all_cols, top_pos[:, c], top_col[:, c]) for c in range(1, kp)]
                position = i[None, :] + np.stack(above, axis=1)
            else:
                # Many positives: count only among the kn first negatives of the ranking, which is exact whenever
                # the position is <= kmax, the only case that counts.
                kn = min(kmax, n)
                ncol = _first_columns(work, kn)  # the kn first negatives in ranking order, unordered
                nval = np.take_along_axis(work, ncol, axis=1)
                before = (nval[:, None, :] > top_pos[:, :, None]) | (
                    (nval[:, None, :] == top_pos[:, :, None]) & (ncol[:, None, :] < top_col[:, :, None]))
                position = i[None, :] + before.sum(axis=2)
            valid = i[None, :] <= pcount[:, None]
            for j, k in enumerate(self.map_ks):
                hit = valid & (position <= k)
                prec = np.where(hit, i[None, :] / position, 0.0).sum(axis=1)
                denom = np.minimum(k, pcount)
                ap = np.divide(prec, denom, out=np.zeros(b), where=denom > 0)
                self._ap[r0:r1, j][tgt] = ap[tgt]

    # ------------------------------------------------------------------ results
    def _require_complete(self) -> None:
        if not self._seen.all():
            missing = np.flatnonzero(~self._seen)
            raise ScoresError(f"{len(missing)} of {self.num_queries} queries have no scores yet "
                              f"(first missing row {int(missing[0])}, query {self.queries[int(missing[0])].qid!r})")

    def compute(self) -> dict[str, float]:
        """The metrics, in percent (0-100), plus ``num_queries_evaluated``, ``num_queries_skipped`` (no targets)
        and, when subsets exist, ``num_queries_subset``. Metric keys are absent when no query has targets."""
        self._require_complete()
        out: dict[str, float] = {}
        ev = self._has_targets
        n_ev = int(ev.sum())
        n_sub = int(self._has_subset.sum())
        if n_ev:
            ranks = self._rank[ev]
            for k in self.ks:
                out[f"R@{k}"] = 100.0 * float(np.mean(ranks <= k))
            if self.recall_target == "first":
                gt_ranks = self._gt_rank[ev]
                for k in self.ks:
                    out[f"Rgt@{k}"] = 100.0 * float(np.mean(gt_ranks <= k))
            if n_sub:
                sranks = self._sub_rank[self._has_subset]
                for k in self.subset_ks:
                    out[f"Rsubset@{k}"] = 100.0 * float(np.mean(sranks <= k))
                if "R@5" in out and "Rsubset@1" in out:
                    out["Rmean"] = (out["R@5"] + out["Rsubset@1"]) / 2.0
            for j, k in enumerate(self.map_ks):
                out[f"mAP@{k}"] = 100.0 * float(np.mean(self._ap[ev, j]))
        out["num_queries_evaluated"] = n_ev
        out["num_queries_skipped"] = self.num_queries - n_ev
        if n_sub:
            out["num_queries_subset"] = n_sub
        return out

    def per_query(self) -> dict[str, np.ndarray]:
        """Per-query results in query order: ``rank`` (1-based rank of what R@K counts: the best positive, or the
        first target with ``recall_target="first"``; -1 without targets; a huge value when it cannot be ranked),
        ``subset_rank`` (same, -1 without a subset), ``AP@K`` in [0, 1] and, with ``recall_target="first"``,
        ``gt_rank`` (the best positive's rank, behind ``Rgt@K``)."""
        self._require_complete()
        out = {"rank": self._rank.copy(), "subset_rank": self._sub_rank.copy()}
        if self.recall_target == "first":
            out["gt_rank"] = self._gt_rank.copy()
        for j, k in enumerate(self.map_ks):
            out[f"AP@{k}"] = self._ap[:, j].copy()
        return out


def iter_row_blocks(scores: Any, chunk: int) -> Iterable[tuple[int, Any]]:
    """(row_start, rows) blocks of a 2-D array-like; memmaps are sliced, never loaded whole."""
    n = scores.shape[0]
    for s in range(0, n, chunk):
        yield s, scores[s:s + chunk]


def evaluate_scores(
    scores: Any,
    source: CIRDataset | tuple[Sequence[Query], Sequence[str]],
    chunk: int = 1024,
    ks: Iterable[int] = DEFAULT_KS,
    subset_ks: Iterable[int] = DEFAULT_SUBSET_KS,
    map_ks: Iterable[int] = DEFAULT_MAP_KS,
    exclude_reference: bool | None = None,
    recall_target: str | None = None,
) -> dict[str, float]:
    """One-shot metrics (percent, see the module docstring) of a full (Q x N) score matrix: numpy array,
    ``np.load(..., mmap_mode="r")`` memmap or torch tensor, read ``chunk`` rows at a time."""
    m = RetrievalMetrics(source, ks=ks, subset_ks=subset_ks, map_ks=map_ks, exclude_reference=exclude_reference,
                         chunk=chunk, recall_target=recall_target)
    shape = tuple(getattr(scores, "shape", ()))
    if shape != (m.num_queries, m.num_gallery):
        raise ScoresError(f"score matrix has shape {shape} but the dataset needs ({m.num_queries}, {m.num_gallery}) "
                          "(rows = queries, columns = gallery images)")
    for s, blk in iter_row_blocks(scores, chunk):
        m.update(s, blk)
    return m.compute()


def topk_ids(scores_block: Any, k: int, exclude: Any = None) -> np.ndarray:
    """Column indices of the ``k`` best scores of each row, best first: shape (rows, k), int64.

    ``exclude``: columns removed per row — ``None``, a 1-D int array with one column per row (-1 = none), or a
    sequence of per-row column lists. Ties are broken by the lower column index (deterministic). Uses
    ``np.argpartition``; raises :class:`ScoresError` for non-finite scores or when a row has fewer than ``k``
    columns left.
    """
    block = as_score_array(scores_block)
    b, n = block.shape
    k = int(k)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    _check_finite(block, 0)
    work = np.array(block, copy=True)
    n_excl = np.zeros(b, dtype=np.int64)
    if exclude is not None:
        if isinstance(exclude, np.ndarray) and exclude.ndim == 1:
            if len(exclude) != b:
                raise ValueError(f"exclude has {len(exclude)} entries for {b} rows")
            ex = exclude.astype(np.int64)
            work[reference_mask(ex, n)] = -np.inf
            n_excl = (ex >= 0).astype(np.int64)
        else:
            ex_lists = list(exclude)
            if len(ex_lists) != b:
                raise ValueError(f"exclude has {len(ex_lists)} entries for {b} rows")
            for r, cols in enumerate(ex_lists):
                cols = np.unique(np.asarray([c for c in cols if c is not None and c >= 0], dtype=np.int64))
                work[r, cols] = -np.inf
                n_excl[r] = len(cols)
    if b and k > n - int(n_excl.max()):
        raise ScoresError(f"cannot take the top {k} of {n} columns with up to {int(n_excl.max())} excluded")
    if k == 0 or b == 0:
        return np.zeros((b, k), dtype=np.int64)
    idx = _first_columns(work, k)
    vals = np.take_along_axis(work, idx, axis=1)
    order = np.lexsort((idx, -vals), axis=1)
    return np.take_along_axis(idx, order, axis=1)


def fashioniq_summary(per_category: Mapping[str, Mapping[str, float]], ks: Sequence[int] = (10, 50)) -> dict[str, float]:
    """FashionIQ's table: ``{cat}/R@K`` per category, ``average/R@K`` (unweighted mean over categories, the field's
    convention) and ``average`` = mean of the ``average/R@K`` values. Input: ``{"dress": metrics_dict, ...}``."""
    if not per_category:
        raise ValueError("fashioniq_summary needs at least one category")
    out: dict[str, float] = {}
    for cat, res in per_category.items():
        for k in ks:
            key = f"R@{k}"
            if key not in res:
                raise ValueError(f"category {cat!r} has no {key} (keys: {sorted(res)})")
            out[f"{cat}/{key}"] = float(res[key])
    avgs = []
    for k in ks:
        v = float(np.mean([float(res[f"R@{k}"]) for res in per_category.values()]))
        out[f"average/R@{k}"] = v
        avgs.append(v)
    out["average"] = float(np.mean(avgs))
    return out
