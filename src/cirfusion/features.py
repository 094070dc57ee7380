"""On-disk cache of frozen-backbone features: computed once, fp16, memory-mappable, reused by every method.

Layout under ``cache_dir``::

    image-<family>-<key>/            key = sha256(kind, backbone_id, weights_hash, preprocess_id)
        meta.json                    what the key was made of + the per-row array shapes
        shards/<shard>.global.npy    [n, D] float16
        shards/<shard>.tokens.npy    [n, T, Dt] float16
        shards/<shard>.keys.json     the n row keys (image content sha256), written LAST: it commits the shard
    text-<family>-<key>/             key = sha256(kind, text encoder identity (Backbone.text_cache_id: by default
                                     backbone_id + weights_hash), text_preprocess_id)
        shards/<shard>.{global,tokens,mask}.npy + <shard>.keys.json   (row key = sha256 of the text)

An image row is keyed by the sha256 of the file's bytes (the same bytes are then decoded), so a renamed or copied
file is a cache hit and an edited file a miss. Changing the backbone, its weights or its preprocessing changes the
directory. Shards are only ever added (each under a unique name, every file written to a temp name then renamed),
so an interrupted run keeps every committed shard and two processes filling one cache cannot corrupt it (at worst
they compute a row twice).

Interruptions. Work is committed at least every ``FLUSH_SECONDS`` (30 s) of computing, and whenever the computation
stops - an error, Ctrl-C, or SIGTERM, which is treated like Ctrl-C while features are computed (a signal that arrives
while a shard is being written waits until it is committed). A writer killed outright (``kill -9``) leaves temporary
or uncommitted files; they are removed when a cache is opened once their writer is dead (shard names carry the
writer's host and process id; a file whose writer cannot be checked is removed after ``feature_store.ORPHAN_AGE_S``). A committed
shard whose files are truncated or unreadable is dropped with a :class:`FeatureCacheWarning` and its rows recomputed.
"""

from __future__ import annotations

import hashlib
import json
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .backbones.base import Backbone, ImageFeatures, TextFeatures
from .data.images import ImageLoadError, load_image, read_image_bytes
from .data.schema import CIRDataset
from .feature_store import FeatureCacheError, FeatureCacheWarning, InterruptGuard, ShardStore

# A shard is committed when its buffered arrays reach this size (or at the end of a call): bounds memory and the work
# an interruption can lose.
SHARD_BYTES = 256 << 20
SHARD_MAX_ROWS = 16384
# ... and at least this often (seconds of computing), so a run killed outright loses at most this much work.
FLUSH_SECONDS = 30.0

RowsLike = Sequence[int] | np.ndarray | torch.Tensor | slice | None




def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def text_key(text: str) -> str:
    """Row key of a text: sha256 of its UTF-8 bytes."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _to_torch(arr: np.ndarray, rows: np.ndarray | slice, dtype: torch.dtype) -> torch.Tensor:
    """Gather rows (one copy, still fp16/bool), then convert with torch (vectorised, multi-threaded)."""
    # Always a private, writable copy: a tensor must never alias a read-only memmap.
    part = np.array(arr[rows]) if isinstance(rows, slice) else np.take(arr, rows, axis=0)
    return torch.from_numpy(part).to(dtype)


def _as_rows(rows: RowsLike, n: int) -> np.ndarray | slice:
    if rows is None:
        return slice(0, n)
    if isinstance(rows, slice):
        return rows
    if isinstance(rows, torch.Tensor):
        rows = rows.detach().cpu().numpy()
    arr = np.asarray(rows, dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError(f"rows must be one-dimensional, got shape {arr.shape}")
    return arr


class _RowLookup(ABC):
    """Row lookup by key for the feature tables (keys in row order: ``_keys()``; positions: ``_pos``)."""

    _WHAT = "key"  # how an error names one key
    _UNIT = "rows"  # how an error counts the rows
    _pos: dict[str, int]

    @abstractmethod
    def _keys(self) -> list[str]:
        """The table's keys in row order (image ids, text hashes)."""

    def __len__(self) -> int:
        return len(self._keys())

    def __contains__(self, key: object) -> bool:
        return key in self._pos

    def index(self, key: str) -> int:
        try:
            return self._pos[key]
        except KeyError:
            raise KeyError(f"{self._WHAT} {key!r} is not in this feature table ({len(self)} {self._UNIT})") from None

    def rows(self, keys: Iterable[str]) -> np.ndarray:
        return np.fromiter((self.index(k) for k in keys), dtype=np.int64)


