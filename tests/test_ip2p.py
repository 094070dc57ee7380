"""Edit pairs as a CIR dataset, and the InstructPix2Pix folder loader (dataset ``ip2p``): layout, splits, errors,
and that DetailFusion's stage 1 trains on it through the CLI's dataset registry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from cirfusion.data import load_dataset
from cirfusion.data.generated import EditPair
from cirfusion.data.ip2p import _is_val, edit_pairs_dataset, load_ip2p_pairs
from cirfusion.data.schema import DataError


def make_ip2p(root: Path, n_prompts: int = 30, seeds: tuple[str, ...] = ("11", "42")) -> Path:
    for i in range(n_prompts):
        d = root / f"{i:07d}"
        d.mkdir(parents=True)
        (d / "prompt.json").write_text(json.dumps({"input": f"a photo of thing {i}", "edit": f"make thing {i} red",
                                                   "output": f"a photo of red thing {i}", "url": "x"}))
        for s in seeds:
            for side in (0, 1):
                Image.new("RGB", (16, 16), (i * 8 % 256, side * 200, 30)).save(d / f"{s}_{side}.jpg")
    return root


def test_layout_to_dataset(tmp_path: Path) -> None:
    root = make_ip2p(tmp_path / "ip2p")
    (root / "0000003" / "99_0.jpg").write_bytes((root / "0000003" / "11_0.jpg").read_bytes())  # a seed missing its _1
    ds = load_dataset("ip2p", root, "edit_pairs")
    assert len(ds.queries) == 60 and len(ds.gallery) == 120  # 30 prompts x 2 complete seeds, 2 images each
    q = ds.queries[0]
    assert q.reference == "0000000/11_0.jpg" and q.targets == ("0000000/11_1.jpg",) and q.text == "make thing 0 red"
    assert q.captions == ("make thing 0 red", "a photo of thing 0", "a photo of red thing 0")
    assert q.meta["input"] == "a photo of thing 0" and q.meta["kind"] == "instruction"
    assert ds.gallery.path(q.reference) == root / "0000000" / "11_0.jpg"
    # train / val: a fixed hash split of the prompt ids, disjoint, together every pair
    tr, va = load_dataset("ip2p", root, "train"), load_dataset("ip2p", root, "val")
    assert len(tr.queries) + len(va.queries) == 60
    assert {q.reference.split("/")[0] for q in va.queries} == {f"{i:07d}" for i in range(30) if _is_val(f"{i:07d}")}
    assert len(load_dataset("ip2p", root, "edit_pairs", limit=5).queries) == 5


def test_layout_errors(tmp_path: Path) -> None:
    root = make_ip2p(tmp_path / "a", n_prompts=2)
    (root / "0000001" / "prompt.json").write_text(json.dumps({"input": "x", "edit": ""}))
    with pytest.raises(DataError, match=r"0000001.*edit.*missing or empty"):
        load_dataset("ip2p", root, "edit_pairs")
    root = make_ip2p(tmp_path / "b", n_prompts=2)
    (root / "0000000" / "prompt.json").unlink()
    with pytest.raises(DataError, match=r"without prompt\.json"):
        load_dataset("ip2p", root, "edit_pairs")
    root = make_ip2p(tmp_path / "c", n_prompts=1, seeds=())
    with pytest.raises(DataError, match="no complete"):
        load_dataset("ip2p", root, "edit_pairs")
    with pytest.raises(DataError, match="unknown ip2p split"):
        load_ip2p_pairs(make_ip2p(tmp_path / "d", n_prompts=1), "test")
    with pytest.raises(DataError, match="not a directory"):
        load_dataset("ip2p", tmp_path / "missing", "edit_pairs")
    with pytest.raises(DataError, match="unknown ip2p dataset option"):
        load_dataset("ip2p", root, "edit_pairs", category="x")


def test_edit_pairs_dataset(tmp_path: Path) -> None:
    a, b, c = (tmp_path / f"{n}.png" for n in "abc")
    pairs = [EditPair("a", "make it red", "b", "change_colour", a, b, instructions=("make it red", "paint it red")),
             EditPair("b", "add a star", "c", "add", b, c)]
    ds = edit_pairs_dataset(pairs, name="toy")
    assert [q.reference for q in ds.queries] == ["a", "b"] and ds.gallery.ids == ["a", "b", "c"]
    assert ds.text_policy == "random" and ds.queries[0].captions == ("make it red", "paint it red")
    assert ds.queries[1].meta == {"kind": "add", "edit_pair": True} and ds.split == "edit_pairs"
    with pytest.raises(DataError, match="no edit pairs"):
        edit_pairs_dataset([])
    with pytest.raises(DataError, match="both 'a'"):
        edit_pairs_dataset([EditPair("a", "x", "a", "add", a, a)])
    with pytest.raises(DataError, match="names two files"):
        edit_pairs_dataset([EditPair("a", "x", "b", "add", a, b), EditPair("a", "y", "c", "add", c, b)])


def test_detailfusion_pretrains_on_an_ip2p_folder(tmp_path: Path) -> None:
    """Stage 1 reads the ip2p folder's edit_pairs split, as `cirfusion train detailfusion --dataset ip2p` does."""
    pytest.importorskip("cirfusion.backbones.tiny")
    from cirfusion.backbones import create_backbone
    from cirfusion.features import FeatureCache
    from cirfusion.methods import create_method
    from cirfusion.train import TrainConfig, train
    from cirfusion.views import load_split_data

    root = make_ip2p(tmp_path / "ip2p", n_prompts=24)
    bb = create_backbone("tiny")
    cache = FeatureCache(bb, tmp_path / "cache")
    split = {s: load_split_data(cache, load_dataset("ip2p", root, s), training=(s != "val")) for s in ("train", "val", "edit_pairs")}
    m = create_method("detailfusion", bb, di_width=16, di_cell_dim=4, gm_embed_dim=16, gm_projection_dim=16,
                      gm_hidden_dim=16, afc_width=8, afc_hidden=8)
    res = train(m, split["train"], split["val"], tmp_path / "run", TrainConfig(epochs=1, batch_size=16, progress=False),
                extra_splits={"edit_pairs": split["edit_pairs"]})
    assert res.completed
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records if r["type"] == "epoch"] == ["di-pretrain", "joint", "compositor"]
