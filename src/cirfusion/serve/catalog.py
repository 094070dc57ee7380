"""What ``cirfusion serve`` holds in memory: one loaded model and its gallery, searched by reference + text.

A :class:`Catalog` is built once at start-up (:func:`cirfusion.serve.loading.load_catalog`) from either

- an **index** directory (``cirfusion index build``): the checkpoint recorded in it encodes the queries, the faiss
  index answers them (exact rescoring, see :mod:`cirfusion.index`); or
- a **checkpoint** and a folder of images: the folder's backbone features come from the feature cache (computed once
  per image), then the method's gallery embedding. A method whose score is an inner product of embeddings gets an
  exact in-memory index; any other method, a fused DAFM checkpoint included, is served by **exact scoring of the
  whole gallery through the model** (``method.similarity``), so every method cirfusion has can be served.

Searches read an immutable :class:`_Gallery` snapshot: the gallery matrix is shared by every request, never copied
per request. :meth:`Catalog.add_images` builds a new snapshot (the old rows shared, the new ones appended: an index
keeps its faiss part and searches the added rows exactly beside it, so nothing is rebuilt) and swaps it in under a
lock; requests that started before the swap finish on the old one.

The reference is never its own answer: a gallery reference (by id), or an upload whose sha256 equals a gallery
image's, is left out of the results unless ``keep_reference`` is set.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .. import __version__
from ..api import CIRModel
from ..backbones.base import ImageFeatures, TextFeatures
from ..data.images import ImageLoadError, load_image
from ..embeddings import Embedding, cat_embeddings, rows_of
from ..errors import CirfusionError
from ..exact_search import as_vectors, exact_scores, topk_rows
from ..features import ImageFeatureTable
from ..fusion.kernels import SMALL_BATCH
from ..index import META_FILE, CIRIndex
from .explain import explain, fused_rank_batch, is_fused

log = logging.getLogger("cirfusion.serve")

_HASH_BLOCK = 1 << 20
# Queries encoded and scored together at most: up to SMALL_BATCH query vectors, float16/bfloat16 gallery products are
# computed row by row exactly as for a lone query.
SCORE_BATCH = SMALL_BATCH


class ServeError(CirfusionError):
    """A request the catalog refuses; ``status`` is the HTTP status the service answers with (400 bad input, 404
    unknown id, 413 too large)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. Defaults: 10 MB per uploaded file, 24 megapixels (aspect ratio up to
    :data:`~cirfusion.data.images.MAX_ASPECT_RATIO`), 500 characters of text, k up to 100, 16 files per add."""

    max_upload_bytes: int = 10 * 2**20
    max_pixels: int = 24_000_000
    max_text_chars: int = 500
    max_k: int = 100
    max_add_files: int = 16
    explain_top: int = 10  # results whose contributions are computed (each costs 2^K network evaluations)


@dataclass
class _Gallery:
    """One immutable state of the gallery. ``emb``: the method's gallery embedding of every row (model-scored
    catalogs) or None (index catalogs: ``index`` holds rows 0..len(index)-1, ``added`` [A, M, D] the rows after)."""

    ids: list[str]
    paths: list[Path]
    hashes: list[str | None]
    row_of: dict[str, int]
    row_of_hash: dict[str, int]
    emb: Embedding | None = None
    index: CIRIndex | None = None
    added: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class CheckedQuery:
    """A search request after :meth:`Catalog.check`: ``row`` is the gallery row the reference is (by id or by
    content), ``upload_key`` the sha256 of an uploaded reference (None for a gallery id), ``image`` its decoded pixels
    and ``features`` its cached features (one of the two)."""

    text: str
    k: int
    row: int | None
    upload_key: str | None
    image: Image.Image | None
    with_explanation: bool
    keep_reference: bool = False
    features: ImageFeatures | None = None  # an upload's features, when they were cached at check time

    @property
    def exclude(self) -> bool:
        """Whether the reference's own gallery row is left out of the results."""
        return self.row is not None and not self.keep_reference


