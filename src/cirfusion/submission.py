"""Test-server submission files for CIRR and CIRCO, validated locally before they are written.

- CIRR (https://cirr.cecs.anu.edu.au/test_process/): two JSON files,
  ``recall_submission_{name}.json`` = ``{"version": "rc2", "metric": "recall", "<pairid>": [50 image ids], ...}``
  and ``recall_subset_submission_{name}.json`` = ``{"version": "rc2", "metric": "recall_subset",
  "<pairid>": [3 image ids], ...}``. Every pair id appears once; the reference image is never listed; subset lists
  only hold ``img_set.members``. The pair id is ``Query.qid`` (the CIRR loader sets ``qid = str(pairid)``).
- CIRCO (https://github.com/miccunifi/CIRCO#submission-format): ``circo_submission_{name}.json`` =
  ``{"<query id>": [50 unique image ids], ...}`` for every query. Image ids are written as JSON integers when every
  gallery id is a plain decimal integer (CIRCO's COCO ids), as strings otherwise.

Scores are given either as a full (queries x gallery) array-like (numpy, ``np.load(mmap_mode="r")``, torch),
read ``chunk`` rows at a time, or as an iterable of ``(row_start, block)`` tiles (e.g. fusion computing scores on
the fly). Ranking ties are broken by the lower gallery index, as in :func:`cirfusion.metrics.topk_ids`; the
metrics of :mod:`cirfusion.metrics` rank by the same rule, so they equal what a server computes from these files.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .data.schema import CIRDataset, Gallery
from .errors import CirfusionError
from .io import atomic_write_json
from .metrics import ScoresError, as_score_array, iter_row_blocks, topk_ids

CIRR_VERSION = "rc2"
CIRR_TOP_K = 50
CIRR_SUBSET_K = 3
CIRCO_TOP_K = 50
_MAX_LISTED = 20


class SubmissionError(CirfusionError, ValueError):
    """A submission that the test server would reject; the message lists the problems found."""

    def __init__(self, what: str, problems: list[str]) -> None:
        self.problems = problems
        shown = "\n  - ".join(problems[:_MAX_LISTED])
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        super().__init__(f"{what}: {len(problems)} problem(s):\n  - {shown}{more}")


def _tiles(scores: Any, n_rows: int, n_cols: int, chunk: int) -> Iterator[tuple[int, Any]]:
    if hasattr(scores, "shape"):
        shape = tuple(scores.shape)
        if shape != (n_rows, n_cols):
            raise ScoresError(f"score matrix has shape {shape} but the dataset needs ({n_rows}, {n_cols}) "
                              "(rows = queries, columns = gallery images)")
        yield from iter_row_blocks(scores, chunk)
    else:
        for row_start, block in scores:
            yield int(row_start), block


def _is_plain_int(s: str) -> bool:
    return s.isdigit() and s.isascii() and (s == "0" or not s.startswith("0"))


def _load_checked(obj: Any, what: str) -> Any:
    """A submission given as a path is parsed with duplicate keys detected (json.load would keep the last)."""
    if not isinstance(obj, (str, Path)):
        return obj

    def no_dups(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        dups = [k for k, n in Counter(k for k, _ in pairs).items() if n > 1]
        if dups:
            raise SubmissionError(what, [f"key {k!r} appears more than once" for k in dups])
        return dict(pairs)

    try:
        with open(obj, encoding="utf-8") as f:
            return json.load(f, object_pairs_hook=no_dups)
    except json.JSONDecodeError as exc:
        raise SubmissionError(str(obj), [f"invalid JSON: {exc}"]) from exc


def _top_lists(block: np.ndarray, ref: np.ndarray, top_k: int, ids: list[str]) -> list[list[str]]:
    """Top-``top_k`` gallery ids per row with the column ``ref[r]`` removed (-1: none). A row keeps
    min(top_k, columns left) ids, so rows with and without an excluded column are ranked separately."""
    n = block.shape[1]
    out: list[list[str]] = [[] for _ in range(block.shape[0])]
    for has in (True, False):
        rows = np.flatnonzero((ref >= 0) == has)
        if len(rows):
            top = topk_ids(block[rows], min(top_k, n - int(has)), exclude=ref[rows])
            for r, cols in zip(rows, top, strict=True):
                out[r] = [ids[c] for c in cols]
    return out


class _RowCollector:
    """Shared bookkeeping of the builders: every row filled exactly once."""

    def __init__(self, dataset: CIRDataset) -> None:
        self.dataset = dataset
        self.num_queries = len(dataset.queries)
        self.num_gallery = len(dataset.gallery)
        self._seen = np.zeros(self.num_queries, dtype=bool)

    def _rows(self, row_start: int, scores_block: Any) -> tuple[np.ndarray, range]:
        block = as_score_array(scores_block)
        b, n = block.shape
        if n != self.num_gallery:
            raise ScoresError(f"score block has {n} columns but the gallery has {self.num_gallery} images")
        if row_start < 0 or row_start + b > self.num_queries:
            raise ScoresError(f"rows {row_start}..{row_start + b - 1} are outside the {self.num_queries} queries")
        if self._seen[row_start:row_start + b].any():
            dup = row_start + int(np.argmax(self._seen[row_start:row_start + b]))
            raise ScoresError(f"row {dup} (query {self.dataset.queries[dup].qid!r}) was already scored")
        self._seen[row_start:row_start + b] = True
        return block, range(row_start, row_start + b)

    def _require_complete(self) -> None:
        if not self._seen.all():
            first = int(np.argmin(self._seen))
            raise ScoresError(f"{int((~self._seen).sum())} of {self.num_queries} queries have no scores yet "
                              f"(first missing row {first}, query {self.dataset.queries[first].qid!r})")


class CIRRSubmissionBuilder(_RowCollector):
    """Accumulates the CIRR top-``top_k`` (reference excluded) and subset top-``subset_k`` lists tile by tile."""

    def __init__(self, dataset: CIRDataset, top_k: int = CIRR_TOP_K, subset_k: int = CIRR_SUBSET_K) -> None:
        super().__init__(dataset)
        self.top_k = top_k
        self.subset_k = subset_k
        g = dataset.gallery
        problems = []
        self._ref = np.full(self.num_queries, -1, dtype=np.int64)
        self._members: list[np.ndarray] = []
        for i, q in enumerate(dataset.queries):
            if q.reference in g:
                self._ref[i] = g.index(q.reference)
            if not q.subset:
                problems.append(f"query {q.qid!r} has no subset (img_set.members)")
                self._members.append(np.zeros(0, dtype=np.int64))
                continue
            missing = [m for m in q.subset if m not in g]
            if missing:
                problems.append(f"query {q.qid!r}: subset members {missing} are not in the gallery")
            self._members.append(np.array([g.index(m) for m in dict.fromkeys(q.subset)
                                           if m in g and m != q.reference], dtype=np.int64))
        if problems:
            raise SubmissionError(f"cannot build a CIRR submission for {dataset.key}", problems)
        self._recall: list[list[str] | None] = [None] * self.num_queries
        self._subset: list[list[str] | None] = [None] * self.num_queries

    def update(self, row_start: int, scores_block: Any) -> None:
        block, rows = self._rows(int(row_start), scores_block)
        ids = self.dataset.gallery.ids
        top = _top_lists(block, self._ref[rows.start:rows.stop], self.top_k, ids)
        for r, qi in enumerate(rows):
            self._recall[qi] = top[r]
            cols = self._members[qi]
            sc = block[r, cols]
            order = np.lexsort((cols, -sc))[: self.subset_k]  # best first, ties by lower gallery index
            self._subset[qi] = [ids[c] for c in cols[order]]

    def result(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(recall submission, recall_subset submission) as JSON-ready dicts."""
        self._require_complete()
        rec: dict[str, Any] = {"version": CIRR_VERSION, "metric": "recall"}
        sub: dict[str, Any] = {"version": CIRR_VERSION, "metric": "recall_subset"}
        for qi, q in enumerate(self.dataset.queries):
            rec[q.qid] = self._recall[qi]
            sub[q.qid] = self._subset[qi]
        return rec, sub


