"""Synthetic benchmark diversity: the number of train scenes, the stage-1 ``pretrain`` scenes and their edit pairs,
the loader's ``edit_pairs`` split -- and the test split of ``make-synthetic --seed 0 --n-images 6000`` staying
byte-identical whatever they are."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from cirfusion.data import load_dataset
from cirfusion.data import synthetic as S
from cirfusion.data.schema import DataError
from cirfusion.data.synthetic.generation import split_annotations
from cirfusion.options import OptionError

# The test split of `cirfusion data make-synthetic --seed 0 --n-images 6000` as the generator wrote it before the
# diversity options existed (hashed from a full run of that command on the main branch). The scenes file holds every
# image's render spec, so it pins the pixels too.
TEST_SPLIT_6000 = {
    "edit_pairs.test.jsonl": "e96451993fefe2599835ad3ce365362f6290a4f4575f0d2a12d0dfa490ad6a4b",
    "gallery.test.json": "9f099b95506e2cfb5e9a22eee975197f6fdac1e3b6a09ac8a34378dd2b2011c7",
    "queries.test.jsonl": "5956597720e75a6101343cb29b566c100278963405279a43610575f2376ae898",
    "scenes.test.jsonl": "7a5b450226db49ce3f98089fa988d013196fe3d871290a8e5c2a94558b91f58c",
}


def _hashes(files: list[Path]) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


@pytest.mark.parametrize("diversity", [{}, {"train_scenes": 40, "train_scene_images": 12, "pretrain_scenes": 30}])
def test_test_split_of_the_6000_image_benchmark_is_pinned(tmp_path: Path, diversity: dict) -> None:
    files = split_annotations(tmp_path / "ann", "test", seed=0, n_images=6000, **diversity)
    assert _hashes(files) == TEST_SPLIT_6000


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("div")
    plain, diverse = base / "plain", base / "diverse"
    S.generate(plain, seed=3, n_images=200, image_size=48, workers=1)
    S.generate(diverse, seed=3, n_images=200, image_size=48, workers=1, train_scenes=9, train_scene_images=12,
               pretrain_scenes=6, pretrain_scene_images=8, pretrain_pairs_per_image=3.0)
    return plain, diverse


def _scene_keys(root: Path, split: str) -> set[str]:
    recs = S.load_scene_records(root, split)
    return {json.dumps(sorted(map(json.dumps, (o for o in r["scene_graph"]["entities"])))) for r in recs.values()}


def test_diversity_changes_train_and_adds_pretrain_only(pair: tuple[Path, Path]) -> None:
    plain, diverse = pair
    for split in ("val", "test"):  # byte-identical files, images included
        for name in (f"gallery.{split}.json", f"queries.{split}.jsonl", f"scenes.{split}.jsonl", f"edit_pairs.{split}.jsonl"):
            assert (plain / name).read_bytes() == (diverse / name).read_bytes(), name
        for img in (plain / "images" / split).iterdir():
            assert img.read_bytes() == (diverse / "images" / split / img.name).read_bytes()
    m = json.loads((diverse / "manifest.json").read_text())
    assert m["splits"]["train"]["clusters"] == 9 and m["splits"]["pretrain"]["clusters"] == 6
    assert m["splits"]["pretrain"]["queries"] == 0 and m["diversity"]["train_scenes"] == 9
    assert "diversity" not in json.loads((plain / "manifest.json").read_text())
    train = load_dataset("synthetic", diverse, "train")
    clusters = {q.meta["cluster"] for q in train.queries}
    assert len(clusters) == 9 and len(train.gallery) <= 9 * 12
    # Pre-training scenes are disjoint from every val and test scene (and from train's).
    pre = _scene_keys(diverse, "pretrain")
    for split in ("train", "val", "test"):
        assert not pre & _scene_keys(diverse, split), split
    assert len(S.load_scene_records(diverse, "pretrain")) == 6 * 8


def test_edit_pairs_split_joins_train_and_pretrain(pair: tuple[Path, Path]) -> None:
    plain, diverse = pair
    ds = load_dataset("synthetic", diverse, "edit_pairs")
    n_train = len(S.load_edit_pairs(diverse, "train"))
    n_pre = len(S.load_edit_pairs(diverse, "pretrain"))
    assert n_pre > 6 * 8  # several pairs per image (3 asked, fewer where a scene has fewer neighbours)
    assert len(ds.queries) == n_train + n_pre and ds.split == "edit_pairs"
    assert {q.reference.split("_")[0] for q in ds.queries} == {"train", "pretrain"}
    for q in ds.queries[:50]:
        assert len(q.targets) == 1 and q.targets[0] != q.reference and ";" not in q.text  # one atomic edit
        assert q.reference in ds.gallery and q.targets[0] in ds.gallery
    # Without a pretrain split: train's pairs only.
    assert len(load_dataset("synthetic", plain, "edit_pairs").queries) == len(S.load_edit_pairs(plain, "train"))


def test_split_annotations_match_what_generate_writes(pair: tuple[Path, Path], tmp_path: Path) -> None:
    _, diverse = pair
    kw = dict(train_scenes=9, train_scene_images=12, pretrain_scenes=6, pretrain_scene_images=8)
    for split in ("test", "train"):
        files = split_annotations(tmp_path / split, split, seed=3, n_images=200, image_size=48, **kw)
        for f in files:
            assert f.read_bytes() == (diverse / f.name).read_bytes(), f.name


def test_bad_diversity_options(tmp_path: Path) -> None:
    for kw, match in [({"train_scenes": 0}, "train_scenes"), ({"train_scene_images": 4}, "train_scene_images"),
                      ({"pretrain_scenes": -1}, "pretrain_scenes"),
                      ({"pretrain_scenes": 2, "pretrain_scene_images": 1}, "pretrain_scene_images")]:
        with pytest.raises(OptionError, match=match):
            S.generate(tmp_path / "x", seed=0, n_images=200, **kw)
    with pytest.raises(OptionError, match="not made"):
        split_annotations(tmp_path / "y", "pretrain", seed=0, n_images=200)
    with pytest.raises(DataError, match=r"manifest\.json is missing"):
        load_dataset("synthetic", tmp_path / "nothing", "edit_pairs")


def test_cli_make_synthetic_diversity_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cirfusion.cli import main

    rc = main(["data", "make-synthetic", "--out", str(tmp_path / "s"), "--n-images", "200", "--image-size", "48",
               "--workers", "1", "--train-scenes", "8", "--train-scene-images", "10", "--pretrain-scenes", "3",
               "--pretrain-scene-images", "6", "--json"])
    assert rc == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["splits"]["train"]["clusters"] == 8 and stats["splits"]["pretrain"]["images"] == 18
    assert stats["splits"]["pretrain"]["queries"] == 0 and stats["splits"]["pretrain"]["edit_pairs"] > 0
