"""The service's model thread: every search's model work runs here, the searches that arrive while it is busy
answered together as one batch.

Why one thread and batches: a fused query streams every base model's gallery matrix from memory (its floor is memory
bandwidth, see :mod:`cirfusion.fusion.score_paths`), and a lone query's small tensor operations cost more in
per-operation overhead than in arithmetic. Several worker threads each running one query would read the galleries
once per query and fight over the cores. One thread answers a lone query at once, and under load encodes a whole
batch of up to ``max_batch`` queries in one pass and reads each gallery tile once for all of them, so throughput grows
with concurrency instead of collapsing. Answers do not depend on the batch beyond float rounding
(:meth:`cirfusion.serve.catalog.Catalog.search_batch`).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

log = logging.getLogger("cirfusion.serve")

Q = TypeVar("Q")
R = TypeVar("R")

_STOP = object()


class Batcher(Generic[Q, R]):
    """A daemon thread that takes submitted items off a queue, up to ``max_batch`` at a time (all that are waiting,
    never waiting for more), and answers them with ``run(items) -> one result or exception per item``.
    :meth:`call` runs any other function on the same thread, alone (model work that is not a search, such as adding
    images), so the model is only ever used from this thread."""

    def __init__(self, run: Callable[[Sequence[Q]], Sequence[R | BaseException]], max_batch: int = 16,
                 setup: Callable[[], None] | None = None, name: str = "cirfusion-model") -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be positive, got {max_batch}")
        self._run, self.max_batch, self._setup = run, max_batch, setup
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.batches = 0  # how many batches were answered, and how many searches in them (for /api/info)
        self.answered = 0
        self._lock = threading.Lock()
        self._dead: str | None = None  # why the thread takes no more jobs (closed, or its set-up failed)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, item: Q) -> Future[R]:
        fut: Future[R] = Future()
        self._put((item, fut), fut)
        return fut

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future[Any]:
        fut: Future[Any] = Future()
        self._put(((fn, args, kwargs), fut, "call"), fut)
        return fut

    def _put(self, job: Any, fut: Future[Any]) -> None:
        with self._lock:  # never queued behind the stop: a job after close() is refused, not left unanswered
            if self._dead is not None:
                fut.set_exception(RuntimeError(f"the model thread has stopped ({self._dead})"))
                return
            self._q.put(job)

    def close(self) -> None:
        """Stop the thread once the jobs queued so far are answered; later jobs are refused."""
        with self._lock:
            if self._dead is None:
                self._dead = "closed"
                self._q.put(_STOP)
        self._thread.join(timeout=10)

    def _fail_queued(self) -> None:
        while True:
            try:
                job = self._q.get_nowait()
            except queue.Empty:
                return
            if job is not _STOP and job[1].set_running_or_notify_cancel():
                job[1].set_exception(RuntimeError(f"the model thread has stopped ({self._dead})"))

    def _loop(self) -> None:
        if self._setup is not None:
            try:
                self._setup()  # per-thread settings (torch's intra-op threads are set by the thread that runs the ops)
            except BaseException as exc:  # fail what waits, and every later job, instead of leaving them unanswered
                log.exception("the model thread could not start")
                with self._lock:
                    self._dead = f"set-up failed: {exc}"
                self._fail_queued()
                return
        pending: list[Any] = []
        while True:
            job = pending.pop(0) if pending else self._q.get()
            if job is _STOP:
                self._fail_queued()
                return
            if len(job) == 3:
                self._call(job)
                continue
            batch = [job]
            while len(batch) < self.max_batch:
                try:
                    nxt = self._q.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP or len(nxt) == 3:  # keep the order: run it after this batch
                    pending.append(nxt)
                    break
                batch.append(nxt)
            self._answer(batch)

    def _call(self, job: tuple[Any, Future[Any], str]) -> None:
        (fn, args, kwargs), fut, _ = job
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # handed to the waiting request, never kills the thread
            fut.set_exception(exc)

    def _answer(self, batch: list[tuple[Q, Future[R]]]) -> None:
        live = [(item, fut) for item, fut in batch if fut.set_running_or_notify_cancel()]
        if not live:
            return
        try:
            results = list(self._run([item for item, _ in live]))
            if len(results) != len(live):
                raise RuntimeError(f"batch of {len(live)} answered with {len(results)} results")
        except BaseException as exc:  # the whole batch failed: each request gets the error
            log.exception("model batch failed")
            results = [exc] * len(live)
        self.batches += 1
        self.answered += len(live)
        for (_, fut), res in zip(live, results, strict=True):
            if isinstance(res, BaseException):
                fut.set_exception(res)
            else:
                fut.set_result(res)


__all__ = ["Batcher"]