@dataclass
class ImageFeatureTable(_RowLookup):
    """Image features in request order. ``global_`` [N, D] and ``tokens`` [N, T, Dt] are float16 (may be memmaps)."""

    ids: list[str]
    global_: np.ndarray
    tokens: np.ndarray
    hashes: list[str]
    _pos: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._pos = {}
        for i, image_id in enumerate(self.ids):
            if image_id in self._pos:
                raise ValueError(f"duplicate image id {image_id!r} in a feature table")
            self._pos[image_id] = i

    _WHAT, _UNIT = "image id", "images"

    def _keys(self) -> list[str]:
        return self.ids

    def torch(self, rows: RowsLike = None) -> ImageFeatures:
        """float32 tensors for ``rows`` (indices, a slice, or None for all)."""
        r = _as_rows(rows, len(self))
        return ImageFeatures(global_=_to_torch(self.global_, r, torch.float32), tokens=_to_torch(self.tokens, r, torch.float32))


@dataclass
class TextFeatureTable(_RowLookup):
    """Text features, one row per distinct text in first-seen order. ``global_`` [M, D], ``tokens`` [M, L, Dt]
    float16; ``mask`` [M, L] bool, True on real tokens (L = the backbone's ``max_text_tokens``)."""

    texts: list[str]
    global_: np.ndarray
    tokens: np.ndarray
    mask: np.ndarray
    hashes: list[str]
    # Encodes other strings with the same cached text encoder (``FeatureCache.encode_texts``), for methods that
    # read more than the table's texts (FineCIR's entity words); None for a table built by hand.
    encoder: Any = field(default=None, repr=False, compare=False)
    _pos: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._pos = {}
        for i, t in enumerate(self.texts):
            self._pos.setdefault(t, i)

    _WHAT, _UNIT = "text", "texts"

    def _keys(self) -> list[str]:
        return self.texts

    def torch(self, rows: RowsLike = None) -> TextFeatures:
        """float32 tensors (bool mask) for ``rows`` (indices, a slice, or None for all)."""
        r = _as_rows(rows, len(self))
        return TextFeatures(
            global_=_to_torch(self.global_, r, torch.float32),
            tokens=_to_torch(self.tokens, r, torch.float32),
            mask=_to_torch(self.mask, r, torch.bool),
        )


def _pad_last(a: np.ndarray, width: int) -> np.ndarray:
    """Zero-pad the last axis of ``a`` to ``width``."""
    if a.shape[-1] == width:
        return a
    return np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, width - a.shape[-1])])


class _ShardBuffer:
    """Rows computed since the last shard write. They become one shard when the buffer is big enough
    (``SHARD_BYTES`` / ``SHARD_MAX_ROWS``) or ``flush_seconds`` have passed since the last write, so an interrupted run
    keeps its work; a shard is written inside the interrupt guard's critical section (a signal waits for it)."""

    def __init__(self, store: ShardStore, names: Sequence[str], guard: InterruptGuard, flush_seconds: float) -> None:
        self.store, self.guard, self.flush_seconds = store, guard, flush_seconds
        self.keys: list[str] = []
        self.arrays: dict[str, list[np.ndarray]] = {n: [] for n in names}
        self.nbytes = 0
        self.last_write = time.monotonic()

    def add(self, keys: Sequence[str], **arrays: np.ndarray) -> None:
        self.keys.extend(keys)
        for name, a in arrays.items():
            self.arrays[name].append(a)
            self.nbytes += a.nbytes
        if (self.nbytes >= SHARD_BYTES or len(self.keys) >= SHARD_MAX_ROWS
                or time.monotonic() - self.last_write >= self.flush_seconds):
            self.commit()

    def commit(self) -> None:
        with self.guard.critical():
            if self.keys:
                self.store.write(list(self.keys), {n: np.concatenate(v) for n, v in self.arrays.items()})
            self.keys.clear()
            self.nbytes = 0
            for v in self.arrays.values():
                v.clear()
            self.last_write = time.monotonic()


