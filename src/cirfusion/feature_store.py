"""The feature cache's on-disk store: append-only shards of fixed-shape rows, looked up by row key.

Split from :mod:`cirfusion.features` (which computes the rows): this module owns the files - committing a shard
(arrays first, key list last, each written atomically), finding shards other processes committed, dropping a
damaged shard, removing what a killed writer left behind - and the signal handling that lets an interrupted
computation commit its last shard. See :mod:`cirfusion.features` for the directory layout.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import secrets
import signal
import socket
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np

from .errors import CirfusionError
from .io import atomic_write_bytes, atomic_write_text, pid_alive

FORMAT_VERSION = 1
# An uncommitted file whose writer cannot be checked (another host, an old name) is an orphan after this long.
ORPHAN_AGE_S = 24 * 3600.0
# Shard names carry the writer's host (hashed) and pid: "<time_ns hex>-<host>-<pid>-<random>".
_HOST = hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


class FeatureCacheError(CirfusionError, RuntimeError):
    """A cache directory that cannot be used (unreadable or inconsistent shard). The message names the file."""


class FeatureCacheWarning(UserWarning):
    """A damaged shard was dropped (its rows are recomputed) - the cache repaired itself."""


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True))


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _npy_ok(path: Path, shape: tuple[int, ...], dtype: str) -> str | None:
    """None if ``path`` is a complete .npy file of ``shape``/``dtype`` (header and size only), else the problem."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                got_shape, fortran, got_dtype = np.lib.format.read_array_header_1_0(f)
            else:
                got_shape, fortran, got_dtype = np.lib.format.read_array_header_2_0(f)
            offset = f.tell()
        size = os.path.getsize(path)
    except FileNotFoundError:
        return "file missing"
    except (OSError, ValueError) as exc:
        return f"truncated or unreadable ({exc})"
    if tuple(got_shape) != shape or got_dtype != np.dtype(dtype) or fortran:
        return f"holds {tuple(got_shape)} {got_dtype}, expected {shape} {dtype}"
    want = offset + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if size != want:
        return f"truncated or padded ({size} bytes, expected {want})"
    return None


def _writer_alive(shard: str) -> bool | None:
    """Whether the process that named ``shard`` is still running (None: another host or an older name format)."""
    parts = shard.split("-")
    if len(parts) != 4 or parts[1] != _HOST or not parts[2].isdigit():
        return None
    return pid_alive(int(parts[2]))


class InterruptGuard:
    """While features are computed, SIGTERM is treated like Ctrl-C (a KeyboardInterrupt, so the computation's
    clean-up commits the rows computed so far); a signal arriving while a shard is being written is held until the
    write ends, so the last shard is not torn. Only installed from the main thread over the default handlers."""

    def __init__(self) -> None:
        self._saved: dict[int, Any] = {}
        self._critical = 0
        self._held: int | None = None

    def __enter__(self) -> InterruptGuard:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                current = signal.getsignal(sig)
                if current in (signal.SIG_DFL, signal.default_int_handler):
                    self._saved[sig] = current
                    signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        self._saved.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._critical:
            self._held = signum
            return
        raise KeyboardInterrupt(f"{signal.Signals(signum).name} received")

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        self._critical += 1
        try:
            yield
        finally:
            self._critical -= 1
            if not self._critical and self._held is not None:
                signum, self._held = self._held, None
                raise KeyboardInterrupt(f"{signal.Signals(signum).name} received")


