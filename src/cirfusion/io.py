"""Atomic file and directory writes: a crash never leaves a half-written output that looks complete."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory, then ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def recover_directory(path: str | Path) -> None:
    """Finish or undo an interrupted :func:`atomic_directory` swap of ``path``.

    A swap moves the old version aside (``.NAME.old.PID``) and then the new one in. A crash between the two renames
    leaves no ``path``: the newest old version is moved back. Old versions left beside a complete ``path`` (a crash
    after both renames, before the clean-up) and orphan temporary directories of dead writers are removed."""
    path = Path(path)
    olds = sorted(path.parent.glob(f".{path.name}.old.*"), key=lambda p: p.stat().st_mtime)
    if olds and not path.exists():
        os.replace(olds.pop(), path)
    for old in olds:
        shutil.rmtree(old, ignore_errors=True)
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):  # .NAME.PID.<random>.tmp: a writer's unfinished directory
        pid = tmp.name[len(path.name) + 2:].split(".", 1)[0]
        if tmp.is_dir() and pid.isdigit() and pid_alive(int(pid)) is False:
            shutil.rmtree(tmp, ignore_errors=True)


def pid_alive(pid: int) -> bool | None:
    """Whether process ``pid`` exists on this machine (None: cannot tell): a writer whose unfinished files must not
    be removed yet."""
    if os.name != "posix":
        return None  # os.kill(pid, 0) is not a probe on Windows
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but is not ours (EPERM), or cannot tell
        return True
    return True


@contextlib.contextmanager
def atomic_directory(path: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``path`` (two renames, see
    :func:`recover_directory`, which runs first so an earlier interrupted swap is never lost).

    On an exception the temporary directory is removed and ``path`` is left as it was.
    """
    path = Path(path)
    if path.parent.exists():
        recover_directory(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old.{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
