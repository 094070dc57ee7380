"""`cirfusion data make-fine`: known edits of the synthetic and catalog benchmarks as numbered finemt, written in the
released Fine-CIRR layout and read back by the finecir loader (round trip); the generator pipeline's three steps
(pair selection, VLM draft + LLM clean with tiny random transformers models, the retrieval filter with cirfusion's
own models, compression to the encoder's length)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from cirfusion.backbones import create_backbone
from cirfusion.cli import main as cli_main
from cirfusion.data import load_dataset
from cirfusion.data import synthetic as S
from cirfusion.data.fine import (
    BackboneRetrieval,
    FineDataError,
    catalog_edits,
    compress,
    gallery_base,
    known_finemt,
    make_fine_generated,
    numbered,
    retrieval_filter,
    select_pairs,
    write_fine,
)
from cirfusion.data.finecir import parse_finemt
from cirfusion.data.schema import Gallery, Query
from cirfusion.features import FeatureCache
from cirfusion.methods import create_method

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fine") / "synthetic"
    S.generate(root, seed=5, n_images=120, workers=1)
    return root


def test_numbered_is_the_released_form_and_parses_back() -> None:
    s = numbered(["add a potted plant to the right side of the table", "replace the red carpet with a gray carpet."])
    assert s == "1. Add a potted plant to the right side of the table. 2. Replace the red carpet with a gray carpet."
    assert parse_finemt(s) == ("Add a potted plant to the right side of the table.", "Replace the red carpet with a gray carpet.")
    with pytest.raises(FineDataError):
        numbered(["  "])


def test_catalog_known_edits_per_kind() -> None:
    base = {"ref_category": "dress", "ref_colour": "red"}
    assert catalog_edits(Query("a", "r", "t", meta={"kind": "colour", **base, "target_colour": "blue"})) == \
        ["change the colour of the dress from red to blue", "keep the dress"]
    assert catalog_edits(Query("b", "r", "t", meta={"kind": "both", **base, "target_category": "shirt",
                                                    "target_colour": "blue"}))[0] == "replace the dress with a shirt"
    assert catalog_edits(Query("c", "r", "t", meta={"kind": "edit", **base, "edit": {"kind": "rotate", "params": {"angle": 90}}})) \
        == ["rotate the photo 90 degrees counter-clockwise"]
    with pytest.raises(FineDataError, match="no known edit"):
        catalog_edits(Query("d", "r", "t", meta={"kind": "mystery"}))


def test_make_fine_synthetic_round_trip_through_the_cli(synth: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fine"
    assert cli_main(["data", "make-fine", "synthetic", "--root", str(synth), "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["pipeline"] == "known edits" and set(report["splits"]) == {"train", "val", "test"}
    first = json.loads((out / "captions" / "cirr.fine.val.jsonl").read_text().splitlines()[0])
    assert set(first) == {"pairid", "reference", "target_hard", "finemt", "img_set"} and first["finemt"].startswith("1. ")
    for split in ("train", "val", "test"):
        orig = load_dataset("synthetic", synth, split, text="fine")
        back = load_dataset("finecir", out, split, image_dir=str(synth))
        assert len(back.queries) == len(orig.queries) and back.gallery.ids == orig.gallery.ids
        assert [p.resolve() for p in back.gallery.paths] == [Path(p).resolve() for p in orig.gallery.paths]
        for a, b in zip(orig.queries, back.queries, strict=True):
            assert (b.reference, b.targets, set(b.subset or ())) == (a.reference, a.targets[:1], set(a.subset or ()))
            assert [s.rstrip(".").lower() for s in b.finemt or ()] == [s.lower() for s in a.finemt or ()]
    assert json.loads((out / "fine.json").read_text())["read_back"].endswith(str(synth.resolve()))


def test_gallery_paths_of_images_kept_outside_the_root(synth: Path, tmp_path: Path) -> None:
    """A generated benchmark whose images lie outside its root (make-catalog over a photo cache) is written against
    the images' common directory, and reads back from it; images inside the root are written against the root."""
    ds = load_dataset("synthetic", synth, "val")
    assert gallery_base([ds]) == synth.resolve()
    photos = tmp_path / "cache" / "photos"
    moved = []
    for i, (image_id, p) in enumerate(zip(ds.gallery.ids, ds.gallery.paths, strict=True)):
        dst = photos / f"{i % 3}" / f"{image_id}.png"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, dst)
        moved.append(dst)
    elsewhere = dataclasses.replace(ds, gallery=Gallery(list(ds.gallery.ids), moved))
    base = gallery_base([elsewhere])
    assert base == photos.resolve()
    fine = known_finemt(elsewhere)
    with pytest.raises(FineDataError, match="outside"):
        write_fine(tmp_path / "out", elsewhere, fine, "cirr", write_gallery=True)
    write_fine(tmp_path / "out", elsewhere, fine, "cirr", write_gallery=True, base_dir=base)
    back = load_dataset("finecir", tmp_path / "out", "val", image_dir=str(base))
    assert back.gallery.ids == ds.gallery.ids and [p.resolve() for p in back.gallery.paths] == [p.resolve() for p in moved]