class FeatureCache:
    """Frozen-backbone features for images and texts, computed once and read back memory-mapped.

    ``num_workers`` threads read, hash, decode and preprocess images while the backbone encodes the previous batch
    (0, the default: all in the calling thread — on 2 cores decoding is <15% of the time and extra threads only
    compete with torch's; worth it with more cores or slow storage). ``device``: where the backbone runs (it is
    moved there). Rows are computed in batches of ``batch_size`` and committed in shards of up to ~256 MB, and at
    least every ``flush_seconds`` of computing.

    A composite backbone (one with a ``parts`` list of backbones, e.g. ``multi:``) is served from its parts' caches.
    """

    def __init__(
        self,
        backbone: Backbone,
        cache_dir: str | Path,
        batch_size: int = 64,
        num_workers: int = 0,
        device: str | torch.device = "cpu",
        flush_seconds: float | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.backbone = backbone
        self.cache_dir = Path(cache_dir)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.device = torch.device(device)
        self.flush_seconds = FLUSH_SECONDS if flush_seconds is None else float(flush_seconds)
        self.backbone.to(self.device).eval()
        self._image_store: ShardStore | None = None
        self._text_store: ShardStore | None = None
        # A multi: backbone's features are its parts' cached features side by side (never computed twice, and
        # exactly what base models trained on each part read). Duck-typed on `parts`: the cache sits below the
        # composite backbone's module and must not import it.
        parts = getattr(backbone, "parts", None)
        self._parts = ([FeatureCache(p, cache_dir, batch_size, num_workers, device, flush_seconds) for p in parts]
                       if parts is not None else None)

    # --- namespaces ---

    def _namespace(self, kind: str, fields: dict[str, str]) -> Path:
        digest = hashlib.sha256(json.dumps({"kind": kind, **fields}, sort_keys=True).encode()).hexdigest()[:20]
        name = fields.get("text_encoder") or self.backbone.backbone_id.split(":", 1)[0]
        family = "".join(c if c.isalnum() or c == "-" else "_" for c in name)
        return self.cache_dir / f"{kind}-{family}-{digest}"

    def image_key(self) -> dict[str, str]:
        b = self.backbone
        return {"backbone_id": b.backbone_id, "weights_hash": b.weights_hash(), "preprocess_id": b.preprocess_id()}

    def text_key(self) -> dict[str, str]:
        b = self.backbone
        return {**b.text_cache_id(), "text_preprocess_id": b.text_preprocess_id()}

    @property
    def image_dir(self) -> Path:
        return self._namespace("image", self.image_key())

    @property
    def text_dir(self) -> Path:
        return self._namespace("text", self.text_key())

    def _images(self) -> ShardStore:
        if self._image_store is None:
            b = self.backbone
            shapes = {
                "global": ((b.image_dim,), "float16"),
                "tokens": ((b.num_image_tokens, b.image_token_dim), "float16"),
            }
            self._image_store = ShardStore(self.image_dir, {"kind": "image", **self.image_key()}, shapes)
        self._image_store.refresh()
        return self._image_store

    def _texts(self) -> ShardStore:
        if self._text_store is None:
            b = self.backbone
            shapes = {
                "global": ((b.text_dim,), "float16"),
                "tokens": ((b.max_text_tokens, b.text_token_dim), "float16"),
                "mask": ((b.max_text_tokens,), "bool"),
            }
            self._text_store = ShardStore(self.text_dir, {"kind": "text", **self.text_key()}, shapes)
        self._text_store.refresh()
        return self._text_store

    # --- images ---

    def _read_one(self, store: ShardStore, path: Path) -> tuple[str, torch.Tensor | None] | ImageLoadError:
        """Read the bytes once: hash them, and decode those same bytes only on a cache miss."""
        try:
            data = read_image_bytes(path)  # format and size checked before the bytes are read (capped)
        except ImageLoadError as exc:
            return exc
        key = sha256_bytes(data)
        if key in store:
            return key, None
        try:
            image = load_image(path, data=data)
            return key, self.backbone.preprocess(image)
        except ImageLoadError as exc:
            return exc

    def image_features(self, ids: Sequence[str], paths: Sequence[str | Path], progress: bool = True) -> ImageFeatureTable:
        """Features for ``paths`` (rows in the order of ``ids``), computing only the images not cached yet.

        A file that cannot be used raises :class:`ImageLoadError` naming it — after every other image has been
        computed and committed, so no work is lost; the message counts any further bad files.
        """
        if self._parts is not None:
            tables = [c.image_features(ids, paths, progress) for c in self._parts]
            d = max(t.tokens.shape[2] for t in tables)
            return ImageFeatureTable(
                ids=list(tables[0].ids), global_=np.concatenate([np.asarray(t.global_) for t in tables], 1),
                tokens=np.concatenate([_pad_last(np.asarray(t.tokens), d) for t in tables], 1), hashes=list(tables[0].hashes))
        ids = [str(i) for i in ids]
        files = [Path(p) for p in paths]
        if len(ids) != len(files):
            raise ValueError(f"image_features: {len(ids)} ids but {len(files)} paths")
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise ValueError(f"image_features: duplicate image id {dup!r}")
        store = self._images()
        b = self.backbone
        keys: list[str | None] = [None] * len(files)
        errors: list[ImageLoadError] = []
        batch_x: list[torch.Tensor] = []
        batch_k: list[str] = []
        pending: dict[str, int] = {}  # keys computed in this call but not yet committed -> buffer row
        interrupts = InterruptGuard()
        buf = _ShardBuffer(store, ("global", "tokens"), interrupts, self.flush_seconds)
        computed = 0

        def encode() -> None:
            nonlocal computed
            if not batch_x:
                return
            with torch.inference_mode():
                feats = b.encode_image(torch.stack(batch_x).to(self.device))
            g = feats.global_.float().cpu().numpy().astype(np.float16)
            t = feats.tokens.float().cpu().numpy().astype(np.float16)
            if g.shape != (len(batch_x), b.image_dim) or t.shape != (len(batch_x), b.num_image_tokens, b.image_token_dim):
                raise FeatureCacheError(
                    f"backbone {b.backbone_id!r} returned image features {g.shape}/{t.shape}; it declares "
                    f"[{b.image_dim}] / [{b.num_image_tokens}, {b.image_token_dim}]"
                )
            bad = ~(np.isfinite(g).all(1) & np.isfinite(t).all((1, 2)))
            if bad.any():
                k = batch_k[int(np.argmax(bad))]
                where = files[keys.index(k)]
                raise FeatureCacheError(f"{where}: backbone {b.backbone_id!r} gives non-finite features (in fp16)")
            buf.add(batch_k, **{"global": g, "tokens": t})
            computed += len(batch_k)
            batch_x.clear()
            batch_k.clear()

        bar = tqdm(total=len(files), desc=f"image features [{b.backbone_id}]", unit="img", disable=not progress)
        try:
            interrupts.__enter__()
            for i, res in enumerate(self._iter_read(store, files)):
                bar.update(1)
                if isinstance(res, ImageLoadError):
                    errors.append(res)
                    continue
                key, x = res
                keys[i] = key
                if x is None or key in pending or key in store:
                    continue
                pending[key] = i
                batch_x.append(x)
                batch_k.append(key)
                if len(batch_x) >= self.batch_size:
                    encode()
                    bar.set_postfix(computed=computed, refresh=False)
            encode()
            bar.set_postfix(computed=computed, refresh=False)
        finally:
            # Whatever happened (a bad file, Ctrl-C or SIGTERM, a backbone error), keep the features already computed.
            try:
                buf.commit()
            finally:
                interrupts.__exit__()
                bar.close()
        if errors:
            first = errors[0]
            if len(errors) > 1:
                others = ", ".join(e.path for e in errors[1:4]) + (" ..." if len(errors) > 4 else "")
                raise ImageLoadError(first.path, f"{first.problem} (and {len(errors) - 1} more unusable image(s): {others})")
            raise first
        arrays = store.gather([k for k in keys if k is not None])
        return ImageFeatureTable(ids=ids, global_=arrays["global"], tokens=arrays["tokens"], hashes=[str(k) for k in keys])

    def _iter_read(self, store: ShardStore, paths: list[Path]) -> Iterable[Any]:
        """``_read_one`` over ``paths`` in order; with workers, a bounded window of reads runs ahead."""
        if self.num_workers == 0:
            for p in paths:
                yield self._read_one(store, p)
            return
        window = max(2 * self.batch_size, 4 * self.num_workers)
        with ThreadPoolExecutor(self.num_workers, thread_name_prefix="cirfusion-decode") as pool:
            futures: deque = deque()
            it = iter(paths)
            for p in it:
                futures.append(pool.submit(self._read_one, store, p))
                if len(futures) >= window:
                    break
            try:
                while futures:
                    res = futures.popleft().result()
                    nxt = next(it, None)
                    if nxt is not None:
                        futures.append(pool.submit(self._read_one, store, nxt))
                    yield res
            finally:
                for f in futures:
                    f.cancel()

    # --- texts ---

    def text_features(self, texts: Sequence[str], progress: bool = True) -> TextFeatureTable:
        """Features for each distinct text (rows in first-seen order), computing only the texts not cached yet."""
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"text_features takes strings, got {type(t).__name__}: {t!r}")
        if self._parts is not None:
            tables = [c.text_features(texts, progress) for c in self._parts]
            d = max(t.tokens.shape[2] for t in tables)
            return TextFeatureTable(
                texts=list(tables[0].texts), global_=np.concatenate([np.asarray(t.global_) for t in tables], 1),
                tokens=np.concatenate([_pad_last(np.asarray(t.tokens), d) for t in tables], 1),
                mask=np.concatenate([np.asarray(t.mask) for t in tables], 1), hashes=list(tables[0].hashes),
                encoder=self.encode_texts)
        unique = list(dict.fromkeys(texts))
        keys = [text_key(t) for t in unique]
        store = self._texts()
        b = self.backbone
        L = b.max_text_tokens
        todo = [i for i, k in enumerate(keys) if k not in store]
        # Similar lengths per batch: little padding, the same results (the mask hides padding).
        todo.sort(key=lambda i: len(unique[i]))
        interrupts = InterruptGuard()
        buf = _ShardBuffer(store, ("global", "tokens", "mask"), interrupts, self.flush_seconds)
        bar = tqdm(total=len(todo), desc=f"text features [{b.backbone_id}]", unit="text", disable=not progress or not todo)
        try:
            interrupts.__enter__()
            for start in range(0, len(todo), self.batch_size):
                idx = todo[start : start + self.batch_size]
                with torch.inference_mode():
                    f = b.encode_text([unique[i] for i in idx])
                g = f.global_.float().cpu().numpy().astype(np.float16)
                tok = f.tokens.float().cpu().numpy().astype(np.float16)
                m = f.mask.cpu().numpy().astype(np.bool_)
                n, width = m.shape
                if g.shape != (len(idx), b.text_dim) or tok.shape != (len(idx), width, b.text_token_dim) or width > L:
                    raise FeatureCacheError(
                        f"backbone {b.backbone_id!r} returned text features {g.shape}/{tok.shape}; it declares "
                        f"[{b.text_dim}] / [<= {L}, {b.text_token_dim}]"
                    )
                if not (np.isfinite(g).all() and np.isfinite(tok).all()):
                    raise FeatureCacheError(f"backbone {b.backbone_id!r} gives non-finite text features (in fp16)")
                tokens = np.zeros((n, L, b.text_token_dim), np.float16)
                mask = np.zeros((n, L), np.bool_)
                tokens[:, :width], mask[:, :width] = tok, m
                tokens[~mask] = 0  # padding rows carry no information; zero them so the bytes are deterministic
                buf.add([keys[i] for i in idx], **{"global": g, "tokens": tokens, "mask": mask})
                bar.update(len(idx))
        finally:
            try:
                buf.commit()
            finally:
                interrupts.__exit__()
                bar.close()
        arrays = store.gather(keys)
        return TextFeatureTable(texts=unique, global_=arrays["global"], tokens=arrays["tokens"], mask=arrays["mask"], hashes=keys,
                                encoder=self.encode_texts)

    def encode_texts(self, texts: list[str]) -> TextFeatures:
        """Cached features of ``texts`` as tensors, rows in the order given (duplicates allowed); what a
        :class:`TextFeatureTable`'s ``encoder`` is. The strings are encoded once and cached like any text."""
        table = self.text_features(texts, progress=False)
        return table.torch(table.rows(texts))


def dataset_texts(dataset: CIRDataset) -> list[str]:
    """Every text a dataset can feed a method: each query's text, caption variants and fine texts (deduplicated)."""
    out: dict[str, None] = {}
    for q in dataset.queries:
        out[q.text] = None
        for c in q.captions:
            out[c] = None
        for c in q.finemt or ():
            out[c] = None
    return list(out)


def dataset_features(
    cache: FeatureCache, dataset: CIRDataset, progress: bool = True
) -> tuple[ImageFeatureTable, TextFeatureTable]:
    """Features of a dataset's whole gallery (rows in gallery order) and of all its texts (see :func:`dataset_texts`)."""
    images = cache.image_features(dataset.gallery.ids, dataset.gallery.paths, progress=progress)
    texts = cache.text_features(dataset_texts(dataset), progress=progress)
    return images, texts


__all__ = [
    "FeatureCache",
    "FeatureCacheError",
    "FeatureCacheWarning",
    "ImageFeatureTable",
    "TextFeatureTable",
    "dataset_features",
    "dataset_texts",
    "sha256_bytes",
    "text_key",
]