class ShardStore:
    """One cache namespace: append-only shards of fixed-shape rows, looked up by row key."""

    def __init__(self, root: Path, meta: dict[str, Any], shapes: dict[str, tuple[tuple[int, ...], str]]) -> None:
        self.root = root
        self.shapes = shapes  # array name -> (per-row shape, dtype)
        self.shard_dir = root / "shards"
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        meta = {**meta, "format": FORMAT_VERSION, "arrays": {k: [list(s), d] for k, (s, d) in shapes.items()}}
        meta_path = root / "meta.json"
        if meta_path.is_file():
            try:
                old = json.loads(meta_path.read_text())
            except (OSError, ValueError) as exc:
                raise FeatureCacheError(f"{meta_path}: unreadable cache metadata ({exc}); delete {root} to rebuild") from exc
            for k in ("format", "arrays"):
                if old.get(k) != meta[k]:
                    raise FeatureCacheError(
                        f"{meta_path}: cache was written with {k}={old.get(k)!r} but this backbone gives {meta[k]!r} "
                        f"under the same key; delete {root} to rebuild"
                    )
        else:
            _write_json(meta_path, meta)
        self.lookup: dict[str, tuple[str, int]] = {}
        self.shard_len: dict[str, int] = {}
        self._arrays: dict[tuple[str, str], np.ndarray] = {}
        self._lock = threading.Lock()
        self.remove_orphans()

    def remove_orphans(self) -> list[Path]:
        """Delete temporary and uncommitted files left by writers that died (see the module doc); returns them."""
        committed = {p.name[: -len(".keys.json")] for p in self.shard_dir.glob("*.keys.json")}
        now = time.time()
        removed = []
        candidates = [(p, p.name[1:].split(".", 1)[0]) for p in self.root.glob(".meta.json.*")]
        for p in self.shard_dir.iterdir():
            if p.name.startswith("."):  # a temporary file: ".<shard>.<array>.npy.<random>.tmp"
                candidates.append((p, p.name[1:].split(".", 1)[0]))
            elif not p.name.endswith(".keys.json") and p.name.split(".", 1)[0] not in committed:
                candidates.append((p, p.name.split(".", 1)[0]))  # arrays of a shard never committed
        for p, shard in candidates:
            alive = _writer_alive(shard)
            try:
                old = now - p.stat().st_mtime > ORPHAN_AGE_S
            except FileNotFoundError:
                continue
            if alive is False or (alive is None and old):
                p.unlink(missing_ok=True)
                removed.append(p)
        return removed

    def _damaged(self, shard: str, keys_file: Path) -> tuple[list[str] | None, str]:
        """The shard's keys, or None and what is wrong with it (a truncated or unreadable file)."""
        try:
            keys = json.loads(keys_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None, ""  # dropped meanwhile by another process
        except (OSError, ValueError) as exc:
            return None, f"{keys_file}: unreadable shard index ({exc})"
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            return None, f"{keys_file}: not a list of row keys"
        for name, (shape, dtype) in self.shapes.items():
            path = self.shard_dir / f"{shard}.{name}.npy"
            problem = _npy_ok(path, (len(keys), *shape), dtype)
            if problem:
                return None, f"{path}: {problem}"
        return keys, ""

    def _drop(self, shard: str) -> None:
        """Remove a damaged shard: its key list first (uncommits it), then its arrays."""
        (self.shard_dir / f"{shard}.keys.json").unlink(missing_ok=True)
        for name in self.shapes:
            (self.shard_dir / f"{shard}.{name}.npy").unlink(missing_ok=True)

    def refresh(self) -> None:
        """Pick up shards committed since the last look (by this or another process); a damaged one is dropped with
        a warning, so its rows are computed again."""
        for keys_file in sorted(self.shard_dir.glob("*.keys.json")):
            shard = keys_file.name[: -len(".keys.json")]
            if shard in self.shard_len:
                continue
            keys, problem = self._damaged(shard, keys_file)
            if keys is None:
                if problem:
                    warnings.warn(f"{problem}; dropping shard {shard} of {self.root} - its rows will be recomputed",
                                  FeatureCacheWarning, stacklevel=4)
                    self._drop(shard)
                continue
            for row, k in enumerate(keys):
                self.lookup.setdefault(k, (shard, row))
            self.shard_len[shard] = len(keys)

    def __contains__(self, key: str) -> bool:
        return key in self.lookup

    def _array(self, shard: str, name: str) -> np.ndarray:
        with self._lock:
            arr = self._arrays.get((shard, name))
            if arr is None:
                path = self.shard_dir / f"{shard}.{name}.npy"
                try:
                    arr = np.load(path, mmap_mode="r")
                except (OSError, ValueError) as exc:
                    raise FeatureCacheError(f"{path}: unreadable cache shard ({exc}); delete {self.root} to rebuild") from exc
                shape, dtype = self.shapes[name]
                if arr.shape != (self.shard_len[shard], *shape) or arr.dtype != np.dtype(dtype):
                    raise FeatureCacheError(
                        f"{path}: shard holds {arr.shape} {arr.dtype}, expected {(self.shard_len[shard], *shape)} {dtype}; "
                        f"delete {self.root} to rebuild"
                    )
                self._arrays[(shard, name)] = arr
            return arr

    def write(self, keys: list[str], arrays: dict[str, np.ndarray]) -> None:
        """Commit one shard: the arrays first, the key list last (readers only see committed shards)."""
        if not keys:
            return
        shard = f"{time.time_ns():016x}-{_HOST}-{os.getpid()}-{secrets.token_hex(3)}"
        for name, (shape, dtype) in self.shapes.items():
            arr = np.ascontiguousarray(arrays[name], dtype=dtype)
            assert arr.shape == (len(keys), *shape), (name, arr.shape, shape)
            atomic_write_bytes(self.shard_dir / f"{shard}.{name}.npy", _npy_bytes(arr))
        _write_json(self.shard_dir / f"{shard}.keys.json", keys)
        for row, k in enumerate(keys):
            self.lookup.setdefault(k, (shard, row))
        self.shard_len[shard] = len(keys)

    def gather(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """Rows for ``keys`` in order. Zero-copy memmaps when the request is exactly one whole shard."""
        locs = [self.lookup[k] for k in keys]
        shards = {s for s, _ in locs}
        if len(shards) == 1:
            (shard,) = shards
            if len(locs) == self.shard_len[shard] and all(r == i for i, (_, r) in enumerate(locs)):
                return {name: self._array(shard, name) for name in self.shapes}
        out = {name: np.empty((len(keys), *shape), dtype=dtype) for name, (shape, dtype) in self.shapes.items()}
        by_shard: dict[str, tuple[list[int], list[int]]] = {}
        for pos, (shard, row) in enumerate(locs):
            dst, src = by_shard.setdefault(shard, ([], []))
            dst.append(pos)
            src.append(row)
        for shard, (dst, src) in by_shard.items():
            d, s = np.asarray(dst), np.asarray(src)
            order = np.argsort(s, kind="stable")  # read the memmap front to back
            d, s = d[order], s[order]
            for name in self.shapes:
                out[name][d] = self._array(shard, name)[s]
        return out


__all__ = ["FORMAT_VERSION", "ORPHAN_AGE_S", "FeatureCacheError", "FeatureCacheWarning", "InterruptGuard", "ShardStore"]