def test_make_fine_refuses_a_real_dataset_without_a_generator(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["data", "make-fine", "cirr", "--root", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "--vlm DIR, --llm DIR" in capsys.readouterr().err


def test_retrieval_filter_and_compress() -> None:
    ds = load_dataset_stub()
    qs = ds.queries
    # Query 0's target is first by text, query 1's by image, query 2's by neither.
    text = torch.tensor([[0.0, 0.9, 0.1, 0.0], [0.0, 0.1, 0.0, 0.9], [0.9, 0.0, 0.1, 0.5]])
    image = torch.tensor([[0.0, 0.9, 0.1, 0.0], [0.0, 0.1, 0.9, 0.3], [0.9, 0.0, 0.1, 0.5]])
    rep = retrieval_filter(ds, qs, ["x"] * 3, lambda t: text, lambda r: image, solved_k=1)
    assert (rep.text_solved, rep.image_solved, rep.kept) == (["q0"], ["q1"], ["q2"])
    assert compress(["one two", "three four", "five"], lambda s: len(s.split()) <= 6) == ["one two", "three four"]
    assert compress(["a b c d e f g h"], lambda s: len(s.split()) <= 4) == ["a b c"]


def load_dataset_stub():  # a 4-image gallery, reference excluded from its ranking
    from cirfusion.data.schema import CIRDataset, Gallery

    ids = ["i0", "i1", "i2", "i3"]
    qs = [Query("q0", "i0", "t", ("i1",)), Query("q1", "i1", "t", ("i2",)), Query("q2", "i2", "t", ("i3",))]
    return CIRDataset(name="stub", split="val", queries=qs, gallery=Gallery(ids, [f"{i}.png" for i in ids]), root=Path("."),
                      files=[], exclude_reference=True)


def test_generator_pipeline_with_tiny_random_models(synth: Path, tmp_path: Path) -> None:
    """Steps 1-3 with a tiny random BLIP-2/OPT drafter and GPT-2 cleaner (both from local directories), the retrieval
    filter on the tiny aligned backbone; the result is written in the cirr layout and read back."""
    from cirfusion.data.fine_hf import HFFineGenerator, save_tiny_generator

    vlm, llm = save_tiny_generator(tmp_path / "models")
    gen = HFFineGenerator(vlm, llm, max_new_tokens=12, min_new_tokens=4)  # random models: no early end
    ds = load_dataset("synthetic", synth, "val")
    pairs = select_pairs(ds, max_pairs=6, seed=0)
    assert len(pairs) == 6 and select_pairs(ds, 6, 0) == pairs and all(q.targets[0] != q.reference for q in pairs)
    draft = gen.draft(ds.gallery.path(pairs[0].reference), ds.gallery.path(pairs[0].targets[0]), pairs[0].text)
    assert draft and gen.clean(draft, pairs[0].text).startswith("1. ")
    cache = FeatureCache(create_backbone("tiny:aligned=true,max_text_tokens=16"), tmp_path / "cache")
    retrieval = BackboneRetrieval(cache, ds, create_method("image-only", cache.backbone))
    fine, info = make_fine_generated(ds, gen, retrieval, max_pairs=6, seed=0, solved_k=1)
    assert info["selected"] == 6 and info["kept"] + len(info["dropped_text_only"]) + len(info["dropped_image_only"]) \
        + info["no_edit"] == 6
    assert info["generated"] >= 3 and len(fine) == info["kept"] and all(retrieval.fits(t) and t.startswith("1. ") for t in fine.values())
    write_fine(tmp_path / "out", ds, fine, "cirr", write_gallery=True)
    back = load_dataset("finecir", tmp_path / "out", "val", image_dir=str(synth))
    assert [q.reference for q in back.queries] == [q.reference for q in ds.queries if q.qid in fine]
    with pytest.raises(FineDataError, match="aligned backbone"):
        BackboneRetrieval(FeatureCache(create_backbone("tiny"), tmp_path / "cache"), ds, None)


def test_known_finemt_refuses_a_dataset_without_known_edits() -> None:
    with pytest.raises(FineDataError, match="no known edits"):
        known_finemt(load_dataset_stub())
