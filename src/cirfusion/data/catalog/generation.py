"""Catalog benchmark, building: ``build_catalog`` analyses and resizes every photo, edits a seeded share of them,
assigns splits, makes the queries of every split and writes the annotation files and the manifest into a
temporary directory that ``cirfusion.io.atomic_directory`` swaps in as ``annotations/``.
"""

from __future__ import annotations

import hashlib
import math
import multiprocessing as mp
import os
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ...io import atomic_directory
from ...options import OptionError
from ..colors import (
    COLOUR_NAMES,
    PALETTE,
    REPRESENTATIVE,
)
from ..generated import OutputKind, write_json, write_jsonl
from ..schema import DataError, Query, sha256_file
from .cache import _analyse_photo, _photo_cache_path
from .config import (
    ANALYSIS_VERSION,
    EDIT_KINDS,
    EDIT_VERSION,
    FORMAT_VERSION,
    JPEG_QUALITY,
    SPLIT_ALIASES,
    SPLITS,
    CatalogConfig,
    _h,
)
from .edits import _edit_photo
from .photos import _select_entries, read_photo_csv, scan_photo_folder
from .queries import _Image, _make_queries

# What a rebuild may replace: the annotations/ directory of an earlier make-catalog build.
OUTPUT = OutputKind("make-catalog", "generator", "cirfusion data make-catalog",
                    ("manifest.json", "gallery.*.jsonl", "queries.*.jsonl", "edit_pairs.*.jsonl"))


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
    for name, r in zip(SPLITS, ratios, strict=False):
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
        raise OptionError("give photos (a folder) or csv_path")
    entries = _select_entries(entries, cfg)
    out = Path(out)
    OUTPUT.check_replaceable(out / "annotations")  # a rebuild replaces annotations/ only if a build wrote it
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
    for e, r in zip(entries, recs, strict=False):
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
    plan_of = {p["id"]: plan for p, plan in zip(to_edit, plans, strict=False)}

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

    # Annotations go to a temporary directory swapped in at the end: a failure leaves the previous build untouched.
    OUTPUT.check_replaceable(out / "annotations")  # again: it may have changed during the long passes above
    with atomic_directory(out / "annotations") as tmp:
        manifest = _write_annotations(tmp, out, cache, cfg, photos, csv_path, photos_info, gallery, queries,
                                      skipped_queries, edited_ids, edit_kinds, plan_of, bad, rel_path, t0)
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
        write_jsonl(tmp / f"gallery.{split}.jsonl", (im.to_dict() for im in g), sort_keys=True)
        write_jsonl(tmp / f"queries.{split}.jsonl", (q.to_dict() for q in queries[split]), sort_keys=True)
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
        write_jsonl(tmp / f"edit_pairs.{split}.jsonl", pairs, sort_keys=True)
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
        "generator": OUTPUT.value,
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
    write_json(tmp / "manifest.json", manifest, ensure_ascii=True, final_newline=False)  # the bytes it always had
    return manifest
