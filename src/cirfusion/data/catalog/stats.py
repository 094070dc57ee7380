"""Catalog benchmark, statistics of a built catalog (from its annotation files only), their text rendering and a
contact sheet of photos, colours and edits.
"""

from __future__ import annotations

import math
import random
import statistics
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from ..colors import (
    COLOUR_NAMES,
    REPRESENTATIVE,
)
from ..images import load_image
from .config import QUERY_KINDS, SPLITS
from .loader import _read_jsonl, _read_manifest, _split_name


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
        im = load_image(p if p.is_absolute() else root / p)
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