def validate_cirr_submission(obj: dict[str, Any] | str | Path, dataset: CIRDataset, top_k: int = CIRR_TOP_K,
                             subset_k: int = CIRR_SUBSET_K) -> None:
    """Raise :class:`SubmissionError` listing every problem of a CIRR submission (dict or JSON file): version and
    metric fields, every pair id exactly once and no other key, list lengths (``top_k`` / ``subset_k``, or all
    the candidates when fewer exist), ids in the gallery (recall) or in the query's subset (recall_subset), no
    reference, no repeated id."""
    what = f"CIRR submission {obj}" if isinstance(obj, (str, Path)) else "CIRR submission"
    obj = _load_checked(obj, what)
    if not isinstance(obj, dict):
        raise SubmissionError(what, [f"top level must be a JSON object, got {type(obj).__name__}"])
    problems: list[str] = []
    if obj.get("version") != CIRR_VERSION:
        problems.append(f"'version' must be {CIRR_VERSION!r}, got {obj.get('version')!r}")
    metric = obj.get("metric")
    if metric not in ("recall", "recall_subset"):
        problems.append(f"'metric' must be 'recall' or 'recall_subset', got {metric!r}")
        raise SubmissionError(what, problems)
    what = f"{what} ({metric})"
    g = dataset.gallery
    qids = [q.qid for q in dataset.queries]
    dup_q = [k for k in dict.fromkeys(qids) if qids.count(k) > 1] if len(set(qids)) != len(qids) else []
    for k in dup_q:
        problems.append(f"pair id {k!r} appears more than once in the dataset")
    keys = set(obj) - {"version", "metric"}
    for k in qids:
        if k not in keys:
            problems.append(f"pair id {k!r} is missing")
    for k in sorted(keys - set(qids)):
        problems.append(f"key {k!r} is not a pair id of {dataset.key}")
    for q in dataset.queries:
        if q.qid not in obj:
            continue
        ids = obj[q.qid]
        if not isinstance(ids, list) or not all(isinstance(x, str) for x in ids):
            problems.append(f"pair id {q.qid!r}: value must be a list of image id strings")
            continue
        allowed: Gallery | set[str]
        if metric == "recall":
            allowed = g
            want = min(top_k, len(g) - (1 if q.reference in g else 0))
        else:
            members = [m for m in dict.fromkeys(q.subset or ()) if m != q.reference]
            allowed = set(members)
            want = min(subset_k, len(members))
        if len(ids) != want:
            problems.append(f"pair id {q.qid!r}: {len(ids)} ids, expected {want}")
        if len(set(ids)) != len(ids):
            problems.append(f"pair id {q.qid!r}: repeated ids {sorted({x for x in ids if ids.count(x) > 1})}")
        if q.reference in ids:
            problems.append(f"pair id {q.qid!r}: lists its reference image {q.reference!r}")
        bad = [x for x in ids if x not in allowed and x != q.reference]
        if bad:
            where = "the gallery" if metric == "recall" else "its subset"
            problems.append(f"pair id {q.qid!r}: ids not in {where}: {bad[:5]}")
    if problems:
        raise SubmissionError(what, problems)


