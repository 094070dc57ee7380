"""Catalog benchmark, configuration: format and cache versions, split names, query and edit kinds, ``CatalogConfig``
(everything that shapes a build, recorded in the manifest) and the seeded hash every choice is drawn from.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from ...options import OptionError

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
            raise OptionError(f"unknown query kind(s) {bad}; choose from {', '.join(QUERY_KINDS)}")
        bad = [k for k in self.edit_kinds if k not in EDIT_KINDS]
        if bad:
            raise OptionError(f"unknown edit kind(s) {bad}; choose from {', '.join(EDIT_KINDS)}")
        if not 0.0 <= self.edit_fraction <= 1.0:
            raise OptionError(f"edit_fraction must be in [0, 1], got {self.edit_fraction}")
        if self.image_size < 32:
            raise OptionError(f"image_size must be at least 32 pixels, got {self.image_size}")
        if self.min_positives < 1:
            raise OptionError(f"min_positives must be at least 1, got {self.min_positives}")
        for name in ("max_per_category", "limit"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise OptionError(f"{name} must be at least 1, got {v}")
        if len(self.split_ratios) != 3 or min(self.split_ratios) < 0 or sum(self.split_ratios) <= 0:
            raise OptionError(f"split_ratios must be three non-negative numbers, got {self.split_ratios}")


def _h(*parts: Any) -> str:
    return hashlib.sha256(":".join(str(p) for p in parts).encode()).hexdigest()
