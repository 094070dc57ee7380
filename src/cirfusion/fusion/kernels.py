"""Score kernels of the fusion: each base model's raw scores for a tile of queries, their exact order-free
normalisation, and the statistics the fusion network's gate reads. Nothing here trains.

**Permutation equivariance over candidates.** Every statistic over the gallery is computed so that it does not
depend on the column order, *bitwise*: maxima and top-k values are order-free, and the sums behind the mean and the
standard deviation are taken in fixed point (:func:`integer_sum`: integer-valued floats, every partial sum exact), so
the order of addition does not matter.

**Precision.** Models with the default similarity (cosine / max-sim) are scored by :func:`dot_or_maxsim` in a fused
model's ``score_dtype``: ``float32`` (exact), ``bfloat16`` or ``float16`` (the gallery stored at half the bytes;
products accumulate in float32 and are rounded to the half type: float16 scores move by ~1e-4, bfloat16 ones by
~1e-2), or ``int8`` (the float16 gallery's int8 copy: one scale per gallery vector, made once and cached; bfloat16
query, float32 accumulation; a quarter of the float32 bytes, scores within ~3e-3). Which is fastest depends on the
CPU (native float16 or bfloat16 arithmetic or neither), so the default, ``auto``, times them on the machine and keeps
the fastest that stays exact enough (:mod:`cirfusion.fusion.score_paths`). Larger query batches widen cache-sized
gallery tiles to float32 for a float32 GEMM (CPU half-precision GEMMs are slow).

The fast paths (float16 / int8 products, fixed-point sums) each have a plain float64 reference next to them
(:func:`reference_dot_or_maxsim`, :func:`reference_normalise`) that the tests compare them with.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..embeddings import Embedding
from ..errors import CirfusionError
from ..methods.base import CIRMethod

STAT_NAMES = ("top1", "margin", "topk_gap", "topk_entropy", "log_std")
NUM_STATS = len(STAT_NAMES)
# A score block ([queries, models, gallery] raw scores or [queries, gallery x hidden] activations) stays under this
# many elements: 2^23 float32 = 32 MiB per tensor, whatever the gallery size.
BLOCK_ELEMS = 1 << 23
# Normalising and fusing a block this small (one query over ~20k candidates) is a chain of ~30 short element-wise ops:
# on one thread each costs less than waking a second one (measured: 1.9 ms vs 2.7 ms per query on 2 threads).
SINGLE_THREAD_ELEMS = 1 << 18
SCORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.int8}
# Up to this many query vectors, half-precision products run as half-precision matrix-vector products (the fastest way
# to stream a half-precision gallery); beyond, gallery tiles are widened to float32 in a cache-sized buffer for a float32
# GEMM (CPU half GEMMs are slow). Both accumulate in float32 on the same inputs; the first rounds its result to the half type.
SMALL_BATCH = 16
_UPCAST_ROWS = 4096
# Fixed-point precision of the sums behind the mean (relative to the row's largest |score|) and the variance (relative
# to the largest |deviation|): far below what a z-score needs, and it makes the statistics order-free.
MEAN_BITS, VAR_BITS = 16, 10


class FusionError(CirfusionError, ValueError):
    """Base models that cannot be fused (different datasets, galleries or backbones; fewer than two; ...)."""


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


# ---------------------------------------------------------------------------------------------------------------------
# Observing score blocks (memory safety is by design; tests check it through this hook)
# ---------------------------------------------------------------------------------------------------------------------
_observers: list[Callable[[str, tuple[int, ...]], None]] = []


def observe(kind: str, t: torch.Tensor) -> None:
    """Report a materialised score block to the :func:`observe_score_blocks` recorders (none: free)."""
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
# Image fingerprints (the reference exclusion)
# ---------------------------------------------------------------------------------------------------------------------
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


def fingerprint_exclusion(query_fp: torch.Tensor, gallery_fp: torch.Tensor) -> torch.Tensor:
    """``[B, N]`` True where a gallery image's fingerprint equals the query reference's: how a fused model, which
    sees only features (no image ids), leaves the reference out, at inference and when fitted alike."""
    return query_fp[:, None] == gallery_fp[None, :]


# ---------------------------------------------------------------------------------------------------------------------
# Raw scores: float32, bfloat16, float16 and int8 paths, and their reference
# ---------------------------------------------------------------------------------------------------------------------
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
_INT8_LOCK = threading.Lock()


def int8_copy(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values [R, D] int8, scale [R] float32)`` of a gallery ``g`` (``[R, D]``, or ``[N, M, D]`` flattened to
    ``R = N * M`` vectors), with ``g ~ values * scale``;
    computed once per tensor (cached while ``g`` lives and is not modified in place)."""
    key = id(g)
    with _INT8_LOCK:  # a fused model may score its bases side by side on several threads (DAFM.base_map)
        hit = _INT8_CACHE.get(key)
        if hit is None or hit.ref() is not g or hit.version != g._version:
            for k in [k for k, v in list(_INT8_CACHE.items()) if v.ref() is None]:
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


