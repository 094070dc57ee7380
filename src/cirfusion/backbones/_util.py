"""Helpers shared by the backbone implementations: weight hashing and image preprocessing (option strings are
:mod:`cirfusion.options`)."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data.schema import sha256_file

# (realpath, size, mtime_ns) -> sha256. Hashing MiniLM's 90 MB or a multi-GB checkpoint is done once per process.
_FILE_HASHES: dict[tuple[str, int, int], str] = {}
_LOCK = threading.Lock()


def file_sha256(path: str | Path) -> str:
    """sha256 hex of a file, memoised by (real path, size, mtime)."""
    real = os.path.realpath(path)
    st = os.stat(real)
    key = (real, st.st_size, st.st_mtime_ns)
    with _LOCK:
        hit = _FILE_HASHES.get(key)
    if hit is None:
        hit = sha256_file(real)
        with _LOCK:
            _FILE_HASHES[key] = hit
    return hit


def files_sha256(paths: Iterable[str | Path], root: str | Path | None = None) -> str:
    """One sha256 over several files: their names (relative to ``root``) and their content hashes, in sorted order."""
    h = hashlib.sha256()
    items = []
    for p in paths:
        name = os.path.relpath(p, root) if root is not None else os.path.basename(p)
        items.append((name, file_sha256(p)))
    for name, digest in sorted(items):
        h.update(name.encode())
        h.update(b"\0")
        h.update(digest.encode())
        h.update(b"\n")
    return h.hexdigest()


def state_dict_sha256(sd: Mapping[str, torch.Tensor]) -> str:
    """sha256 over parameter names, dtypes, shapes and bytes (for weights that do not come from local files)."""
    h = hashlib.sha256()
    for name in sorted(sd):
        t = sd[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        # bfloat16 has no numpy dtype: hash the raw bytes through a same-size integer view.
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def short_hash(text: str, n: int = 16) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def resize_center_crop(image: Image.Image, size: int, resample: int = Image.Resampling.BICUBIC) -> Image.Image:
    """Resize the shorter side to ``size`` then centre-crop ``size`` x ``size`` (the ImageNet evaluation transform)."""
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        # reducing_gap: Pillow first shrinks by an integer factor (fast, antialiased), then resamples exactly.
        image = image.resize((nw, nh), resample, reducing_gap=3.0)
    left, top = (nw - size) // 2, (nh - size) // 2
    return image.crop((left, top, left + size, top + size))


def to_normalised_tensor(image: Image.Image, mean: Iterable[float], std: Iterable[float]) -> torch.Tensor:
    """RGB PIL image -> float32 [3, H, W], scaled to [0, 1] then normalised per channel."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) * (1.0 / 255.0)
    m = np.asarray(list(mean), dtype=np.float32)
    s = np.asarray(list(std), dtype=np.float32)
    arr = (arr - m) / s
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