def write_cirr_submission(scores: Any, dataset: CIRDataset, out_dir: str | Path, name: str, chunk: int = 1024,
                          top_k: int = CIRR_TOP_K, subset_k: int = CIRR_SUBSET_K) -> tuple[Path, Path]:
    """Rank, validate and atomically write ``recall_submission_{name}.json`` and
    ``recall_subset_submission_{name}.json`` in ``out_dir``; returns their paths. ``scores``: a (Q x N) array-like
    or an iterable of ``(row_start, block)`` tiles."""
    builder = CIRRSubmissionBuilder(dataset, top_k=top_k, subset_k=subset_k)
    for row_start, block in _tiles(scores, builder.num_queries, builder.num_gallery, chunk):
        builder.update(row_start, block)
    rec, sub = builder.result()
    validate_cirr_submission(rec, dataset, top_k=top_k, subset_k=subset_k)
    validate_cirr_submission(sub, dataset, top_k=top_k, subset_k=subset_k)
    out = Path(out_dir)
    p_rec = out / f"recall_submission_{name}.json"
    p_sub = out / f"recall_subset_submission_{name}.json"
    atomic_write_json(p_rec, rec, indent=None)
    atomic_write_json(p_sub, sub, indent=None)
    return p_rec, p_sub


class CIRCOSubmissionBuilder(_RowCollector):
    """Accumulates the CIRCO top-``top_k`` lists tile by tile. ``exclude_reference`` defaults to the dataset's."""

    def __init__(self, dataset: CIRDataset, top_k: int = CIRCO_TOP_K, exclude_reference: bool | None = None) -> None:
        super().__init__(dataset)
        self.top_k = top_k
        self.exclude_reference = dataset.exclude_reference if exclude_reference is None else exclude_reference
        g = dataset.gallery
        self._ref = np.array([g.index(q.reference) if (self.exclude_reference and q.reference in g) else -1
                              for q in dataset.queries], dtype=np.int64)
        self._lists: list[list[str] | None] = [None] * self.num_queries

    def update(self, row_start: int, scores_block: Any) -> None:
        block, rows = self._rows(int(row_start), scores_block)
        ids = self.dataset.gallery.ids
        top = _top_lists(block, self._ref[rows.start:rows.stop], self.top_k, ids)
        for r, qi in enumerate(rows):
            self._lists[qi] = top[r]

    def result(self, int_ids: bool | None = None) -> dict[str, list[Any]]:
        """``{query id: [image ids]}``; ``int_ids=None`` writes JSON integers when every gallery id is one."""
        self._require_complete()
        if int_ids is None:
            int_ids = all(_is_plain_int(i) for i in self.dataset.gallery.ids)
        conv = int if int_ids else str
        lists = [lst or [] for lst in self._lists]  # complete: _require_complete() checked every row
        return {q.qid: [conv(x) for x in lists[qi]] for qi, q in enumerate(self.dataset.queries)}


