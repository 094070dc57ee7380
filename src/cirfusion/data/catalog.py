"""Embedded benchmark B: composed-retrieval triplets bootstrapped from a labelled photo catalog.

``build_catalog`` turns a folder of photos labelled by category (``<photos>/<split>/<category>/*.jpg``,
``<photos>/<category>/*.jpg`` or a CSV ``path,category[,split]``) into a CIR benchmark; ``load_catalog``
(dataset ``"catalog"``) reads it back. Each photo gets two attributes: its category and the named dominant
colour of the item (:mod:`cirfusion.data.colors`). Query kinds:

- ``category``: "show me a skirt instead" — targets: every gallery image of the new category in the
  reference's colour (the colour comes from the image, the category from the text);
- ``colour``: "same but in red" — every image of the reference's category in the new colour;
- ``both``: "a red skirt instead" — every image of the new category and colour;
- ``edit``: the target is a programmatic edit of the reference photo (recolour the item, mirror, zoom,
  rotate, brightness) and the instruction is the text; the subset is the reference plus all its edits.

Kinds ``category``/``colour``/``both`` list *every* matching gallery image (photos and edits) as a target, so they
are scored with Recall-any and mAP@K. The gallery of a split is its photos plus their edits; every image (photos
included) is stored resized to ``image_size`` in a content-addressed cache, so photos and edits go through the
same resize and JPEG encoding and no model can tell an edit by its compression. The (photo, instruction, edit)
pairs double as image-editing pre-training data (:func:`load_edit_pairs`).

Splits follow the photo folder: ``train``, ``val`` and ``test``, where a folder named ``validation``, ``valid`` or
``dev`` is read as ``val``. Photos without a split (a flat category folder, or a CSV without a split column) get one
from their content hash (80/10/10 by default), which does not depend on the seed.

Directory written by ``build_catalog(..., out=ROOT)``::

    ROOT/annotations/manifest.json        config, source digest, palette, per-photo attributes, counts
    ROOT/annotations/gallery.{split}.jsonl   one image per line: id, path, kind (photo|edit), attributes
    ROOT/annotations/queries.{split}.jsonl   Query.to_dict() per line
    ROOT/annotations/edit_pairs.{split}.jsonl  source, instruction, edited
    ROOT/cache/...                        resized photos, edits and colour analyses, keyed by photo hash

``annotations/`` is written to a temporary directory and renamed into place, so it is always one complete build.
The cache is append-only and reused by later builds (also with other seeds); ``cache_dir`` can point elsewhere
to share it between outputs.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import multiprocessing as mp
import os
import random
import shutil
import statistics
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps
from tqdm import tqdm

from ._jsonio import read_jsonl, require_file
from .colors import (
    COLOUR_NAMES,
    PALETTE,
    REPRESENTATIVE,
    _small,
    estimate_colour,
    foreground_mask,
    lab_to_srgb,
    srgb_to_lab,
)
from .images import ImageLoadError, load_image
from .registry import register_dataset
from .schema import CIRDataset, DataError, Gallery, Query, sha256_file

FORMAT_VERSION = 1
# Bump when the pixels an edit / resize / analysis produces change: they are part of every cache key.
EDIT_VERSION = 1
ANALYSIS_VERSION = 1
JPEG_QUALITY = 90

SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
QUERY_KINDS = ("category", "colour", "both", "edit")
EDIT_KINDS = ("recolour", "mirror", "crop", "rotate", "brightness")
# Colours a recolour edit may paint: the hue-bearing names (black/grey/white/beige/brown are not reachable
# by a convincing recolour of a patterned, shaded item).
RECOLOUR_TARGETS = ("red", "orange", "yellow", "green", "blue", "purple", "pink")


# ----------------------------------------------------------------------------------------------------------------
# Configuration and input discovery


@dataclass
class CatalogConfig:
    """Everything that shapes a build (recorded in the manifest).

    ``edit_fraction``: share of each split's photos (stratified by category, at least one per category) that get
    one edit of every kind in ``edit_kinds``. ``min_positives``: a category/colour/both query is only made for a
    target whose matching images, not counting the reference and its own edits, number at least this many.
    ``max_per_category`` caps photos per (split, category); ``limit`` caps photos in total (a seeded sample).
    """

    seed: int = 0
    image_size: int = 256
    edit_fraction: float = 0.15
    kinds: tuple[str, ...] = QUERY_KINDS
    edit_kinds: tuple[str, ...] = EDIT_KINDS
    min_positives: int = 2
    max_per_category: int | None = None
    limit: int | None = None
    skip_bad: bool = False
    split_ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)

    def __post_init__(self) -> None:
        self.kinds = tuple(self.kinds)
        self.edit_kinds = tuple(self.edit_kinds)
        self.split_ratios = tuple(float(r) for r in self.split_ratios)  # type: ignore[assignment]
        bad = [k for k in self.kinds if k not in QUERY_KINDS]
        if bad or not self.kinds:
            raise ValueError(f"unknown query kind(s) {bad}; choose from {', '.join(QUERY_KINDS)}")
        bad = [k for k in self.edit_kinds if k not in EDIT_KINDS]
        if bad:
            raise ValueError(f"unknown edit kind(s) {bad}; choose from {', '.join(EDIT_KINDS)}")
        if not 0.0 <= self.edit_fraction <= 1.0:
            raise ValueError(f"edit_fraction must be in [0, 1], got {self.edit_fraction}")
        if self.image_size < 32:
            raise ValueError(f"image_size must be at least 32 pixels, got {self.image_size}")
        if self.min_positives < 1:
            raise ValueError(f"min_positives must be at least 1, got {self.min_positives}")
        for name in ("max_per_category", "limit"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be at least 1, got {v}")
        if len(self.split_ratios) != 3 or min(self.split_ratios) < 0 or sum(self.split_ratios) <= 0:
            raise ValueError(f"split_ratios must be three non-negative numbers, got {self.split_ratios}")


@dataclass
class PhotoEntry:
    path: Path  # absolute path of the source photo
    rel: str  # path relative to the photo root (the photo's id is derived from it)
    category: str
    split: str | None  # None: assigned from the content hash


def _canonical_split(name: str, file: Path | str | None, entry: Any) -> str:
    s = SPLIT_ALIASES.get(name.strip().lower())
    if s is None:
        raise DataError(file, entry, f"unknown split {name!r}; expected one of {sorted(SPLIT_ALIASES)}")
    return s


def _check_category(cat: str, file: Path | str | None, entry: Any) -> str:
    cat = cat.strip()
    if not cat or "/" in cat or "\\" in cat or cat.startswith("."):
        raise DataError(file, entry, f"invalid category name {cat!r}")
    return cat


def scan_photo_folder(photos: str | Path) -> list[PhotoEntry]:
    """Photos of ``<photos>/<split>/<category>/*`` or ``<photos>/<category>/*`` (image extensions only).

    Non-image files (README, LICENSE) are ignored; an image file at any other depth, a split folder next to a
    category folder, or an empty tree is an error naming the path.
    """
    root = Path(photos)
    if not root.is_dir():
        raise DataError(root, None, "photo folder does not exist or is not a directory")
    top = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    for p in root.iterdir():
        if p.is_file() and p.suffix.lower() in IMAGE_EXTS:
            raise DataError(p, None, "image directly under the photo root; expected <split>/<category>/ or <category>/ folders")
    is_split = [p.name.lower() in SPLIT_ALIASES for p in top]
    if any(is_split) and not all(is_split):
        odd = [p.name for p, s in zip(top, is_split) if not s]
        raise DataError(root, None, f"mixes split folders with other folders {odd}; use <split>/<category>/ throughout")
    entries: list[PhotoEntry] = []
    seen_splits: dict[str, Path] = {}
    for d in top:
        if all(is_split):
            split = _canonical_split(d.name, root, d.name)
            if split in seen_splits:
                raise DataError(root, d.name, f"folders {seen_splits[split].name!r} and {d.name!r} both map to split {split!r}")
            seen_splits[split] = d
            for p in d.iterdir():
                if p.is_file() and p.suffix.lower() in IMAGE_EXTS:
                    raise DataError(p, None, "image directly under a split folder; expected <split>/<category>/*")
            cat_dirs = sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
        else:
            split = None
            cat_dirs = [d]
        for cdir in cat_dirs:
            cat = _check_category(cdir.name, cdir, None)
            for p in sorted(cdir.rglob("*")):
                if not (p.is_file() and p.suffix.lower() in IMAGE_EXTS):
                    continue
                if p.parent != cdir:
                    raise DataError(p, None, "image in a sub-folder of a category folder; expected <category>/<image>")
                entries.append(PhotoEntry(p.resolve(), p.relative_to(root).as_posix(), cat, split))
    if not entries:
        raise DataError(root, None, f"no images found (extensions {sorted(IMAGE_EXTS)})")
    return entries


def read_photo_csv(csv_path: str | Path, photos: str | Path | None = None) -> list[PhotoEntry]:
    """Photos listed in a CSV ``path,category[,split]`` (an optional header row naming these columns).

    Relative paths are resolved against ``photos`` when given, else against the CSV's folder.
    """
    cp = Path(csv_path)
    if not cp.is_file():
        raise DataError(cp, None, "CSV file does not exist")
    base = Path(photos) if photos is not None else cp.parent
    entries: list[PhotoEntry] = []
    seen: dict[str, int] = {}
    with open(cp, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    start = 0
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["path", "category"]:
        if len(rows[0]) > 2 and rows[0][2].strip().lower() != "split":
            raise DataError(cp, "line 1", f"third header column must be 'split', got {rows[0][2]!r}")
        start = 1
    for i in range(start, len(rows)):
        row = rows[i]
        line = f"line {i + 1}"
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) not in (2, 3):
            raise DataError(cp, line, f"expected 2 or 3 columns (path,category[,split]), got {len(row)}")
        rel = row[0].strip()
        if not rel:
            raise DataError(cp, line, "empty path")
        cat = _check_category(row[1], cp, line)
        split = _canonical_split(row[2], cp, line) if len(row) == 3 and row[2].strip() else None
        p = Path(rel)
        full = p if p.is_absolute() else base / p
        key = full.resolve().as_posix()
        if key in seen:
            raise DataError(cp, line, f"photo {rel!r} is already listed on line {seen[key]}")
        seen[key] = i + 1
        try:
            rel_id = full.resolve().relative_to(base.resolve()).as_posix()
        except ValueError:
            rel_id = full.resolve().as_posix().lstrip("/")
        entries.append(PhotoEntry(full.resolve(), rel_id, cat, split))
    if not entries:
        raise DataError(cp, None, "CSV lists no photos")
    return entries


def _h(*parts: Any) -> str:
    return hashlib.sha256(":".join(str(p) for p in parts).encode()).hexdigest()


def _unit(*parts: Any) -> float:
    """A deterministic number in [0, 1) from the parts."""
    return int(_h(*parts)[:13], 16) / float(1 << 52)


def _select_entries(entries: list[PhotoEntry], cfg: CatalogConfig) -> list[PhotoEntry]:
    """Apply ``max_per_category`` (per split and category) and ``limit`` with a seeded order."""
    out = entries
    if cfg.max_per_category is not None:
        groups: dict[tuple[str | None, str], list[PhotoEntry]] = defaultdict(list)
        for e in out:
            groups[(e.split, e.category)].append(e)
        keep: set[str] = set()
        for g in groups.values():
            g = sorted(g, key=lambda e: _h(cfg.seed, "subset", e.rel))
            keep.update(e.rel for e in g[: cfg.max_per_category])
        out = [e for e in out if e.rel in keep]
    if cfg.limit is not None and len(out) > cfg.limit:
        keep = {e.rel for e in sorted(out, key=lambda e: _h(cfg.seed, "limit", e.rel))[: cfg.limit]}
        out = [e for e in out if e.rel in keep]
    return out


# ----------------------------------------------------------------------------------------------------------------
# Cache: resized photos, colour analyses and edits, keyed by the photo's content hash


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    _atomic_write_bytes(path, text.encode("utf-8"))


def _save_jpeg(img: Image.Image, path: Path) -> None:
    import io

    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=False)
    _atomic_write_bytes(path, buf.getvalue())


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
    _atomic_write_text(apath, json.dumps(rec, sort_keys=True))
    rec["path"] = path
    return rec


# ----------------------------------------------------------------------------------------------------------------
# Edits


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
    _atomic_write_text(plan_path, json.dumps(plan, sort_keys=True))
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


# ----------------------------------------------------------------------------------------------------------------
# Wording


@dataclass(frozen=True)
class _Noun:
    one: str  # singular phrase with a {c} slot for a colour adjective ("pair of {c}trousers")
    many: str  # plural phrase with a {c} slot
    the: str  # definite reference to the item ("the trousers")


_NOUNS = {
    "dress": _Noun("{c}dress", "{c}dresses", "the dress"),
    "hat": _Noun("{c}hat", "{c}hats", "the hat"),
    "longsleeve": _Noun("{c}long-sleeve top", "{c}long-sleeve tops", "the top"),
    "outwear": _Noun("{c}jacket", "{c}jackets", "the jacket"),
    "pants": _Noun("pair of {c}trousers", "{c}trousers", "the trousers"),
    "shirt": _Noun("{c}shirt", "{c}shirts", "the shirt"),
    "shoes": _Noun("pair of {c}shoes", "{c}shoes", "the shoes"),
    "shorts": _Noun("pair of {c}shorts", "{c}shorts", "the shorts"),
    "skirt": _Noun("{c}skirt", "{c}skirts", "the skirt"),
    "t-shirt": _Noun("{c}t-shirt", "{c}t-shirts", "the t-shirt"),
}


def _noun(category: str) -> _Noun:
    if category in _NOUNS:
        return _NOUNS[category]
    word = category.replace("_", " ").replace("-", " ").strip()
    plural = word if word.endswith("s") else word + "s"
    return _Noun("{c}" + word, "{c}" + plural, "the " + word)


def _a(phrase: str) -> str:
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def _one(category: str, colour: str | None = None) -> str:
    return _noun(category).one.format(c=f"{colour} " if colour else "")


def _many(category: str, colour: str | None = None) -> str:
    return _noun(category).many.format(c=f"{colour} " if colour else "")


def category_texts(category: str) -> list[str]:
    a = _a(_one(category))
    return [
        f"show me {a} instead",
        f"same colour but {a}",
        f"I want {a} in this colour",
        f"{_many(category)} in the same colour",
        f"change it to {a}, keep the colour",
        f"do you have {a} like this?",
    ]


def colour_texts(category: str, colour: str) -> list[str]:
    return [
        f"same but in {colour}",
        f"I'd like this in {colour}",
        f"do you have it in {colour}?",
        f"{colour} instead",
        f"the same kind of {_one(category)} but {colour}",
        f"{_many(category, colour)} please",
    ]


def both_texts(category: str, colour: str) -> list[str]:
    a = _a(_one(category, colour))
    return [
        f"show me {a} instead",
        f"I want {a}",
        f"{_many(category, colour)} instead",
        f"change it to {a}",
        f"something else: {a}",
    ]


def edit_texts(kind: str, params: dict[str, Any], category: str) -> list[str]:
    the = _noun(category).the
    if kind == "recolour":
        t = params["target"]
        return [f"recolour {the} {t}", f"dye it {t}", f"the same photo with {the} in {t}", f"paint {the} {t}, keep everything else"]
    if kind == "mirror":
        return ["mirror the photo", "flip it horizontally", "flip the image left to right", "show its mirror image"]
    if kind == "rotate":
        return {
            90: ["rotate it 90 degrees counter-clockwise", "turn the photo a quarter turn to the left", "rotate left by 90 degrees"],
            180: ["turn the photo upside down", "rotate it 180 degrees", "flip it upside down by rotating"],
            270: ["rotate it 90 degrees clockwise", "turn the photo a quarter turn to the right", "rotate right by 90 degrees"],
        }[int(params["angle"])]
    if kind == "crop":
        z = {1.5: "1.5x", 2.0: "2x"}[float(params["zoom"])]
        where = {"centre": "the centre", "top": "the top", "bottom": "the bottom"}[params["region"]]
        return [f"zoom in {z} on {where}", f"crop closer, {z}, to {where} of the photo", f"a {z} close-up of {where}"]
    if kind == "brightness":
        if float(params["factor"]) < 1:
            return ["make the photo darker", "darken the image", "the same photo but darker"]
        return ["make the photo brighter", "brighten the image", "the same photo but brighter"]
    raise ValueError(kind)


# ----------------------------------------------------------------------------------------------------------------
# Building


@dataclass
class _Image:
    id: str
    path: str  # relative to the output root when inside it, else absolute
    kind: str  # "photo" or "edit"
    category: str
    colour: str
    source: str  # the photo id it comes from (itself for a photo)
    edit: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if v is not None}
        return d


def _mp_context() -> Any:
    """``spawn`` (safe next to torch's threads), except when ``__main__`` is not a file spawn can re-import
    (``python - <script``): spawned workers would then fail to start forever, so ``fork`` is used — our workers
    only touch numpy and Pillow."""
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if main_file is not None and not os.path.exists(main_file):
        return mp.get_context("fork")
    return mp.get_context("spawn")


def _run_pool(fn, jobs: list, workers: int, desc: str, progress: bool) -> list:
    """Map ``fn`` over ``jobs`` in order, in ``workers`` processes (spawned: safe next to torch threads)."""
    out = []
    bar = tqdm(total=len(jobs), desc=desc, disable=not progress, unit="img")
    if workers <= 1 or len(jobs) <= 1:
        for j in jobs:
            out.append(fn(j))
            bar.update(1)
    else:
        with _mp_context().Pool(min(workers, len(jobs))) as pool:
            for r in pool.imap(fn, jobs, chunksize=4):
                out.append(r)
                bar.update(1)
    bar.close()
    return out


def _assign_split(sha: str, ratios: Sequence[float]) -> str:
    u = int(sha[:13], 16) / float(1 << 52)
    total = sum(ratios)
    acc = 0.0
    for name, r in zip(SPLITS, ratios):
        acc += r / total
        if u < acc:
            return name
    return SPLITS[-1]


def _photo_id(rel: str) -> str:
    stem = rel.rsplit(".", 1)[0] if "." in rel.rsplit("/", 1)[-1] else rel
    return stem


def build_catalog(
    out: str | Path,
    photos: str | Path | None = None,
    csv_path: str | Path | None = None,
    config: CatalogConfig | None = None,
    cache_dir: str | Path | None = None,
    workers: int = 2,
    progress: bool = True,
) -> dict[str, Any]:
    """Build the catalog benchmark into ``out`` and return its manifest (see the module docstring).

    Bad photos (corrupt, truncated, empty, missing) raise a :class:`DataError` naming every one of them, after
    all other photos were processed into the cache (a re-run after fixing them is quick); with
    ``config.skip_bad`` they are left out and listed in the manifest under ``"skipped"``.
    """
    cfg = config or CatalogConfig()
    t0 = time.time()
    if csv_path is not None:
        entries = read_photo_csv(csv_path, photos)
        source_root = Path(photos) if photos is not None else Path(csv_path).parent
    elif photos is not None:
        entries = scan_photo_folder(photos)
        source_root = Path(photos)
    else:
        raise ValueError("give photos (a folder) or csv_path")
    entries = _select_entries(entries, cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir) if cache_dir is not None else out / "cache"
    cache.mkdir(parents=True, exist_ok=True)

    # Pass 1: hash, colour, resized copy.
    recs = _run_pool(
        _analyse_photo, [(str(e.path), str(cache), cfg.image_size) for e in entries], workers, "catalog: photos", progress
    )
    bad = [(r["path"], r["error"]) for r in recs if "error" in r]
    if bad and not cfg.skip_bad:
        listing = "; ".join(f"{p}: {m}" for p, m in bad[:20]) + ("; ..." if len(bad) > 20 else "")
        raise DataError(bad[0][0], None, f"{len(bad)} bad photo(s): {listing}. Fix or remove them, or pass --skip-bad")
    photos_info: list[dict[str, Any]] = []
    for e, r in zip(entries, recs):
        if "error" in r:
            continue
        split = e.split or _assign_split(r["sha256"], cfg.split_ratios)
        photos_info.append(
            {
                "id": _photo_id(e.rel),
                "source_path": e.rel,
                "split": split,
                "category": e.category,
                "sha256": r["sha256"],
                "width": r["width"],
                "height": r["height"],
                "colour": r["colour"],
                "image": _photo_cache_path(cache, r["sha256"], cfg.image_size),
                "_src": str(e.path),  # absolute source path: used by the edit pass, not written out
            }
        )
    ids = Counter(p["id"] for p in photos_info)
    dup = [i for i, n in ids.items() if n > 1]
    if dup:
        raise DataError(source_root, dup[0], "two photos map to the same id (same path without extension)")
    if not photos_info:
        raise DataError(source_root, None, "no usable photos left")

    # Pass 2: edits for a stratified, seeded share of each split's photos.
    make_edits = "edit" in cfg.kinds and cfg.edit_fraction > 0 and bool(cfg.edit_kinds)
    edited_ids: set[str] = set()
    if make_edits:
        groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
        for p in photos_info:
            groups[(p["split"], p["category"])].append(p)
        for g in groups.values():
            g = sorted(g, key=lambda p: _h(cfg.seed, "edit-select", p["sha256"], p["id"]))
            n = max(1, math.floor(cfg.edit_fraction * len(g) + 0.5))
            edited_ids.update(p["id"] for p in g[:n])
    # Canonical order of edit kinds, whatever order the user gave them in.
    edit_kinds = tuple(k for k in EDIT_KINDS if k in cfg.edit_kinds)
    to_edit = [p for p in photos_info if p["id"] in edited_ids]
    plans = _run_pool(
        _edit_photo,
        [(p["_src"], p["sha256"], str(cache), cfg.image_size, cfg.seed, edit_kinds, p["colour"]) for p in to_edit],
        workers,
        "catalog: edits",
        progress,
    )
    plan_of = {p["id"]: plan for p, plan in zip(to_edit, plans)}

    def rel_path(p: Path) -> str:
        try:
            return p.resolve().relative_to(out.resolve()).as_posix()
        except ValueError:
            return str(p.resolve())

    # Galleries.
    gallery: dict[str, list[_Image]] = {s: [] for s in SPLITS}
    edits_of: dict[str, list[_Image]] = defaultdict(list)
    for p in sorted(photos_info, key=lambda p: p["id"]):
        gallery[p["split"]].append(_Image(p["id"], rel_path(p["image"]), "photo", p["category"], p["colour"]["name"], p["id"]))
        for e in plan_of.get(p["id"], {}).get("edits", []):
            suffix = e["kind"] if e["kind"] != "rotate" else f"rotate{e['params']['angle']}"
            if e["kind"] == "recolour":
                suffix = f"recolour-{e['params']['target']}"
            img = _Image(
                f"{p['id']}@{suffix}",
                rel_path(cache / e["file"]),
                "edit",
                p["category"],
                e["colour"],
                p["id"],
                {"kind": e["kind"], "params": e["params"]},
            )
            gallery[p["split"]].append(img)
            edits_of[p["id"]].append(img)

    # Queries.
    queries: dict[str, list[Query]] = {}
    skipped_queries: dict[str, Counter] = {}
    for split in SPLITS:
        queries[split], skipped_queries[split] = _make_queries(gallery[split], edits_of, cfg)

    # Write annotations atomically: temp dir, then swap. A failure leaves the previous build untouched.
    ann = out / "annotations"
    tmp = out / f".annotations.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        manifest = _write_annotations(tmp, out, cache, cfg, photos, csv_path, photos_info, gallery, queries,
                                      skipped_queries, edited_ids, edit_kinds, plan_of, bad, rel_path, t0)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out / f".annotations.old-{os.getpid()}"
    if ann.exists():
        os.replace(ann, old)
    os.replace(tmp, ann)
    if old.exists():
        shutil.rmtree(old)
    return manifest


def _write_annotations(tmp: Path, out: Path, cache: Path, cfg: CatalogConfig, photos: str | Path | None,
                       csv_path: str | Path | None, photos_info: list[dict[str, Any]], gallery: dict[str, list[_Image]],
                       queries: dict[str, list[Query]], skipped_queries: dict[str, Counter], edited_ids: set[str],
                       edit_kinds: tuple[str, ...], plan_of: dict[str, Any], bad: list[tuple[str, str]], rel_path: Any,
                       t0: float) -> dict[str, Any]:
    """Every annotation file and the manifest (last) into ``tmp``; returns the manifest."""
    files: dict[str, str] = {}
    counts: dict[str, Any] = {}
    for split in SPLITS:
        g = gallery[split]
        _write_jsonl(tmp / f"gallery.{split}.jsonl", (im.to_dict() for im in g))
        _write_jsonl(tmp / f"queries.{split}.jsonl", (q.to_dict() for q in queries[split]))
        # The edit pairs are the edit queries seen as (source, instruction, edited) for edit pre-training.
        path_of = {im.id: im.path for im in g}
        pairs = [
            {
                "source": q.reference,
                "source_path": path_of[q.reference],
                "instruction": q.text,
                "instructions": list(q.captions),
                "edited": q.targets[0],
                "edited_path": path_of[q.targets[0]],
                "kind": q.meta["edit"]["kind"],
                "params": q.meta["edit"]["params"],
            }
            for q in queries[split]
            if q.meta.get("kind") == "edit"
        ]
        _write_jsonl(tmp / f"edit_pairs.{split}.jsonl", pairs)
        for name in (f"gallery.{split}.jsonl", f"queries.{split}.jsonl", f"edit_pairs.{split}.jsonl"):
            files[name] = sha256_file(tmp / name)
        counts[split] = {
            "photos": sum(im.kind == "photo" for im in g),
            "edits": sum(im.kind == "edit" for im in g),
            "gallery": len(g),
            "queries": dict(Counter(q.meta["kind"] for q in queries[split])),
            "queries_without_valid_target": dict(skipped_queries[split]),
            "edit_pairs": len(pairs),
        }
    recolour_missing = sum(
        1 for pid in edited_ids if "recolour" in edit_kinds and not any(e["kind"] == "recolour" for e in plan_of[pid]["edits"])
    )
    source_lines = sorted(f"{p['source_path']}\t{p['sha256']}\t{p['category']}\t{p['split']}" for p in photos_info)
    manifest = {
        "format_version": FORMAT_VERSION,
        "generator": "cirfusion data make-catalog",
        "config": {
            "seed": cfg.seed,
            "image_size": cfg.image_size,
            "edit_fraction": cfg.edit_fraction,
            "kinds": list(cfg.kinds),
            "edit_kinds": list(edit_kinds),
            "min_positives": cfg.min_positives,
            "max_per_category": cfg.max_per_category,
            "limit": cfg.limit,
            "skip_bad": cfg.skip_bad,
            "split_ratios": list(cfg.split_ratios),
            "jpeg_quality": JPEG_QUALITY,
            "edit_version": EDIT_VERSION,
            "analysis_version": ANALYSIS_VERSION,
        },
        "source": {
            "photos": str(Path(photos).resolve()) if photos is not None else None,
            "csv": str(Path(csv_path).resolve()) if csv_path is not None else None,
            "n_photos": len(photos_info),
            "digest": hashlib.sha256("\n".join(source_lines).encode()).hexdigest(),
        },
        "cache_dir": rel_path(cache),
        "split_aliases": SPLIT_ALIASES,
        "palette": {n: {"representative": list(REPRESENTATIVE[n]), "prototypes": [list(p) for p in PALETTE[n]]} for n in COLOUR_NAMES},
        "categories": sorted({p["category"] for p in photos_info}),
        "counts": counts,
        "recolour_not_possible": recolour_missing,
        "skipped": [{"path": p, "error": m} for p, m in bad],
        "photos": [
            {k: (rel_path(v) if k == "image" else v) for k, v in p.items() if not k.startswith("_")}
            for p in sorted(photos_info, key=lambda p: p["id"])
        ],
        "files": files,
        "build_seconds": None,
    }
    manifest["build_seconds"] = round(time.time() - t0, 2)
    _atomic_write_text(tmp / "manifest.json", json.dumps(manifest, indent=1, sort_keys=False))
    return manifest


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n")


def _make_queries(
    gallery: list[_Image], edits_of: dict[str, list[_Image]], cfg: CatalogConfig
) -> tuple[list[Query], Counter]:
    """Queries of one split. Targets list every matching gallery image in gallery order."""
    by_attr: dict[tuple[str, str], list[_Image]] = defaultdict(list)
    for im in gallery:
        by_attr[(im.category, im.colour)].append(im)
    categories = sorted({im.category for im in gallery})
    colours = [c for c in COLOUR_NAMES if any(im.colour == c for im in gallery)]
    queries: list[Query] = []
    skipped: Counter = Counter()

    total = {a: len(v) for a, v in by_attr.items()}

    def matches(cat: str, col: str) -> list[str]:
        return [im.id for im in by_attr.get((cat, col), ())]

    for im in gallery:
        if im.kind != "photo":
            continue
        # The reference and its own edits do not count towards the minimum: the text must pick out other items.
        own = Counter((x.category, x.colour) for x in [im, *edits_of.get(im.id, [])])

        def enough(cat: str, col: str) -> bool:
            return total.get((cat, col), 0) - own[(cat, col)] >= cfg.min_positives

        rng = random.Random(_h(cfg.seed, "queries", im.id))
        base_meta = {"ref_category": im.category, "ref_colour": im.colour}
        if "category" in cfg.kinds:
            opts = [c for c in categories if c != im.category and enough(c, im.colour)]
            if opts:
                c = rng.choice(opts)
                caps = category_texts(c)
                queries.append(
                    Query(
                        qid=f"category:{im.id}",
                        reference=im.id,
                        text=rng.choice(caps),
                        targets=tuple(matches(c, im.colour)),
                        captions=tuple(caps),
                        meta={"kind": "category", **base_meta, "target_category": c, "target_colour": im.colour},
                    )
                )
            else:
                skipped["category"] += 1
        if "colour" in cfg.kinds:
            opts = [k for k in colours if k != im.colour and enough(im.category, k)]
            if opts:
                k = rng.choice(opts)
                caps = colour_texts(im.category, k)
                queries.append(
                    Query(
                        qid=f"colour:{im.id}",
                        reference=im.id,
                        text=rng.choice(caps),
                        targets=tuple(matches(im.category, k)),
                        captions=tuple(caps),
                        meta={"kind": "colour", **base_meta, "target_category": im.category, "target_colour": k},
                    )
                )
            else:
                skipped["colour"] += 1
        if "both" in cfg.kinds:
            opts = [(c, k) for c in categories for k in colours if c != im.category and k != im.colour and enough(c, k)]
            if opts:
                c, k = rng.choice(opts)
                caps = both_texts(c, k)
                queries.append(
                    Query(
                        qid=f"both:{im.id}",
                        reference=im.id,
                        text=rng.choice(caps),
                        targets=tuple(matches(c, k)),
                        captions=tuple(caps),
                        meta={"kind": "both", **base_meta, "target_category": c, "target_colour": k},
                    )
                )
            else:
                skipped["both"] += 1
        if "edit" in cfg.kinds:
            edits = edits_of.get(im.id, [])
            subset = (im.id,) + tuple(e.id for e in edits)
            for e in edits:
                assert e.edit is not None
                caps = edit_texts(e.edit["kind"], e.edit["params"], im.category)
                queries.append(
                    Query(
                        qid=f"edit:{e.id}",
                        reference=im.id,
                        text=rng.choice(caps),
                        targets=(e.id,),
                        captions=tuple(caps),
                        subset=subset,
                        meta={"kind": "edit", **base_meta, "edit": e.edit, "target_colour": e.colour},
                    )
                )
    return queries, skipped


# ----------------------------------------------------------------------------------------------------------------
# Reading back


def _read_manifest(root: str | Path) -> dict[str, Any]:
    mf = Path(root) / "annotations" / "manifest.json"
    if not mf.is_file():
        raise DataError(mf, None, "not a catalog benchmark (no annotations/manifest.json); build one with `cirfusion data make-catalog`")
    try:
        m = json.loads(mf.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(mf, None, f"invalid JSON ({exc})") from exc
    if not isinstance(m, dict) or m.get("format_version") != FORMAT_VERSION:
        got = m.get("format_version") if isinstance(m, dict) else None
        raise DataError(mf, None, f"catalog format version {got!r} is not supported (expected {FORMAT_VERSION}); rebuild it")
    return m


def _read_jsonl(path: Path, manifest: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The objects of one of the build's JSONL files, checked against the sha256 the manifest recorded."""
    require_file(path)
    if manifest is not None:
        want = manifest.get("files", {}).get(path.name)
        if want is not None and sha256_file(path) != want:
            raise DataError(path, None, "file changed since the build (sha256 differs from manifest.json); rebuild the catalog")
    return [r for _, r in read_jsonl(path)]


def _parse_kinds(kinds: str | Sequence[str] | None) -> tuple[str, ...] | None:
    if kinds is None:
        return None
    ks = tuple(k.strip() for k in (kinds.split(",") if isinstance(kinds, str) else kinds) if k.strip())
    bad = [k for k in ks if k not in QUERY_KINDS]
    if bad or not ks:
        raise ValueError(f"unknown query kind(s) {bad or ks}; choose from {', '.join(QUERY_KINDS)}")
    return ks


def _split_name(split: str) -> str:
    s = SPLIT_ALIASES.get(split.strip().lower())
    if s is None:
        raise ValueError(f"unknown catalog split {split!r}; expected train, val or test")
    return s


@register_dataset("catalog")
def load_catalog(
    root: str | Path, split: str, kinds: str | Sequence[str] | None = None, text_policy: str = "fixed"
) -> CIRDataset:
    """A split of a catalog benchmark written by :func:`build_catalog` (``split`` ``validation`` reads as ``val``).

    ``kinds``: keep only these query kinds (``"category,colour"`` or a list); the gallery is unchanged.
    ``text_policy="random"`` gives a random wording variant of each query at training time.
    """
    root = Path(root)
    split = _split_name(split)
    m = _read_manifest(root)
    ann = root / "annotations"
    gfile, qfile = ann / f"gallery.{split}.jsonl", ann / f"queries.{split}.jsonl"
    ids, paths = [], []
    for i, r in enumerate(_read_jsonl(gfile, m), 1):
        if "id" not in r or "path" not in r:
            raise DataError(gfile, f"line {i}", "gallery entry needs 'id' and 'path'")
        p = Path(r["path"])
        ids.append(str(r["id"]))
        paths.append(p if p.is_absolute() else root / p)
    gallery = Gallery(ids, paths, source=gfile)
    keep = _parse_kinds(kinds)
    queries = []
    for i, r in enumerate(_read_jsonl(qfile, m), 1):
        q = Query.from_dict(r, qfile, f"line {i}")
        if keep is None or q.meta.get("kind") in keep:
            queries.append(q)
    ds = CIRDataset(
        name="catalog",
        split=split,
        queries=queries,
        gallery=gallery,
        root=root,
        files=[qfile, gfile, ann / "manifest.json"],
        exclude_reference=True,
        text_policy=text_policy,
        meta={"kinds": list(keep or m["config"]["kinds"]), "seed": m["config"]["seed"], "colours": list(m["palette"])},
    )
    ds.validate()
    return ds


@dataclass(frozen=True)
class EditPair:
    """(source photo, instruction, edited image): image-editing pre-training data."""

    source: str
    source_path: Path
    instruction: str
    edited: str
    edited_path: Path
    kind: str
    params: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    instructions: tuple[str, ...] = ()


def load_edit_pairs(root: str | Path, split: str) -> list[EditPair]:
    """The edit pairs of a split (``edit_pairs.{split}.jsonl``), paths resolved against ``root``."""
    root = Path(root)
    split = _split_name(split)
    m = _read_manifest(root)
    f = root / "annotations" / f"edit_pairs.{split}.jsonl"
    out = []
    for i, r in enumerate(_read_jsonl(f, m), 1):
        try:
            sp, ep = Path(r["source_path"]), Path(r["edited_path"])
            out.append(
                EditPair(
                    source=str(r["source"]),
                    source_path=sp if sp.is_absolute() else root / sp,
                    instruction=str(r["instruction"]),
                    edited=str(r["edited"]),
                    edited_path=ep if ep.is_absolute() else root / ep,
                    kind=str(r["kind"]),
                    params=dict(r.get("params", {})),
                    instructions=tuple(str(x) for x in r.get("instructions", ())),
                )
            )
        except KeyError as exc:
            raise DataError(f, f"line {i}", f"missing field {exc.args[0]!r}") from None
    return out


# ----------------------------------------------------------------------------------------------------------------
# Statistics and a contact sheet


def _summary(xs: Sequence[float]) -> dict[str, float]:
    if not xs:
        return {"n": 0}
    return {
        "n": len(xs),
        "mean": round(float(statistics.fmean(xs)), 2),
        "median": float(statistics.median(xs)),
        "min": float(min(xs)),
        "max": float(max(xs)),
    }


def benchmark_stats(root: str | Path) -> dict[str, Any]:
    """Statistics of a built catalog, read from its annotation files only (the images need not exist):
    per split the gallery size, queries per kind, positives per query, subset sizes, colour/category
    distributions of the photos, and edit kinds."""
    root = Path(root)
    m = _read_manifest(root)
    ann = root / "annotations"
    out: dict[str, Any] = {
        "root": str(root),
        "seed": m["config"]["seed"],
        "config": m["config"],
        "photos": m["source"]["n_photos"],
        "categories": m["categories"],
        "build_seconds": m.get("build_seconds"),
        "recolour_not_possible": m.get("recolour_not_possible", 0),
        "skipped_photos": len(m.get("skipped", [])),
        "splits": {},
    }
    all_colours: Counter = Counter()
    for split in SPLITS:
        g = _read_jsonl(ann / f"gallery.{split}.jsonl", m)
        qs = _read_jsonl(ann / f"queries.{split}.jsonl", m)
        photos = [r for r in g if r.get("kind") == "photo"]
        colours = Counter(r["colour"] for r in photos)
        all_colours.update(colours)
        kinds = Counter(q["meta"]["kind"] for q in qs)
        pos = {k: _summary([len(q["targets"]) for q in qs if q["meta"]["kind"] == k]) for k in QUERY_KINDS if kinds[k]}
        multi = [len(q["targets"]) for q in qs if q["meta"]["kind"] != "edit"]
        if multi:
            pos["category+colour+both"] = _summary(multi)
        out["splits"][split] = {
            "gallery": len(g),
            "photos": len(photos),
            "edits": len(g) - len(photos),
            "queries": {**{k: kinds[k] for k in QUERY_KINDS if kinds[k]}, "total": len(qs)},
            "positives_per_query": pos,
            "subset_size": _summary([len(q["subset"]) for q in qs if q.get("subset")]),
            "colour_distribution": {c: colours[c] for c in COLOUR_NAMES if colours[c]},
            "category_distribution": dict(sorted(Counter(r["category"] for r in photos).items())),
            "edit_kinds": dict(sorted(Counter(r["edit"]["kind"] for r in g if r.get("kind") == "edit").items())),
            "queries_without_valid_target": m["counts"][split].get("queries_without_valid_target", {}),
        }
    out["colour_distribution"] = {c: all_colours[c] for c in COLOUR_NAMES if all_colours[c]}
    return out


def format_stats(stats: dict[str, Any]) -> str:
    """A readable multi-line rendering of :func:`benchmark_stats`."""
    lines = [
        f"catalog benchmark at {stats['root']} (seed {stats['seed']}, {stats['photos']} photos, "
        f"{len(stats['categories'])} categories, built in {stats['build_seconds']} s)",
        "photo colours: " + ", ".join(f"{c} {n}" for c, n in stats["colour_distribution"].items()),
    ]
    for split, s in stats["splits"].items():
        lines.append(f"[{split}] gallery {s['gallery']} = {s['photos']} photos + {s['edits']} edits; queries {s['queries']['total']}: "
                     + ", ".join(f"{k} {n}" for k, n in s["queries"].items() if k != "total"))
        for k, p in s["positives_per_query"].items():
            if p.get("n"):
                lines.append(f"    positives/query {k:>21}: mean {p['mean']}, median {p['median']:g}, min {p['min']:g}, max {p['max']:g}")
        if s["subset_size"].get("n"):
            ss = s["subset_size"]
            lines.append(f"    subset size (edit queries): mean {ss['mean']}, min {ss['min']:g}, max {ss['max']:g}")
        if s["queries_without_valid_target"]:
            lines.append(f"    photos without a valid target (fewer than min_positives matches): {s['queries_without_valid_target']}")
    if stats.get("recolour_not_possible"):
        lines.append(f"recolour edit not possible for {stats['recolour_not_possible']} photo(s) (no target colour verified)")
    if stats.get("skipped_photos"):
        lines.append(f"skipped bad photos: {stats['skipped_photos']} (listed in annotations/manifest.json)")
    return "\n".join(lines)


def contact_sheet(root: str | Path, out_png: str | Path, split: str = "train", n: int = 40, seed: int = 0, cols: int = 8) -> Path:
    """A PNG of ``n`` random photos of a split with their estimated colour (swatch + name) and category, then
    one photo with all its edits: a quick visual check of the colour estimator and the edits."""
    from PIL import ImageDraw

    root = Path(root)
    split = _split_name(split)
    m = _read_manifest(root)
    g = _read_jsonl(root / "annotations" / f"gallery.{split}.jsonl", m)
    lab_of = {p["id"]: p["colour"] for p in m["photos"]}
    photos = [r for r in g if r["kind"] == "photo"]
    rng = random.Random(seed)
    pick = rng.sample(photos, min(n, len(photos)))
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in g:
        if r["kind"] == "edit":
            groups[r["source"]].append(r)
    group: list[dict[str, Any]] = []
    if groups:
        src = rng.choice(sorted(groups))
        group = [next(r for r in photos if r["id"] == src)] + groups[src]
    W, H, T = 150, 190, 28
    rows = math.ceil(len(pick) / cols) + math.ceil(len(group) / cols)
    sheet = Image.new("RGB", (W * cols, (H + T) * max(rows, 1)), "white")
    d = ImageDraw.Draw(sheet)

    def cell(k: int, r: dict[str, Any], label: str) -> None:
        p = Path(r["path"])
        im = Image.open(p if p.is_absolute() else root / p).convert("RGB")
        im.thumbnail((W - 4, H - 4))
        x, y = (k % cols) * W, (k // cols) * (H + T)
        sheet.paste(im, (x + 2, y + 2))
        rgb = tuple(lab_of.get(r["id"], {}).get("rgb") or REPRESENTATIVE[r["colour"]])
        d.rectangle([x + 2, y + H, x + 22, y + H + T - 4], fill=rgb, outline="black")
        d.text((x + 26, y + H + 1), label, fill="black")

    for k, r in enumerate(pick):
        cell(k, r, f"{r['colour']}\n{r['category']}")
    start = math.ceil(len(pick) / cols) * cols
    for k, r in enumerate(group):
        label = "photo" if r["kind"] == "photo" else r["edit"]["kind"] + " " + ",".join(f"{v}" for v in r["edit"]["params"].values())
        cell(start + k, r, f"{label}\n{r['colour']}")
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_png)
    return out_png