@dataclass
class Hit:
    id: str
    row: int
    score: float


@dataclass
class SearchResult:
    hits: list[Hit]
    reference_id: str | None  # the gallery image the reference is (by id or by content), if any
    excluded: bool  # whether that image was left out
    explanation: dict[str, Any] = field(default_factory=dict)


class LRU:
    """A small thread-safe least-recently-used map (reference and text features, thumbnails)."""

    def __init__(self, size: int) -> None:
        self.size, self._d, self._lock = size, OrderedDict[Any, Any](), threading.Lock()

    def get(self, key: Any) -> Any:
        with self._lock:
            v = self._d.get(key)
            if v is not None:
                self._d.move_to_end(key)
            return v

    def put(self, key: Any, value: Any) -> None:
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > self.size:
                self._d.popitem(last=False)


def file_sha256(path: Path) -> str | None:
    """sha256 of a gallery file's bytes, or None when it cannot be read (it is then never matched by content)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(_HASH_BLOCK), b""):
                h.update(block)
    except OSError:
        return None
    return h.hexdigest()


class Catalog:
    """A model and its gallery, ready to search (see the module docstring). Thread-safe: the service checks requests
    in worker threads and runs searches and additions on its one model thread; additions are serialised."""

    def __init__(self, model: CIRModel, gallery: _Gallery, source: dict[str, Any], *, limits: Limits | None = None,
                 feature_table: ImageFeatureTable | None = None, upload_dir: Path | None = None,
                 build_seconds: float = 0.0) -> None:
        self.model = model
        self.method = model.method
        self.limits = limits or Limits()
        self.source = source
        self.build_seconds = build_seconds
        self._g = gallery
        self._table = feature_table  # backbone features of the folder's images (reference lookups skip the backbone)
        self._table_rows = len(feature_table) if feature_table is not None else 0
        self._add_lock = threading.Lock()
        self._ref_cache = LRU(1024)
        self._text_cache = LRU(4096)
        self._upload_dir = upload_dir
        self.started = time.time()
        # when the model (or the index) being served was written: the newest of its description files
        files = ([Path(source["index"]) / META_FILE] if "index" in source else []) + \
            ([model.path / "config.json"] if model.path else [])
        stamp = [p.stat().st_mtime for p in files if p.is_file()]
        self.built = _iso(max(stamp)) if stamp else None

    # ---- what it holds -------------------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return len(self._g)

    @property
    def mode(self) -> str:
        """``index`` (faiss, plus exactly scored additions) or ``model`` (exact scoring through the method)."""
        return "model" if self._g.emb is not None else "index"

    def has(self, image_id: str) -> bool:
        return image_id in self._g.row_of

    def path_of(self, image_id: str) -> Path:
        """The server-side file of a gallery id (never a path a client sent); :class:`ServeError` 404 if unknown."""
        g = self._g
        row = g.row_of.get(image_id)
        if row is None:
            raise ServeError(f"no gallery image has the id {image_id!r}", 404)
        return g.paths[row]

    def ids(self, offset: int = 0, limit: int = 60, contains: str = "") -> tuple[int, list[str]]:
        """(matching count, a page of gallery ids in gallery order) for browsing."""
        ids = self._g.ids
        if contains:
            ids = [i for i in ids if contains.lower() in i.lower()]
        return len(ids), ids[offset : offset + limit]

    def info(self) -> dict[str, Any]:
        cfg = self.model.config
        return {"model": cfg.get("method"), "checkpoint": str(self.model.path) if self.model.path else None,
                "backbone": self.model.backbone_id, "dataset": cfg.get("dataset"), "gallery_size": self.size,
                "mode": self.mode, "source": self.source, "build_seconds": round(self.build_seconds, 3),
                "built": self.built,
                "started": _iso(self.started),
                "explanation": "shapley" if is_fused(self.method) else "similarity",
                "cirfusion_version": __version__,
                "limits": {"max_upload_bytes": self.limits.max_upload_bytes, "max_text_chars": self.limits.max_text_chars,
                           "max_k": self.limits.max_k, "max_pixels": self.limits.max_pixels}}

    # ---- request checks ------------------------------------------------------------------------------------------
    def check_text(self, text: Any) -> str:
        if not isinstance(text, str):
            raise ServeError("text must be a string (the modification, e.g. \"same but in red\")")
        text = text.strip()
        if not text:
            raise ServeError("text is empty: type the modification to apply to the reference")
        if len(text) > self.limits.max_text_chars:
            raise ServeError(f"text is {len(text)} characters long, above the limit of {self.limits.max_text_chars}")
        return text

    def check_k(self, k: Any) -> int:
        if isinstance(k, str):
            k = k.strip()
            if not k.lstrip("-").isdigit():
                raise ServeError(f"k must be a whole number, got {k!r}")
            k = int(k)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.limits.max_k:
            raise ServeError(f"k must be a whole number from 1 to {self.limits.max_k}, got {k!r}")
        return k

    def decode_upload(self, data: bytes, name: str = "upload") -> Image.Image:
        """An uploaded file as an RGB image through the project's safe loader; :class:`ServeError` 413 / 400."""
        if len(data) > self.limits.max_upload_bytes:
            raise ServeError(f"{name} is {len(data):,} bytes, above the limit of {self.limits.max_upload_bytes:,}", 413)
        try:
            return load_image(data, max_pixels=self.limits.max_pixels, max_bytes=self.limits.max_upload_bytes, name=name)
        except ImageLoadError as exc:
            raise ServeError(f"{name}: {exc.problem}") from None

    # ---- features ----------------------------------------------------------------------------------------------
    def _text_features(self, text: str) -> TextFeatures:
        # One text at a time (never padded beside others), so a text's features do not depend on what else is asked.
        tf = self._text_cache.get(text)
        if tf is None:
            tf = self.model.text_features([text])
            self._text_cache.put(text, tf)
        return tf

    def _row_features(self, g: _Gallery, row: int) -> ImageFeatures:
        if self._table is not None and row < self._table_rows:
            return self._table.torch(np.array([row]))
        key = g.hashes[row] or f"row:{g.ids[row]}"
        f = self._ref_cache.get(key)
        if f is None:
            try:
                f = self.model.image_features([load_image(g.paths[row])])
            except ImageLoadError as exc:
                raise ServeError(f"gallery image {g.ids[row]!r} cannot be read: {exc.problem}", 500) from None
            self._ref_cache.put(key, f)
        return f

    # ---- search --------------------------------------------------------------------------------------------------
    def search(self, text: str, k: int, *, reference: str | None = None, upload: bytes | None = None,
               keep_reference: bool = False, with_explanation: bool = True) -> SearchResult:
        """Top ``k`` gallery images for a reference (a gallery id, or the bytes of an uploaded image) modified by
        ``text``. Raises :class:`ServeError` for bad input (400), an unknown id (404), a too-large upload (413)."""
        query = self.check(text, k, reference=reference, upload=upload, keep_reference=keep_reference,
                           with_explanation=with_explanation)
        out = self.search_batch([query])[0]
        if isinstance(out, BaseException):
            raise out
        return out

    def check(self, text: Any, k: Any, *, reference: str | None = None, upload: bytes | None = None,
              keep_reference: bool = False, with_explanation: bool = True) -> CheckedQuery:
        """A search request checked and made ready for :meth:`search_batch`: the text and k validated, the reference
        found (404) or the upload decoded through the safe loader (400 / 413). No model work: the service runs this
        in its worker threads, beside the model thread."""
        if (reference is None) == (upload is None):
            raise ServeError("give exactly one reference: an uploaded image or the id of a gallery image")
        text, k = self.check_text(text), self.check_k(k)
        g = self._g
        image: Image.Image | None = None
        feats: ImageFeatures | None = None
        if reference is not None:
            row = g.row_of.get(reference)
            if row is None:
                raise ServeError(f"no gallery image has the id {reference!r}", 404)
            ref: int | None = row
            key = None
        else:
            assert upload is not None
            key = hashlib.sha256(upload).hexdigest()
            ref = g.row_of_hash.get(key)
            feats = self._ref_cache.get(key)  # held here: the cache may evict it before the model thread gets to it
            if feats is None:
                image = self.decode_upload(upload)
        exclude = ref is not None and not keep_reference
        k = min(k, len(g) - int(exclude))
        if k < 1:
            raise ServeError("nothing to return: the gallery holds only the reference image (set keep_reference)")
        return CheckedQuery(text, k, ref, key, image, with_explanation, keep_reference, feats)

    def _reference_features(self, g: _Gallery, c: CheckedQuery) -> ImageFeatures:
        if c.upload_key is None:
            assert c.row is not None
            return self._row_features(g, c.row)
        f = c.features if c.features is not None else self._ref_cache.get(c.upload_key)
        if f is None:
            if c.image is None:
                raise ServeError("the uploaded image is no longer held by the server: send it again", 400)
            f = self.model.image_features([c.image])
            self._ref_cache.put(c.upload_key, f)
        return f

    @staticmethod
    def _now(g: _Gallery, c: CheckedQuery) -> CheckedQuery:
        """``c`` against the gallery as it is now: an upload whose bytes were added to the gallery after it was
        checked (a ``POST /api/images`` queued before it) is that gallery image, and left out unless kept."""
        if c.upload_key is None or c.row is not None or c.upload_key not in g.row_of_hash:
            return c
        now = replace(c, row=g.row_of_hash[c.upload_key])
        return replace(now, k=max(1, min(c.k, len(g) - int(now.exclude))))

    def search_batch(self, queries: Sequence[CheckedQuery]) -> list[SearchResult | BaseException]:
        """Answer several checked queries together (what the service's model thread does with the requests that
        arrived while it was busy): their query embeddings are computed in one batch and, for an exactly scored
        gallery, every gallery matrix is read once for all of them (tiles of at most :data:`SCORE_BATCH` queries).
        Each query gets the answer it gets alone: the same results, scores equal up to float rounding (float32 query
        encoders may round a batch's rows differently in the last bit; float16/bfloat16 gallery products are
        computed row by row exactly as alone; tested). A query whose reference cannot be read gets its own
        :class:`ServeError`; the others are answered."""
        g = self._g
        out: list[SearchResult | BaseException | None] = [None] * len(queries)
        live: list[int] = []
        refs: list[ImageFeatures] = []
        texts: list[TextFeatures] = []
        queries = [self._now(g, c) for c in queries]
        for i, c in enumerate(queries):
            try:
                refs.append(self._reference_features(g, c))
                texts.append(self._text_features(c.text))
                live.append(i)
            except Exception as exc:  # this query's own failure (its image, its text): the others go on
                out[i] = exc
        for s in range(0, len(live), SCORE_BATCH):
            part = live[s : s + SCORE_BATCH]
            answers: Sequence[SearchResult | BaseException]
            try:
                answers = self._answer(g, [queries[i] for i in part], _cat_images([refs[s + j] for j in range(len(part))]),
                                       _cat_texts([texts[s + j] for j in range(len(part))]))
            except Exception as exc:
                if len(part) == 1:
                    log.exception("search failed")
                    answers = [exc]
                else:  # one query's failure must not fail the batch: answer each alone, so only it fails
                    answers = []
                    for j, i in enumerate(part):
                        try:
                            answers.extend(self._answer(g, [queries[i]], refs[s + j], texts[s + j]))
                        except Exception as one_exc:
                            log.exception("search failed")
                            answers.append(one_exc)
            for i, a in zip(part, answers, strict=True):
                out[i] = a
        return [o if o is not None else ServeError("not answered", 500) for o in out]

    def _answer(self, g: _Gallery, qs: Sequence[CheckedQuery], feats: ImageFeatures,
                tf: TextFeatures) -> list[SearchResult]:
        results = []
        with torch.no_grad():
            q = self.method.encode_query(feats, tf)
            excl = [c.row if c.exclude else None for c in qs]
            if g.emb is not None and is_fused(self.method):
                ranked = fused_rank_batch(self.method, q, g.emb, [c.k for c in qs], excl, self.limits.explain_top,
                                          [c.with_explanation for c in qs])
                for _, _, explanation in ranked:
                    for e in explanation.get("results", []):
                        e["id"] = g.ids[e.pop("row")]
                results = list(ranked)
            else:
                sims = self.method.similarity(q, g.emb).float() if g.emb is not None else None
                for j, c in enumerate(qs):
                    qj = rows_of(q, slice(j, j + 1))
                    scores, rows = self._rank(g, qj, c.k, excl[j], None if sims is None else sims[j])
                    results.append((scores, rows, explain(self.method, qj, c.text) if c.with_explanation else {}))
        return [SearchResult([Hit(g.ids[r], int(r), float(s)) for s, r in zip(scores, rows, strict=True)],
                             None if c.row is None else g.ids[c.row], c.exclude, explanation)
                for c, (scores, rows, explanation) in zip(qs, results, strict=True)]

    def _rank(self, g: _Gallery, q: Embedding, k: int, exclude: int | None,
              sims: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Best ``k`` rows (scores descending, ties by the lower row) without row ``exclude``; ``sims``: the query's
        similarity to the gallery when already computed (model-scored catalogs)."""
        if g.emb is not None:
            s = (self.method.similarity(q, g.emb)[0] if sims is None else sims).float().numpy().copy()
            if exclude is not None:
                s[exclude] = -np.inf
            return topk_rows(s, np.arange(s.shape[0], dtype=np.int64), k)
        assert g.index is not None
        if not isinstance(q, torch.Tensor):
            raise ServeError("this method gives bundled query embeddings that a faiss index cannot search", 500)
        idx = g.index
        n_idx = len(idx)
        qv = q.float().numpy()
        excl_idx = [g.ids[exclude]] if exclude is not None and exclude < n_idx else []
        k_idx = min(k, n_idx - len(excl_idx))
        s, r = idx.search_rows(qv, k_idx, exclude=[excl_idx])
        s, r = s[0], r[0]
        if g.added is not None and len(g.added):
            qq = as_vectors(qv, "query", idx.metric, dim=idx.dim)
            sa = exact_scores(qq, g.added)[0]
            ra = np.arange(n_idx, n_idx + len(sa), dtype=np.int64)
            if exclude is not None and exclude >= n_idx:
                keep = ra != exclude
                sa, ra = sa[keep], ra[keep]
            s, r = topk_rows(np.concatenate([s, sa]), np.concatenate([r, ra]), k)
        return s, r

    # ---- additions -----------------------------------------------------------------------------------------------
    def add_images(self, files: Sequence[tuple[bytes, str]]) -> list[dict[str, Any]]:
        """Add uploaded images (bytes, and the name a client gave, used only in messages) to the gallery without
        a rebuild. Each gets the id ``added/<first 16 hex digits of its sha256>``; an image already in the gallery
        (same bytes) is not added twice and its existing id is returned. The bytes are kept under the server's
        upload folder, named by their hash (never by a client's name). The service runs :meth:`decode_additions`
        in a worker thread and :meth:`commit_additions` on the model thread."""
        return self.commit_additions(self.decode_additions(files))

    def decode_additions(self, files: Sequence[tuple[bytes, str]]) -> list[tuple[bytes, str, Image.Image]]:
        """The checks and decoding of :meth:`add_images` (no model work): ``(bytes, sha256, image)`` per file."""
        if not files:
            raise ServeError("no images given: send one or more files in the form field 'images'")
        if len(files) > self.limits.max_add_files:
            raise ServeError(f"{len(files)} files in one request, above the limit of {self.limits.max_add_files}")
        if self._upload_dir is None:
            raise ServeError("this server keeps no upload folder: adding images is switched off", 400)
        decoded = []
        for i, (data, name) in enumerate(files):
            label = f"image {i + 1} ({name[:60]})" if name else f"image {i + 1}"
            decoded.append((data, hashlib.sha256(data).hexdigest(), self.decode_upload(data, label)))
        return decoded

    def commit_additions(self, decoded: Sequence[tuple[bytes, str, Image.Image]]) -> list[dict[str, Any]]:
        """The model work of :meth:`add_images`: the new images' features and embeddings, then the swap."""
        assert self._upload_dir is not None
        with self._add_lock:
            g = self._g
            out: list[dict[str, Any]] = []
            new: list[tuple[str, Path, str, Image.Image]] = []
            seen: dict[str, str] = {}
            for data, digest, image in decoded:
                if digest in g.row_of_hash:
                    out.append({"id": g.ids[g.row_of_hash[digest]], "added": False})
                    continue
                if digest in seen:
                    out.append({"id": seen[digest], "added": False})
                    continue
                image_id = f"added/{digest[:16]}"
                suffix = _suffix_of(image)
                path = self._upload_dir / f"{digest}{suffix}"
                _write_once(path, data)
                new.append((image_id, path, digest, image))
                seen[digest] = image_id
                out.append({"id": image_id, "added": True})
            if new:
                feats = self.model.image_features([im for *_, im in new])
                with torch.no_grad():
                    emb = self.method.encode_gallery(feats)
                self._g = _extend(g, [n[0] for n in new], [n[1] for n in new], [n[2] for n in new], emb)
                log.info("added %d image(s); the gallery holds %d", len(new), len(self._g))
            return out


def _cat_images(parts: Sequence[ImageFeatures]) -> ImageFeatures:
    if len(parts) == 1:
        return parts[0]
    return ImageFeatures(torch.cat([p.global_ for p in parts]), torch.cat([p.tokens for p in parts]))


def _cat_texts(parts: Sequence[TextFeatures]) -> TextFeatures:
    if len(parts) == 1:
        return parts[0]
    texts = [t for p in parts for t in (p.texts or [])]
    return TextFeatures(torch.cat([p.global_ for p in parts]), torch.cat([p.tokens for p in parts]),
                        torch.cat([p.mask for p in parts]),
                        texts=texts if len(texts) == sum(len(p.global_) for p in parts) else None,
                        encoder=parts[0].encoder)


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _suffix_of(image: Image.Image) -> str:
    fmt = (image.format or "").lower()
    return {"jpeg": ".jpg", "png": ".png", "webp": ".webp", "gif": ".gif", "bmp": ".bmp", "tiff": ".tif"}.get(fmt, ".img")


def _write_once(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` unless it already holds it (content-addressed: the same name is the same bytes)."""
    if path.is_file():
        return
    tmp = path.with_name(f".{path.name}.{threading.get_ident()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _extend(g: _Gallery, ids: list[str], paths: list[Path], hashes: list[str], emb: Embedding) -> _Gallery:
    n = len(g)
    row_of = dict(g.row_of)
    row_of.update({i: n + j for j, i in enumerate(ids)})
    row_of_hash = dict(g.row_of_hash)
    row_of_hash.update({h: n + j for j, h in enumerate(hashes)})
    base = replace(g, ids=[*g.ids, *ids], paths=[*g.paths, *paths], hashes=[*g.hashes, *hashes], row_of=row_of,
                   row_of_hash=row_of_hash)
    if g.emb is not None:
        base.emb = cat_embeddings([g.emb, emb])
        return base
    assert g.index is not None
    v = as_vectors(emb.float().numpy(), "added embeddings", g.index.metric, dim=g.index.dim)
    base.added = v if g.added is None else np.concatenate([g.added, v])
    return base


__all__ = ["Catalog", "CheckedQuery", "Hit", "Limits", "SearchResult", "ServeError", "file_sha256"]
