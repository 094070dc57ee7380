"""``score_dtype="auto"``: the fastest exact-enough way to score a fused query's K galleries on *this* machine.

A fused query reads every base model's gallery, so its floor is memory bandwidth, and which precision streams fastest
depends on the CPU: one with native float16 arithmetic reads a float16 gallery fastest, one without it (but with
native bfloat16) is 2-3x slower in float16 than in bfloat16 or even float32. One machine's measurement is not a
default, so a fused model with ``score_dtype="auto"`` (the default) decides at first use, once per machine:

1. :func:`probe_paths` builds a fixed-seed probe gallery of :data:`PROBE_ROWS` x :data:`PROBE_DIM` unit vectors (too
   big for any cache, which is the regime where the choice matters) made of tight clusters, so every probe query --
   a gallery vector plus a little noise -- has close-scored nearest neighbours, the hard case for a rounded score.
2. It times one query against it in each path of :data:`PATHS` (float32, bfloat16, float16, int8; the fastest
   of several passes) and measures each path's top-10 overlap with float32 over the probe queries.
3. :func:`choose_score_dtype` keeps the fastest path whose overlap is at least :data:`MIN_TOP10_OVERLAP`; float32,
   the reference, always passes.

The probe's figures are cached in ``~/.cache/cirfusion/score_paths.json`` (``$CIRFUSION_SCORE_PATHS`` names another
file), keyed by the CPU model, torch's vector capability and the torch version, so they are measured once per machine
(whatever the thread count at the time: a fused model scores with the same path when fitted on one thread and when
queried on every core). An explicit ``score_dtype`` on the model always wins, and is what makes a fused model's
scores identical across machines; ``auto`` makes them identical on one machine (the cached choice), while two
machines may pick two paths whose scores differ by the rounding above. The choice and the figures behind it are what
:meth:`cirfusion.methods.dafm.DAFM.score_path` returns and ``cirfusion info`` prints.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..io import atomic_write_json
from .kernels import SCORE_DTYPES, dot_or_maxsim, storage_dtype

PATHS = ("float32", "bfloat16", "float16", "int8")
PROBE_ROWS, PROBE_DIM = 65_536, 256  # 64 MiB in float32: bigger than any last-level cache we run on
PROBE_QUERIES = 32
MIN_TOP10_OVERLAP = 0.99
_REPEATS = 9
_memo: dict[str, dict[str, dict[str, float]]] = {}  # per process: the file is read once


@dataclass
class ScorePath:
    """The scoring path a fused model uses: ``dtype`` (a :data:`PATHS` name), how (``"auto"`` or ``"explicit"``), and
    for ``auto`` the probe's milliseconds per path on this machine and each path's top-10 overlap with float32."""

    dtype: str
    how: str
    probe_ms: dict[str, float] = field(default_factory=dict)
    overlap: dict[str, float] = field(default_factory=dict)
    machine: str = ""

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def machine_key() -> str:
    """What the choice depends on: CPU model, torch's vector capability, torch version. Not the thread count: one
    model must score with one path whether it is fitted (one thread, cirfusion.threads) or queried (every core)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cap = torch.backends.cpu.get_cpu_capability()
    return f"{cpu} | {cap} | torch {torch.__version__}"


