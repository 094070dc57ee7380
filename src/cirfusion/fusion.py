"""DAFM score fusion (Dynamic Adaptive Fusion, arXiv 2511.05020) of K >= 2 frozen CIR models, on 2 CPU cores.

The paper fuses pre-computed similarity matrices (~10 GB of fp16 for CIRR) with a small convolutional network. Here
no Q x N matrix is ever held: every base model's query and gallery *embeddings* are computed once (tables of Q x D and
N x D, or N x M x D for multi-vector models), and the similarity vectors are recomputed on the fly, a tile of queries
at a time, so memory is O(tile x N x K) plus the embeddings.

Pipeline for one tile of B queries against the N gallery images (:func:`base_scores`, :func:`normalise_scores`,
:class:`FusionNet`)::

    raw[b, k, n]   = base_k.similarity(query_k[b], gallery_k[n])               # each model's own score
    z[b, k, n]     = (raw - mean_bk) / std_bk                                   # per query and model, over the gallery
    stats[b, k, :] = (top-1 z, top-1 - top-2, top-1 - mean of top-k,           # the shape of model k's score
                      entropy of softmax(beta * top-k z), log std_bk)           # distribution for query b
    w[b, :]        = softmax(MLP(stats[b]))                                     # query-aware model weights, sum to 1
    x              = w[b, k] * z[b, k, n]                                       # K channels per candidate
    x              = x + W2 relu(W1 x + b1)        (x blocks)                   # residual refinement, 1x1 convolutions
    fused[b, n]    = w_out . x + b_out                                          # 1x1 convolution to one score

**Reference exclusion.** When the dataset excludes the reference from the ranking (CIRR convention), the column
holding the reference image is left out of every statistic (mean, std, top-k). The reference is recognised by an
exact fingerprint of its cached global image feature (:func:`image_fingerprint`), which the query and the gallery
embeddings both carry, so training, ``cirfusion fuse``'s evaluation and ``cirfusion eval`` / ``cirfusion.load`` of
the fused checkpoint normalise identically. The training loss masks the reference column by image id, as the metrics do.

**Permutation equivariance over candidates.** Every per-candidate operation is pointwise (elementwise ops and 1x1
convolutions), and every statistic over the gallery is computed so that it does not depend on the column order,
*bitwise*: maxima and top-k values are order-free, and the sums behind the mean and the standard deviation are
taken in fixed point (:func:`integer_sum`: integer-valued floats, every partial sum exact), so the order of
addition does not matter. The paper's convolution along an arbitrary candidate order has no such property. Permuting the gallery permutes the fused scores exactly (tested).

**Initialisation.** The gate's last layer and every block's last layer start at zero and the head at ones, so an
untrained network computes exactly the mean of the normalised scores (uniform weights, no residual): the simple
baseline is the starting point and training can only move away from it on evidence.

**Training** (:func:`fit`): only the fusion network trains; the bases are frozen. The loss is InfoNCE over the
gallery with several positives (``-log sum_{p in P} exp(f_p/tau) + log sum_{j} exp(f_j/tau)``, the reference
column masked). Two ways to take the gallery:

- ``negatives="shortlist"`` (default): one pass over the training queries (the *setup pass*, tiles of queries vs the
  whole gallery) stores each query's normalisation statistics and the z-scores of its positives and of its ``hard``
  hardest candidates (highest z of any model, i.e. whatever some model ranks high). Each step adds ``random``
  gallery columns drawn uniformly (shared by the tile), whose exp-logits are weighted by
  ``(#rest of the gallery) / (#valid random columns)``: an unbiased estimate of the rest of the gallery's share of
  the softmax denominator. The fusion network therefore never runs on the whole gallery during training: memory
  O(Q x (hard + positives) x K) for the shortlists, O(tile x N x K) for the setup pass.
- ``negatives="full"``: every step scores its queries against the whole gallery (exact InfoNCE; gradients are
  accumulated over sub-tiles so memory stays O(tile x N x K)).

When ``hard + random`` covers the whole gallery the two losses are equal (tested).

**Dynamic temperature.** The paper updates the temperature from the loss: ``tau_t = tau_{t-1} * (1 - L_{t-1} / s)``.
We apply it at every optimisation step (``L_{t-1}`` = the mean loss of the previous step), starting from
``tau0 = 0.02`` and clamping to ``[tau_min, tau_max]`` after every update (a factor <= 0, i.e. ``L >= s``, gives
``tau_min``). A large loss shrinks tau fast (sharper softmax, more weight on the hardest negatives); as the loss falls
the schedule settles. ``dynamic_tau=False`` keeps ``tau0`` (the ablation, ``cirfusion fuse --fixed-tau``).

**Which queries to fit on.** The network learns from the base models' scores how far to trust each model per
query. Base models score the queries they were trained on far better than unseen ones (on the embedded synthetic
benchmark, Rmean +20 to +34 points on their training split), so a fusion fitted there learns to trust whichever
model overfits most, and can end up below the plain mean of the normalised scores on test. Fit it on queries the
bases did not train on (``cirfusion fuse --split-train val --split-val none --split-test test``); the command measures
the gap and warns.

**Precision.** Models with the default similarity (cosine / max-sim) are scored by :func:`dot_or_maxsim`; the fused
model's ``score_dtype`` (default float16) stores their gallery embeddings in float16, which halves the bytes read per
query (the cost of a query is reading K galleries). Products accumulate in float32; scores move by ~1e-4, the precision
of the fp16 feature cache itself. ``score_dtype="float32"`` is exact. ``score_dtype="int8"`` keeps the gallery in
float16 and scores a few queries at a time against an int8 copy of it (one scale per gallery vector, made once and
cached; bfloat16 query, float32 accumulation): a quarter of the float32 bytes; measured on 2 CPU cores at K = 4 and
20k images, base scores 2.7 ms instead of 4.6 ms (float16) and fused top-10 lists 98 % equal to exact scoring
(float16: 99.8 %); scores within ~3e-3 of the exact ones (``benchmarks/dafm_speed.py``). Larger batches dequantise
the int8 tiles into a float32 GEMM.

Determinism: the network initialisation, the epoch order and the random columns of each step are drawn from
generators seeded by ``seed`` (and the epoch / step), so a run is a pure function of its inputs.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data.schema import CIRDataset, DataError
from .embeddings import (
    Embedding,
    cat_embeddings,
    embedding_len,
    rows_of,
    take_embeddings,
)
from .errors import CirfusionError
from .methods.base import CIRMethod
from .metrics import RetrievalMetrics

if TYPE_CHECKING:  # pragma: no cover
    from .methods.dafm import DAFM
    from .views import SplitData

STAT_NAMES = ("top1", "margin", "topk_gap", "topk_entropy", "log_std")
NUM_STATS = len(STAT_NAMES)
# A score block ([queries, models, gallery] raw scores or [queries, gallery x hidden] activations) stays under this
# many elements: 2^23 float32 = 32 MiB per tensor, whatever the gallery size.
BLOCK_ELEMS = 1 << 23
# Normalising and fusing a block this small (one query over ~20k candidates) is a chain of ~30 short element-wise ops:
# on one thread each costs less than waking a second one (measured: 1.9 ms vs 2.7 ms per query on 2 threads).
SINGLE_THREAD_ELEMS = 1 << 18


@contextlib.contextmanager
def single_thread_if_small(numel: int) -> Iterator[None]:
    """Run the body on one intra-op thread when a block has at most :data:`SINGLE_THREAD_ELEMS` elements (torch's thread
    count is process-wide: restored on exit)."""
    n = torch.get_num_threads()
    if numel > SINGLE_THREAD_ELEMS or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class FusionError(CirfusionError, ValueError):
    """Base models that cannot be fused (different datasets, galleries or backbones; fewer than two; ...)."""


# ---------------------------------------------------------------------------------------------------------------------
# Observing score blocks (memory safety is by design; tests check it through this hook)
# ---------------------------------------------------------------------------------------------------------------------
_observers: list[Callable[[str, tuple[int, ...]], None]] = []


def _observe(kind: str, t: torch.Tensor) -> None:
    for fn in _observers:
        fn(kind, tuple(t.shape))


@contextlib.contextmanager
def observe_score_blocks() -> Iterator[list[tuple[str, tuple[int, ...]]]]:
    """Record the shape of every score block materialised inside the ``with`` (``("raw", (B, K, N))``,
    ``("fused", (B, N))``, ``("hidden", (B, H, N))``): the largest one bounds the memory of a fused scoring."""
    seen: list[tuple[str, tuple[int, ...]]] = []

    def record(kind: str, shape: tuple[int, ...]) -> None:
        seen.append((kind, shape))

    _observers.append(record)
    try:
        yield seen
    finally:
        _observers.remove(record)


def block_rows(n_cols: int, width: int, limit: int, block_elems: int | None = None) -> int:
    """Rows per block so that ``rows x n_cols x width`` stays under ``block_elems`` (default :data:`BLOCK_ELEMS`;
    at least 1 row, at most ``limit``)."""
    be = BLOCK_ELEMS if block_elems is None else block_elems
    return max(1, min(int(limit), be // max(1, n_cols * width)))


# ---------------------------------------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------------------------------------
def feature_parts(bases: Sequence[CIRMethod]) -> tuple[list[Any], list[int]] | None:
    """Base models on more than one backbone: ``(parts, part_of)``, the distinct backbones' :class:`MethodDims` in
    order of first appearance and each base's index into them; ``None`` when every base reads one backbone."""
    parts: list[Any] = []
    part_of: list[int] = []
    for b in bases:
        ids = [p.backbone_id for p in parts]
        bid = b.dims.backbone_id
        if bid in ids:
            p = parts[ids.index(bid)]
            for f in ("weights_hash", "preprocess_id", "image_dim", "text_dim", "num_image_tokens", "max_text_tokens"):
                if getattr(p, f) != getattr(b.dims, f):
                    raise FusionError(f"base models on backbone {bid!r} disagree on its {f} ({getattr(p, f)!r} vs "
                                      f"{getattr(b.dims, f)!r}): they were trained on different versions of it")
            part_of.append(ids.index(bid))
        else:
            parts.append(b.dims)
            part_of.append(len(parts) - 1)
    return (parts, part_of) if len(parts) > 1 else None


