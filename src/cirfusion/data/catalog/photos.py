"""Catalog benchmark, input discovery: photos of a ``<split>/<category>/`` or ``<category>/`` folder or of a CSV
``path,category[,split]``, and the seeded per-category / total caps on how many are used.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..schema import DataError
from .config import IMAGE_EXTS, SPLIT_ALIASES, CatalogConfig, _h


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
        odd = [p.name for p, s in zip(top, is_split, strict=False) if not s]
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
