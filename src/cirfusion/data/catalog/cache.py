"""Catalog benchmark, the content-addressed cache: resized photos, colour analyses, edits and edit plans, keyed by
the photo's sha256 (and the versions of what produced them), written atomically and reused by later builds.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from ...io import atomic_write_bytes, atomic_write_text
from ..colors import (
    estimate_colour,
)
from ..images import ImageLoadError, load_image
from ..schema import sha256_file
from .config import ANALYSIS_VERSION, EDIT_VERSION, JPEG_QUALITY, _h


def _save_jpeg(img: Image.Image, path: Path) -> None:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=False)
    atomic_write_bytes(path, buf.getvalue())


def _resize_short(img: Image.Image, size: int) -> Image.Image:
    """Shorter side to ``size`` (never upscaled)."""
    w, h = img.size
    s = size / min(w, h)
    if s >= 1:
        return img.copy()
    return img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.LANCZOS)


def _photo_cache_path(cache: Path, sha: str, size: int) -> Path:
    return cache / "photos" / sha[:2] / f"{sha}-s{size}-v{EDIT_VERSION}.jpg"


def _analysis_cache_path(cache: Path, sha: str) -> Path:
    return cache / "analysis" / sha[:2] / f"{sha}-v{ANALYSIS_VERSION}.json"


def _edit_cache_path(cache: Path, sha: str, kind: str, params: dict[str, Any], size: int) -> Path:
    key = _h(sha, kind, json.dumps(params, sort_keys=True), size, EDIT_VERSION, JPEG_QUALITY)[:32]
    return cache / "edits" / sha[:2] / f"{sha[:16]}-{kind}-{key}.jpg"


def _plan_cache_path(cache: Path, sha: str, seed: int, kinds: Sequence[str], size: int) -> Path:
    key = _h(sha, seed, ",".join(kinds), size, EDIT_VERSION, ANALYSIS_VERSION)[:32]
    return cache / "plans" / sha[:2] / f"{sha[:16]}-{key}.json"


def _analyse_photo(job: tuple[str, str, int]) -> dict[str, Any]:
    """Worker: hash, colour analysis and resized copy of one photo (all cached). Never raises for a bad photo:
    returns ``{"error": ...}`` so the parent can report every bad file at once."""
    path, cache_s, size = job
    cache = Path(cache_s)
    try:
        sha = sha256_file(path)
    except OSError as exc:
        return {"path": path, "error": f"cannot read file ({exc})"}
    apath = _analysis_cache_path(cache, sha)
    ppath = _photo_cache_path(cache, sha, size)
    if apath.is_file() and ppath.is_file():
        rec = json.loads(apath.read_text())
        rec["path"] = path
        return rec
    try:
        img = load_image(path)
    except ImageLoadError as exc:
        return {"path": path, "sha256": sha, "error": exc.problem}
    est = estimate_colour(img)
    small = _resize_short(img, size)
    if not ppath.is_file():
        _save_jpeg(small, ppath)
    rec = {"sha256": sha, "width": img.size[0], "height": img.size[1], "colour": est.to_dict()}
    atomic_write_text(apath, json.dumps(rec, sort_keys=True))
    rec["path"] = path
    return rec