def composite_dims(parts: Sequence[Any]) -> Any:
    """The :class:`MethodDims` of the ``multi:`` backbone over ``parts`` (what :class:`~cirfusion.backbones.multi.
    MultiBackbone` reports, computed without building it)."""
    from .backbones.multi import composite_fields
    from .methods.base import MethodDims

    return MethodDims(**composite_fields(parts), aligned=False)


def fusion_backbone(backbones: Sequence[Any]) -> Any:
    """The one backbone a fused model over base models on ``backbones`` (one per base, instances) reads: the shared
    one, or a ``multi:`` composite of the distinct ones in order of first appearance."""
    from .backbones.multi import MultiBackbone

    distinct: dict[str, Any] = {}
    for b in backbones:
        distinct.setdefault(b.backbone_id, b)
    return backbones[0] if len(distinct) == 1 else MultiBackbone(list(distinct.values()))


_FP_COEF: dict[int, torch.Tensor] = {}


def image_fingerprint(global_: torch.Tensor) -> torch.Tensor:
    """``[B]`` int64 fingerprint of each image's global feature, exact and order-free.

    The feature is rounded to float16 (how the feature cache stores it), its 16-bit patterns are weighted by fixed
    random 31-bit integers and summed in int64 (no overflow below 2^16 dimensions, so the sum is exact). Two rows get
    the same fingerprint iff their cached features are equal (up to a ~2^-31 chance of collision)."""
    if global_.dim() != 2:
        raise ValueError(f"image_fingerprint expects [B, D] global features, got shape {tuple(global_.shape)}")
    d = int(global_.shape[1])
    if d >= 1 << 16:
        raise ValueError(f"image_fingerprint supports up to 65535 dimensions, got {d}")
    coef = _FP_COEF.get(d)
    if coef is None:
        g = torch.Generator().manual_seed(0x5EED_F1A9)
        coef = _FP_COEF[d] = torch.randint(1, 1 << 31, (d,), generator=g, dtype=torch.int64)
    bits = global_.detach().to(torch.float16).view(torch.int16).to(torch.int64)
    return (bits * coef).sum(-1)


# ---------------------------------------------------------------------------------------------------------------------
# Scores: raw, exact order-free statistics, normalisation
# ---------------------------------------------------------------------------------------------------------------------
SCORE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int8": torch.int8}


def storage_dtype(score_dtype: torch.dtype) -> torch.dtype:
    """The dtype a gallery scored in ``score_dtype`` is stored in (int8 scoring reads a cached int8 copy of a float16
    gallery: the float16 one stays the embedding every other helper slices and concatenates)."""
    return torch.float16 if score_dtype == torch.int8 else score_dtype


class _Int8Copy:
    __slots__ = ("ref", "scale", "values", "version")

    def __init__(self, g: torch.Tensor) -> None:
        self.ref, self.version = weakref.ref(g), g._version
        gf = g.reshape(-1, g.shape[-1]).float()
        # Symmetric per-vector quantisation: the largest |x| of each gallery vector maps to 127.
        scale = gf.abs().amax(1).clamp(min=1e-12) / 127.0
        self.values = torch.round(gf / scale[:, None]).clamp_(-127, 127).to(torch.int8).contiguous()
        self.scale = scale


_INT8_CACHE: dict[int, _Int8Copy] = {}


def int8_copy(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values [R, D] int8, scale [R] float32)`` of a gallery ``g`` (``[R, D]``, or ``[N, M, D]`` flattened to
    ``R = N * M`` vectors), with ``g ~ values * scale``;
    computed once per tensor (cached while ``g`` lives and is not modified in place)."""
    key = id(g)
    hit = _INT8_CACHE.get(key)
    if hit is None or hit.ref() is not g or hit.version != g._version:
        for k in [k for k, v in _INT8_CACHE.items() if v.ref() is None]:
            del _INT8_CACHE[k]
        hit = _INT8_CACHE[key] = _Int8Copy(g)
    return hit.values, hit.scale


def _int8_products(qf: torch.Tensor, values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``[B, R]`` float32 products of float32 queries with an int8 gallery: a weight-only int8 kernel (bfloat16 query,
    float32 accumulation) for a few query vectors; a float32 GEMM on dequantised cache-sized tiles for more."""
    if qf.shape[0] <= SMALL_BATCH:
        return torch._weight_int8pack_mm(qf.to(torch.bfloat16), values, scale.to(torch.bfloat16)).float()
    tile = _UPCAST_ROWS
    buf = torch.empty(min(tile, values.shape[0]), values.shape[1])
    out = []
    for s in range(0, values.shape[0], tile):
        e = min(values.shape[0], s + tile)
        part = buf[: e - s]
        part.copy_(values[s:e]).mul_(scale[s:e, None])
        out.append(F.linear(qf, part))
    return torch.cat(out, 1) if out else qf.new_zeros(qf.shape[0], 0)
# Up to this many query vectors, float16 products run as float16 matrix-vector products (the fastest way to stream a
# float16 gallery); beyond, gallery tiles are widened to float32 in a cache-sized buffer for a float32 GEMM (CPU float16
# GEMMs are slow). Both accumulate in float32 on the same float16 inputs; the first rounds its result to float16.
SMALL_BATCH = 16
_UPCAST_ROWS = 4096