def dot_or_maxsim(q: torch.Tensor, g: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[B, N]`` float32: the default similarity of :mod:`cirfusion.methods.base` (inner product; max over vector pairs
    when either side is multi-vector), computed over the flattened vectors with the gallery tiled (the generic einsum
    path copies a multi-vector gallery on every call).

    ``dtype=float16`` or ``bfloat16``: both sides are rounded to that type (the gallery should already be stored so: that
    halves the bytes read per query, and converting on every call would cost more than it saves); products accumulate
    in float32. A float16 score differs from the float32 one by ~1e-4 (the precision of the fp16 feature cache itself),
    a bfloat16 one by up to ~1e-2.
    ``dtype=int8``: the float gallery's cached int8 copy (:func:`int8_copy`). Reference: :func:`reference_dot_or_maxsim`."""
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


def reference_dot_or_maxsim(q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``[B, N]`` float64: the plain definition of :func:`dot_or_maxsim` (every vector pair's inner product in float64,
    the max over pairs), untiled and unquantised: what the fast paths are tested against."""
    q3 = (q if q.dim() == 3 else q[:, None, :]).double()
    g3 = (g if g.dim() == 3 else g[:, None, :]).double()
    return torch.einsum("bqd,ngd->bnqg", q3, g3).amax(dim=(2, 3))


def uses_default_similarity(base: CIRMethod) -> bool:
    """True when ``base`` scores with the inherited cosine / max-sim similarity (so :func:`dot_or_maxsim` may)."""
    return type(base).similarity is CIRMethod.similarity


def base_scores(bases: Sequence[CIRMethod], queries: Sequence[Embedding], galleries: Sequence[Embedding],
                dtype: torch.dtype = torch.float32, map_fn: Callable[..., Iterable[Any]] = map) -> torch.Tensor:
    """``[B, K, N]`` float32: each base model's own similarity, no gradient. Bases with the default similarity are
    scored by :func:`dot_or_maxsim` in ``dtype``; others by their own ``similarity``. ``map_fn`` maps the scoring
    of one base over the K bases (``map``: in turn, here; a thread pool's ``map``: the bases side by side, each the
    same computation, so the same scores)."""
    def one(k: int) -> torch.Tensor:
        base, q, g = bases[k], queries[k], galleries[k]
        with torch.no_grad():  # grad mode is per thread: set here, where the work runs
            fast = uses_default_similarity(base) and isinstance(q, torch.Tensor) and isinstance(g, torch.Tensor)
            return dot_or_maxsim(q, g, dtype) if fast else base.similarity(q, g).float()

    if not len(bases) == len(queries) == len(galleries):
        raise FusionError(f"base_scores: {len(bases)} bases, {len(queries)} queries, {len(galleries)} galleries")
    with torch.no_grad():
        raw = torch.stack(list(map_fn(one, range(len(bases)))), 1)
        # One pass for the finiteness check: a row sum is finite iff every score in it is (scores summing past 3e38
        # are no scores either); cheaper than a bool tensor per model on a lone query's tile.
        bad = ~torch.isfinite(raw.sum(-1)).all(0)
        if bool(bad.any()):
            k = int(bad.nonzero()[0])
            raise FusionError(f"base model {k} ({bases[k].method_name}) produced non-finite scores")
    observe("raw", raw)
    return raw


# ---------------------------------------------------------------------------------------------------------------------
# Exact order-free statistics (fixed point), normalisation, and its reference
# ---------------------------------------------------------------------------------------------------------------------
def pow2(shift: torch.Tensor) -> torch.Tensor:
    """Exact float32 powers of two ``2**shift`` (built from the exponent bits: no pow/exp rounding)."""
    return ((shift.clamp(-126, 127).to(torch.int32) + 127) << 23).view(torch.float32)


def fixed_point(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` scaled by an exact power of two per row (last dimension) so the row's largest magnitude is below
    ``2**bits``, then rounded: integer-valued float32 ``q`` and the ``[..., 1]`` scale (``x ~ q / scale``)."""
    m = torch.maximum(x.amax(-1, keepdim=True), -x.amin(-1, keepdim=True))  # not aminmax: 13x slower on this CPU
    _, e = torch.frexp(m)  # m = f * 2**e with f in [0.5, 1): |x| < 2**e
    scale = pow2(bits - e)
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
    n = z.shape[-1]
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
    same score everywhere (to the mean's fixed-point resolution) gets std 1 and z-scores exactly 0. The excluded
    columns' z-scores are computed like the others' (the metrics ignore the reference's fused score) but they enter no
    statistic.
    Reference: :func:`reference_normalise`."""
    if raw.dim() != 3:
        raise ValueError(f"raw scores must be [B, K, N], got {tuple(raw.shape)}")
    b, _, n = raw.shape
    if exclude is not None:
        er, ec = exclude.nonzero(as_tuple=True)
        cnt = (n - exclude.sum(1)).clamp(min=1).double()[:, None]
    else:
        er = ec = torch.zeros(0, dtype=torch.int64)
        cnt = torch.full((b, 1), float(max(n, 1)), dtype=torch.float64)
    q, mscale = fixed_point(raw, MEAN_BITS)
    mean = ((integer_sum(q, MEAN_BITS) - _excluded_sum(q, er, ec)) / cnt / mscale[..., 0].double()).float()
    dev = raw - mean[..., None]
    q, scale = fixed_point(dev, VAR_BITS)
    q2 = q.mul_(q)
    var = (integer_sum(q2, 2 * VAR_BITS) - _excluded_sum(q2, er, ec)) / cnt / scale[..., 0].double() ** 2
    std = var.sqrt().float()
    # A constant row's fixed-point mean misses its value by up to half the mean's resolution 1/mscale, and dividing
    # that residue by its own std would give z = +-1: a std within that resolution is treated as 0 (z exactly 0, std
    # 1), so a model that tells no candidates apart is exactly what the fusion sees as an absent one (fusion.shapley).
    flat = std <= 1.0 / mscale[..., 0]
    std = torch.where((std > 0) & ~flat, std, torch.ones_like(std))
    z = dev.div_(std[..., None])
    if bool(flat.any()):
        z[flat] = 0.0
    valid = None if exclude is None else ~exclude
    return Normalised(z, mean, std, score_stats(z, std, exclude, topk, beta), valid)


def reference_normalise(raw: torch.Tensor, exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(z, mean, std)`` in float64 by the plain definition: the mean and the (population) standard deviation of each
    (query, model) row over its non-excluded columns, std 1 where it is 0. What :func:`normalise_scores`'s fixed-point
    sums are tested against."""
    x = raw.double()
    keep = torch.ones_like(x, dtype=torch.bool) if exclude is None else ~exclude[:, None, :].expand_as(x)
    cnt = keep.sum(-1).clamp(min=1)
    mean = x.masked_fill(~keep, 0.0).sum(-1) / cnt
    dev = x - mean[..., None]
    std = (dev.masked_fill(~keep, 0.0) ** 2).sum(-1).div(cnt).sqrt()
    std = torch.where(std > 0, std, torch.ones_like(std))
    return dev / std[..., None], mean, std


__all__ = [
    "BLOCK_ELEMS",
    "MEAN_BITS",
    "NUM_STATS",
    "SCORE_DTYPES",
    "SINGLE_THREAD_ELEMS",
    "SMALL_BATCH",
    "STAT_NAMES",
    "VAR_BITS",
    "FusionError",
    "Normalised",
    "base_scores",
    "block_rows",
    "dot_or_maxsim",
    "fixed_point",
    "image_fingerprint",
    "int8_copy",
    "integer_sum",
    "normalise_scores",
    "observe",
    "observe_score_blocks",
    "pow2",
    "reference_dot_or_maxsim",
    "reference_normalise",
    "score_stats",
    "single_thread_if_small",
    "standardise",
    "storage_dtype",
    "uses_default_similarity",
]
