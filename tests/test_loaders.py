"""Real-format loaders: counts and field mapping on the real annotation files in ../shared/data, small synthetic
files of the same shapes for the splits/datasets not available offline, and every malformed-input error."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import PIL.Image
import pytest

from cirfusion.data import _jsonio, circo, cirr, custom, fashioniq, finecir, shoes
from cirfusion.data.images import load_image
from cirfusion.data.schema import CIRDataset, DataError, join_fashioniq
from cirfusion.io import atomic_write_json

# ------------------------------------------------------------------------------------------- builders


def _wjson(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def _wjsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _rjson(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def make_cirr(root: Path, split: str = "train", n_sets: int = 2, ext: bool = True) -> Path:
    """CIRR rc2 files of the real shape: 6-member image sets, nested train paths like ./train/34/x.png."""
    imgs = [f"{split}-{i}-0-img{i % 2}" for i in range(6 * n_sets)]
    sub = (lambda i: f"./{split}/{i % 3}/") if split == "train" else (lambda i: f"./{split}/")
    _wjson(root / "image_splits" / f"split.rc2.{split}.json", {im: f"{sub(i)}{im}.png" for i, im in enumerate(imgs)})
    caps, exts = [], []
    pid = 100
    for s in range(n_sets):
        members = imgs[6 * s: 6 * s + 6]
        for k in range(3):
            ref, tgt = members[k], members[k + 1]
            e = {"pairid": pid, "reference": ref, "caption": f"edit {pid} of set {s}.",
                 "img_set": {"id": s, "members": members, "reference_rank": k}}
            if not split.startswith("test"):
                e.update(target_hard=tgt, target_soft={tgt: 1.0, members[5]: -1.0})
                e["img_set"]["target_rank"] = k + 1
            caps.append(e)
            x = {"pairid": pid, "reference": ref,
                 "caption_extend": {"0": f"being a photo of thing {pid}", "1": "[c] None existed",
                                    "2": "[cr0] Nothing worth mentioning", "3": f"add detail {pid}"}}
            if not split.startswith("test"):
                x["target_hard"] = tgt
            exts.append(x)
            pid += 1
    _wjson(root / "captions" / f"cap.rc2.{split}.json", caps)
    if ext:
        _wjson(root / "captions_ext" / f"cap.ext.rc2.{split}.json", exts)
    return root


def make_fiq(root: Path, category: str = "dress", split: str = "val", n: int = 6) -> Path:
    ids = [f"B00{category[:2].upper()}{i:05d}" for i in range(2 * n + 3)]
    _wjson(root / "image_splits" / f"split.{category}.{split}.json", ids)
    caps = []
    for i in range(n):
        e = {"candidate": ids[2 * i], "captions": [f"is longer {i}.", f"has stripes {i}!"]}
        if not split.startswith("test"):
            e["target"] = ids[2 * i + 1]
        caps.append(e)
    _wjson(root / "captions" / f"cap.{category}.{split}.json", caps)
    return root


def make_shoes(root: Path) -> Path:
    d = root / "dataset"
    d.mkdir(parents=True, exist_ok=True)
    train = [f"img_womens_boots_{i}.jpg" for i in range(8)]
    ev = [f"img_womens_clogs_{i}.jpg" for i in range(5)]
    (d / "train_im_names.txt").write_text("\n".join(train) + "\n", encoding="utf-8")
    (d / "eval_im_names.txt").write_text("\n".join(ev) + "\n", encoding="utf-8")
    pairs = [(train[0], train[1]), (ev[0], ev[1]), (train[2], train[3]), (ev[2], ev[2]), (train[4], train[5])]
    _wjson(d / "relative_captions_shoes.json",
           [{"ImageName": t, "ReferenceImageName": r, "RelativeCaption": f"is taller {i}"} for i, (r, t) in enumerate(pairs)])
    return root


def make_circo(root: Path, split: str = "val", info_as_list: bool = False) -> Path:
    ids = [9761, 85932, 489535, 57541, 375057, 119881, 243611, 535009]
    if info_as_list:
        _wjson(root / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json", ids)
    else:
        _wjson(root / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json",
               {"info": {}, "images": [{"id": i, "file_name": f"{i:012d}.jpg", "height": 8, "width": 8} for i in ids]})
    anns = [
        {"id": 0, "reference_img_id": 85932, "target_img_id": 9761, "gt_img_ids": [9761, 489535, 57541],
         "relative_caption": "is held by a little girl on a chair", "shared_concept": "a teddy bear"},
        {"id": 1, "reference_img_id": 375057, "target_img_id": 119881, "gt_img_ids": [119881],
         "relative_caption": "is on a beach", "shared_concept": "a dog", "semantic_aspects": ["addition"]},
        {"id": 2, "reference_img_id": 243611, "target_img_id": 535009, "gt_img_ids": [535009, 9761],
         "relative_caption": "has two of them", "shared_concept": "a cat"},
    ]
    if split.startswith("test"):
        anns = [{k: v for k, v in a.items() if k not in ("target_img_id", "gt_img_ids")} for a in anns]
    _wjson(root / "annotations" / f"{split}.json", anns)
    return root


def make_finecir_cirr(root: Path, split: str = "train") -> Path:
    make_cirr(root, split, ext=False)
    caps = _rjson(root / "captions" / f"cap.rc2.{split}.json")
    rows = []
    for i, c in enumerate(caps):
        fm: Any = (f"1. Add a lamp {i}.\n2. Replace the carpet with a gray one." if i % 2 == 0
                   else [f"Add a lamp {i}", "Make the wall purple"])
        r = {"pairid": c["pairid"], "reference": c["reference"], "finemt": fm, "img_set": c["img_set"]}
        if "target_hard" in c:
            r["target_hard"] = c["target_hard"]
        rows.append(r)
    _wjsonl(root / "captions" / f"cirr.fine.{split}.jsonl", rows)
    return root


def make_finecir_fiq(root: Path, category: str = "shirt", split: str = "train") -> Path:
    make_fiq(root, category, split)
    caps = _rjson(root / "captions" / f"cap.{category}.{split}.json")
    rows = [{"candidate": c["candidate"], "target": c["target"],
             "finemt": f"To transform the reference image to target image: 1. Shorten sleeves by {i} cm. 2. Add a belt."}
            for i, c in enumerate(caps)]
    _wjsonl(root / f"fiq.fine.{category}.{split}.jsonl", rows)  # at root/: the other accepted place
    return root


def make_custom(root: Path, split: str = "train", with_gallery_json: bool = False) -> Path:
    names = ["shirts/red_01", "shirts/blue_03", "shirts/green_02", "dresses/long_1", "dresses/short_2"]
    if with_gallery_json:
        _wjson(root / "gallery.json", {n.replace("/", "-"): f"pics/{n}.jpg" for n in names})
        ids = [n.replace("/", "-") for n in names]
    else:
        for n in names:  # zero-byte files: the loader must list them, never open them
            p = root / "images" / f"{n}.jpg"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"")
        ids = names
    rows = [
        {"qid": "q1", "reference": ids[0], "text": "make it blue", "targets": [ids[1]],
         "captions": ["make it blue", "blue instead"], "subset": [ids[0], ids[1], ids[2]]},
        {"qid": "q2", "reference": ids[3], "text": "shorter", "targets": [ids[4]], "finemt": ["Shorten the hem"],
         "scene_graph": {"entities": [{"name": "dress", "attributes": ["short"]}], "relations": []},
         "meta": {"source": "me"}},
        {"qid": 3, "reference": ids[2], "text": "any red or blue shirt", "targets": [ids[0], ids[1]]},
    ]
    _wjsonl(root / f"queries.{split}.jsonl", rows)
    return root


# name -> (builder(root) -> None, loader, kwargs, split)
SYNTHETIC: dict[str, tuple[Callable[[Path], Any], Callable[..., CIRDataset], dict[str, Any], str]] = {
    "cirr-train": (lambda r: make_cirr(r, "train"), cirr.load_cirr, {}, "train"),
    "cirr-test1": (lambda r: make_cirr(r, "test1"), cirr.load_cirr, {}, "test1"),
    "fashioniq-val": (lambda r: make_fiq(r, "dress", "val"), fashioniq.load_fashioniq, {"category": "dress"}, "val"),
    "fashioniq-test": (lambda r: make_fiq(r, "toptee", "test"), fashioniq.load_fashioniq, {"category": "toptee"}, "test"),
    "shoes-train": (make_shoes, shoes.load_shoes, {}, "train"),
    "shoes-eval": (make_shoes, shoes.load_shoes, {}, "eval"),
    "circo-val": (make_circo, circo.load_circo, {}, "val"),
    "circo-test": (lambda r: make_circo(r, "test", info_as_list=True), circo.load_circo, {}, "test"),
    "finecir-cirr": (make_finecir_cirr, finecir.load_finecir, {}, "train"),
    "finecir-fiq": (make_finecir_fiq, finecir.load_finecir, {"which": "fiq", "category": "shirt"}, "train"),
    "custom-folder": (make_custom, custom.load_custom, {}, "train"),
    "custom-json": (lambda r: make_custom(r, with_gallery_json=True), custom.load_custom, {}, "train"),
}


@pytest.mark.parametrize("name", sorted(SYNTHETIC))
def test_every_loader_end_to_end_with_placeholder_images(name, tmp_path, placeholder_images):
    """Each loader: valid dataset, gallery paths that really resolve (placeholder images load), query order and
    ids stable across two loads, and no image needed to load."""
    build, loader, kwargs, split = SYNTHETIC[name]
    build(tmp_path)

    def no_image_reads(*a, **k):
        raise AssertionError("a loader opened an image")

    with pytest.MonkeyPatch.context() as mp:  # loaders read annotations only (custom: zero-byte image files)
        mp.setattr(PIL.Image, "open", no_image_reads)
        ds = loader(tmp_path, split, **kwargs)
    ds.validate()
    assert len(ds.queries) > 0 and len(ds.gallery) > 0
    assert ds.split == split and ds.files and all(Path(f).is_file() for f in ds.files)
    assert [q.qid for q in ds.queries] == [q.qid for q in loader(tmp_path, split, **kwargs).queries]
    assert all(q.text.strip() for q in ds.queries)
    for p in ds.gallery.paths:
        if p.exists():
            p.unlink()
    placeholder_images(ds.gallery.paths)
    for image_id, path in ds.gallery.items():
        assert path.is_relative_to(tmp_path), (image_id, path)
        assert load_image(path).mode == "RGB"
    rng = random.Random(0)
    assert all(isinstance(ds.training_text(q, rng), str) for q in ds.queries)


# ------------------------------------------------------------------------------------------- CIRR


def test_cirr_real_val(shared_data):
    root = shared_data / "cirr"
    ds = cirr.load_cirr(root, "val")
    assert (len(ds.queries), len(ds.gallery)) == (4181, 2297)
    ds.validate()
    split = _rjson(root / "image_splits" / "split.rc2.val.json")
    assert ds.gallery.ids == list(split)  # file (key) order = score-matrix columns
    assert ds.gallery.path("dev-244-0-img0") == root / "dev" / "dev-244-0-img0.png"
    caps = _rjson(root / "captions" / "cap.rc2.val.json")
    assert [q.qid for q in ds.queries] == [str(c["pairid"]) for c in caps]
    q = ds.queries[0]
    assert q.qid == "12060" and q.reference == "dev-244-0-img0" and q.targets == ("dev-1028-1-img1",)
    assert q.text == "show three bottles of soft drink"
    assert q.subset == ("dev-430-3-img0", "dev-63-0-img1", "dev-1028-1-img1", "dev-1028-2-img1", "dev-244-0-img0",
                        "dev-1028-2-img0")
    assert q.meta["target_soft"] == {"dev-1028-1-img1": 1.0}
    assert (q.meta["img_set_id"], q.meta["reference_rank"], q.meta["target_rank"]) == (36, 2, 3)
    # extended captions merged, the "[cr1] Covered in query" marker kept only in meta
    assert q.captions == ("show three bottles of soft drink", "being a photo of bottles",
                          "change the size of the bottles", "add a pub in the background")
    assert q.meta["caption_extend"][2] == "[cr1] Covered in query"
    assert all(len(x.subset) == 6 and x.reference in x.subset and x.targets[0] in x.subset for x in ds.queries)
    assert ds.exclude_reference and ds.text_policy == "fixed"
    assert [p.name for p in ds.files] == ["cap.rc2.val.json", "split.rc2.val.json", "cap.ext.rc2.val.json"]
    assert sum(len(x.meta["target_soft"]) > 1 for x in ds.queries) == 645


def test_cirr_real_test1(shared_data):
    ds = cirr.load_cirr(shared_data / "cirr", "test1")
    assert (len(ds.queries), len(ds.gallery)) == (4148, 2315)
    assert not ds.has_targets and all(len(q.subset) == 6 for q in ds.queries)
    # pair 27098 has caption " ": kept (the test server needs every pair id) and counted
    assert ds.meta["empty_texts"] == 1
    assert any(q.qid == "27098" and not q.text.strip() for q in ds.queries)
    no_ext = cirr.load_cirr(shared_data / "cirr", "test1", captions_ext=False)
    assert all(q.captions == (q.text,) for q in no_ext.queries) and len(no_ext.files) == 2


def test_cirr_real_images_resolve_under_image_dir(shared_data, tmp_path, placeholder_images):
    ds = cirr.load_cirr(shared_data / "cirr", "val", image_dir=tmp_path / "img_raw")
    q = ds.queries[5]
    paths = [ds.gallery.path(i) for i in q.subset]
    assert all(p.parent == tmp_path / "img_raw" / "dev" for p in paths)
    placeholder_images(paths)
    assert all(load_image(p).size == (8, 8) for p in paths)


def test_cirr_synthetic_train_shape(tmp_path):
    make_cirr(tmp_path, "train")
    ds = cirr.load_cirr(tmp_path, "train")
    assert len(ds.queries) == 6 and len(ds.gallery) == 12
    assert ds.gallery.path("train-1-0-img1") == tmp_path / "train" / "1" / "train-1-0-img1.png"
    q = ds.queries[0]
    assert q.captions == ("edit 100 of set 0.", "being a photo of thing 100", "add detail 100")
    assert q.meta["target_soft"] == {q.targets[0]: 1.0, q.subset[5]: -1.0}
    assert ds.meta["captions_ext"] is True
    # captions_ext is optional: missing file -> plain captions; required -> error
    (tmp_path / "captions_ext" / "cap.ext.rc2.train.json").unlink()
    assert cirr.load_cirr(tmp_path, "train").queries[0].captions == ("edit 100 of set 0.",)
    with pytest.raises(DataError, match=r"cap\.ext\.rc2\.train\.json.*not found"):
        cirr.load_cirr(tmp_path, "train", captions_ext=True)


def _edit_json(path: Path, fn: Callable[[Any], Any]) -> None:
    """Rewrite a JSON file after ``fn`` mutates its data in place (``fn``'s return value is ignored)."""
    data = _rjson(path)
    fn(data)
    _wjson(path, data)


CIRR_CAP = "captions/cap.rc2.val.json"
CIRR_EXT = "captions_ext/cap.ext.rc2.val.json"
CIRR_SPLIT = "image_splits/split.rc2.val.json"

CIRR_BAD = {
    "invalid-json": (CIRR_CAP, lambda p: p.write_text('[{"pairid": 1,', encoding="utf-8"), "line 1", "invalid JSON"),
    "not-a-list": (CIRR_CAP, lambda p: _wjson(p, {"pairid": 1}), None, "expected a JSON list"),
    "missing-caption": (CIRR_CAP, lambda p: _edit_json(p, lambda d: d[1].pop("caption")), "#1 (pairid 101)",
                        "missing field 'caption'"),
    "missing-target-on-val": (CIRR_CAP, lambda p: _edit_json(p, lambda d: d[2].pop("target_hard")), "#2 (pairid 102)",
                              "missing field 'target_hard'"),
    "reference-not-in-split": (CIRR_CAP, lambda p: _edit_json(p, lambda d: d[0].update(reference="nope")),
                               "#0 (pairid 100)", "reference 'nope' is not in the gallery"),
    "target-not-in-split": (CIRR_CAP, lambda p: _edit_json(p, lambda d: d[3].update(target_hard="ghost")),
                            "#3 (pairid 103)", "target_hard 'ghost' is not in the gallery"),
    "soft-not-in-split": (CIRR_CAP, lambda p: _edit_json(p, lambda d: d[0]["target_soft"].update(ghost=0.5)),
                          "#0", "target_soft image 'ghost' is not in the gallery"),
    "member-not-in-split": (CIRR_CAP, lambda p: _edit_json(p, lambda d: d[0]["img_set"]["members"].append("x")),
                            "#0", "img_set member 'x' is not in the gallery"),
    "target-not-in-set": (CIRR_CAP, lambda p: _edit_json(p, lambda d: d[0].update(target_hard=d[5]["reference"])),
                          "#0", "is not among its img_set members"),
    "duplicate-pairid": (CIRR_CAP, lambda p: _edit_json(p, lambda d: d[1].update(pairid=100)), "#1 (pairid 100)",
                         "duplicate pairid 100"),
    "pairid-not-int": (CIRR_CAP, lambda p: _edit_json(p, lambda d: d[0].update(pairid="x")), "#0",
                       "'pairid' must be an integer"),
    "duplicate-split-id": (CIRR_SPLIT, lambda p: p.write_text(
        p.read_text(encoding="utf-8").replace("{", '{"val-0-0-img0": "./val/a.png", ', 1), encoding="utf-8"),
        "val-0-0-img0", "duplicate key"),
    "split-path-escapes": (CIRR_SPLIT, lambda p: _edit_json(p, lambda d: d.update({"val-0-0-img0": "../../etc/x.png"})),
                           "val-0-0-img0", "must be relative and stay inside"),
    "ext-unknown-pairid": (CIRR_EXT, lambda p: _edit_json(p, lambda d: d[0].update(pairid=999)), "#0 (pairid 999)",
                           "pairid 999 is not in the captions file"),
    "ext-missing-pair": (CIRR_EXT, lambda p: _edit_json(p, lambda d: d.pop()), None, "have no extended captions"),
    "ext-duplicate": (CIRR_EXT, lambda p: _edit_json(p, lambda d: d[1].update(pairid=100)), "#1 (pairid 100)",
                      "duplicate pairid"),
    "ext-reference-mismatch": (CIRR_EXT, lambda p: _edit_json(p, lambda d: d[0].update(reference="val-9-0-img1")),
                               "#0", "disagrees with the captions file"),
    "ext-invalid-json": (CIRR_EXT, lambda p: p.write_text("[\n\n{oops}]", encoding="utf-8"), "line 3", "invalid JSON"),
}


@pytest.mark.parametrize("case", sorted(CIRR_BAD))
def test_cirr_malformed(case, tmp_path):
    rel, mutate, entry, problem = CIRR_BAD[case]
    make_cirr(tmp_path, "val")
    mutate(tmp_path / rel)
    with pytest.raises(DataError) as ei:
        cirr.load_cirr(tmp_path, "val")
    err = ei.value
    assert err.file == str(tmp_path / rel), str(err)
    assert problem in err.problem, str(err)
    if entry is not None:
        assert str(err.entry).startswith(entry), str(err)
    assert Path(rel).name in str(err) and problem in str(err)


def test_cirr_missing_files(tmp_path):
    with pytest.raises(DataError, match=r"split.rc2.val.json.*not found"):
        cirr.load_cirr(tmp_path, "val")
    make_cirr(tmp_path, "val")
    (tmp_path / CIRR_CAP).unlink()
    with pytest.raises(DataError, match=r"cap.rc2.val.json.*not found"):
        cirr.load_cirr(tmp_path, "val")


# ------------------------------------------------------------------------------------------- FashionIQ

FIQ_REAL = {  # (category, split): (queries, gallery) measured on ../shared/data/fashioniq
    ("dress", "train"): (5985, 11452), ("dress", "val"): (2017, 3817), ("dress", "test"): (2024, 3818),
    ("shirt", "train"): (5988, 19036), ("shirt", "val"): (2038, 6346), ("shirt", "test"): (2038, 6346),
    ("toptee", "train"): (6027, 16121), ("toptee", "val"): (1961, 5373), ("toptee", "test"): (2056, 5374),
}


@pytest.mark.parametrize("category,split", sorted(FIQ_REAL))
def test_fashioniq_real_counts(shared_data, category, split):
    root = shared_data / "fashioniq"
    ds = fashioniq.load_fashioniq(root, split, category=category)
    assert (len(ds.queries), len(ds.gallery)) == FIQ_REAL[(category, split)]
    ds.validate()
    assert ds.gallery.ids == _rjson(root / "image_splits" / f"split.{category}.{split}.json")
    assert ds.meta["added_to_gallery"] == []  # every candidate/target is in its split file
    assert ds.has_targets == (split != "test")
    assert ds.text_policy == ("fashioniq" if split == "train" else "fixed")
    assert not ds.exclude_reference and ds.category == category and ds.key == f"fashioniq/{category}/{split}"


def test_fashioniq_real_field_mapping(shared_data):
    root = shared_data / "fashioniq"
    ds = fashioniq.load_fashioniq(root, "val", category="dress")
    raw = _rjson(root / "captions" / "cap.dress.val.json")
    q = ds.queries[0]
    assert q.qid == "dress-val-0" and q.reference == raw[0]["candidate"] and q.targets == (raw[0]["target"],)
    assert q.captions == tuple(raw[0]["captions"])
    assert q.text == "is shiny and silver with shorter sleeves and fit and flare"
    assert ds.gallery.path(q.reference) == root / "images" / f"{q.reference}.png"
    # trailing punctuation stripped before joining (toptee test #0 ends its first caption with ".")
    t = fashioniq.load_fashioniq(root, "test", category="toptee").queries[0]
    assert t.text == "the tank top is blue with a character of a woman and has no sleeves" and t.targets == ()
    # training text: one of the four FashionIQ variants
    tr = fashioniq.load_fashioniq(root, "train", category="shirt")
    q = tr.queries[3]
    c1, c2 = q.captions
    variants = {join_fashioniq(c1, c2), join_fashioniq(c2, c1), join_fashioniq(c1, ""), join_fashioniq(c2, "")}
    rng = random.Random(1)
    seen = {tr.training_text(q, rng) for _ in range(200)}
    assert seen == variants


def test_fashioniq_ext_and_image_dir(tmp_path):
    make_fiq(tmp_path, "shirt", "val")
    ds = fashioniq.load_fashioniq(tmp_path, "val", category="shirt", image_dir="resized", ext="jpg")
    assert ds.gallery.paths[0] == tmp_path / "resized" / f"{ds.gallery.ids[0]}.jpg"


def test_fashioniq_category_required(tmp_path):
    make_fiq(tmp_path, "dress", "val")
    for bad in (None, "shoes"):
        with pytest.raises(ValueError, match="dress, shirt, toptee"):
            fashioniq.load_fashioniq(tmp_path, "val", category=bad)


def test_fashioniq_missing_ids_error_or_documented_flag(tmp_path):
    make_fiq(tmp_path, "dress", "val")
    _edit_json(tmp_path / "captions/cap.dress.val.json", lambda d: d[2].update(target="B0NOTINSPL"))
    with pytest.raises(DataError, match=r"cap.dress.val.json \[entry #2\]: target 'B0NOTINSPL' is not in the split"):
        fashioniq.load_fashioniq(tmp_path, "val", category="dress")
    ds = fashioniq.load_fashioniq(tmp_path, "val", category="dress", add_missing_to_gallery=True)
    assert ds.meta["added_to_gallery"] == ["B0NOTINSPL"] and ds.gallery.ids[-1] == "B0NOTINSPL"
    assert len(ds.gallery) == 16 and ds.gallery.ids[:15] == _rjson(tmp_path / "image_splits/split.dress.val.json")
    ds.validate()


FIQ_CAP = "captions/cap.dress.val.json"
FIQ_SPLIT = "image_splits/split.dress.val.json"
FIQ_BAD = {
    "invalid-json": (FIQ_CAP, lambda p: p.write_text('[\n{"candidate": }', encoding="utf-8"), "line 2", "invalid JSON"),
    "missing-captions": (FIQ_CAP, lambda p: _edit_json(p, lambda d: d[1].pop("captions")), "#1", "missing field 'captions'"),
    "one-caption": (FIQ_CAP, lambda p: _edit_json(p, lambda d: d[1].update(captions=["x"])), "#1", "expected 2 captions"),
    "caption-not-str": (FIQ_CAP, lambda p: _edit_json(p, lambda d: d[0].update(captions=["x", 3])), "#0",
                        "must be a list of strings"),
    "missing-target": (FIQ_CAP, lambda p: _edit_json(p, lambda d: d[4].pop("target")), "#4", "missing field 'target'"),
    "candidate-not-in-split": (FIQ_CAP, lambda p: _edit_json(p, lambda d: d[0].update(candidate="ZZZ")), "#0",
                               "candidate 'ZZZ' is not in the split file"),
    "duplicate-split-id": (FIQ_SPLIT, lambda p: _edit_json(p, lambda d: d.append(d[3])), "#15", "duplicate image id"),
    "split-invalid-json": (FIQ_SPLIT, lambda p: p.write_text('["a",,]', encoding="utf-8"), "line 1", "invalid JSON"),
}


@pytest.mark.parametrize("case", sorted(FIQ_BAD))
def test_fashioniq_malformed(case, tmp_path):
    rel, mutate, entry, problem = FIQ_BAD[case]
    make_fiq(tmp_path, "dress", "val")
    mutate(tmp_path / rel)
    with pytest.raises(DataError) as ei:
        fashioniq.load_fashioniq(tmp_path, "val", category="dress")
    assert ei.value.file == str(tmp_path / rel) and problem in ei.value.problem, str(ei.value)
    assert str(ei.value.entry).startswith(entry), str(ei.value)


# ------------------------------------------------------------------------------------------- Shoes


def test_shoes_real(shared_data):
    root = shared_data / "shoes"
    tr = shoes.load_shoes(root, "train")
    ev = shoes.load_shoes(root, "eval")
    assert (len(tr.queries), len(tr.gallery)) == (8990, 10000)
    assert (len(ev.queries), len(ev.gallery)) == (1761, 4658)
    for ds in (tr, ev):
        ds.validate()
        assert ds.meta["straddling_pairs"] == [] and ds.meta["pairs_total"] == 10751
        assert ds.exclude_reference  # ARTEMIS removes the reference (issue 9)
    assert (tr.meta["self_pairs"], ev.meta["self_pairs"]) == (26, 1)
    assert tr.meta["pairs_in_other_split"] == 1761
    raw = _rjson(root / "dataset" / "relative_captions_shoes.json")
    q = tr.queries[0]
    assert q.qid == "shoes-0" and q.reference == raw[0]["ReferenceImageName"] == "img_womens_clogs_512.jpg"
    assert q.targets == ("img_womens_clogs_851.jpg",) and q.text == "is more of a textured material"
    assert tr.gallery.ids[:2] == ["img_womens_pumps_813.jpg", "img_womens_clogs_679.jpg"]
    assert tr.gallery.path("img_womens_pumps_813.jpg") == root / "images" / "img_womens_pumps_813.jpg"
    # all queries, train and eval together, cover the file exactly once
    assert sorted(int(q.qid.split("-")[1]) for q in tr.queries + ev.queries) == list(range(10751))
    assert [q.qid for q in shoes.load_shoes(root, "test").queries] == [q.qid for q in ev.queries]


def test_shoes_straddling(tmp_path):
    make_shoes(tmp_path)
    _edit_json(tmp_path / "dataset/relative_captions_shoes.json",
               lambda d: d[2].update(ImageName="img_womens_clogs_4.jpg"))
    with pytest.raises(DataError, match=r"relative_captions_shoes.json \[entry #2\]: reference .* is in train but target"):
        shoes.load_shoes(tmp_path, "train")
    tr = shoes.load_shoes(tmp_path, "train", straddling="exclude")
    ev = shoes.load_shoes(tmp_path, "eval", straddling="exclude")
    assert tr.meta["straddling_pairs"] == ev.meta["straddling_pairs"] == [2]
    assert [q.qid for q in tr.queries] == ["shoes-0", "shoes-4"] and [q.qid for q in ev.queries] == ["shoes-1", "shoes-3"]
    assert ev.meta["self_pairs"] == 1
    with pytest.raises(ValueError, match="straddling"):
        shoes.load_shoes(tmp_path, "train", straddling="drop")
    with pytest.raises(ValueError, match="shoes split"):
        shoes.load_shoes(tmp_path, "dev")


SHOES_CAP = "dataset/relative_captions_shoes.json"
SHOES_TRAIN = "dataset/train_im_names.txt"
SHOES_BAD = {
    "invalid-json": (SHOES_CAP, lambda p: p.write_text('[{"ImageName": "a"}\n{', encoding="utf-8"), "line 2", "invalid JSON"),
    "missing-caption": (SHOES_CAP, lambda p: _edit_json(p, lambda d: d[3].pop("RelativeCaption")), "#3",
                        "missing field 'RelativeCaption'"),
    "unlisted-image": (SHOES_CAP, lambda p: _edit_json(p, lambda d: d[1].update(ReferenceImageName="img_x.jpg")), "#1",
                       "reference 'img_x.jpg' is in neither"),
    "duplicate-name": (SHOES_TRAIN, lambda p: p.write_text(p.read_text() + "img_womens_boots_3.jpg\n"), "line 9",
                       "duplicate name"),
    "in-both-lists": (SHOES_TRAIN, lambda p: p.write_text(p.read_text() + "img_womens_clogs_0.jpg\n"), None,
                      "listed in both"),
}


@pytest.mark.parametrize("case", sorted(SHOES_BAD))
def test_shoes_malformed(case, tmp_path):
    rel, mutate, entry, problem = SHOES_BAD[case]
    make_shoes(tmp_path)
    mutate(tmp_path / rel)
    with pytest.raises(DataError) as ei:
        shoes.load_shoes(tmp_path, "train")
    assert problem in ei.value.problem, str(ei.value)
    if case == "in-both-lists":
        assert "eval_im_names.txt" in str(ei.value) and ei.value.entry == "img_womens_clogs_0.jpg"
    else:
        assert ei.value.file == str(tmp_path / rel) and str(ei.value.entry).startswith(entry), str(ei.value)


# ------------------------------------------------------------------------------------------- CIRCO


def test_circo_val_mapping(tmp_path):
    make_circo(tmp_path)
    ds = circo.load_circo(tmp_path, "val")
    assert len(ds.queries) == 3 and len(ds.gallery) == 8 and not ds.exclude_reference  # SEARLE keeps it (issue 9)
    assert ds.gallery.ids[:2] == ["9761", "85932"]
    assert ds.gallery.path("9761") == tmp_path / "COCO2017_unlabeled" / "unlabeled2017" / "000000009761.jpg"
    q = ds.queries[0]
    assert q.qid == "0" and q.reference == "85932" and q.targets == ("9761", "489535", "57541")
    assert q.text == "a teddy bear that is held by a little girl on a chair"
    assert q.captions == ("is held by a little girl on a chair",)
    assert q.meta == {"shared_concept": "a teddy bear", "target_img_id": "9761"}
    assert ds.queries[1].meta["semantic_aspects"] == ["addition"]
    alt = circo.load_circo(tmp_path, "val", text_template="{relative_caption}")
    assert alt.queries[0].text == "is held by a little girl on a chair"
    for bad in ("{caption}", "no fields", "{relative_caption"):
        with pytest.raises(ValueError, match="text_template"):
            circo.load_circo(tmp_path, "val", text_template=bad)


def test_circo_test_and_id_list_gallery(tmp_path):
    make_circo(tmp_path, "test", info_as_list=True)
    ds = circo.load_circo(tmp_path, "test")
    assert not ds.has_targets and [q.qid for q in ds.queries] == ["0", "1", "2"]
    assert ds.gallery.path("535009") == tmp_path / "COCO2017_unlabeled" / "unlabeled2017" / "000000535009.jpg"
    # string ids are the same images as integer ids
    _edit_json(tmp_path / "annotations/test.json", lambda d: d[0].update(reference_img_id="085932"))
    assert circo.load_circo(tmp_path, "test").queries[0].reference == "85932"
    info = tmp_path / "ids.json"
    _wjson(info, [85932, 375057, 243611])
    ds2 = circo.load_circo(tmp_path, "test", image_info=info, image_dir=tmp_path / "coco")
    assert len(ds2.gallery) == 3 and ds2.gallery.path("243611") == tmp_path / "coco" / "000000243611.jpg"


CIRCO_ANN = "annotations/val.json"
CIRCO_INFO = "COCO2017_unlabeled/annotations/image_info_unlabeled2017.json"
CIRCO_BAD = {
    "invalid-json": (CIRCO_ANN, lambda p: p.write_text("[\n {\"id\": 0,\n ]", encoding="utf-8"), "line 3", "invalid JSON"),
    "missing-concept": (CIRCO_ANN, lambda p: _edit_json(p, lambda d: d[1].pop("shared_concept")), "#1 (id 1)",
                        "missing field 'shared_concept'"),
    "missing-gt": (CIRCO_ANN, lambda p: _edit_json(p, lambda d: d[0].pop("gt_img_ids")), "#0 (id 0)",
                   "missing field 'gt_img_ids'"),
    "gt-not-in-gallery": (CIRCO_ANN, lambda p: _edit_json(p, lambda d: d[2]["gt_img_ids"].append(42)), "#2 (id 2)",
                          "ground-truth image 42 is not in the gallery"),
    "reference-not-in-gallery": (CIRCO_ANN, lambda p: _edit_json(p, lambda d: d[2].update(reference_img_id=7)),
                                 "#2", "reference_img_id 7 is not in the gallery"),
    "target-not-in-gt": (CIRCO_ANN, lambda p: _edit_json(p, lambda d: d[0].update(target_img_id=375057)), "#0",
                         "target_img_id 375057 is not among gt_img_ids"),
    "duplicate-gt": (CIRCO_ANN, lambda p: _edit_json(p, lambda d: d[0]["gt_img_ids"].append("9761")), "#0",
                     "field 'gt_img_ids' repeats id '9761'"),
    "duplicate-gt-spelling": (CIRCO_ANN, lambda p: _edit_json(p, lambda d: d[0]["gt_img_ids"].append("09761")), "#0",
                              "gt_img_ids repeats an image id"),
    "duplicate-id": (CIRCO_ANN, lambda p: _edit_json(p, lambda d: d[2].update(id=1)), "#2 (id 1)", "duplicate query id 1"),
    "non-integer-id": (CIRCO_ANN, lambda p: _edit_json(p, lambda d: d[1].update(reference_img_id="abc")), "#1",
                       "not an integer COCO image id"),
    "info-duplicate-image": (CIRCO_INFO, lambda p: _edit_json(p, lambda d: d["images"].append(d["images"][0])), "9761",
                             "duplicate image id in gallery"),
    "info-missing-file-name": (CIRCO_INFO, lambda p: _edit_json(p, lambda d: d["images"][3].pop("file_name")),
                               "#3 (id 57541)", "missing field 'file_name'"),
}


@pytest.mark.parametrize("case", sorted(CIRCO_BAD))
def test_circo_malformed(case, tmp_path):
    rel, mutate, entry, problem = CIRCO_BAD[case]
    make_circo(tmp_path)
    mutate(tmp_path / rel)
    with pytest.raises(DataError) as ei:
        circo.load_circo(tmp_path, "val")
    assert ei.value.file == str(tmp_path / rel) and problem in ei.value.problem, str(ei.value)
    assert str(ei.value.entry).startswith(entry), str(ei.value)


# ------------------------------------------------------------------------------------------- FineCIR


def test_parse_finemt_forms():
    assert finecir.parse_finemt("1. Add a lamp.  \n2. Replace the carpet.\n\n3) Paint it") == (
        "Add a lamp.", "Replace the carpet.", "Paint it")
    assert finecir.parse_finemt("To transform the reference image to target image: 1. Modify the neckline. "
                                "2. Adjust the length to 2.5 inches.") == (
        "Modify the neckline.", "Adjust the length to 2.5 inches.")
    assert finecir.parse_finemt("Close the mouth. Replace the background. Attach a red leash.") == (
        "Close the mouth.", "Replace the background.", "Attach a red leash.")
    # only the sequence 1, 2, 3... cuts: "size 10. " and "by 2. " stay inside their edit
    assert finecir.parse_finemt("Header: 1. Use size 10. Keep it. 2. Shorten by 2. 3 cm") == (
        "Use size 10. Keep it.", "Shorten by 2. 3 cm")
    assert finecir.parse_finemt("Remove shelves. Install new ones.\nReplace the rack.") == (
        "Remove shelves. Install new ones.", "Replace the rack.")
    assert finecir.parse_finemt(["- Add a bowl", "  ", "Add a book "]) == ("- Add a bowl", "Add a book")
    assert finecir.finemt_text(("Add a lamp", "Paint it red.")) == "Add a lamp. Paint it red."
    for bad in ("", "  \n ", [], ["  "], 3, ["a", 2]):
        with pytest.raises(DataError, match="finemt"):
            finecir.parse_finemt(bad, Path("f.jsonl"), "line 1")


def test_finecir_cirr_synthetic(tmp_path):
    make_finecir_cirr(tmp_path, "train")
    ds = finecir.load_finecir(tmp_path, "train")
    assert len(ds.queries) == 6 and ds.exclude_reference and ds.meta["which"] == "cirr"
    q0, q1 = ds.queries[0], ds.queries[1]
    assert q0.finemt == ("Add a lamp 0.", "Replace the carpet with a gray one.")
    assert q0.text == "Add a lamp 0. Replace the carpet with a gray one." and q0.meta["finemt_raw"].startswith("1. ")
    assert q1.finemt == ("Add a lamp 1", "Make the wall purple") and q1.text == "Add a lamp 1. Make the wall purple."
    assert q0.subset is not None and len(q0.subset) == 6 and q0.captions == ()
    raw = finecir.load_finecir(tmp_path, "train", text_mode="raw")
    assert raw.queries[0].text == "1. Add a lamp 0.\n2. Replace the carpet with a gray one."
    withcap = finecir.load_finecir(tmp_path, "train", with_captions=True)
    assert withcap.queries[0].captions == ("edit 100 of set 0.",) and len(withcap.files) == 3
    with pytest.raises(ValueError, match="text_mode"):
        finecir.load_finecir(tmp_path, "train", text_mode="fancy")
    with pytest.raises(ValueError, match="which"):
        finecir.load_finecir(tmp_path, "train", which="shoes")


def test_finecir_fiq_synthetic(tmp_path):
    make_finecir_fiq(tmp_path)
    ds = finecir.load_finecir(tmp_path, "train", which="fiq", category="shirt", with_captions=True)
    assert len(ds.queries) == 6 and not ds.exclude_reference and len(ds.gallery) == 15
    q = ds.queries[2]
    assert q.qid == "shirt-train-2" and q.finemt == ("Shorten sleeves by 2 cm.", "Add a belt.")
    assert q.captions == ("is longer 2.", "has stripes 2!") and q.meta["caption_text"] == "is longer 2 and has stripes 2"
    assert ds.files[0] == tmp_path / "fiq.fine.shirt.train.jsonl"
    with pytest.raises(ValueError, match="category"):
        finecir.load_finecir(tmp_path, "train", which="fiq")
    with pytest.raises(ValueError, match="takes no category"):
        finecir.load_finecir(tmp_path, "train", category="shirt")
    with pytest.raises(DataError, match=r"split.rc2.train.json: CIRR image split file not found"):
        finecir.load_finecir(tmp_path, "train")
    make_cirr(tmp_path, "train")
    with pytest.raises(DataError, match=r"FineCIR file cirr.fine.train.jsonl not found \(looked at: .*captions/cirr"):
        finecir.load_finecir(tmp_path, "train")


def test_finecir_over_real_galleries(shared_data, tmp_path):
    """FineCIR files written for real CIRR/FIQ val entries load over the real split files (split_root)."""
    caps = _rjson(shared_data / "cirr" / "captions" / "cap.rc2.val.json")[:5]
    _wjsonl(tmp_path / "captions" / "cirr.fine.val.jsonl",
            [{"pairid": c["pairid"], "reference": c["reference"], "target_hard": c["target_hard"],
              "finemt": "1. Change one thing.\n2. Change another.", "img_set": c["img_set"]} for c in caps])
    ds = finecir.load_finecir(tmp_path, "val", split_root=shared_data / "cirr", with_captions=True)
    assert len(ds.gallery) == 2297 and [q.qid for q in ds.queries] == [str(c["pairid"]) for c in caps]
    assert ds.queries[0].captions == ("show three bottles of soft drink",)
    assert ds.gallery.path("dev-244-0-img0") == shared_data / "cirr" / "dev" / "dev-244-0-img0.png"
    fcaps = _rjson(shared_data / "fashioniq" / "captions" / "cap.toptee.val.json")[:4]
    _wjsonl(tmp_path / "captions" / "fiq.fine.toptee.val.jsonl",
            [{"candidate": c["candidate"], "target": c["target"], "finemt": "Make it red. Add a pocket."} for c in fcaps])
    fq = finecir.load_finecir(tmp_path, "val", which="fiq", category="toptee", split_root=shared_data / "fashioniq",
                              with_captions=True)
    assert len(fq.gallery) == 5373 and fq.queries[1].captions == tuple(fcaps[1]["captions"])
    fq.validate()


FINE_CIRR = "captions/cirr.fine.val.jsonl"
FINE_BAD = {
    "invalid-json": (lambda p: p.write_text(p.read_text().replace("\n", "\n{bad json\n", 2).replace(
        "{bad json\n", "", 1)), "line 3", "invalid JSON"),
    "not-an-object": (lambda p: p.write_text(p.read_text() + "[1, 2]\n"), "line 7", "expected a JSON object"),
    "missing-finemt": (lambda p: _rewrite_jsonl(p, 1, lambda r: r.pop("finemt")), "line 2 (pairid 101)",
                       "missing field 'finemt'"),
    "empty-finemt": (lambda p: _rewrite_jsonl(p, 1, lambda r: r.update(finemt="  ")), "line 2", "holds no edit"),
    "reference-not-in-split": (lambda p: _rewrite_jsonl(p, 0, lambda r: r.update(reference="dev-x")),
                               "line 1 (pairid 100)", "reference 'dev-x' is not in the gallery"),
    "target-not-in-split": (lambda p: _rewrite_jsonl(p, 4, lambda r: r.update(target_hard="dev-x")), "line 5",
                            "target_hard 'dev-x' is not in the gallery"),
    "duplicate-pairid": (lambda p: _rewrite_jsonl(p, 2, lambda r: r.update(pairid=100)), "line 3 (pairid 100)",
                         "duplicate pairid 100"),
    "duplicate-key": (lambda p: p.write_text(p.read_text().replace('{"pairid": 101', '{"pairid": 101, "pairid": 7', 1)),
                      "line 2", "duplicate key 'pairid'"),
}


def _rewrite_jsonl(path: Path, index: int, fn: Callable[[dict], Any]) -> None:
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    fn(rows[index])
    _wjsonl(path, rows)


@pytest.mark.parametrize("case", sorted(FINE_BAD))
def test_finecir_malformed(case, tmp_path):
    mutate, entry, problem = FINE_BAD[case]
    make_finecir_cirr(tmp_path, "val")
    mutate(tmp_path / FINE_CIRR)
    with pytest.raises(DataError) as ei:
        finecir.load_finecir(tmp_path, "val")
    assert ei.value.file == str(tmp_path / FINE_CIRR) and problem in ei.value.problem, str(ei.value)
    assert str(ei.value.entry).startswith(entry), str(ei.value)


def test_finecir_fiq_malformed(tmp_path):
    make_finecir_fiq(tmp_path)
    path = tmp_path / "fiq.fine.shirt.train.jsonl"
    _rewrite_jsonl(path, 3, lambda r: r.update(target="B0GHOST"))
    with pytest.raises(DataError, match=r"fiq.fine.shirt.train.jsonl \[entry line 4\]: target 'B0GHOST' is not in"):
        finecir.load_finecir(tmp_path, "train", which="fiq", category="shirt")
    make_finecir_fiq(tmp_path)
    _rewrite_jsonl(path, 0, lambda r: r.update(candidate=r["target"]))
    with pytest.raises(DataError, match=r"\[entry line 1\]: pair .* is not in the captions file"):
        finecir.load_finecir(tmp_path, "train", which="fiq", category="shirt", with_captions=True)


# ------------------------------------------------------------------------------------------- custom


def test_custom_folder_gallery(tmp_path):
    make_custom(tmp_path)
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    (tmp_path / "images" / ".hidden").mkdir()
    (tmp_path / "images" / ".hidden" / "x.jpg").write_bytes(b"")
    ds = custom.load_custom(tmp_path, "train")
    assert ds.gallery.ids == ["dresses/long_1", "dresses/short_2", "shirts/blue_03", "shirts/green_02", "shirts/red_01"]
    assert ds.gallery.path("shirts/red_01") == tmp_path / "images" / "shirts" / "red_01.jpg"
    q1, q2, q3 = ds.queries
    assert q1.captions == ("make it blue", "blue instead") and q1.subset == ("shirts/red_01", "shirts/blue_03",
                                                                               "shirts/green_02")
    assert q2.finemt == ("Shorten the hem",) and q2.scene_graph.entities[0].name == "dress" and q2.meta == {"source": "me"}
    assert q3.qid == "3" and len(q3.targets) == 2
    assert ds.meta["gallery_source"] == str(tmp_path / "images") and ds.exclude_reference
    ds2 = custom.load_custom(tmp_path, "train", exclude_reference=False, text_policy="random")
    assert not ds2.exclude_reference and ds2.text_policy == "random"
    with pytest.raises(ValueError, match="text_policy"):
        custom.load_custom(tmp_path, "train", text_policy="sometimes")


def test_custom_gallery_json_per_split_wins(tmp_path):
    make_custom(tmp_path, with_gallery_json=True)
    ds = custom.load_custom(tmp_path, "train")
    assert ds.gallery.ids[0] == "shirts-red_01" and ds.gallery.paths[0] == tmp_path / "pics" / "shirts" / "red_01.jpg"
    _wjson(tmp_path / "gallery.train.json", {"shirts-red_01": "a.jpg", "shirts-blue_03": "b.jpg",
                                             "shirts-green_02": "c.jpg", "dresses-long_1": "d.jpg",
                                             "dresses-short_2": "e.jpg", "extra": "f.jpg"})
    ds = custom.load_custom(tmp_path, "train")
    assert len(ds.gallery) == 6 and ds.files[-1] == tmp_path / "gallery.train.json"


CUSTOM_Q = "queries.train.jsonl"
CUSTOM_BAD = {
    "invalid-json": (CUSTOM_Q, lambda p: p.write_text(p.read_text() + '{"qid": "q9", \n'), "line 4", "invalid JSON"),
    "missing-text": (CUSTOM_Q, lambda p: _rewrite_jsonl(p, 1, lambda r: r.pop("text")), "line 2", "missing field 'text'"),
    "target-not-in-gallery": (CUSTOM_Q, lambda p: _rewrite_jsonl(p, 0, lambda r: r.update(targets=["shirts/nope"])),
                              "line 1 (qid q1)", "target 'shirts/nope' is not in the gallery"),
    "subset-not-in-gallery": (CUSTOM_Q, lambda p: _rewrite_jsonl(p, 0, lambda r: r["subset"].append("zz")),
                              "line 1", "subset member 'zz' is not in the gallery"),
    "duplicate-qid": (CUSTOM_Q, lambda p: _rewrite_jsonl(p, 2, lambda r: r.update(qid="q1")), "line 3",
                      "duplicate qid 'q1' (first on line 1)"),
    "unknown-field": (CUSTOM_Q, lambda p: _rewrite_jsonl(p, 1, lambda r: r.update(target=["x"])), "line 2",
                      "unknown field(s) ['target']"),
    "targets-not-list": (CUSTOM_Q, lambda p: _rewrite_jsonl(p, 1, lambda r: r.update(targets="dresses/short_2")),
                         "line 2", "'targets' must be a list"),
    "bad-scene-graph": (CUSTOM_Q, lambda p: _rewrite_jsonl(p, 1, lambda r: r["scene_graph"].update(
        relations=[{"subject": 0, "predicate": "on", "object": 5}])), "line 2", "points outside"),
    "same-id-two-files": ("images/shirts/red_01.png", lambda p: p.write_bytes(b""), "shirts/red_01",
                          "two images map to the same id"),
}


@pytest.mark.parametrize("case", sorted(CUSTOM_BAD))
def test_custom_malformed(case, tmp_path):
    rel, mutate, entry, problem = CUSTOM_BAD[case]
    make_custom(tmp_path)
    mutate(tmp_path / rel)
    with pytest.raises(DataError) as ei:
        custom.load_custom(tmp_path, "train")
    assert problem in ei.value.problem, str(ei.value)
    assert str(ei.value.entry).startswith(entry), str(ei.value)
    if rel.endswith(".jsonl"):
        assert ei.value.file == str(tmp_path / rel)


def test_custom_gallery_json_errors(tmp_path):
    make_custom(tmp_path, with_gallery_json=True)
    _wjson(tmp_path / "gallery.json", {"a": "/etc/passwd"})
    with pytest.raises(DataError, match=r"gallery.json \[entry a\]: image path '/etc/passwd' must be relative"):
        custom.load_custom(tmp_path, "train")
    _wjson(tmp_path / "gallery.json", ["a.jpg"])
    with pytest.raises(DataError, match=r"gallery\.json: expected the gallery file to be a JSON object"):
        custom.load_custom(tmp_path, "train")
    (tmp_path / "gallery.json").unlink()
    with pytest.raises(DataError, match="image folder not found"):
        custom.load_custom(tmp_path, "train")


# ------------------------------------------------------------------------------------------- file helpers


def test_jsonio_encoding_and_atomic_write(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"a": 1}\n{"b": "\xff"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl \[entry line 2\]: not UTF-8 text"):
        _jsonio.read_jsonl(bad)
    badj = tmp_path / "bad.json"
    badj.write_bytes(b'["ok", "\xfe"]')
    with pytest.raises(DataError, match=r"bad.json \[entry byte 8\]: not UTF-8 text"):
        _jsonio.read_json(badj)
    bom = tmp_path / "bom.json"
    bom.write_bytes(b'\xef\xbb\xbf{"a": [1]}')
    assert _jsonio.read_json(bom) == {"a": [1]}
    names = tmp_path / "names.txt"
    names.write_bytes(b"\xef\xbb\xbfa.jpg\n\n  b.jpg  \n")
    assert _jsonio.read_name_list(names) == ["a.jpg", "b.jpg"]
    out = tmp_path / "deep" / "out.json"
    atomic_write_json(out, {"x": "\u00e9"})  # the one atomic writer (cirfusion.io)
    assert json.loads(out.read_text(encoding="utf-8")) == {"x": "\u00e9"}
    with pytest.raises(TypeError):
        atomic_write_json(out, {"x": object()})
    assert json.loads(out.read_text(encoding="utf-8")) == {"x": "\u00e9"}  # old content intact, no temp left
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.json"]