def dot_or_maxsim(q: torch.Tensor, g: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[B, N]`` float32: the default similarity of :mod:`cirfusion.methods.base` (inner product; max over vector pairs
    when either side is multi-vector), computed over the flattened vectors with the gallery tiled (the generic einsum
    path copies a multi-vector gallery on every call).

    ``dtype=float16``: both sides are rounded to float16 (the gallery should already be stored so: that halves the
    bytes read per query, and converting on every call would cost more than it saves); products accumulate in float32.
    A score then differs from the float32 one by ~1e-4 (the precision of the fp16 feature cache itself)."""
    q3 = q if q.dim() == 3 else q[:, None, :]
    g3 = g if g.dim() == 3 else g[:, None, :]
    b, mq, d = q3.shape
    n, mg, _ = g3.shape
    gf = g3.reshape(n * mg, d)
    if dtype == torch.int8:
        if g.dtype == torch.int8:
            raise TypeError("dot_or_maxsim: int8 scoring takes the float gallery (its int8 copy is made and cached)")
        values, scale = int8_copy(g)
        prod = _int8_products(q3.reshape(b * mq, d).float(), values, scale)
        return prod if mq == 1 and mg == 1 else prod.view(b, mq, n, mg).amax(dim=(1, 3))
    if gf.dtype != dtype:
        gf = gf.to(dtype)
    qf = q3.reshape(b * mq, d).to(dtype)
    upcast = dtype != torch.float32 and b * mq > SMALL_BATCH
    if upcast:
        qf = qf.float()
        tile = max(1, _UPCAST_ROWS // mg)
        buf = torch.empty(tile * mg, d)
    else:
        tile = block_rows(b * mq * mg, 1, n)
    out = []
    for s in range(0, n, tile):
        e = min(n, s + tile)
        if upcast:
            part = buf[: (e - s) * mg]
            part.copy_(gf[s * mg : e * mg])
        else:
            part = gf[s * mg : e * mg]
        prod = F.linear(qf, part)  # [b*mq, (e-s)*mg]
        out.append(prod.float() if mq == 1 and mg == 1 else prod.view(b, mq, e - s, mg).amax(dim=(1, 3)).float())
    return torch.cat(out, 1) if out else q3.new_zeros(b, 0)


def uses_default_similarity(base: CIRMethod) -> bool:
    return type(base).similarity is CIRMethod.similarity


def base_scores(bases: Sequence[CIRMethod], queries: Sequence[Embedding], galleries: Sequence[Embedding],
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[B, K, N]`` float32: each base model's own similarity, no gradient. Bases with the default similarity are
    scored by :func:`dot_or_maxsim` in ``dtype``; others by their own ``similarity``."""
    with torch.no_grad():
        blocks = []
        for k, (base, q, g) in enumerate(zip(bases, queries, galleries)):
            fast = uses_default_similarity(base) and isinstance(q, torch.Tensor) and isinstance(g, torch.Tensor)
            s = dot_or_maxsim(q, g, dtype) if fast else base.similarity(q, g).float()
            if not torch.isfinite(s).all():
                raise FusionError(f"base model {k} ({base.method_name}) produced non-finite scores")
            blocks.append(s)
        raw = torch.stack(blocks, 1)
    _observe("raw", raw)
    return raw


def _pow2(shift: torch.Tensor) -> torch.Tensor:
    """Exact float32 powers of two ``2**shift`` (built from the exponent bits: no pow/exp rounding)."""
    return ((shift.clamp(-126, 127).to(torch.int32) + 127) << 23).view(torch.float32)


def fixed_point(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` scaled by an exact power of two per row (last dimension) so the row's largest magnitude is below
    ``2**bits``, then rounded: integer-valued float32 ``q`` and the ``[..., 1]`` scale (``x ~ q / scale``)."""
    m = torch.maximum(x.amax(-1, keepdim=True), -x.amin(-1, keepdim=True))
    _, e = torch.frexp(m)  # m = f * 2**e with f in [0.5, 1): |x| < 2**e
    scale = _pow2(bits - e)
    return (x * scale).round_(), scale


def integer_sum(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Exact float64 sum over the last dimension of integer-valued float32 ``q`` with ``|q| <= 2**bits``.

    Blocks of ``2**(24 - bits)`` elements are summed in float32 -- every partial sum is an integer of at most 2**24,
    so exact whatever the summation order -- and the block sums in float64 (exact below 2**53). The result is
    therefore bitwise independent of the order of the elements, at the speed of a float32 sum."""
    n = q.shape[-1]
    blk = 1 << (24 - bits)
    main = n - n % blk
    out = q[..., main:].sum(-1).double()
    if main:
        out = out + q[..., :main].unflatten(-1, (main // blk, blk)).sum(-1).double().sum(-1)
    return out


def _excluded_sum(q: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``[B, K]`` float64 sum of the integer-valued ``q[b, :, n]`` over the excluded (b, n) pairs (exact)."""
    out = torch.zeros(q.shape[0], q.shape[1], dtype=torch.float64)
    if len(rows):
        out.index_add_(0, rows, q[rows, :, cols].double())
    return out


# Fixed-point precision of the sums behind the mean (relative to the row's largest |score|) and the variance (relative
# to the largest |deviation|): far below what a z-score needs, and it makes the statistics order-free.
MEAN_BITS, VAR_BITS = 16, 10


def standardise(raw: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``(raw - mean) / std`` per (query, model): ``raw [B, K, C]``, ``mean``/``std`` ``[B, K]`` float32."""
    return (raw - mean[..., None]) / std[..., None]


@dataclass
class Normalised:
    """Normalised scores of a tile: ``z [B, K, N]`` (excluded columns 0), ``mean``/``std`` ``[B, K]`` (float32, the
    raw scores' per-query statistics), ``stats [B, K, S]`` (:data:`STAT_NAMES`) and ``valid [B, N]`` (None = all)."""

    z: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    stats: torch.Tensor
    valid: torch.Tensor | None


def score_stats(z: torch.Tensor, std: torch.Tensor, exclude: torch.Tensor | None, topk: int, beta: float) -> torch.Tensor:
    """``[B, K, S]`` statistics of each model's normalised score distribution for each query (see
    :data:`STAT_NAMES`), over the non-excluded columns. Only order-free quantities: sorted top-k values and the std."""
    b, k_models, n = z.shape
    k = max(1, min(int(topk), n))
    if exclude is not None and bool(exclude.any()):
        er, ec = exclude.nonzero(as_tuple=True)
        keep = z[er, :, ec].clone()
        z[er, :, ec] = float("-inf")  # in place on the few excluded entries, restored below
        top = z.topk(k, dim=-1).values
        z[er, :, ec] = keep
    else:
        top = z.topk(k, dim=-1).values  # [B, K, k], sorted descending
    ok = torch.isfinite(top)
    cnt = ok.sum(-1).clamp(min=1)
    t = top.masked_fill(~ok, 0.0)
    top1 = t[..., 0]
    top2 = torch.where(ok[..., 1], t[..., 1], top1) if k > 1 else top1
    mean_top = t.sum(-1) / cnt
    logits = (beta * top).masked_fill(~ok, float("-inf"))
    p = torch.softmax(logits, dim=-1)
    ent = -(p * torch.log(p.clamp(min=1e-30))).masked_fill(~ok, 0.0).sum(-1)
    ent = torch.where(cnt > 1, ent / torch.log(cnt.to(ent.dtype)).clamp(min=1e-12), torch.zeros_like(ent))
    log_std = torch.log(std.clamp(min=1e-12))
    return torch.stack([top1, top1 - top2, top1 - mean_top, ent, log_std], dim=-1)


def normalise_scores(raw: torch.Tensor, exclude: torch.Tensor | None = None, topk: int = 32, beta: float = 4.0) -> Normalised:
    """Per-query, per-model z-scores over the gallery and the score-distribution statistics.

    ``raw``: ``[B, K, N]``; ``exclude``: ``[B, N]`` bool, True on columns left out of the statistics (the reference).
    The mean and the variance are sums of fixed-point values (:func:`fixed_point`, :func:`integer_sum`; the excluded
    entries' exact share subtracted), hence bitwise independent of the gallery's order. A model giving one query the
    same score everywhere gets std 1 (its z-scores are then 0). The excluded columns' z-scores are computed like the
    others' (the metrics ignore the reference's fused score) but they enter no statistic."""
    if raw.dim() != 3:
        raise ValueError(f"raw scores must be [B, K, N], got {tuple(raw.shape)}")
    b, k_models, n = raw.shape
    if exclude is not None:
        er, ec = exclude.nonzero(as_tuple=True)
        cnt = (n - exclude.sum(1)).clamp(min=1).double()[:, None]
    else:
        er = ec = torch.zeros(0, dtype=torch.int64)
        cnt = torch.full((b, 1), float(max(n, 1)), dtype=torch.float64)
    q, scale = fixed_point(raw, MEAN_BITS)
    mean = ((integer_sum(q, MEAN_BITS) - _excluded_sum(q, er, ec)) / cnt / scale[..., 0].double()).float()
    dev = raw - mean[..., None]
    q, scale = fixed_point(dev, VAR_BITS)
    q2 = q.mul_(q)
    var = (integer_sum(q2, 2 * VAR_BITS) - _excluded_sum(q2, er, ec)) / cnt / scale[..., 0].double() ** 2
    std = var.sqrt().float()
    std = torch.where(std > 0, std, torch.ones_like(std))
    z = dev.div_(std[..., None])
    valid = None if exclude is None else ~exclude
    return Normalised(z, mean, std, score_stats(z, std, exclude, topk, beta), valid)


# ---------------------------------------------------------------------------------------------------------------------
# The fusion network
# ---------------------------------------------------------------------------------------------------------------------
class FusionNet(nn.Module):
    """Query-aware weights over K models + residual refinement of the K x N stack + 1x1 convolution (see the module
    docstring). Pointwise over candidates, hence permutation-equivariant over the gallery.

    ``stat_mean``/``stat_std`` (buffers, saved with the weights) standardise the statistics; :func:`fit` sets them
    from the training queries."""

    def __init__(self, num_models: int, hidden: int = 16, blocks: int = 1, gate_hidden: int = 32, num_stats: int = NUM_STATS,
                 init_seed: int = 0) -> None:
        super().__init__()
        if num_models < 1 or hidden < 1 or blocks < 1 or gate_hidden < 1:
            raise ValueError(f"FusionNet: bad sizes num_models={num_models} hidden={hidden} blocks={blocks} gate_hidden={gate_hidden}")
        self.num_models, self.hidden, self.num_stats = num_models, hidden, num_stats
        self.register_buffer("stat_mean", torch.zeros(num_models, num_stats))
        self.register_buffer("stat_std", torch.ones(num_models, num_stats))
        # The initial weights come from their own generator: a fused model is a pure function of its inputs, whatever
        # the global RNG state when it is built.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            self.gate = nn.Sequential(nn.Linear(num_models * num_stats, gate_hidden), nn.ReLU(),
                                      nn.Linear(gate_hidden, num_models))
            self.blocks = nn.ModuleList(
                nn.Sequential(nn.Linear(num_models, hidden), nn.ReLU(), nn.Linear(hidden, num_models)) for _ in range(blocks)
            )
            self.head = nn.Linear(num_models, 1)
        # Start as the mean of the normalised scores: uniform weights, no residual, unit head.
        nn.init.zeros_(self.gate[2].weight)
        nn.init.zeros_(self.gate[2].bias)
        for blk in self.blocks:
            nn.init.zeros_(blk[2].weight)
            nn.init.zeros_(blk[2].bias)
        nn.init.ones_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def set_stat_norm(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.stat_mean.copy_(mean)
        self.stat_std.copy_(std.clamp(min=1e-6))

    def weights(self, stats: torch.Tensor) -> torch.Tensor:
        """``[B, K]`` softmax weights of the models for each query, from ``stats [B, K, S]``."""
        x = ((stats - self.stat_mean) / self.stat_std).flatten(1)
        return torch.softmax(self.gate(x), dim=-1)

    def forward(self, z: torch.Tensor, stats: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """``z [B, K, C]`` normalised scores of C candidates, ``stats [B, K, S]`` -> fused scores ``[B, C]``."""
        w = self.weights(stats) if weights is None else weights
        b, k, c = z.shape
        # Channels first with every (query, candidate) pair as one column: [K, B*C]. Each 1x1 convolution is then one
        # plain [out, in] @ [in, B*C] product (skinny batched or row-wise products are several times slower on CPU).
        x = (z * w[:, :, None]).transpose(0, 1).reshape(k, b * c)
        for blk in self.blocks:
            lin1, lin2 = blk[0], blk[2]
            h = torch.addmm(lin1.bias[:, None], lin1.weight, x).relu_()
            _observe("hidden", h.view(-1, b, c).transpose(0, 1))
            x = x + torch.addmm(lin2.bias[:, None], lin2.weight, h)
        out = torch.addmm(self.head.bias[:, None], self.head.weight, x).view(b, c)
        _observe("fused", out)
        return out


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------------------------------
# Embedding tables of a split
# ---------------------------------------------------------------------------------------------------------------------
class SplitTable:
    """The frozen base models' embeddings of one split, computed once: per model the queries (dataset order) and the
    gallery (gallery order), plus image fingerprints (reference exclusion), reference columns and positives."""

    def __init__(self, dataset: CIRDataset, bases: Sequence[CIRMethod], names: Sequence[str], query: Sequence[Embedding],
                 gallery: Sequence[Embedding], query_fp: torch.Tensor, gallery_fp: torch.Tensor) -> None:
        if not (len(bases) == len(names) == len(query) == len(gallery)):
            raise ValueError("SplitTable: bases, names, query and gallery embeddings must have one entry per model")
        self.dataset, self.bases, self.names = dataset, list(bases), list(names)
        self.query, self.gallery = list(query), list(gallery)
        self.query_fp, self.gallery_fp = query_fp, gallery_fp
        self.num_queries, self.num_gallery = len(dataset.queries), len(dataset.gallery)
        for k, (q, g) in enumerate(zip(self.query, self.gallery)):
            if embedding_len(q) != self.num_queries or embedding_len(g) != self.num_gallery:
                raise ValueError(f"SplitTable: model {self.names[k]} has {embedding_len(q)} query / {embedding_len(g)} "
                                 f"gallery embeddings for {self.num_queries} queries / {self.num_gallery} images")
        gal = dataset.gallery
        src = dataset.files[0] if dataset.files else None
        ref, pos = [], []
        for q in dataset.queries:
            r = gal.index(q.reference) if q.reference in gal else -1
            ref.append(r)
            cols = []
            for t in dict.fromkeys(q.targets):
                if t not in gal:
                    raise DataError(src, q.qid, f"target {t!r} is not in the gallery")
                c = gal.index(t)
                if not (dataset.exclude_reference and c == r):
                    cols.append(c)
            pos.append(np.array(sorted(cols), dtype=np.int64))
        self.ref_col = torch.tensor(ref, dtype=torch.int64)
        self.positives = pos
        self._cast: dict[tuple[int, torch.dtype], Embedding] = {}

    @classmethod
    def build(cls, bases: Sequence[CIRMethod], names: Sequence[str], data: "SplitData", chunk: int = 512,
              progress: bool = False) -> "SplitTable":
        """Encode a split's queries (their evaluation text) and gallery with every base model, from cached features."""
        from tqdm.auto import tqdm

        from .views import FeatureView

        view = FeatureView(data.images, data.texts)
        ds = data.dataset
        img_tok = any(b.uses_image_tokens for b in bases)
        txt_tok = any(b.uses_text_tokens for b in bases)
        # Bases on different backbones read their own part of a multi: backbone's features.
        fp = feature_parts(bases)
        if fp is None:
            cut = [None] * len(bases)
        else:
            from .backbones.multi import part_slices

            parts, part_of = fp
            sl = part_slices(parts)
            cut = [sl[i] for i in part_of]
            want = composite_dims(parts)
            if int(view.img_global.shape[1]) != want.image_dim:
                raise FusionError(f"the base models read {len(parts)} backbones ({want.backbone_id}): their features "
                                  f"must come from that multi: backbone ({want.image_dim}-d global image features), "
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

    def select(self, members: Sequence[int]) -> "SplitTable":
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

    def query_subset(self, rows: Sequence[int] | np.ndarray) -> "SplitTable":
        """A table over the queries ``rows`` only (same gallery, models and embeddings, shared)."""
        import dataclasses

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

    def split_queries(self, fraction: float, seed: int = 0) -> tuple["SplitTable", "SplitTable"]:
        """``(fit, holdout)``: a seeded random ``fraction`` of the queries held out (for model selection)."""
        if not 0 < fraction < 1:
            raise ValueError(f"holdout fraction must be in (0, 1), got {fraction}")
        order = np.random.default_rng([seed, 7]).permutation(self.num_queries)
        n_hold = max(1, int(round(fraction * self.num_queries)))
        if n_hold >= self.num_queries:
            raise ValueError(f"{self.dataset.key}: {self.num_queries} queries are too few to hold {fraction:.0%} out")
        return self.query_subset(np.sort(order[n_hold:])), self.query_subset(np.sort(order[:n_hold]))

    def galleries(self, dtype: torch.dtype = torch.float32) -> list[Embedding]:
        """The gallery embeddings as the fused scoring reads them: default-similarity models' tensors in
        ``storage_dtype(dtype)`` (converted once and cached; shared with the table this one was selected from)."""
        parent = getattr(self, "_parent", None)
        if parent is not None:
            full = parent[0].galleries(dtype)
            return [full[i] for i in parent[1]]
        out = []
        for k, (b, g) in enumerate(zip(self.bases, self.gallery)):
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
        """``[B, N]`` columns left out of the statistics (fingerprint equal to the reference's) or None."""
        if not exclude_reference:
            return None
        return rows_of(self.query_fp, rows)[:, None] == self.gallery_fp[None, :]

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


@torch.no_grad()
def evaluate_base(table: SplitTable, k: int, chunk: int = 256) -> dict[str, float]:
    """Metrics of base model ``k`` alone (its own similarity)."""
    base, q, g = table.bases[k], table.query[k], table.gallery[k]
    return _metrics_from(lambda r: base.similarity(rows_of(q, r), g).float(), table.dataset, chunk)


@torch.no_grad()
def evaluate_fused(model: "DAFM", table: SplitTable, chunk: int = 256) -> dict[str, float]:
    """Metrics of a fused model on a split whose table holds exactly the model's bases, in its order."""
    was = model.training
    model.eval()
    try:
        g = table.gallery_bundle(model.score_dtype)
        return _metrics_from(lambda r: model.similarity(table.query_bundle(r), g), table.dataset, chunk)
    finally:
        model.train(was)


@torch.no_grad()
def explain(model: "DAFM", table: SplitTable, query_rows: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
    """``[B, K]`` effective weight of each base model for each query row (the gate's softmax: sums to 1). The fused
    score only sees model k through ``w_k * z_k``, so a weight near 0 means the model is ignored for that query."""
    rows = torch.as_tensor(np.asarray(query_rows, dtype=np.int64))
    return model.explain(table.query_bundle(rows), table.gallery_bundle(model.score_dtype))


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


@torch.no_grad()
def explain_all(model: "DAFM", table: SplitTable, chunk: int = 256) -> torch.Tensor:
    g = table.gallery_bundle(model.score_dtype)
    parts = [model.explain(table.query_bundle(slice(s, min(table.num_queries, s + chunk))), g)
             for s in range(0, table.num_queries, chunk)]
    return torch.cat(parts)


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class FusionConfig:
    epochs: int = 4
    min_steps: int = 0  # train at least this many steps: more epochs when the fit set is small (0 = just ``epochs``)
    holdout: float = 0.0  # without a validation table, hold this share of the fit queries out to pick the epoch
    keep_initial: bool = True  # the untrained network (mean of normalised scores) competes in the epoch selection
    batch_size: int = 64  # queries per optimisation step
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup: float = 0.05
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    tau0: float = 0.02
    dynamic_tau: bool = True
    s: float = 1000.0  # the paper's s in tau_t = tau_{t-1} * (1 - L_{t-1} / s)
    tau_min: float = 0.005
    tau_max: float = 0.05
    negatives: str = "shortlist"  # "shortlist" (hard + random, see module docstring) or "full"
    positives: str = "sum"  # several positives: "sum" (one softmax, their mass summed) or "each" (see multi_positive_nce)
    hard: int = 256
    random: int = 512
    tile: int = 128  # queries per block in full-gallery passes (fewer when the gallery is large)
    eval_chunk: int = 256
    val_metric: str = "auto"
    progress: bool = False

    def __post_init__(self) -> None:
        if self.positives not in POSITIVE_LOSSES:
            raise ValueError(f"positives must be one of {POSITIVE_LOSSES}, got {self.positives!r}")
        if self.negatives not in ("shortlist", "full"):
            raise ValueError(f"negatives must be 'shortlist' or 'full', got {self.negatives!r}")
        if not (0 < self.tau_min <= self.tau0 <= self.tau_max):
            raise ValueError(f"need 0 < tau_min <= tau0 <= tau_max, got {self.tau_min}, {self.tau0}, {self.tau_max}")
        if self.s <= 0:
            raise ValueError(f"s must be positive, got {self.s}")
        if not 0 <= self.holdout < 1:
            raise ValueError(f"holdout must be in [0, 1), got {self.holdout}")
        if self.epochs < 1 or self.batch_size < 1 or self.tile < 1 or self.hard < 0 or self.random < 0 or self.min_steps < 0:
            raise ValueError("epochs, batch_size and tile must be >= 1; hard, random and min_steps >= 0")

    def epochs_for(self, steps_per_epoch: int) -> int:
        """``epochs``, raised so that at least ``min_steps`` optimisation steps run."""
        return max(self.epochs, -(-self.min_steps // max(1, steps_per_epoch)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def next_tau(tau: float, loss: float, cfg: FusionConfig) -> float:
    """The dynamic temperature update ``tau * (1 - loss / s)``, clamped to ``[tau_min, tau_max]`` (fixed tau:
    unchanged)."""
    if not cfg.dynamic_tau:
        return tau
    return float(min(cfg.tau_max, max(cfg.tau_min, tau * (1.0 - loss / cfg.s))))


POSITIVE_LOSSES = ("sum", "each")


def multi_positive_nce(logits: torch.Tensor, positive: torch.Tensor, valid: torch.Tensor, mode: str = "sum") -> torch.Tensor:
    """InfoNCE of rows with one or more positive columns; ``logits`` may already hold log-weights (importance-sampled
    columns). ``mode="sum"``: mean over rows of ``-logsumexp(logits[positives]) + logsumexp(logits[valid])`` (one
    softmax, the positives' mass summed: satisfied once any positive is on top). ``mode="each"``: every positive
    against the negatives alone, ``softplus(logsumexp(logits[negatives]) - logit_p)``, averaged over the row's
    positives, then over rows (all positives must rank above the negatives: what mAP@k rewards). The two are equal
    for rows with one positive."""
    neg_inf = torch.finfo(logits.dtype).min
    if mode == "sum":
        allv = logits.masked_fill(~valid, neg_inf)
        posv = logits.masked_fill(~(positive & valid), neg_inf)
        return (torch.logsumexp(allv, dim=1) - torch.logsumexp(posv, dim=1)).mean()
    if mode != "each":
        raise ValueError(f"positive loss mode must be one of {POSITIVE_LOSSES}, got {mode!r}")
    pv = positive & valid
    neg_lse = torch.logsumexp(logits.masked_fill(~(valid & ~positive), neg_inf), dim=1)
    per = F.softplus(neg_lse[:, None] - logits).masked_fill(~pv, 0.0)
    return (per.sum(1) / pv.sum(1).clamp(min=1)).mean()


@dataclass
class Shortlists:
    """What the setup pass stores per training query: normalisation statistics and the z-scores of its candidates
    (its positives first, then its hardest candidates)."""

    rows: np.ndarray  # [Q'] table rows of the trainable queries
    mean: torch.Tensor  # [Q', K]
    std: torch.Tensor  # [Q', K]
    stats: torch.Tensor  # [Q', K, S]
    cand: torch.Tensor  # [Q', W] gallery columns (-1 = empty slot)
    cand_z: torch.Tensor  # [Q', K, W]
    cand_pos: torch.Tensor  # [Q', W] bool
    n_total: torch.Tensor  # [Q'] gallery columns that count (all but the excluded reference)


def _positive_matrix(table: SplitTable, rows: np.ndarray) -> tuple[torch.Tensor, int]:
    width = max(1, max(len(table.positives[r]) for r in rows))
    out = torch.full((len(rows), width), -1, dtype=torch.int64)
    for i, r in enumerate(rows):
        p = table.positives[r]
        out[i, : len(p)] = torch.from_numpy(p)
    return out, width


def _loss_mask(table: SplitTable, rows: np.ndarray, n: int) -> torch.Tensor:
    """``[B, N]`` True where a column is not a candidate for the loss (the excluded reference, by image id)."""
    m = torch.zeros(len(rows), n, dtype=torch.bool)
    if table.dataset.exclude_reference:
        ref = table.ref_col[torch.from_numpy(rows)]
        has = ref >= 0
        m[torch.nonzero(has).squeeze(1), ref[has]] = True
    return m


def prepare_shortlists(model: "DAFM", table: SplitTable, cfg: FusionConfig) -> Shortlists:
    """The setup pass: every trainable query against the whole gallery, once, in tiles."""
    from tqdm.auto import tqdm

    rows_all = table.trainable_rows()
    if len(rows_all) == 0:
        raise DataError(table.dataset.files[0] if table.dataset.files else None, None,
                        f"split {table.dataset.key} has no query with a retrievable target: nothing to train the fusion on")
    k_models, n = table.num_models, table.num_gallery
    pos_all, p_width = _positive_matrix(table, rows_all)
    hard = min(cfg.hard, n)
    width = p_width + hard
    q = len(rows_all)
    out = Shortlists(rows_all, torch.empty(q, k_models), torch.empty(q, k_models), torch.empty(q, k_models, NUM_STATS),
                     torch.full((q, width), -1, dtype=torch.int64), torch.zeros(q, k_models, width),
                     torch.zeros(q, width, dtype=torch.bool), torch.empty(q, dtype=torch.int64))
    tile = block_rows(n, k_models, cfg.tile)
    topk, beta, excl_ref = model.hparams["topk"], model.hparams["beta"], model.hparams["exclude_reference"]
    for s in tqdm(range(0, q, tile), desc=f"setup {table.dataset.key}", disable=not cfg.progress, leave=False):
        e = min(q, s + tile)
        rows = rows_all[s:e]
        rt = torch.from_numpy(rows)
        raw = table.raw_scores(rt, dtype=model.score_dtype)
        norm = normalise_scores(raw, table.exclusion(rt, excl_ref), topk, beta)
        out.mean[s:e], out.std[s:e], out.stats[s:e] = norm.mean, norm.std, norm.stats
        pos = pos_all[s:e]
        lmask = _loss_mask(table, rows, n)
        out.n_total[s:e] = n - lmask.sum(1)
        crit = norm.z.amax(1)  # what any model ranks high
        if norm.valid is not None:
            crit = crit.masked_fill(~norm.valid, float("-inf"))
        crit = crit.masked_fill(lmask, float("-inf"))
        has_pos = pos >= 0
        crit[torch.nonzero(has_pos)[:, 0], pos[has_pos]] = float("-inf")
        cand = pos.clone()
        cand_pos = has_pos.clone()
        if hard:
            hv, hi = crit.topk(hard, dim=1)
            hi = hi.masked_fill(~torch.isfinite(hv), -1)
            cand = torch.cat([cand, hi], 1)
            cand_pos = torch.cat([cand_pos, torch.zeros_like(hi, dtype=torch.bool)], 1)
        ok = cand >= 0
        z = torch.gather(norm.z, 2, cand.clamp(min=0)[:, None, :].expand(-1, k_models, -1))
        out.cand[s:e] = cand
        out.cand_z[s:e] = z.masked_fill(~ok[:, None, :], 0.0)
        out.cand_pos[s:e] = cand_pos
    return out


@dataclass
class FitResult:
    best_epoch: int
    val_metric: str | None
    best_metric: float | None
    val: dict[str, float]  # validation metrics of the kept epoch
    epochs: list[dict[str, Any]]
    steps: list[dict[str, float]]  # per step: loss, tau (the tau used), lr
    tau_final: float
    wall_s: float
    setup_s: float


def _step_generator(seed: int, step: int) -> torch.Generator:
    from .seeding import step_seed

    return torch.Generator().manual_seed(step_seed(seed, 7, step))


def _shortlist_loss(model: "DAFM", table: SplitTable, sl: Shortlists, idx: np.ndarray, tau: float, cfg: FusionConfig,
                    step: int) -> torch.Tensor:
    """InfoNCE of the queries ``idx`` (positions in the shortlists) over their candidates + random columns."""
    n = table.num_gallery
    rows = sl.rows[idx]
    it = torch.from_numpy(idx)
    cand, zc, pos = sl.cand[it], sl.cand_z[it], sl.cand_pos[it]
    valid_c = cand >= 0
    z_parts, valid_parts, pos_parts, logw_parts = [zc], [valid_c], [pos], [torch.zeros(cand.shape)]
    r = min(cfg.random, n)
    if r:
        cols = torch.randperm(n, generator=_step_generator(cfg.seed, step))[:r]
        raw = table.raw_scores(torch.from_numpy(rows), cols, model.score_dtype)
        zr = standardise(raw, sl.mean[it], sl.std[it])
        taken = _loss_mask(table, rows, n)
        has = valid_c
        taken[torch.nonzero(has)[:, 0], cand[has]] = True
        vr = ~taken[:, cols]
        n_rand = vr.sum(1)
        n_rest = sl.n_total[it] - valid_c.sum(1)
        logw = torch.where(n_rand > 0, torch.log(n_rest.clamp(min=1).double() / n_rand.clamp(min=1).double()),
                           torch.zeros(len(idx), dtype=torch.float64)).float()
        vr &= (n_rest > 0)[:, None]
        z_parts.append(zr)
        valid_parts.append(vr)
        pos_parts.append(torch.zeros_like(vr))
        logw_parts.append(logw[:, None].expand(-1, r))
    z = torch.cat(z_parts, 2)
    f = model.fusion(z, sl.stats[it])
    logits = f / tau + torch.cat(logw_parts, 1)
    return multi_positive_nce(logits, torch.cat(pos_parts, 1), torch.cat(valid_parts, 1), cfg.positives)


def _full_loss(model: "DAFM", table: SplitTable, rows: np.ndarray, tau: float, positives: str = "sum") -> torch.Tensor:
    rt = torch.from_numpy(rows)
    raw = table.raw_scores(rt, dtype=model.score_dtype)
    hp = model.hparams
    norm = normalise_scores(raw, table.exclusion(rt, hp["exclude_reference"]), hp["topk"], hp["beta"])
    f = model.fusion(norm.z, norm.stats)
    n = table.num_gallery
    pos = torch.zeros(len(rows), n, dtype=torch.bool)
    for i, r in enumerate(rows):
        pos[i, torch.from_numpy(table.positives[r])] = True
    return multi_positive_nce(f / tau, pos, ~_loss_mask(table, rows, n), positives)


def fit(model: "DAFM", train: SplitTable, val: SplitTable | None = None, cfg: FusionConfig | None = None,
        log: Callable[[dict[str, Any]], None] | None = None) -> FitResult:
    """Train ``model.fusion`` on ``train`` (a table holding exactly the model's bases, in order); keep the epoch with
    the best validation metric (the last one without ``val``). The bases stay frozen."""
    from tqdm.auto import tqdm

    from .evaluation import pick_val_metric
    from .optim import lr_at, make_optimizer

    cfg = cfg or FusionConfig()
    if train.num_models != model.num_models:
        raise ValueError(f"fit: the table holds {train.num_models} models, the fused model {model.num_models}")
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    sl = prepare_shortlists(model, train, cfg)
    # Standardise the gate's inputs with the training queries' statistics.
    st = sl.stats.double()
    model.fusion.set_stat_norm(st.mean(0).float(), st.std(0, unbiased=False).float())
    setup_s = time.perf_counter() - t0

    named = [(n, p) for n, p in model.fusion.named_parameters()]
    for _, p in named:
        p.requires_grad_(True)
    params = [p for _, p in named]
    opt = make_optimizer(named, cfg.lr, cfg.weight_decay)
    q = len(sl.rows)
    bs = min(cfg.batch_size, q)
    steps_per_epoch = max(1, q // bs)
    n_epochs = cfg.epochs_for(steps_per_epoch)
    total = n_epochs * steps_per_epoch
    tau = cfg.tau0
    step = 0
    steps: list[dict[str, float]] = []
    epochs: list[dict[str, Any]] = []
    best: tuple[float, int, dict[str, torch.Tensor], dict[str, float], float] | None = None
    metric_name: str | None = None
    n = train.num_gallery
    if val is not None and cfg.keep_initial:
        # Epoch -1: the untrained network, i.e. the mean of the normalised scores. Training only replaces it when
        # the held-out metric says the learned weights generalise.
        metrics = evaluate_fused(model, val, cfg.eval_chunk)
        metric_name = pick_val_metric(cfg.val_metric, metrics, val.dataset)
        best = (metrics[metric_name], -1, {k: v.detach().clone() for k, v in model.fusion.state_dict().items()},
                metrics, tau)
        epochs.append({"epoch": -1, "val": metrics, "tau": tau, "best": True})
    for epoch in range(n_epochs):
        order = np.random.default_rng([cfg.seed, epoch]).permutation(q)
        model.fusion.train()
        losses = []
        bar = tqdm(range(steps_per_epoch), desc=f"fusion epoch {epoch + 1}/{n_epochs}", disable=not cfg.progress, leave=False)
        for b in bar:
            idx = np.sort(order[b * bs : (b + 1) * bs])
            lr = lr_at(step, total, cfg.lr, cfg.warmup, cfg.min_lr_ratio)
            for g in opt.param_groups:
                g["lr"] = lr
            opt.zero_grad(set_to_none=True)
            if cfg.negatives == "shortlist":
                loss = _shortlist_loss(model, train, sl, idx, tau, cfg, step)
                loss.backward()
                loss_v = float(loss.detach())
            else:
                # Gradient accumulation over sub-tiles: memory O(sub-tile x N x max(K, hidden)).
                sub = block_rows(n, max(model.num_models, model.hparams["hidden"]), cfg.tile)
                loss_v = 0.0
                for s in range(0, len(idx), sub):
                    part = idx[s : s + sub]
                    li = _full_loss(model, train, sl.rows[part], tau, cfg.positives) * (len(part) / len(idx))
                    li.backward()
                    loss_v += float(li.detach())
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            steps.append({"step": step, "epoch": epoch, "loss": loss_v, "tau": tau, "lr": lr})
            if log:
                log({"type": "step", **steps[-1]})
            losses.append(loss_v)
            tau = next_tau(tau, loss_v, cfg)
            step += 1
            bar.set_postfix(loss=f"{loss_v:.3f}", tau=f"{tau:.4f}")
        rec: dict[str, Any] = {"epoch": epoch, "train_loss": float(np.mean(losses)), "tau": tau}
        if val is not None:
            metrics = evaluate_fused(model, val, cfg.eval_chunk)
            metric_name = pick_val_metric(cfg.val_metric, metrics, val.dataset)
            rec["val"] = metrics
            if best is None or metrics[metric_name] > best[0]:
                best = (metrics[metric_name], epoch, {k: v.detach().clone() for k, v in model.fusion.state_dict().items()},
                        metrics, tau)
                rec["best"] = True
        epochs.append(rec)
        if log:
            log({"type": "epoch", **rec})
    if best is not None:
        model.fusion.load_state_dict(best[2])
        best_metric, best_epoch, val_metrics, tau_best = best[0], best[1], best[3], best[4]
    else:
        best_metric, best_epoch, val_metrics, tau_best = None, n_epochs - 1, {}, tau
    model.tau.fill_(tau_best)
    model.fusion.eval()
    return FitResult(best_epoch, metric_name, best_metric, val_metrics, epochs, steps, tau_best,
                     time.perf_counter() - t0, setup_s)


# ---------------------------------------------------------------------------------------------------------------------
# Fusing: build, train, compare
# ---------------------------------------------------------------------------------------------------------------------
def fuse(train: SplitTable, val: SplitTable | None, cfg: FusionConfig | None = None, members: Sequence[int] | None = None,
         hparams: Mapping[str, Any] | None = None, base_info: Sequence[Mapping[str, Any]] | None = None,
         log: Callable[[dict[str, Any]], None] | None = None) -> tuple["DAFM", FitResult]:
    """Build a DAFM over the tables' models ``members`` (default all) and train it. ``val`` may hold more models
    (the same pool): it is narrowed to ``members`` too."""
    from .methods.dafm import DAFM

    cfg = cfg or FusionConfig()
    members = list(range(train.num_models)) if members is None else list(members)
    if val is None and cfg.holdout > 0:
        train, val = train.split_queries(cfg.holdout, cfg.seed)
    tr = train.select(members)
    va = None if val is None else val.select(members)
    info = None if base_info is None else [base_info[i] for i in members]
    torch.manual_seed(cfg.seed)
    model = DAFM.from_bases(tr.bases, names=tr.names, base_info=info,
                            exclude_reference=tr.dataset.exclude_reference, **dict(hparams or {}))
    res = fit(model, tr, va, cfg, log)
    return model, res


def baseline_model(table: SplitTable, members: Sequence[int] | None = None, hparams: Mapping[str, Any] | None = None) -> "DAFM":
    """The untrained fusion network: the mean of the normalised scores (see the module docstring)."""
    from .methods.dafm import DAFM

    t = table if members is None else table.select(members)
    return DAFM.from_bases(t.bases, names=t.names, exclude_reference=t.dataset.exclude_reference, **dict(hparams or {}))


# ---------------------------------------------------------------------------------------------------------------------
# Incremental analysis (the paper's Figure 3)
# ---------------------------------------------------------------------------------------------------------------------
def incremental_orders(names: Sequence[str], start: str, max_orders: int = 24, seed: int = 0) -> list[list[str]]:
    """Every order of adding the other models after ``start`` (all of them for up to 4 others' permutations =
    24; beyond, ``max_orders`` drawn at random, seeded)."""
    if start not in names:
        raise ValueError(f"--base {start!r} is not one of the base models {list(names)}")
    others = [n for n in names if n != start]
    if math.factorial(len(others)) <= max_orders:
        return [[start, *p] for p in itertools.permutations(others)]
    rng = np.random.default_rng(seed)
    seen: set[tuple[str, ...]] = set()
    while len(seen) < max_orders:
        seen.add(tuple(rng.permutation(others).tolist()))
    return [[start, *p] for p in sorted(seen)]


def incremental_analysis(train: SplitTable, val: SplitTable, evaluate_on: SplitTable, start: str, cfg: FusionConfig,
                         hparams: Mapping[str, Any] | None = None, metric: str | None = None,
                         trained: Mapping[frozenset[str], float] | None = None,
                         report: Callable[[str], None] | None = None) -> dict[str, Any]:
    """For every order of adding the other models to ``start``: the metric of the fusion of each prefix on
    ``evaluate_on`` (one fusion trained per distinct subset, reused across orders; ``trained`` may pre-fill subsets
    already measured). Returns the figures as JSON-ready data."""
    from .evaluation import pick_val_metric

    names = train.names
    orders = incremental_orders(names, start, seed=cfg.seed)
    values: dict[frozenset[str], float] = dict(trained or {})
    k0 = names.index(start)
    single = evaluate_base(evaluate_on, k0, cfg.eval_chunk)
    metric = metric or pick_val_metric(cfg.val_metric, single, evaluate_on.dataset)
    values.setdefault(frozenset([start]), single[metric])
    out_orders = []
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
    subsets = [{"models": [n for n in names if n in key], "value": v} for key, v in values.items()]
    subsets.sort(key=lambda d: (len(d["models"]), d["models"]))
    return {"start": start, "metric": metric, "split": evaluate_on.dataset.key, "orders": out_orders, "subsets": subsets}


def plot_incremental(figures: Mapping[str, Any], path: str | Path) -> Path:
    """The Figure-3-style plot: x = number of models, one line per order of addition (PNG, written atomically)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io import atomic_write_bytes

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for o in figures["orders"]:
        xs = list(range(1, len(o["values"]) + 1))
        ax.plot(xs, o["values"], marker="o", label=" \u2192 ".join(o["order"]))
    n = max(len(o["values"]) for o in figures["orders"])
    ax.set_xticks(list(range(1, n + 1)))
    ax.set_xlabel("number of models fused")
    ax.set_ylabel(f"{figures['metric']} ({figures['split']})")
    ax.set_title(f"Incremental fusion from {figures['start']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


# ---------------------------------------------------------------------------------------------------------------------
# Compatibility of base checkpoints
# ---------------------------------------------------------------------------------------------------------------------
def dataset_family(key: str | None) -> str | None:
    """``"synthetic/train"`` -> ``"synthetic"``; ``"fashioniq/dress/train"`` -> ``"fashioniq/dress"``."""
    if not key:
        return None
    parts = key.split("/")
    return "/".join(parts[:-1]) if len(parts) > 1 else key


def check_compatible(bases: Sequence[Mapping[str, Any]], dataset: CIRDataset | None = None) -> list[str]:
    """Refuse base checkpoints that cannot be fused; returns notes for what could not be verified.

    Each entry: ``{"name", "path", "config"}`` (``config``: the checkpoint's config.json) and optionally
    ``"manifest"`` (the run's manifest.json). Raises :class:`FusionError` when fewer than two models are given, a base
    is itself a fusion, bases on the same backbone differ in its weights or preprocessing (bases on different
    backbones are fine: the fused model reads a ``multi:`` backbone of them), the training datasets differ (also from ``dataset``), or the runs' training annotation files differ
    (same dataset name, different data: different galleries)."""
    notes: list[str] = []
    if len(bases) < 2:
        raise FusionError(f"DAFM fuses K >= 2 base models; got {len(bases)}")
    for b in bases:
        if b["config"].get("method") == "dafm":
            raise FusionError(f"{b['path']}: is already a fused (dafm) checkpoint; fuse its base models directly")
    first: dict[str, Mapping[str, Any]] = {}
    for b in bases:
        bb = b["config"].get("backbone", {})
        bid = bb.get("id")
        if isinstance(bid, str) and bid.startswith("multi:"):
            raise FusionError(f"{b['path']}: trained on a multi: backbone; a base model must read one backbone")
        ref = first.setdefault(bid, b)
        for field_ in ("weights_hash", "preprocess_id"):
            a, c = ref["config"].get("backbone", {}).get(field_), bb.get(field_)
            if a != c:
                raise FusionError(
                    f"{b['path']} uses backbone {bid!r} with {field_} {c!r} but {ref['path']} uses {a!r}: base models "
                    "on the same backbone must use the same weights and preprocessing")
    if len(first) > 1:
        notes.append(f"the base models read {len(first)} backbones ({', '.join(map(str, first))}): the fused model "
                     "reads them side by side (a multi: backbone)")
    fams = {b["name"]: dataset_family(b["config"].get("dataset")) for b in bases}
    known = {n: f for n, f in fams.items() if f}
    if len(set(known.values())) > 1:
        raise FusionError("base models were trained on different datasets: "
                          + ", ".join(f"{n} on {b['config'].get('dataset')!r}" for n, b in zip(fams, bases)))
    unknown = [n for n, f in fams.items() if not f]
    if unknown:
        notes.append(f"training dataset not recorded for {', '.join(unknown)}: not checked")
    if dataset is not None:
        fam = dataset_family(dataset.key)
        wrong = {n: f for n, f in known.items() if f != fam}
        if wrong:
            raise FusionError(f"fusing on {fam!r} but " + ", ".join(f"{n} was trained on {f!r}" for n, f in wrong.items()))
    digests = {}
    for b in bases:
        man = b.get("manifest")
        rec = (man or {}).get("datasets", {}).get("train") if isinstance(man, Mapping) else None
        if rec and rec.get("files"):
            digests[b["name"]] = (tuple(sorted(rec["files"].values())), rec.get("num_gallery"))
    if len(set(digests.values())) > 1:
        raise FusionError("base models were trained on different data (annotation files or gallery sizes differ): "
                          + "; ".join(f"{n}: gallery {d[1]}, files {[h[:12] for h in d[0]]}" for n, d in digests.items()))
    missing = [b["name"] for b in bases if b["name"] not in digests]
    if missing and len(bases) > 1:
        notes.append(f"no run manifest for {', '.join(missing)}: training data files not compared")
    return notes


__all__ = [
    "BLOCK_ELEMS",
    "SCORE_DTYPES",
    "STAT_NAMES",
    "FitResult",
    "FusionConfig",
    "FusionError",
    "FusionNet",
    "Normalised",
    "Shortlists",
    "SplitTable",
    "base_scores",
    "baseline_model",
    "block_rows",
    "check_compatible",
    "composite_dims",
    "count_parameters",
    "dataset_family",
    "dot_or_maxsim",
    "evaluate_base",
    "evaluate_fused",
    "explain",
    "explain_all",
    "explanation_summary",
    "feature_parts",
    "fit",
    "fixed_point",
    "fuse",
    "fusion_backbone",
    "image_fingerprint",
    "incremental_analysis",
    "incremental_orders",
    "int8_copy",
    "integer_sum",
    "multi_positive_nce",
    "next_tau",
    "normalise_scores",
    "observe_score_blocks",
    "plot_incremental",
    "prepare_shortlists",
    "score_stats",
    "single_thread_if_small",
    "standardise",
    "storage_dtype",
    "take_embeddings",
]
