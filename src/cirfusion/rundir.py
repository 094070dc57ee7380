"""A training run's directory as a resource: one writer at a time, a fresh start never mixes with an old run, and
a metrics log that survives a crash in the middle of a line.

- :class:`RunLock`: an exclusive ``flock`` on ``RUN_DIR/train.lock``, held for the whole run (only rank 0 takes it
  under torchrun). The kernel drops it when the process dies, even on ``kill -9``, so a stale lock never blocks a
  later run. The file itself stays (deleting it would let a third process lock a fresh inode while a second still
  holds the old one).
- :func:`check_fresh` / :func:`clear_run_dir`: a run started without ``--resume`` in a directory that already holds
  something is refused, unless ``--overwrite`` is given; then the old run's files are removed -- and only those: a
  directory that also holds files a run does not write is never cleared.
- :func:`read_metrics` / :func:`append_metrics` / :func:`truncate_metrics`: ``metrics.jsonl``, one JSON record per
  line. A process killed while writing leaves a torn last line: it is dropped with a warning.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any

from .errors import CirfusionError
from .io import atomic_write_text

try:  # POSIX; where it is missing (Windows) runs are not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = "train.lock"
METRICS_FILE = "metrics.jsonl"
MANIFEST_FILE = "manifest.json"
# Everything a training run writes into its directory (atomic writers add hidden ``.NAME.*`` temporaries).
RUN_ENTRIES = (MANIFEST_FILE, METRICS_FILE, "best", "last", LOCK_FILE)


class RunDirError(CirfusionError, ValueError):
    """A run directory that cannot be used as asked: in use by another run, or holding files a fresh run would mix
    with."""


class RunLock:
    """``with RunLock(run_dir):`` -- creates ``run_dir`` and holds its lock, or raises :class:`RunDirError` at once
    when another process holds it."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode("ascii", "replace").strip()
                os.close(fd)
                raise RunDirError(f"{self.run_dir} is in use by another training run ({self.path} is locked"
                                  f"{f' by process {holder}' if holder else ''}); wait for it to finish, or choose "
                                  "another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))  # who holds it, for the message above
        self._fd = fd
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._fd is not None:
            if fcntl is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def check_unlocked(run_dir: str | Path) -> None:
    """Raise :class:`RunDirError` now if another process holds ``run_dir``'s lock (a command checks this before
    its slow set-up; the training loop takes the lock for real)."""
    run_dir = Path(run_dir)
    if (run_dir / LOCK_FILE).exists():
        with RunLock(run_dir):
            pass


def _is_run_entry(name: str) -> bool:
    return name in RUN_ENTRIES or any(name.startswith(f".{e}.") for e in RUN_ENTRIES)


def check_fresh(run_dir: str | Path, overwrite: bool) -> list[Path]:
    """The entries a fresh run in ``run_dir`` would have to remove ([] when it is empty or missing). Refused
    (:class:`RunDirError`) when there are some and ``overwrite`` is off, or when some are not a run's own files."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        return []
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir} is not a directory")
    entries = sorted(p for p in run_dir.iterdir() if p.name != LOCK_FILE)
    if not entries:
        return []
    names = ", ".join(p.name for p in entries[:6]) + (" ..." if len(entries) > 6 else "")
    foreign = [p.name for p in entries if not _is_run_entry(p.name)]
    if foreign:  # checked first: --overwrite would not help, so it is not suggested
        raise RunDirError(f"{run_dir}: --overwrite removes only a training run's own files, and this directory also "
                          f"holds {', '.join(foreign[:6])}; choose another --out")
    if not overwrite:
        raise RunDirError(f"{run_dir} already holds a run ({names}); continue it with --resume, start it again with "
                          "--overwrite (deletes it), or choose another --out")
    return entries


def clear_run_dir(run_dir: str | Path) -> None:
    """Remove an old run's files from ``run_dir`` (after :func:`check_fresh` with ``overwrite=True``; the caller
    holds the lock, which stays)."""
    for p in check_fresh(run_dir, overwrite=True):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


# ---- metrics.jsonl ---------------------------------------------------------------------------------------------------
def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics log ([] when it does not exist). A torn last line (the writer was killed mid-line)
    is dropped with a warning; a bad line anywhere else is a :class:`RunDirError` naming the line."""
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    complete = text.endswith("\n")
    out: list[dict[str, Any]] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        last = n == len(lines) or (n == len(lines) - 1 and complete)
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
            if last and not complete:
                raise ValueError("no end of line")
        except (ValueError, RecursionError) as exc:
            if last:
                warnings.warn(f"{path}: dropping the torn last line {n} (the run was interrupted while writing it): "
                              f"{line[:80]!r}", stacklevel=2)
                break
            raise RunDirError(f"{path}:{n}: not a metrics record ({exc})") from None
        out.append(rec)
    return out


def append_metrics(path: str | Path, record: dict[str, Any]) -> None:
    """Append one record (a whole line in one write)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def truncate_metrics(path: str | Path, global_step: int) -> None:
    """On resume: keep the records up to ``global_step`` (the later ones are redone) and drop a torn last line."""
    path = Path(path)
    if not path.is_file():
        return
    keep = [r for r in read_metrics(path) if r.get("global_step", 0) <= global_step]
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in keep))