def validate_circo_submission(obj: dict[str, Any] | str | Path, dataset: CIRDataset, top_k: int = CIRCO_TOP_K,
                              exclude_reference: bool | None = None) -> None:
    """Raise :class:`SubmissionError` listing every problem of a CIRCO submission (dict or JSON file): every query
    id exactly once and no other key, ``top_k`` unique gallery ids per query (ints or strings), no reference when
    ``exclude_reference`` (default: the dataset's)."""
    what = f"CIRCO submission {obj}" if isinstance(obj, (str, Path)) else "CIRCO submission"
    obj = _load_checked(obj, what)
    if not isinstance(obj, dict):
        raise SubmissionError(what, [f"top level must be a JSON object, got {type(obj).__name__}"])
    excl = dataset.exclude_reference if exclude_reference is None else exclude_reference
    g = dataset.gallery
    problems: list[str] = []
    qids = [q.qid for q in dataset.queries]
    if len(set(qids)) != len(qids):
        problems += [f"query id {k!r} appears more than once in the dataset"
                     for k in dict.fromkeys(qids) if qids.count(k) > 1]
    for k in qids:
        if k not in obj:
            problems.append(f"query id {k!r} is missing")
    for k in sorted(set(obj) - set(qids)):
        problems.append(f"key {k!r} is not a query id of {dataset.key}")
    for q in dataset.queries:
        if q.qid not in obj:
            continue
        raw = obj[q.qid]
        if not isinstance(raw, list) or not all(isinstance(x, (str, int)) and not isinstance(x, bool) for x in raw):
            problems.append(f"query id {q.qid!r}: value must be a list of image ids")
            continue
        ids = [str(x) for x in raw]
        want = min(top_k, len(g) - (1 if excl and q.reference in g else 0))
        if len(ids) != want:
            problems.append(f"query id {q.qid!r}: {len(ids)} ids, expected {want}")
        if len(set(ids)) != len(ids):
            problems.append(f"query id {q.qid!r}: repeated ids {sorted({x for x in ids if ids.count(x) > 1})}")
        if excl and q.reference in ids:
            problems.append(f"query id {q.qid!r}: lists its reference image {q.reference!r}")
        bad = [x for x in ids if x not in g]
        if bad:
            problems.append(f"query id {q.qid!r}: ids not in the gallery: {bad[:5]}")
    if problems:
        raise SubmissionError(what, problems)


def write_circo_submission(scores: Any, dataset: CIRDataset, out_dir: str | Path, name: str, chunk: int = 1024,
                           top_k: int = CIRCO_TOP_K, exclude_reference: bool | None = None,
                           int_ids: bool | None = None) -> Path:
    """Rank, validate and atomically write ``circo_submission_{name}.json`` in ``out_dir``; returns its path.
    ``scores``: a (Q x N) array-like or an iterable of ``(row_start, block)`` tiles."""
    builder = CIRCOSubmissionBuilder(dataset, top_k=top_k, exclude_reference=exclude_reference)
    for row_start, block in _tiles(scores, builder.num_queries, builder.num_gallery, chunk):
        builder.update(row_start, block)
    obj = builder.result(int_ids=int_ids)
    validate_circo_submission(obj, dataset, top_k=top_k, exclude_reference=builder.exclude_reference)
    path = Path(out_dir) / f"circo_submission_{name}.json"
    atomic_write_json(path, obj, indent=None)
    return path

