"""Torch intra-op threads, set per workload rather than left to torch (which takes every core).

On 2 *shared* cores a second torch thread often waits for a core another process holds, and every small operator of a
training step then waits for it: ``benchmarks/threads.py`` measured training a pool head (CLIP4CIR at the embedded
backbone's sizes) 6.7x slower on 2 threads than on 1 while the machine was busy, and DAFM's fused query 1.7x slower.
The heads are small (a few hundred thousand parameters, batches of 64): on the same 2 cores with nothing else running,
2 threads train them only 1.2-1.6x faster (clip4cir 0.81x the time, blip4cir-bi 0.70x, tg-cir 0.64x, sprc 0.71x;
the fused query 1.11x *slower*), while on a busy machine they were 6.7x slower: one thread gives up at most a third of
the time and cannot collapse. The backbone's convolutions are large enough to gain from every core. Hence:

=========== ========= =============================================================================================
workload    threads   where
=========== ========= =============================================================================================
``train``   1         :func:`cirfusion.train.train` (the pool's heads, any method's training stages)
``fuse``    1         :func:`cirfusion.fusion.fit` (DAFM's fusion network)
``features`` all      filling the feature cache (the backbone's forward passes)
=========== ========= =============================================================================================

Override: a function's ``threads=`` argument, else :func:`set_override` (what ``--threads N`` on the command line
does, for every workload of the command), else ``$CIRFUSION_THREADS`` for every workload, else the table. The count is process-wide in torch, so :func:`torch_threads` restores the caller's on
exit.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Literal

import torch

from .errors import CirfusionError

Workload = Literal["train", "fuse", "features"]
WORKLOAD_THREADS: dict[str, int | None] = {"train": 1, "fuse": 1, "features": None}  # None: every usable core
ENV = "CIRFUSION_THREADS"
_override: int | None = None


class ThreadsError(CirfusionError, ValueError):
    """A thread count that is not a positive integer."""


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _check(n: object) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ThreadsError(f"threads must be a positive integer, got {n!r}")
    return n


def set_override(n: int | None) -> None:
    """Every workload of this process runs on ``n`` threads (None: back to the defaults). The command line's
    ``--threads N`` calls this, and sets torch's count for everything else the command does."""
    global _override
    _override = None if n is None else _check(n)
    if n is not None:
        torch.set_num_threads(n)


def threads_for(workload: Workload, override: int | None = None) -> int:
    """The torch threads ``workload`` runs on: ``override``, else :func:`set_override`'s count, else
    ``$CIRFUSION_THREADS``, else the module's table."""
    if override is not None:
        return _check(override)
    if _override is not None:
        return _override
    env = os.environ.get(ENV)
    if env:
        try:
            n = int(env)
        except ValueError:
            n = 0
        if n < 1:
            raise ThreadsError(f"${ENV}={env!r}: expected a positive integer")
        return n
    if workload not in WORKLOAD_THREADS:
        raise ThreadsError(f"unknown workload {workload!r}; expected one of {sorted(WORKLOAD_THREADS)}")
    n_table = WORKLOAD_THREADS[workload]
    return usable_cores() if n_table is None else n_table


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the body on ``n`` torch intra-op threads; the caller's count is restored on exit."""
    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


__all__ = ["ENV", "WORKLOAD_THREADS", "ThreadsError", "Workload", "set_override", "threads_for", "torch_threads",
           "usable_cores"]
