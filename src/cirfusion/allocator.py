"""Keep freed memory in the process for reuse, instead of handing every large block back to the OS.

glibc serves an allocation of more than 32 MiB (its largest dynamic mmap threshold) with a fresh ``mmap`` and
unmaps it on ``free``. A training step on cached token maps allocates such blocks every step (the hard negatives'
token maps, attention's packed key/value projections and their gradients: a ``[2, 64, 507, 128]`` float32 tensor is
33 MiB), so every step page-faults them in again: about 100 ms per block on this project's VM, and a third of a
CLIP4CIR step. :func:`keep_freed_memory` raises glibc's mmap and trim thresholds (``mallopt``) so those blocks stay
in the heap and are reused. Arithmetic is unchanged, so results are bit-identical; peak memory is the same, but it
is returned to the OS only at exit. ``benchmarks/allocator.py`` measures the training steps with it off and on.

Called by :func:`cirfusion.train.train`. ``CIRFUSION_MALLOPT=0`` turns it off; it does nothing where the C library
is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks up to this size come from the heap and stay there when freed; larger ones (a whole feature matrix) are
# still mapped and unmapped on their own.
MMAP_THRESHOLD = 512 << 20
TRIM_THRESHOLD = 1 << 30
ENV = "CIRFUSION_MALLOPT"

_done: bool | None = None


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds once per process; True if they are set (now or before). False when
    ``$CIRFUSION_MALLOPT`` is ``0`` or the C library has no ``mallopt`` (not glibc)."""
    global _done
    if _done is not None:
        return _done
    if os.environ.get(ENV, "1").strip() == "0":
        _done = False
        return _done
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        _done = False
        return _done
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; setting the mmap threshold also turns off glibc's dynamic threshold.
    _done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _done


__all__ = ["keep_freed_memory"]
