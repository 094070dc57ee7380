"""Catalog benchmark, edits: recolouring the item (a CIELAB colour transfer checked by the colour estimator),
mirror, zoomed crop, rotation and brightness, and the per-photo worker that makes (or finds cached) every edit.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from ...io import atomic_write_text
from ..colors import (
    REPRESENTATIVE,
    _small,
    estimate_colour,
    foreground_mask,
    lab_to_srgb,
    srgb_to_lab,
)
from ..images import load_image
from .cache import _edit_cache_path, _plan_cache_path, _resize_short, _save_jpeg
from .config import RECOLOUR_TARGETS, _h


def recolour(img: Image.Image, mask: np.ndarray, source_lab: Sequence[float], target: str) -> Image.Image:
    """Shift the item's colours so that its dominant colour ``source_lab`` lands on the palette colour ``target``.

    ``mask``: float item mask in [0, 1] at ``img``'s size. The whole item moves by one CIELAB offset (lightness
    partly), so shading, texture and prints keep their relative contrast — a colour transfer, not a paint fill.
    """
    rgb = np.asarray(img.convert("RGB"), dtype=np.float64)
    lab = srgb_to_lab(rgb)
    tgt = srgb_to_lab(np.array(REPRESENTATIVE[target], dtype=np.float64))
    src = np.asarray(source_lab, dtype=np.float64)
    delta = tgt - src
    delta[0] *= 0.8  # keep some of the item's own lightness (a dark item recoloured stays a little darker)
    out = lab + mask[..., None] * delta
    srgb = np.clip(np.round(lab_to_srgb(out)), 0, 255).astype(np.uint8)
    return Image.fromarray(srgb, "RGB")


def _soft_mask(img_small: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """Item mask computed at analysis size, upsampled and feathered to ``size`` (w, h)."""
    fg, _ = foreground_mask(img_small)
    m = Image.fromarray((fg * 255).astype(np.uint8), "L").resize(size, Image.Resampling.BILINEAR)
    m = m.filter(ImageFilter.GaussianBlur(radius=max(1.0, min(size) / 200)))
    return np.asarray(m, dtype=np.float64) / 255.0


def _crop_zoom(img: Image.Image, zoom: float, region: str, out_size: tuple[int, int]) -> Image.Image:
    """Cut a 1/zoom window (horizontally centred, vertically at ``region``) and scale it to ``out_size``."""
    w, h = img.size
    cw, ch = round(w / zoom), round(h / zoom)
    left = (w - cw) // 2
    top = {"centre": (h - ch) // 2, "top": 0, "bottom": h - ch}[region]
    return img.crop((left, top, left + cw, top + ch)).resize(out_size, Image.Resampling.LANCZOS)


def _edit_params(kind: str, rng: random.Random) -> dict[str, Any]:
    if kind == "mirror":
        return {}
    if kind == "rotate":
        return {"angle": rng.choice([90, 180, 270])}  # counter-clockwise degrees
    if kind == "crop":
        return {"zoom": rng.choice([1.5, 2.0]), "region": rng.choice(["centre", "top", "bottom"])}
    if kind == "brightness":
        return {"factor": rng.choice([0.6, 1.5])}
    raise ValueError(kind)


def apply_edit(photo: Image.Image, kind: str, params: dict[str, Any], size: int, base: Image.Image | None = None) -> Image.Image:
    """A geometric / photometric edit of the original ``photo``, output at shorter side ``size``.

    ``base``: ``photo`` already resized to ``size`` (saves a resize per edit). Crops are cut from the full
    resolution photo, so a zoom is as sharp as the source allows.
    """
    if base is None:
        base = _resize_short(photo, size)
    if kind == "crop":  # zoomed back to the photo's own cached size
        return _crop_zoom(photo, float(params["zoom"]), str(params["region"]), base.size)
    if kind == "mirror":
        return ImageOps.mirror(base)
    if kind == "rotate":
        return base.transpose({90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270}[int(params["angle"])])
    if kind == "brightness":
        return ImageEnhance.Brightness(base).enhance(float(params["factor"]))
    raise ValueError(f"unknown edit kind {kind!r}")


def _edit_photo(job: tuple[str, str, str, int, int, tuple[str, ...], dict[str, Any]]) -> dict[str, Any]:
    """Worker: every edit of one photo (cached). Returns ``{"sha256", "edits": [{kind, params, file, colour}]}``."""
    path, sha, cache_s, size, seed, kinds, colour = job
    cache = Path(cache_s)
    plan_path = _plan_cache_path(cache, sha, seed, kinds, size)
    if plan_path.is_file():
        plan = json.loads(plan_path.read_text())
        if all((cache / e["file"]).is_file() for e in plan["edits"]):
            return plan
    img = load_image(path)
    base = _resize_short(img, size)
    edits: list[dict[str, Any]] = []
    for kind in kinds:
        rng = random.Random(_h(seed, sha, "edit", kind))  # one stream per kind: choosing kinds changes no params
        if kind == "recolour":
            rec = _make_recolour(img, base, sha, cache, size, colour, rng)
            if rec is not None:
                edits.append(rec)
            continue
        params = _edit_params(kind, rng)
        out = _edit_cache_path(cache, sha, kind, params, size)
        if not out.is_file():
            _save_jpeg(apply_edit(img, kind, params, size, base), out)
        edits.append({"kind": kind, "params": params, "file": out.relative_to(cache).as_posix(), "colour": colour["name"]})
    plan = {"sha256": sha, "edits": edits}
    atomic_write_text(plan_path, json.dumps(plan, sort_keys=True))
    return plan


def _make_recolour(
    img: Image.Image, base: Image.Image, sha: str, cache: Path, size: int, colour: dict[str, Any], rng: random.Random
) -> dict[str, Any] | None:
    """Recolour to the first target (seeded order) that the colour estimator then names as that target, so
    the edited image's label is as trustworthy as a photo's. ``None`` when no target passes (e.g. a black item
    too dark to carry a hue): the photo then simply has no recolour edit (counted in the manifest)."""
    if colour.get("fallback"):
        return None  # no item mask (the centre ellipse was guessed): a recolour would paint an ellipse
    targets = [t for t in RECOLOUR_TARGETS if t != colour["name"]]
    rng.shuffle(targets)
    mask = _soft_mask(_small(img), base.size)
    for target in targets[:3]:
        params = {"target": target}
        out = _edit_cache_path(cache, sha, "recolour", params, size)
        if out.is_file():
            return {"kind": "recolour", "params": params, "file": out.relative_to(cache).as_posix(), "colour": target}
        edited = recolour(base, mask, colour["lab"], target)
        if estimate_colour(edited).name != target:
            continue
        _save_jpeg(edited, out)
        return {"kind": "recolour", "params": params, "file": out.relative_to(cache).as_posix(), "colour": target}
    return None