def native_dtypes() -> list[str]:
    """The reduced precisions this CPU computes natively, from its flags (informational: every path runs anywhere,
    the probe decides)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
    except OSError:
        flags = []
    out = []
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        out.append("bfloat16")
    if "avx512_fp16" in flags or "amx_fp16" in flags:
        out.append("float16")
    if "avx512_vnni" in flags or "avx_vnni" in flags or "amx_int8" in flags:
        out.append("int8")
    return out


def cache_file() -> Path:
    env = os.environ.get("CIRFUSION_SCORE_PATHS")
    return Path(env) if env else Path.home() / ".cache" / "cirfusion" / "score_paths.json"


def _best_ms(fn: Callable[[], object], repeats: int = _REPEATS) -> float:
    """The fastest of ``repeats`` calls: on a shared machine, other processes only ever add time, so the minimum is
    the steadiest estimate of what the path itself costs."""
    fn()
    fn()  # warm-up: first-call allocations and (for int8) the quantised copy
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1000.0


def _probe(rows: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The probe gallery (``rows`` unit vectors in clusters of ~64) and :data:`PROBE_QUERIES` queries near its
    vectors."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(max(1, rows // 64), dim, generator=g)
    member = torch.randint(0, centres.shape[0], (rows,), generator=g)
    gallery = F.normalize(centres[member] + 0.3 * torch.randn(rows, dim, generator=g), dim=-1)
    picks = torch.linspace(0, rows - 1, PROBE_QUERIES).round().long()
    queries = F.normalize(gallery[picks] + 0.01 * torch.randn(PROBE_QUERIES, dim, generator=g), dim=-1)
    return gallery, queries


def probe_paths(rows: int = PROBE_ROWS, dim: int = PROBE_DIM) -> dict[str, dict[str, float]]:
    """``{"ms": {path: ms of one query (fastest of several passes)}, "overlap": {path: top-10 overlap with float32}}`` on the probe."""
    gallery, queries = _probe(rows, dim)
    ms, overlap = {}, {}
    with torch.no_grad():
        exact = dot_or_maxsim(queries, gallery, torch.float32).topk(10, dim=1).indices.tolist()
        one = queries[:1]
        for name in PATHS:
            dt = SCORE_DTYPES[name]
            stored = gallery.to(storage_dtype(dt))

            def score(s: torch.Tensor = stored, d: torch.dtype = dt) -> torch.Tensor:
                return dot_or_maxsim(one, s, d)

            ms[name] = _best_ms(score)
            got = dot_or_maxsim(queries, stored, dt).topk(10, dim=1).indices.tolist()
            overlap[name] = sum(len(set(a) & set(b)) / 10 for a, b in zip(exact, got, strict=True)) / len(exact)
    return {"ms": ms, "overlap": overlap}


def _valid(entry: object) -> bool:
    return (isinstance(entry, dict) and all(isinstance(entry.get(k), dict) and set(entry[k]) == set(PATHS)
                                            for k in ("ms", "overlap")))


def measured_paths(refresh: bool = False) -> dict[str, dict[str, float]]:
    """This machine's :func:`probe_paths` figures: measured once, then read from the cache file (``refresh``
    measures again)."""
    key = machine_key()
    path = cache_file()
    memo_key = f"{path}|{key}"
    if not refresh and memo_key in _memo:
        return _memo[memo_key]
    cached: dict[str, object] = {}
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
        cached = loaded if isinstance(loaded, dict) else {}
    except (OSError, ValueError):
        cached = {}
    entry = None if refresh else cached.get(key)
    if not _valid(entry):
        entry = probe_paths()
        cached[key] = entry
        try:
            atomic_write_json(path, cached)
        except OSError:  # a read-only home still gets the (uncached) choice
            pass
    assert isinstance(entry, dict)
    _memo[memo_key] = entry
    return entry


def choose_score_dtype(refresh: bool = False) -> ScorePath:
    """The fastest path on this machine whose probe top-10 overlap with float32 is at least
    :data:`MIN_TOP10_OVERLAP` (:func:`measured_paths`)."""
    fig = measured_paths(refresh)
    ms, overlap = fig["ms"], fig["overlap"]
    ok = [p for p in PATHS if p == "float32" or overlap[p] >= MIN_TOP10_OVERLAP]
    best = min(ok, key=lambda p: (ms[p], PATHS.index(p)))
    return ScorePath(best, "auto", dict(ms), dict(overlap), machine_key())


__all__ = ["MIN_TOP10_OVERLAP", "PATHS", "PROBE_DIM", "PROBE_QUERIES", "PROBE_ROWS", "ScorePath", "cache_file",
           "choose_score_dtype", "machine_key", "measured_paths", "native_dtypes", "probe_paths"]
