"""The frozen base models' embeddings of one split, computed once (:class:`SplitTable`), and the metrics of a base
model or a fused model read from them (:func:`evaluate_base`, :func:`evaluate_fused`).

No Q x N score matrix is ever held: a table keeps every base model's query and gallery *embeddings* (Q x D and N x D,
or N x M x D for multi-vector models), and the similarity vectors are recomputed on the fly, a tile of queries at a
time, so memory is O(tile x N x K) plus the embeddings.

**Reference exclusion.** When the dataset excludes the reference from the ranking (CIRR convention), the column
holding the reference image is left out of every statistic (mean, std, top-k). The reference is recognised by an
exact fingerprint of its cached global image feature (:func:`~cirfusion.fusion.kernels.image_fingerprint`), which the
query and the gallery embeddings both carry, so training, ``cirfusion fuse``'s evaluation and ``cirfusion eval`` /
``cirfusion.load`` of the fused checkpoint normalise identically. The training loss masks the reference column by
image id (:func:`cirfusion.data.schema.reference_columns`), as the metrics do.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..backbones.multi import composite_fields, feature_parts, part_slices
from ..data.schema import CIRDataset, DataError, reference_columns
from ..embeddings import Embedding, cat_embeddings, embedding_len, rows_of, take_embeddings
from ..methods.base import CIRMethod
from ..metrics import RetrievalMetrics
from ..views import FeatureView, SplitData
from .kernels import FusionError, base_scores, fingerprint_exclusion, image_fingerprint, storage_dtype, uses_default_similarity

if TYPE_CHECKING:  # pragma: no cover
    from ..methods.dafm import DAFM


class SplitTable:
    """The frozen base models' embeddings of one split, computed once: per model the queries (dataset order) and the
    gallery (gallery order), plus image fingerprints (reference exclusion), reference columns and positives."""

    _parent: tuple[SplitTable, list[int]] | None = None

    def __init__(self, dataset: CIRDataset, bases: Sequence[CIRMethod], names: Sequence[str], query: Sequence[Embedding],
                 gallery: Sequence[Embedding], query_fp: torch.Tensor, gallery_fp: torch.Tensor) -> None:
        if not (len(bases) == len(names) == len(query) == len(gallery)):
            raise ValueError("SplitTable: bases, names, query and gallery embeddings must have one entry per model")
        self.dataset, self.bases, self.names = dataset, list(bases), list(names)
        self.query, self.gallery = list(query), list(gallery)
        self.query_fp, self.gallery_fp = query_fp, gallery_fp
        self.num_queries, self.num_gallery = len(dataset.queries), len(dataset.gallery)
        for k, (q, g) in enumerate(zip(self.query, self.gallery, strict=True)):
            if embedding_len(q) != self.num_queries or embedding_len(g) != self.num_gallery:
                raise ValueError(f"SplitTable: model {self.names[k]} has {embedding_len(q)} query / {embedding_len(g)} "
                                 f"gallery embeddings for {self.num_queries} queries / {self.num_gallery} images")
        gal = dataset.gallery
        src = dataset.files[0] if dataset.files else None
        # The reference's column where the dataset leaves it out of the ranking, else -1 (the one reference mask).
        ref = reference_columns(dataset)
        pos = []
        for q, r in zip(dataset.queries, ref, strict=True):
            cols = []
            for t in dict.fromkeys(q.targets):
                if t not in gal:
                    raise DataError(src, q.qid, f"target {t!r} is not in the gallery")
                c = gal.index(t)
                if c != r:
                    cols.append(c)
            pos.append(np.array(sorted(cols), dtype=np.int64))
        self.ref_col = torch.from_numpy(ref)
        self.positives = pos
        self._cast: dict[tuple[int, torch.dtype], Embedding] = {}

    @classmethod
    def build(cls, bases: Sequence[CIRMethod], names: Sequence[str], data: SplitData, chunk: int = 512,
              progress: bool = False) -> SplitTable:
        """Encode a split's queries (their evaluation text) and gallery with every base model, from cached features."""
        view = FeatureView(data.images, data.texts)
        ds = data.dataset
        img_tok = any(b.uses_image_tokens for b in bases)
        txt_tok = any(b.uses_text_tokens for b in bases)
        # Bases on different backbones read their own part of a multi: backbone's features.
        fp = feature_parts([b.dims for b in bases])
        if fp is None:
            cut: list[Any] = [None] * len(bases)
        else:
            parts, part_of = fp
            sl = part_slices(parts)
            cut = [sl[i] for i in part_of]
            want = composite_fields(parts)
            if int(view.img_global.shape[1]) != want["image_dim"]:
                raise FusionError(f"the base models read {len(parts)} backbones ({want['backbone_id']}): their features "
                                  f"must come from that multi: backbone ({want['image_dim']}-d global image features), "
                                  f"got {int(view.img_global.shape[1])}-d")
        for b in bases:
            b.eval()
        g_rows = np.array([view.image_row(i) for i in ds.gallery.ids], dtype=np.int64)
        q_ref = np.array([view.image_row(q.reference) for q in ds.queries], dtype=np.int64)
        q_txt = np.array([view.text_row(q.text) for q in ds.queries], dtype=np.int64)
        gal: list[list[Embedding]] = [[] for _ in bases]
        qry: list[list[Embedding]] = [[] for _ in bases]
        gfp, qfp = [], []
        with torch.no_grad():
            for s in tqdm(range(0, len(g_rows), chunk), desc=f"gallery {ds.key}", disable=not progress, leave=False):
                f = view.image(g_rows[s : s + chunk], img_tok)
                gfp.append(image_fingerprint(f.global_))
                for k, b in enumerate(bases):
                    gal[k].append(b.encode_gallery(f if cut[k] is None else cut[k].image(f)))
            for s in tqdm(range(0, len(q_ref), chunk), desc=f"queries {ds.key}", disable=not progress, leave=False):
                ref = view.image(q_ref[s : s + chunk], img_tok)
                txt = view.text(q_txt[s : s + chunk], txt_tok)
                qfp.append(image_fingerprint(ref.global_))
                for k, b in enumerate(bases):
                    qry[k].append(b.encode_query(ref, txt) if cut[k] is None else b.encode_query(cut[k].image(ref), cut[k].text(txt)))
        if not gfp or not qfp:
            raise DataError(ds.files[0] if ds.files else None, None, f"split {ds.key} has no queries or no gallery")
        return cls(ds, bases, names, [cat_embeddings(p) for p in qry], [cat_embeddings(p) for p in gal],
                   torch.cat(qfp), torch.cat(gfp))

    @property
    def num_models(self) -> int:
        return len(self.bases)

    def select(self, members: Sequence[int]) -> SplitTable:
        """A view holding only the models ``members`` (in that order); tensors are shared."""
        t = object.__new__(SplitTable)
        t.__dict__.update(self.__dict__)
        t.bases = [self.bases[i] for i in members]
        t.names = [self.names[i] for i in members]
        t.query = [self.query[i] for i in members]
        t.gallery = [self.gallery[i] for i in members]
        t._cast = {}
        t._parent = (self, list(members))
        return t

    def query_subset(self, rows: Sequence[int] | np.ndarray) -> SplitTable:
        """A table over the queries ``rows`` only (same gallery, models and embeddings, shared)."""
        idx = np.asarray(rows, dtype=np.int64)
        rt = torch.from_numpy(idx)
        t = object.__new__(SplitTable)
        t.__dict__.update(self.__dict__)
        t.dataset = dataclasses.replace(self.dataset, queries=[self.dataset.queries[i] for i in idx])
        t.query = [rows_of(q, rt) for q in self.query]
        t.query_fp = self.query_fp[rt]
        t.ref_col = self.ref_col[rt]
        t.positives = [self.positives[i] for i in idx]
        t.num_queries = len(idx)
        return t

    def split_queries(self, fraction: float, seed: int = 0) -> tuple[SplitTable, SplitTable]:
        """``(fit, holdout)``: a seeded random ``fraction`` of the queries held out (for model selection)."""
        if not 0 < fraction < 1:
            raise FusionError(f"holdout fraction must be in (0, 1), got {fraction}")
        order = np.random.default_rng([seed, 7]).permutation(self.num_queries)
        n_hold = max(1, round(fraction * self.num_queries))
        if n_hold >= self.num_queries:
            raise FusionError(f"{self.dataset.key}: {self.num_queries} queries are too few to hold {fraction:.0%} out")
        return self.query_subset(np.sort(order[n_hold:])), self.query_subset(np.sort(order[:n_hold]))

    def galleries(self, dtype: torch.dtype = torch.float32) -> list[Embedding]:
        """The gallery embeddings as the fused scoring reads them: default-similarity models' tensors in
        ``storage_dtype(dtype)`` (converted once and cached; shared with the table this one was selected from)."""
        if self._parent is not None:
            full = self._parent[0].galleries(dtype)
            return [full[i] for i in self._parent[1]]
        out = []
        for k, (b, g) in enumerate(zip(self.bases, self.gallery, strict=True)):
            want = storage_dtype(dtype)
            if isinstance(g, torch.Tensor) and uses_default_similarity(b) and g.dtype != want:
                if (k, want) not in self._cast:
                    self._cast[(k, want)] = g.to(want)
                g = self._cast[(k, want)]
            out.append(g)
        return out

    def query_bundle(self, rows: slice | torch.Tensor) -> dict[str, Any]:
        """The DAFM query embedding of ``rows`` (what ``DAFM.encode_query`` returns)."""
        return {"q": tuple(rows_of(q, rows) for q in self.query), "fp": rows_of(self.query_fp, rows)}

    def gallery_bundle(self, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
        """The DAFM gallery embedding (what ``DAFM.encode_gallery`` returns for a model scoring in ``dtype``)."""
        return {"g": tuple(self.galleries(dtype)), "fp": self.gallery_fp}

    def raw_scores(self, rows: slice | torch.Tensor, cols: torch.Tensor | None = None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``[B, K, N]`` (or ``[B, K, len(cols)]``) raw scores of query ``rows``, as a fused model scoring in
        ``dtype`` computes them."""
        gals = self.galleries(dtype)
        if cols is not None:
            gals = [take_embeddings(g, cols) for g in gals]
        return base_scores(self.bases, [rows_of(q, rows) for q in self.query], gals, dtype)

    def exclusion(self, rows: slice | torch.Tensor, exclude_reference: bool) -> torch.Tensor | None:
        """``[B, N]`` columns left out of the statistics, or None.

        Not :func:`cirfusion.data.schema.reference_mask`: the fused model at inference (``cirfusion eval``,
        ``cirfusion.load``) has no image ids, only features, and recognises the reference by fingerprint equality; the
        statistics fitted here must be computed the same way, so a gallery image whose cached feature equals the
        reference's (a duplicate) is excluded here as it is there."""
        if not exclude_reference:
            return None
        fp = rows_of(self.query_fp, rows)
        assert isinstance(fp, torch.Tensor)
        return fingerprint_exclusion(fp, self.gallery_fp)

    def trainable_rows(self) -> np.ndarray:
        return np.array([i for i, p in enumerate(self.positives) if len(p)], dtype=np.int64)


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------------
def _metrics_from(scorer: Callable[[slice], torch.Tensor], dataset: CIRDataset, chunk: int) -> dict[str, float]:
    m = RetrievalMetrics(dataset)
    for s in range(0, len(dataset.queries), chunk):
        m.update(s, scorer(slice(s, min(len(dataset.queries), s + chunk))).numpy())
    return m.compute()


def _per_query_from(scorer: Callable[[slice], torch.Tensor], dataset: CIRDataset, chunk: int) -> dict[str, np.ndarray]:
    m = RetrievalMetrics(dataset)
    for s in range(0, len(dataset.queries), chunk):
        m.update(s, scorer(slice(s, min(len(dataset.queries), s + chunk))).numpy())
    return m.per_query()


@torch.no_grad()
def per_query_base(table: SplitTable, k: int, chunk: int = 256) -> dict[str, np.ndarray]:
    """Per-query results of base model ``k`` alone (:meth:`RetrievalMetrics.per_query`: ranks, subset ranks, AP)."""
    base, q, g = table.bases[k], table.query[k], table.gallery[k]
    return _per_query_from(lambda r: base.similarity(rows_of(q, r), g).float(), table.dataset, chunk)


@contextlib.contextmanager
def _fused_scorer(model: DAFM, table: SplitTable) -> Iterator[Callable[[Any], torch.Tensor]]:
    """``rows -> fused scores`` of ``model`` over the table's gallery (encoded once, in the model's score dtype), with
    the model in eval mode inside the ``with`` and its mode restored after."""
    was = model.training
    model.eval()
    try:
        g = table.gallery_bundle(model.score_dtype)
        yield lambda r: model.similarity(table.query_bundle(r), g)
    finally:
        model.train(was)


@torch.no_grad()
def per_query_fused(model: DAFM, table: SplitTable, chunk: int = 256) -> dict[str, np.ndarray]:
    """Per-query results of a fused model (the table holds exactly its bases, in its order)."""
    with _fused_scorer(model, table) as score:
        return _per_query_from(score, table.dataset, chunk)


@torch.no_grad()
def evaluate_base(table: SplitTable, k: int, chunk: int = 256) -> dict[str, float]:
    """Metrics of base model ``k`` alone (its own similarity)."""
    base, q, g = table.bases[k], table.query[k], table.gallery[k]
    return _metrics_from(lambda r: base.similarity(rows_of(q, r), g).float(), table.dataset, chunk)


@torch.no_grad()
def evaluate_fused(model: DAFM, table: SplitTable, chunk: int = 256) -> dict[str, float]:
    """Metrics of a fused model on a split whose table holds exactly the model's bases, in its order."""
    with _fused_scorer(model, table) as score:
        return _metrics_from(score, table.dataset, chunk)


__all__ = ["SplitTable", "evaluate_base", "evaluate_fused", "per_query_base", "per_query_fused"]
