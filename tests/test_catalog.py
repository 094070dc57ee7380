"""Embedded benchmark B (catalog): colour naming, positives completeness, edits, determinism, cache reuse,
loader round trip, malformed input, and a small build on the real clothing-small photos."""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cirfusion.data import DataError, load_dataset
from cirfusion.data.catalog import (
    CatalogConfig,
    benchmark_stats,
    build_catalog,
    contact_sheet,
    edit_texts,
    format_stats,
    load_catalog,
    load_edit_pairs,
    read_photo_csv,
    scan_photo_folder,
)
from cirfusion.data.colors import COLOUR_NAMES, PALETTE, REPRESENTATIVE, estimate_colour, foreground_mask, name_lab, srgb_to_lab
from conftest import SHARED_DATA

REAL = SHARED_DATA / "clothing-small"  # conftest: ../shared/data or $CIRFUSION_SHARED_DATA


# ------------------------------------------------------------------------------------------------ synthetic photos


def item_photo(colour: str, seed: int, size: tuple[int, int] = (96, 128), bg: tuple[int, int, int] | None = None,
               touch_edges: bool = False, gradient: bool = False) -> Image.Image:
    """A solid-colour 'garment' (with shading and noise) on a plain background, plus a dark mark on its left
    side so that mirroring is visible."""
    rng = np.random.default_rng(seed)
    w, h = size
    if bg is None:
        bg = (150, 110, 70) if colour in ("white", "beige") else (242, 240, 236)
    img = np.empty((h, w, 3), dtype=np.float64)
    img[:] = bg
    if gradient:  # lighting falls off from the top-left corner of the floor
        yy, xx = np.mgrid[0:h, 0:w]
        img *= (1.0 - 0.18 * (xx / w + yy / h) / 2)[..., None]
    x0, x1 = int(w * 0.18), int(w * 0.66)  # off-centre, so that a mirror image differs
    y0, y1 = (0, h) if touch_edges else (int(h * 0.2), int(h * 0.8))
    shade = np.linspace(1.05, 0.92, y1 - y0)[:, None, None]
    img[y0:y1, x0:x1] = np.array(REPRESENTATIVE[colour], dtype=np.float64) * shade
    img[y0 + 4 : y0 + 14, x0 + 2 : x0 + 8] = (10, 10, 10)
    img += rng.normal(0, 3, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


ITEM_COLOURS = ("red", "blue", "green")
CATEGORIES = ("shirt", "skirt", "hat")


def make_folder(root: Path, per_cell: dict[str, int] | None = None, split_dir_val: str = "validation") -> dict[str, str]:
    """<root>/<split>/<category>/<n>.jpg with known colours; returns {relative path: true colour}."""
    per_cell = per_cell or {"train": 3, split_dir_val: 2, "test": 2}
    truth = {}
    k = 0
    for split, n in per_cell.items():
        for cat in CATEGORIES:
            d = root / split / cat
            d.mkdir(parents=True, exist_ok=True)
            for col in ITEM_COLOURS:
                for i in range(n):
                    k += 1
                    p = d / f"{col}{i}.jpg"
                    item_photo(col, k).save(p, quality=95)
                    truth[p.relative_to(root).as_posix()] = col
    (root / "README.md").write_text("not an image")
    return truth


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    base = tmp_path_factory.mktemp("catalog")
    photos = base / "photos"
    truth = make_folder(photos)
    cfg = CatalogConfig(seed=3, image_size=64, edit_fraction=0.2, min_positives=2)
    out = base / "out"
    manifest = build_catalog(out, photos=photos, config=cfg, workers=1, progress=False)
    return {"base": base, "photos": photos, "truth": truth, "out": out, "cfg": cfg, "manifest": manifest}


def read_jsonl(p: Path) -> list[dict]:
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------ colours


def test_palette_prototypes_name_themselves():
    for name, protos in PALETTE.items():
        for rgb in protos:
            assert name_lab(srgb_to_lab(np.array(rgb, dtype=float))) == name, (name, rgb)
        assert name_lab(srgb_to_lab(np.array(REPRESENTATIVE[name], dtype=float))) == name
    # Near-neutral colours are only ever black/grey/white.
    assert name_lab(srgb_to_lab(np.array([128, 126, 131.0]))) == "grey"


@pytest.mark.parametrize("colour", COLOUR_NAMES)
def test_estimate_colour_of_synthetic_items(colour):
    assert estimate_colour(item_photo(colour, 1)).name == colour
    # Lighting gradient across the floor, and an item touching the top and bottom edges (trousers).
    assert estimate_colour(item_photo(colour, 2, gradient=True)).name == colour
    assert estimate_colour(item_photo(colour, 3, touch_edges=True)).name == colour


def test_foreground_mask_finds_the_item_not_the_background():
    img = item_photo("blue", 5, size=(96, 128), bg=(200, 40, 40))  # a red bed behind a blue item
    fg, fallback = foreground_mask(img)
    truth = np.zeros(fg.shape, bool)
    truth[int(128 * 0.2) : int(128 * 0.8), int(96 * 0.18) : int(96 * 0.66)] = True
    iou = (fg & truth).sum() / (fg | truth).sum()
    assert not fallback and iou > 0.85
    # An item that cannot be told from its background falls back to the centre, and says so.
    flat = Image.new("RGB", (96, 128), (120, 120, 120))
    assert foreground_mask(flat)[1] is True


# ------------------------------------------------------------------------------------------------ build


def test_photo_attributes_and_splits(built):
    m, truth = built["manifest"], built["truth"]
    assert len(m["photos"]) == len(truth)
    for p in m["photos"]:
        assert p["colour"]["name"] == truth[p["source_path"]], p
        assert p["category"] == p["source_path"].split("/")[1]
        # "validation" folder -> split "val"
        assert p["split"] == {"train": "train", "validation": "val", "test": "test"}[p["source_path"].split("/")[0]]
    assert set(m["counts"]) == {"train", "val", "test"}
    assert m["source"]["n_photos"] == len(truth) and len(m["source"]["digest"]) == 64


def test_every_matching_image_is_a_target(built):
    out, cfg = built["out"], built["cfg"]
    for split in ("train", "val", "test"):
        gallery = read_jsonl(out / "annotations" / f"gallery.{split}.jsonl")
        attrs = {g["id"]: (g["category"], g["colour"]) for g in gallery}
        source = {g["id"]: g["source"] for g in gallery}
        kinds = defaultdict(int)
        for q in read_jsonl(out / "annotations" / f"queries.{split}.jsonl"):
            meta = q["meta"]
            kinds[meta["kind"]] += 1
            ref_cat, ref_col = attrs[q["reference"]]
            if meta["kind"] == "edit":
                continue
            want = (meta["target_category"], meta["target_colour"])
            expected = [i for i, a in attrs.items() if a == want]
            assert q["targets"] == expected, q["qid"]  # every match, in gallery order
            assert q["reference"] not in q["targets"]
            assert sum(source[t] != q["reference"] for t in q["targets"]) >= cfg.min_positives
            if meta["kind"] == "category":
                assert want[0] != ref_cat and want[1] == ref_col
            elif meta["kind"] == "colour":
                assert want[0] == ref_cat and want[1] != ref_col
            else:
                assert want[0] != ref_cat and want[1] != ref_col
            assert q["text"] in q["captions"]
        assert kinds["category"] and kinds["colour"] and kinds["both"] and kinds["edit"], (split, dict(kinds))


def test_edits_are_what_they_say(built):
    out = built["out"]
    gallery = read_jsonl(out / "annotations" / "gallery.train.jsonl")
    path = {g["id"]: out / g["path"] for g in gallery}
    edits = [g for g in gallery if g["kind"] == "edit"]
    assert {e["edit"]["kind"] for e in edits} == {"recolour", "mirror", "crop", "rotate", "brightness"}
    checked = set()
    for e in edits:
        src = np.asarray(Image.open(path[e["source"]]).convert("RGB"), dtype=np.float64)
        img = Image.open(path[e["id"]]).convert("RGB")
        arr = np.asarray(img, dtype=np.float64)
        kind, params = e["edit"]["kind"], e["edit"]["params"]
        if kind == "mirror":
            assert np.abs(arr - src[:, ::-1]).mean() < 4 < 3 * 4 < np.abs(arr - src).mean()
        elif kind == "rotate":
            k = {90: 1, 180: 2, 270: 3}[params["angle"]]  # counter-clockwise quarter turns
            rot = np.rot90(src, k)
            assert arr.shape == rot.shape and np.abs(arr - rot).mean() < 4
        elif kind == "brightness":
            ratio = arr.mean() / src.mean()
            assert (ratio < 0.75) if params["factor"] < 1 else (ratio > 1.1)
        elif kind == "crop":
            assert arr.shape == src.shape  # zoomed back to the photo's size
            z, region = params["zoom"], params["region"]
            h, w = src.shape[:2]
            ch, cw = round(h / z), round(w / z)
            top = {"centre": (h - ch) // 2, "top": 0, "bottom": h - ch}[region]
            left = (w - cw) // 2
            crop = Image.fromarray(src[top : top + ch, left : left + cw].astype(np.uint8)).resize((w, h))
            assert np.abs(arr - np.asarray(crop, dtype=np.float64)).mean() < 12
        elif kind == "recolour":
            assert e["colour"] == params["target"] != built["truth"][e["source"] + ".jpg"]
            assert estimate_colour(img).name == params["target"]
        checked.add(kind)
        assert e["category"] == next(g["category"] for g in gallery if g["id"] == e["source"])
    assert checked == {"recolour", "mirror", "crop", "rotate", "brightness"}
    # Edit queries: target = the edit, subset = reference + all its edits; pairs mirror the queries.
    qs = [q for q in read_jsonl(out / "annotations" / "queries.train.jsonl") if q["meta"]["kind"] == "edit"]
    by_source = defaultdict(list)
    for e in edits:
        by_source[e["source"]].append(e["id"])
    for q in qs:
        assert q["subset"] == [q["reference"]] + by_source[q["reference"]]
        assert q["targets"][0] in by_source[q["reference"]]
        assert q["text"] in edit_texts(q["meta"]["edit"]["kind"], q["meta"]["edit"]["params"], "shirt") or q["text"] in q["captions"]
    pairs = load_edit_pairs(out, "train")
    assert [(p.source, p.edited, p.instruction) for p in pairs] == [(q["reference"], q["targets"][0], q["text"]) for q in qs]
    assert all(p.source_path.is_file() and p.edited_path.is_file() for p in pairs)
    # The loader's split "edit_pairs" (DetailFusion's stage 1, e.g. through `cirfusion train`) is the same pairs.
    ds = load_dataset("catalog", out, "edit_pairs")
    assert [(q.reference, q.targets[0], q.text) for q in ds.queries] == [(p.source, p.edited, p.instruction) for p in pairs]
    assert ds.split == "edit_pairs" and all(q.meta["edit_pair"] for q in ds.queries)


def test_deterministic_and_seed_dependent(built, tmp_path):
    cfg = built["cfg"]
    a = built["out"] / "annotations"
    b_out = tmp_path / "again"
    build_catalog(b_out, photos=built["photos"], config=cfg, workers=1, progress=False)
    for name in ("gallery.train.jsonl", "queries.train.jsonl", "queries.val.jsonl", "edit_pairs.test.jsonl"):
        assert (a / name).read_bytes() == (b_out / "annotations" / name).read_bytes(), name
    c_out = tmp_path / "other-seed"
    cfg2 = CatalogConfig(**{**cfg.__dict__, "seed": cfg.seed + 1})
    build_catalog(c_out, photos=built["photos"], config=cfg2, workers=1, progress=False)
    assert (a / "queries.train.jsonl").read_bytes() != (c_out / "annotations" / "queries.train.jsonl").read_bytes()


def test_two_workers_give_the_same_build(built, tmp_path):
    out = tmp_path / "w2"
    build_catalog(out, photos=built["photos"], config=built["cfg"], cache_dir=tmp_path / "cache2", workers=2, progress=False)
    for split in ("train", "val", "test"):
        # Paths differ (separate cache); everything else is identical.
        mine = [{k: v for k, v in r.items() if k != "path"} for r in read_jsonl(out / "annotations" / f"gallery.{split}.jsonl")]
        ref = [{k: v for k, v in r.items() if k != "path"} for r in read_jsonl(built["out"] / "annotations" / f"gallery.{split}.jsonl")]
        assert mine == ref
        assert (out / "annotations" / f"queries.{split}.jsonl").read_bytes() == (built["out"] / "annotations" / f"queries.{split}.jsonl").read_bytes()


def test_cache_is_reused_not_rewritten(built, tmp_path):
    photos = tmp_path / "p"
    make_folder(photos, {"train": 2, "test": 2})
    cache = tmp_path / "shared-cache"
    cfg = CatalogConfig(seed=0, image_size=64, edit_fraction=0.5)
    build_catalog(tmp_path / "o1", photos=photos, config=cfg, cache_dir=cache, workers=1, progress=False)
    before = {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}
    assert any("edits" in p.parts for p in before) and any("photos" in p.parts for p in before)
    m2 = build_catalog(tmp_path / "o2", photos=photos, config=cfg, cache_dir=cache, workers=1, progress=False)
    after = {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}
    assert after == before  # no file rewritten, none added
    assert m2["cache_dir"].startswith("/")  # a cache outside the output is referenced by absolute path
    ds = load_dataset("catalog", tmp_path / "o2", "test")
    assert all(p.is_file() for p in ds.gallery.paths)
    # Rebuilding into the same directory replaces the annotations atomically and leaves no temp dirs behind.
    build_catalog(tmp_path / "o2", photos=photos, config=cfg, cache_dir=cache, workers=1, progress=False)
    assert sorted(p.name for p in (tmp_path / "o2").iterdir()) == ["annotations"]


def test_failed_write_keeps_the_previous_build(built, tmp_path, monkeypatch):
    import shutil

    from cirfusion.data.catalog import generation

    out = tmp_path / "keep"
    shutil.copytree(built["out"], out)
    before = (out / "annotations" / "queries.train.jsonl").read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(generation, "_write_annotations", boom)
    with pytest.raises(OSError, match="disk full"):
        build_catalog(out, photos=built["photos"], config=built["cfg"], workers=1, progress=False)
    assert (out / "annotations" / "queries.train.jsonl").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["annotations", "cache"]  # no temp dir left behind


def test_rebuild_replaces_only_a_make_catalog_annotations_folder(built, tmp_path):
    import shutil

    # An annotations/ folder of the user's in the output directory: refused with a clear error, left intact.
    out = tmp_path / "mine"
    (out / "annotations").mkdir(parents=True)
    (out / "annotations" / "thesis.txt").write_text("four years of work")
    with pytest.raises(DataError, match="does not look like a make-catalog output") as exc:
        build_catalog(out, photos=built["photos"], config=built["cfg"], workers=1, progress=False)
    assert str(out / "annotations") in str(exc.value)
    assert [p.name for p in (out / "annotations").iterdir()] == ["thesis.txt"]
    assert (out / "annotations" / "thesis.txt").read_text() == "four years of work"
    assert sorted(p.name for p in out.iterdir()) == ["annotations"]  # refused before any work (no cache/)

    # A previous build is replaced (here with another seed).
    prev = tmp_path / "prev"
    shutil.copytree(built["out"], prev)
    m = build_catalog(prev, photos=built["photos"], config=CatalogConfig(**{**built["cfg"].__dict__, "seed": 4}),
                      workers=1, progress=False)
    assert m["config"]["seed"] == 4
    assert json.loads((prev / "annotations" / "manifest.json").read_text())["config"]["seed"] == 4
    # ... but not once the user put a file of theirs into it.
    (prev / "annotations" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=r"notes\.txt"):
        build_catalog(prev, photos=built["photos"], config=built["cfg"], workers=1, progress=False)
    assert (prev / "annotations" / "notes.txt").is_file()
    assert json.loads((prev / "annotations" / "manifest.json").read_text())["config"]["seed"] == 4


# ------------------------------------------------------------------------------------------------ reading back


def test_loader_round_trip_and_stats(built, tmp_path):
    out = built["out"]
    ds = load_dataset("catalog", out, "validation")  # alias of val
    assert ds.name == "catalog" and ds.split == "val" and ds.exclude_reference
    raw = read_jsonl(out / "annotations" / "queries.val.jsonl")
    assert [q.to_dict() for q in ds.queries] == raw
    assert all(p.is_file() for p in ds.gallery.paths)
    ds.validate()
    only = load_catalog(out, "val", kinds="colour,both")
    assert {q.meta["kind"] for q in only.queries} == {"colour", "both"} and len(only.gallery) == len(ds.gallery)
    rnd = load_catalog(out, "val", text_policy="random")
    assert rnd.text_policy == "random"
    with pytest.raises(ValueError):
        load_catalog(out, "val", kinds="nonsense")
    with pytest.raises(ValueError):
        load_catalog(out, "dev-2")

    st = benchmark_stats(out)
    s = st["splits"]["val"]
    assert s["queries"]["total"] == len(ds.queries)
    assert s["gallery"] == len(ds.gallery) == s["photos"] + s["edits"]
    multi = [len(q.targets) for q in ds.queries if q.meta["kind"] == "colour"]
    assert s["positives_per_query"]["colour"]["max"] == max(multi) and s["positives_per_query"]["colour"]["min"] == min(multi)
    assert s["subset_size"]["min"] == s["subset_size"]["max"] == 6
    assert sum(st["colour_distribution"].values()) == len(built["truth"])
    assert "positives/query" in format_stats(st)
    png = contact_sheet(out, tmp_path / "sheet.png", split="train", n=8)
    assert Image.open(png).size[0] > 0


def test_loader_rejects_tampered_or_missing_files(built, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(built["out"], out)
    q = out / "annotations" / "queries.test.jsonl"
    q.write_text(q.read_text().replace('"text": "', '"text": "x', 1))
    with pytest.raises(DataError, match="changed since the build"):
        load_catalog(out, "test")
    with pytest.raises(DataError, match=r"manifest\.json"):
        load_catalog(tmp_path / "nowhere", "test")
    (out / "annotations" / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="invalid JSON"):
        load_catalog(out, "train")


# ------------------------------------------------------------------------------------------------ malformed input


def test_bad_photos_are_named_or_skipped_and_recorded(tmp_path):
    photos = tmp_path / "p"
    make_folder(photos, {"train": 2})
    (photos / "train" / "hat" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (photos / "train" / "skirt" / "empty.jpg").write_bytes(b"")
    cfg = CatalogConfig(image_size=64, edit_fraction=0.0, kinds=("category", "colour", "both"))
    with pytest.raises(DataError) as err:
        build_catalog(tmp_path / "o", photos=photos, config=cfg, workers=1, progress=False)
    msg = str(err.value)
    assert "corrupt.jpg" in msg and "empty.jpg" in msg and "2 bad photo(s)" in msg
    assert not (tmp_path / "o" / "annotations").exists()  # nothing half-written
    m = build_catalog(tmp_path / "o", photos=photos, config=CatalogConfig(**{**cfg.__dict__, "skip_bad": True}), workers=1, progress=False)
    assert sorted(Path(s["path"]).name for s in m["skipped"]) == ["corrupt.jpg", "empty.jpg"]
    assert benchmark_stats(tmp_path / "o")["skipped_photos"] == 2
    assert m["counts"]["train"]["edits"] == 0


def test_malformed_folders_and_csv(tmp_path):
    # split folders mixed with a category folder
    (tmp_path / "a" / "train" / "hat").mkdir(parents=True)
    item_photo("red", 0).save(tmp_path / "a" / "train" / "hat" / "x.jpg")
    (tmp_path / "a" / "hat").mkdir()
    with pytest.raises(DataError, match="mixes split folders"):
        scan_photo_folder(tmp_path / "a")
    # an image directly under a split folder
    (tmp_path / "b" / "test").mkdir(parents=True)
    item_photo("red", 0).save(tmp_path / "b" / "test" / "x.jpg")
    with pytest.raises(DataError, match=r"x\.jpg"):
        scan_photo_folder(tmp_path / "b")
    with pytest.raises(DataError, match="no images"):
        (tmp_path / "c").mkdir()
        scan_photo_folder(tmp_path / "c")
    with pytest.raises(DataError, match="does not exist"):
        scan_photo_folder(tmp_path / "missing")
    # CSV problems name the file and the line.
    csv = tmp_path / "l.csv"
    csv.write_text("path,category,split\nx.jpg,hat,train\ny.jpg,hat\n")
    assert [e.split for e in read_photo_csv(csv)] == ["train", None]
    csv.write_text("x.jpg,hat,train,extra\n")
    with pytest.raises(DataError, match=r"l\.csv \[entry line 1\].*columns"):
        read_photo_csv(csv)
    csv.write_text("x.jpg,hat,holdout\n")
    with pytest.raises(DataError, match="unknown split 'holdout'"):
        read_photo_csv(csv)
    csv.write_text("x.jpg,hat\nx.jpg,skirt\n")
    with pytest.raises(DataError, match="already listed on line 1"):
        read_photo_csv(csv)
    with pytest.raises(ValueError):
        CatalogConfig(kinds=("category", "style"))
    with pytest.raises(ValueError):
        CatalogConfig(edit_fraction=1.5)


def test_csv_catalog_with_hash_splits(tmp_path):
    photos = tmp_path / "imgs"
    photos.mkdir()
    lines = ["path,category"]
    for i in range(24):
        col = ITEM_COLOURS[i % 3]
        cat = CATEGORIES[(i // 3) % 3]
        item_photo(col, 100 + i).save(photos / f"{i}.png")
        lines.append(f"imgs/{i}.png,{cat}")
    csv = tmp_path / "catalog.csv"
    csv.write_text("\n".join(lines) + "\n")
    m = build_catalog(tmp_path / "o", csv_path=csv, config=CatalogConfig(image_size=64, edit_fraction=0.0, kinds=("colour",), min_positives=1), workers=1, progress=False)
    splits = {p["split"] for p in m["photos"]}
    assert splits <= {"train", "val", "test"} and "train" in splits
    assert m["source"]["csv"].endswith("catalog.csv")
    ds = load_catalog(tmp_path / "o", "train")
    assert all(q.meta["kind"] == "colour" for q in ds.queries) and ds.queries


def test_cli_make_catalog(tmp_path, capsys):
    from cirfusion.commands import data_catalog

    photos = tmp_path / "p"
    make_folder(photos, {"train": 2, "val": 2})
    parser = argparse.ArgumentParser()
    data_catalog.register(parser.add_subparsers())
    args = parser.parse_args(
        ["make-catalog", "--photos", str(photos), "--out", str(tmp_path / "o"), "--seed", "1", "--image-size", "64",
         "--max-per-category", "4", "--edit-kinds", "mirror,rotate", "--workers", "1", "--no-progress", "--json"]
    )
    assert args.func(args) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["seed"] == 1 and stats["splits"]["train"]["photos"] == 12
    assert set(stats["splits"]["train"]["edit_kinds"]) == {"mirror", "rotate"}
    assert stats["splits"]["train"]["subset_size"]["max"] == 3
    with pytest.raises(SystemExit):
        parser.parse_args(["make-catalog", "--photos", str(photos), "--out", "x", "--kinds", "category,style"])


# ------------------------------------------------------------------------------------------------ real photos


@pytest.mark.skipif(not REAL.is_dir(), reason="../shared/data/clothing-small not available")
def test_real_clothing_small_subset(tmp_path):
    cfg = CatalogConfig(seed=0, image_size=96, max_per_category=2, edit_fraction=0.01, edit_kinds=("recolour", "mirror"))
    m = build_catalog(tmp_path / "o", photos=REAL, config=cfg, workers=1, progress=False)
    assert m["source"]["n_photos"] == 60  # 3 splits x 10 categories x 2
    assert len(m["categories"]) == 10 and set(m["counts"]) == {"train", "val", "test"}
    assert {p["colour"]["name"] for p in m["photos"]} <= set(COLOUR_NAMES)
    assert len({p["colour"]["name"] for p in m["photos"]}) >= 4
    for split in ("train", "val", "test"):
        ds = load_catalog(tmp_path / "o", split)
        ds.validate()
        assert len(ds.gallery) == 20 + m["counts"][split]["edits"]
        assert any(q.meta["kind"] == "edit" for q in ds.queries)
