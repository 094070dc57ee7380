"""Nearest-neighbour index and search over gallery embeddings, as plain functions on numpy arrays.

    index = build_index(gallery_emb, gallery_ids)                  # exact (faiss IndexFlatIP) by default
    scores, ids = index.search(query_emb, k=10, exclude=[[ref_id] for ref_id in reference_ids])
    index.save("runs/x/index"); index = load_index("runs/x/index")
    scores, ids = brute_force_search(query_emb, gallery_emb, k=10, ids=gallery_ids)   # the ground truth

Scoring. Embeddings are compared by inner product. A gallery item is one vector ``[N, D]`` or several
(``[N, M, D]``, e.g. SPRC's query tokens); a query is one vector ``[B, D]`` or several ``[B, Mq, D]``. The score of
a (query, item) pair is the **maximum inner product over all (query vector, item vector) pairs** ("max-max"); with
one vector on each side it is the plain inner product. Max rather than a sum keeps one score scale whatever M is.
Items must all have the same M; to give an item fewer vectors, repeat one of them (a duplicate never changes a max).

Metric. ``"ip"`` expects L2-normalised vectors (the methods produce them) and raises :class:`CIRIndexError` on a
vector whose norm is off by more than ``NORM_TOLERANCE`` (a forgotten normalisation is a bug, not something to
hide). ``"cosine"`` normalises every vector, gallery and query, itself.

Exactness. Final scores are always recomputed in float64 by the same numpy code as :func:`brute_force_search`
(rounded to float32), and ranking breaks ties by the lower gallery row. faiss only proposes candidates: the
exact kind asks faiss (IndexFlatIP) for more candidates until a float32 round-off bound proves that nothing it did
not return can reach the k-th score, so ``kind="exact"`` returns exactly what brute force returns, scores and ids,
ties included. ``"ivf"`` and ``"hnsw"`` rescore their candidates the same way but may miss true neighbours.

Determinism. Same inputs and options give the same index and the same results. IVF k-means uses a fixed seed;
HNSW inserts vectors with one thread (faiss's parallel insertion builds a different graph on every run).

Threads. faiss uses ``threads`` (argument of :func:`build_index` / :func:`load_index`), else the
``CIRFUSION_THREADS`` environment variable, else faiss's default (OMP_NUM_THREADS / all cores). OpenMP's thread
count is per calling OS thread (a server's worker threads do not see ``faiss.omp_set_num_threads`` called in the
main thread), so an index remembers its count and applies it at the start of every search and build. A search
with fewer than 20 query vectors runs faiss on one thread: on a loaded 2-core machine splitting a single scan
costs far more in thread synchronisation than it saves (see ``benchmarks/index_speed.py``).

On disk an index is a directory: ``index.faiss`` (faiss's own format), ``ids.json`` (the gallery ids in row
order) and ``meta.json`` (kind, metric, sizes, parameters, sha256 of the other two files and the caller's ``meta``
dict, e.g. checkpoint path and hash, backbone id). No pickle anywhere. Written to a temporary sibling directory
and swapped into place with two renames (:func:`cirfusion.io.atomic_directory`), so a crash never leaves a
half-written index; a crash between the two renames leaves the previous index aside, and every save and load first
puts it back (:func:`cirfusion.io.recover_directory`), as checkpoints do.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from .exact_search import (
    METRICS,
    NORM_TOLERANCE,
    CIRIndexError,
    as_vectors,
    brute_force_rows,
    brute_force_search,
    check_enough,
    check_ids,
    check_k,
    exact_scores,
    exclude_rows,
    topk_rows,
)
from .io import atomic_directory, recover_directory

__all__ = [
    "INDEX_KINDS",
    "METRICS",
    "NORM_TOLERANCE",
    "CIRIndex",
    "CIRIndexError",
    "brute_force_search",
    "build_index",
    "load_index",
    "resolve_threads",
    "set_threads",
]

INDEX_KINDS = ("exact", "ivf", "hnsw")
THREADS_ENV = "CIRFUSION_THREADS"

FORMAT_NAME = "cirfusion.index"
FORMAT_VERSION = 1
INDEX_FILE = "index.faiss"
IDS_FILE = "ids.json"
META_FILE = "meta.json"

# Options accepted per kind, with their defaults (None = chosen from the data, see _ivf_params).
_DEFAULT_OPTS: dict[str, dict[str, Any]] = {
    "exact": {},
    "ivf": {"nlist": None, "nprobe": None, "seed": 1234},
    "hnsw": {"M": 32, "ef_construction": 80, "ef_search": 128},
}
# Search-time knobs that may be changed after building (set_search_params).
_SEARCH_OPTS = {"ivf": ("nprobe",), "hnsw": ("ef_search",)}
_MIN_POINTS_PER_LIST = 39  # faiss k-means wants >= 39 training points per centroid
_MAX_NLIST = 65536
# Extra candidates asked of the exact index beyond the k (+ exclusions) needed; saves most re-queries on ties.
_EXACT_MARGIN = 16
_PARALLEL_MIN_QUERY_VECTORS = 20  # smaller searches run on one thread (see CIRIndex._faiss_search)
_QUERY_CHUNK = 1024  # query vectors per faiss call: bounds the [chunk, k_cand] result arrays



# ----------------------------------------------------------------------------------------------------------------
# threads


def resolve_threads(threads: int | None = None) -> int | None:
    """``threads`` if given, else ``$CIRFUSION_THREADS`` if set, else None (leave faiss's default); validated."""
    if threads is None:
        env = os.environ.get(THREADS_ENV, "").strip()
        if env:
            try:
                threads = int(env)
            except ValueError:
                raise CIRIndexError(f"environment variable {THREADS_ENV}={env!r} is not an integer") from None
            if threads < 1:
                raise CIRIndexError(f"environment variable {THREADS_ENV}={env!r} must be >= 1")
    elif isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise CIRIndexError(f"threads must be a positive integer, got {threads!r}")
    return None if threads is None else int(threads)


def set_threads(threads: int | None = None) -> int:
    """Set faiss's OpenMP thread count for the calling thread (see :func:`resolve_threads`); returns the count
    now in effect there."""
    resolved = resolve_threads(threads)
    if resolved is not None:
        faiss.omp_set_num_threads(resolved)
    return int(faiss.omp_get_max_threads())


# ----------------------------------------------------------------------------------------------------------------
# the index


def _ivf_params(n_vectors: int, nlist: int | None, nprobe: int | None) -> tuple[int, int]:
    """nlist defaults to ~4*sqrt(#vectors), capped so every list gets >= 39 training vectors (at least 1 list);
    nprobe defaults to nlist/8 (at least 8, at most nlist)."""
    if nlist is None:
        nlist = round(4 * math.sqrt(n_vectors))
        nlist = max(1, min(nlist, n_vectors // _MIN_POINTS_PER_LIST, _MAX_NLIST))
    elif isinstance(nlist, bool) or not isinstance(nlist, (int, np.integer)) or not 1 <= nlist <= n_vectors:
        raise CIRIndexError(f"ivf nlist must be an integer in [1, {n_vectors}] (the number of vectors), got {nlist!r}")
    if nprobe is None:
        nprobe = min(int(nlist), max(8, int(nlist) // 8))
    elif isinstance(nprobe, bool) or not isinstance(nprobe, (int, np.integer)) or nprobe < 1:
        raise CIRIndexError(f"ivf nprobe must be a positive integer, got {nprobe!r}")
    return int(nlist), min(int(nprobe), int(nlist))


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise CIRIndexError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class CIRIndex:
    """A gallery index: a faiss index over all gallery vectors plus the ids of the gallery rows.

    Built by :func:`build_index` or :func:`load_index`; see the module doc for scoring and guarantees.
    Attributes: ``kind``, ``metric``, ``dim``, ``vectors_per_item`` (M; 1 for single-vector galleries),
    ``multi_vector``, ``ids``, ``params`` (kind options), ``meta`` (the caller's dict).
    """

    def __init__(
        self,
        faiss_index: faiss.Index,
        ids: list[str],
        kind: str,
        metric: str,
        vectors_per_item: int,
        multi_vector: bool,
        params: dict[str, Any],
        meta: dict[str, Any],
        threads: int | None = None,
    ) -> None:
        self.index = faiss_index
        self.threads = threads  # faiss threads applied in the calling thread of each search; None = faiss default
        self.ids = ids
        self.kind = kind
        self.metric = metric
        self.dim = int(faiss_index.d)
        self.vectors_per_item = int(vectors_per_item)
        self.multi_vector = bool(multi_vector)
        self.params = dict(params)
        self.meta = dict(meta)
        self._row_of = {name: i for i, name in enumerate(ids)}
        self._vectors = self._gallery_vectors()  # [N, M, D] float32, for exact rescoring
        self._apply_search_params()

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        shape = f"{len(self)}x{self.vectors_per_item}x{self.dim}" if self.multi_vector else f"{len(self)}x{self.dim}"
        return f"CIRIndex(kind={self.kind!r}, metric={self.metric!r}, items={shape}, params={self.params})"

    def _gallery_vectors(self) -> np.ndarray:
        """The stored vectors as ``[N, M, D]``; a zero-copy view for flat storage, reconstructed for IVF."""
        idx: Any = self.index  # the concrete faiss class for self.kind (faiss's stubs only know the base Index)
        if self.kind == "ivf":
            idx.make_direct_map()
            flat = idx.reconstruct_n(0, idx.ntotal)
        else:
            storage: Any = faiss.downcast_index(idx.storage) if self.kind == "hnsw" else idx
            flat = faiss.rev_swig_ptr(storage.get_xb(), storage.ntotal * storage.d)
        return flat.reshape(len(self.ids), self.vectors_per_item, self.dim)

    def _apply_search_params(self) -> None:
        idx: Any = self.index  # IndexIVFFlat / IndexHNSWFlat, typed as the base Index
        if self.kind == "ivf":
            idx.nprobe = self.params["nprobe"]
        elif self.kind == "hnsw":
            idx.hnsw.efSearch = self.params["ef_search"]

    def set_search_params(self, **opts: int) -> None:
        """Change search-time knobs: ``nprobe`` (ivf), ``ef_search`` (hnsw). Saved with the index."""
        allowed = _SEARCH_OPTS.get(self.kind, ())
        for name, value in opts.items():
            if name not in allowed:
                raise CIRIndexError(f"{self.kind} index has no search option {name!r} (accepted: {list(allowed)})")
            value = _positive_int(name, value)
            self.params[name] = min(value, self.params["nlist"]) if name == "nprobe" else value
        self._apply_search_params()

    # -- search ---------------------------------------------------------------------------------------------------

    def search(
        self, queries: np.ndarray, k: int, exclude: Sequence[Sequence[str]] | None = None
    ) -> tuple[np.ndarray, list[list[str]]]:
        """Top-k gallery items per query: float32 scores ``[B, k]`` (descending, ties by lower row) and their ids.

        ``queries``: ``[B, D]``, ``[B, Mq, D]`` or one vector ``[D]``. ``exclude[b]``: ids query b must not return
        (e.g. the reference image, CIRR's convention); ids not in the gallery are ignored. Raises
        :class:`CIRIndexError` when k exceeds the gallery size (after exclusions).
        """
        scores, rows = self.search_rows(queries, k, exclude)
        return scores, [[self.ids[r] for r in row] for row in rows]

    def search_rows(
        self, queries: np.ndarray, k: int, exclude: Sequence[Sequence[str]] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`search` but returns gallery row numbers ``[B, k]`` (int64) instead of ids."""
        k = check_k(k)
        q = as_vectors(queries[None] if np.ndim(queries) == 1 else queries, "queries", self.metric, dim=self.dim)
        excl = exclude_rows(exclude, q.shape[0], self._row_of)
        check_enough(k, len(self), excl)
        if self.threads is not None:
            faiss.omp_set_num_threads(self.threads)
        out_s = np.empty((q.shape[0], k), np.float32)
        out_r = np.empty((q.shape[0], k), np.int64)
        step = max(1, _QUERY_CHUNK // q.shape[1])
        for b0 in range(0, q.shape[0], step):
            sl = slice(b0, b0 + step)
            out_s[sl], out_r[sl] = self._search_chunk(q[sl], k, excl[sl])
        return out_s, out_r

    def _search_chunk(self, q: np.ndarray, k: int, excl: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        n_queries, mq, d = q.shape
        m = self.vectors_per_item
        n_vectors = int(self.index.ntotal)
        exact = self.kind == "exact"
        # k items (+ the excluded ones) need at most (k + excluded) * M vectors per query vector.
        need = (k + max(e.size for e in excl)) * m
        k_cand = min(n_vectors, need + (_EXACT_MARGIN * m if exact else 0))
        # Largest gap between faiss's float32 inner products and ours: |error| <= ~D * 2^-24 * |q| * |g| (doubled).
        eps = 2.0 * (d + 2) * 2.0**-24 * (1.0 + NORM_TOLERANCE) ** 2
        out_s = np.empty((n_queries, k), np.float32)
        out_r = np.empty((n_queries, k), np.int64)
        pending = np.arange(n_queries)
        while pending.size:
            fs, fl = self._faiss_search(q[pending].reshape(-1, d), k_cand)
            fs, fl = fs.reshape(pending.size, mq, k_cand), fl.reshape(pending.size, mq, k_cand)
            complete = k_cand >= n_vectors  # faiss returned every vector (exact kind)
            retry: list[Any] = []  # query positions (numpy ints)
            fallback: list[Any] = []
            for j, b in enumerate(pending):
                labels = fl[j][fl[j] >= 0]
                cand = np.setdiff1d(labels // m, excl[b], assume_unique=False)  # unique, sorted rows
                if cand.size < k:
                    # Approximate structures can run dry (IVF probes too few lists); ask for more or go exact.
                    (retry if labels.size == fl[j].size and not complete else fallback).append(b)
                    continue
                s, r = topk_rows(exact_scores(q[b : b + 1], self._vectors[cand])[0], cand, k)
                if exact and not complete:
                    # Anything faiss did not return scores (in float32) at most the last score it returned per
                    # query vector; if that, plus round-off, cannot reach our k-th score, the result is exact.
                    bound = float(fs[j, :, -1].max()) + eps
                    if not s[-1] > bound:
                        retry.append(b)
                        continue
                out_s[b], out_r[b] = s, r
            if fallback:
                fb = np.array(fallback)
                out_s[fb], out_r[fb] = brute_force_rows(q[fb], self._vectors, k, [excl[b] for b in fb])
            pending = np.array(retry, dtype=np.int64)
            k_cand = min(n_vectors, 2 * k_cand)
        return out_s, out_r

    def _faiss_search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """faiss search; fewer than ``_PARALLEL_MIN_QUERY_VECTORS`` query vectors run on one thread, because
        splitting one scan across threads makes every query wait for the slowest thread — on a busy 2-core
        machine a scheduler time slice (measured: one query on 20k x 256 took 1.2 ms on 1 thread, 35 ms on 2)."""
        if x.shape[0] >= _PARALLEL_MIN_QUERY_VECTORS:
            return self.index.search(x, k)
        before = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            return self.index.search(x, k)
        finally:
            faiss.omp_set_num_threads(before)

    # -- persistence ------------------------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write the index directory atomically (temporary sibling + rename). Replaces an existing index directory;
        refuses to replace anything else. Returns the path."""
        path = Path(path)
        if path.parent.is_dir():
            recover_directory(path)  # an earlier save interrupted between its renames: its old index is back first
        if path.exists() and not (path.is_dir() and ((path / META_FILE).is_file() or not any(path.iterdir()))):
            raise CIRIndexError("exists and is not an index directory; refusing to overwrite it", path)
        index_bytes = faiss.serialize_index(self.index).tobytes()
        ids_bytes = (json.dumps(self.ids, ensure_ascii=False) + "\n").encode("utf-8")
        meta = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "metric": self.metric,
            "dim": self.dim,
            "num_items": len(self.ids),
            "multi_vector": self.multi_vector,
            "vectors_per_item": self.vectors_per_item,
            "num_vectors": int(self.index.ntotal),
            "vector_to_item": "item row = faiss vector id // vectors_per_item",
            "params": self.params,
            "faiss_version": faiss.__version__,
            "files": {
                INDEX_FILE: {"sha256": hashlib.sha256(index_bytes).hexdigest(), "bytes": len(index_bytes)},
                IDS_FILE: {"sha256": hashlib.sha256(ids_bytes).hexdigest(), "bytes": len(ids_bytes)},
            },
            "meta": self.meta,
        }
        with atomic_directory(path) as tmp:
            for name, data in ((INDEX_FILE, index_bytes), (IDS_FILE, ids_bytes)):
                with open(tmp / name, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            with open(tmp / META_FILE, "w", encoding="utf-8") as f:
                json.dump(meta, f, indent=2, ensure_ascii=False)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only
        return path


def build_index(
    embeddings: np.ndarray,
    ids: Sequence[str],
    kind: str = "exact",
    metric: str = "ip",
    *,
    meta: dict[str, Any] | None = None,
    threads: int | None = None,
    **opts: Any,
) -> CIRIndex:
    """Index gallery ``embeddings`` (``[N, D]`` or multi-vector ``[N, M, D]``) named by ``ids`` (row order).

    ``kind``: ``"exact"`` (faiss IndexFlatIP; results equal :func:`brute_force_search`), ``"ivf"`` (IndexIVFFlat;
    options ``nlist`` — default ~4*sqrt(#vectors), lowered so each list has >= 39 training vectors; an explicit
    value must not exceed the number of vectors —, ``nprobe`` — default nlist/8, at least 8 —, ``seed``) or
    ``"hnsw"`` (IndexHNSWFlat, inner product; options ``M`` = 32, ``ef_construction`` = 80, ``ef_search`` = 128).
    ``metric``: ``"ip"`` (unit vectors required) or ``"cosine"`` (normalised here). ``meta``: a JSON-serialisable
    dict saved with the index (checkpoint path and hash, backbone id, ...). ``threads``: faiss threads for the build
    and later searches (see :func:`resolve_threads`).
    """
    if kind not in INDEX_KINDS:
        raise CIRIndexError(f"kind must be one of {INDEX_KINDS}, got {kind!r}")
    unknown = sorted(set(opts) - set(_DEFAULT_OPTS[kind]))
    if unknown:
        raise CIRIndexError(f"unknown option(s) {unknown} for a {kind} index (accepted: {sorted(_DEFAULT_OPTS[kind])})")
    meta = {} if meta is None else meta
    if not isinstance(meta, dict):
        raise CIRIndexError(f"meta must be a dict, got {type(meta).__name__}")
    try:
        meta = json.loads(json.dumps(meta))
    except (TypeError, ValueError) as exc:
        raise CIRIndexError(f"meta must be JSON-serialisable: {exc}") from None
    x = as_vectors(embeddings, "gallery embeddings", metric)
    n, m, d = x.shape
    if n == 0:
        raise CIRIndexError("cannot build an index from 0 embeddings")
    ids = check_ids(ids, n)
    threads = resolve_threads(threads)
    set_threads(threads)
    params = {**_DEFAULT_OPTS[kind], **opts}
    flat = x.reshape(n * m, d)
    index: Any
    if kind == "exact":
        index = faiss.IndexFlatIP(d)
        index.add(flat)
    elif kind == "ivf":
        params["nlist"], params["nprobe"] = _ivf_params(n * m, params["nlist"], params["nprobe"])
        params["seed"] = int(params["seed"])
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, params["nlist"], faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = params["seed"]
        if params["nlist"] == 1:  # one list needs no k-means; silence faiss's "too few training points" warning
            index.cp.min_points_per_centroid = 1
        index.train(flat)
        index.add(flat)
    else:
        for name in ("M", "ef_construction", "ef_search"):
            params[name] = _positive_int(f"hnsw {name}", params[name])
        index = faiss.IndexHNSWFlat(d, params["M"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params["ef_construction"]
        before = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)  # parallel insertion is order-dependent: one thread keeps the graph reproducible
        try:
            index.add(flat)
        finally:
            faiss.omp_set_num_threads(before)
    return CIRIndex(index, ids, kind, metric, m, np.ndim(embeddings) == 3, params, meta, threads)


_FAISS_TYPES = {"exact": faiss.IndexFlatIP, "ivf": faiss.IndexIVFFlat, "hnsw": faiss.IndexHNSWFlat}


def _read_checked(path: Path, expected: dict[str, Any] | None) -> bytes:
    if not path.is_file():
        raise CIRIndexError("missing (not a complete index directory)", path)
    data = path.read_bytes()
    if expected is not None and hashlib.sha256(data).hexdigest() != expected.get("sha256"):
        raise CIRIndexError(
            f"sha256 does not match the one recorded in {META_FILE} ({len(data)} bytes, expected "
            f"{expected.get('bytes')}); the file was modified or corrupted after the index was saved",
            path,
        )
    return data


def load_index(path: str | Path, threads: int | None = None) -> CIRIndex:
    """Load an index directory written by :meth:`CIRIndex.save`, checking every file against ``meta.json``.
    ``threads``: faiss threads for searches, as in :func:`build_index`."""
    path = Path(path)
    if path.parent.is_dir():
        recover_directory(path)  # a save interrupted between its two renames left the previous index aside
    if not path.is_dir():
        raise CIRIndexError("is not a directory (expected an index directory)", path)
    meta_path = path / META_FILE
    try:
        meta = json.loads(_read_checked(meta_path, None).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CIRIndexError(f"not valid JSON: {exc}", meta_path) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise CIRIndexError(f"not a cirfusion index description (format should be {FORMAT_NAME!r})", meta_path)
    if meta.get("format_version") != FORMAT_VERSION:
        raise CIRIndexError(
            f"format_version {meta.get('format_version')!r} is not supported (expected {FORMAT_VERSION})", meta_path
        )
    try:
        kind, metric = meta["kind"], meta["metric"]
        m, n, d = int(meta["vectors_per_item"]), int(meta["num_items"]), int(meta["dim"])
        params, user_meta, multi = dict(meta["params"]), dict(meta["meta"]), bool(meta["multi_vector"])
        index_sum, ids_sum = dict(meta["files"][INDEX_FILE]), dict(meta["files"][IDS_FILE])
    except (KeyError, TypeError, ValueError) as exc:
        raise CIRIndexError(f"missing or malformed field: {exc!r}", meta_path) from None
    if kind not in INDEX_KINDS or metric not in METRICS or m < 1 or n < 1:
        raise CIRIndexError(
            f"bad kind/metric/sizes: kind={kind!r} metric={metric!r} num_items={n} vectors_per_item={m}", meta_path
        )
    if set(params) != set(_DEFAULT_OPTS[kind]) or not all(
        isinstance(v, int) and not isinstance(v, bool) and (v >= 1 or name == "seed") for name, v in params.items()
    ):
        raise CIRIndexError(
            f"params {params} do not fit kind {kind!r} (expected integers {sorted(_DEFAULT_OPTS[kind])})", meta_path
        )

    ids_path = path / IDS_FILE
    try:
        ids = json.loads(_read_checked(ids_path, ids_sum).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CIRIndexError(f"not valid JSON: {exc}", ids_path) from None
    if not isinstance(ids, list):
        raise CIRIndexError(f"must hold a JSON list of ids, got {type(ids).__name__}", ids_path)
    if len(ids) != n:
        raise CIRIndexError(f"holds {len(ids)} ids but {META_FILE} says num_items={n}", ids_path)
    ids = check_ids(ids, n, file=ids_path)

    index_path = path / INDEX_FILE
    raw = _read_checked(index_path, index_sum)
    try:
        # deserialize_index already returns the concrete class; wrapping it again with downcast_index would let the
        # owning wrapper be garbage-collected and free the index under us.
        index = faiss.deserialize_index(np.frombuffer(raw, dtype=np.uint8))
    except RuntimeError as exc:
        raise CIRIndexError(f"faiss cannot read it: {str(exc).strip().splitlines()[-1]}", index_path) from None
    if not isinstance(index, _FAISS_TYPES[kind]) or index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise CIRIndexError(
            f"holds a {type(index).__name__} (metric {index.metric_type}); kind {kind!r} needs an "
            f"{_FAISS_TYPES[kind].__name__} with inner product",
            index_path,
        )
    if index.d != d:
        raise CIRIndexError(f"has dimension {index.d} but {META_FILE} says dim={d}", index_path)
    if index.ntotal != n * m:
        raise CIRIndexError(
            f"holds {index.ntotal} vectors but {IDS_FILE} has {n} ids x {m} vectors per item = {n * m}", index_path
        )
    return CIRIndex(index, ids, kind, metric, m, multi, params, user_meta, resolve_threads(threads))
