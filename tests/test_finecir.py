"""FineCIR: the GATv2 layer, entity tokens from a (fake) parser's graphs, the parse cache (once per text, on disk,
keyed by parser version), word vectors encoded once through the feature cache, the entity-guidance switch with
everything else equal, every backbone family, training -> eval -> cirfusion.load on cached features, and `cirfusion
fuse` with FineCIR in a DAFM pool on two backbones."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import cirfusion
from cirfusion.backbones import create_backbone
from cirfusion.backbones.hf_blip2 import save_tiny_blip2
from cirfusion.backbones.hf_clip import save_tiny_clip
from cirfusion.cli import main
from cirfusion.data import load_dataset
from cirfusion.data.schema import Query
from cirfusion.evaluation import score_blocks
from cirfusion.features import FeatureCache
from cirfusion.methods import HyperParameterError, create_method
from cirfusion.methods.finecir import FineCIR, FineCIRWarning, GraphAttention
from cirfusion.parse_cache import (
    ParseCache,
    ParseError,
    entity_edits,
    entity_node_sets,
    get_parser,
    register_parser,
)
from cirfusion.views import FeatureView, load_split_data
from test_train import make_custom_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

COLOURS = ("red", "green", "blue", "yellow", "white", "purple")
CALLS: list[list[str]] = []


def fake_parse(texts: list[str]) -> list[dict]:
    """One 'square' entity with the colour words of the text (none: no entity)."""
    CALLS.append(list(texts))
    out = []
    for t in texts:
        cols = [w for w in t.lower().split() if w in COLOUR_SET]
        ents = [{"name": "square", "attributes": cols, "implicit": False}] if cols else []
        out.append({"text": t, "entities": ents, "relations": [], "edits": []})
    return out


COLOUR_SET = set(COLOURS)
register_parser("test-fake", fake_parse, "v1")


def test_graph_attention_follows_the_adjacency() -> None:
    torch.manual_seed(0)
    gat = GraphAttention(16, 4, 0.0).eval()
    x = torch.randn(2, 3, 16)
    star = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 1]], dtype=torch.float).expand(2, 3, 3)
    y = gat(x, star)
    x2 = x.clone()
    x2[:, 2] += 1.0  # node 2 is not a neighbour of node 1: node 1's output does not move, node 0's does
    y2 = gat(x2, star)
    assert torch.allclose(y[:, 1], y2[:, 1], atol=1e-6) and not torch.allclose(y[:, 0], y2[:, 0])
    assert y.shape == (2, 3, 16) and (y >= 0).all()  # ReLU output


def test_entity_node_sets() -> None:
    g = {"entities": [{"name": "floor_lamp", "attributes": ["red", "top-left", "red", "floor lamp"]},
                      {"name": "table", "attributes": []}, {"name": "x", "attributes": []}]}
    assert entity_node_sets(g, 2, 1) == [["floor lamp", "red"], ["table"]]
    assert entity_node_sets(g, 5, 5)[0] == ["floor lamp", "red", "top left"]
    assert entity_node_sets(g, 5, 5, edit_ops=True) == entity_node_sets(g, 5, 5)  # no edits: no op nodes


def test_edit_op_nodes_go_to_the_entity_each_edit_names() -> None:
    # "replace the red rhombus with a cross; add a green rhombus; keep the square": two rhombuses, told apart by
    # the edit's attributes; the replaced one is marked as such.
    g = {"entities": [{"name": "cross", "attributes": []}, {"name": "rhombus", "attributes": ["red"]},
                      {"name": "rhombus", "attributes": ["green", "small"]}, {"name": "square", "attributes": []},
                      {"name": "circle", "attributes": []}],
         "edits": [{"op": "replace", "entity": "cross", "attributes": [], "from": "rhombus"},
                   {"op": "add", "entity": "rhombus", "attributes": ["green"]},
                   {"op": "keep", "entity": "square", "attributes": []}]}
    assert [x and x[0] for x in entity_edits(g)] == ["replace", "replaced", "add", "keep", None]
    assert entity_edits(g)[1] == ("replaced", g["edits"][0])  # with the edit itself
    assert entity_node_sets(g, 5, 1, edit_ops=True) == [["cross", "replace"], ["rhombus", "red", "replaced"],
                                                        ["rhombus", "green", "add"], ["square", "keep"], ["circle"]]


def test_place_and_new_attribute_nodes() -> None:
    # "give the blue cross a red colour; relocate the big triangle in the bottom left corner to the left middle"
    g = {"entities": [{"name": "cross", "attributes": ["blue", "red"]},
                      {"name": "triangle", "attributes": ["big"], "places": ["in bottom left corner", "to left middle"]}],
         "edits": [{"op": "change", "entity": "cross", "attributes": ["red"]},
                   {"op": "change", "entity": "triangle", "attributes": []}]}
    assert entity_node_sets(g, 5, 5, edit_ops=True) == [["cross", "blue", "red", "change"], ["triangle", "big", "change"]]
    assert entity_node_sets(g, 5, 5, True, places=True, new_attributes=True) == [
        ["cross", "blue", "change", "now red"], ["triangle", "big", "in bottom left corner", "to left middle", "change"]]
    assert entity_node_sets(g, 5, 1, False, places=True, new_attributes=True) == [
        ["cross", "blue", "now red"], ["triangle", "big", "in bottom left corner"]]


def test_parse_cache_parses_once_and_keys_on_version(tmp_path: Path) -> None:
    p = get_parser("test-fake")
    CALLS.clear()
    c = ParseCache(p, tmp_path)
    g = c.graphs(["make it red", "make it blue", "make it red"])
    assert [e["attributes"] for x in g for e in x["entities"]] == [["red"], ["blue"], ["red"]]
    assert CALLS == [["make it red", "make it blue"]]
    assert c.graphs(["make it blue"]) == [g[1]] and len(CALLS) == 1
    assert ParseCache(p, tmp_path).graphs(["make it red"]) == [g[0]] and len(CALLS) == 1  # from disk
    ParseCache(register_parser("test-fake-2", fake_parse, "v2"), tmp_path).graphs(["make it red"])
    assert len(CALLS) == 2
    with pytest.raises(ParseError, match=r"returned 0 graphs"):
        ParseCache(register_parser("test-bad", lambda ts: [], "v1")).graphs(["x"])
    with pytest.raises(ParseError, match="not a scene graph"):
        ParseCache(register_parser("test-bad2", lambda ts: ["x"] * len(ts), "v1")).graphs(["x"])
    with pytest.raises(KeyError, match="unknown parser"):
        get_parser("no-such-parser")


@pytest.fixture(scope="module")
def custom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("finecir") / "data"
    make_custom_dataset(root)
    return root


def val_query_features(custom: Path, tmp_path: Path, keep: Callable[[Query], bool], n: int) -> tuple[Any, ...]:
    """(backbone, cache, the first ``n`` val queries that ``keep`` accepts, their reference and text features, the
    latter with raw texts and an encoder, as training and evaluation see them)."""
    bb = create_backbone("tiny")
    cache = FeatureCache(bb, tmp_path / "cache")
    data = load_split_data(cache, load_dataset("custom", custom, "val"))
    view = FeatureView(data.images, data.texts)
    qs = [q for q in data.dataset.queries if keep(q)][:n]
    ref = view.image(np.array([view.image_row(q.reference) for q in qs]), True)
    text = view.text(np.array([view.text_row(q.text) for q in qs]), True)
    return bb, cache, qs, ref, text


def test_entities_change_the_query_and_the_switch_keeps_everything_else(custom: Path, tmp_path: Path) -> None:
    bb, cache, qs, ref, text = val_query_features(custom, tmp_path, lambda q: True, 6)
    assert text.texts == [q.text for q in qs] and text.encoder is not None
    torch.manual_seed(0)
    on = create_method("finecir", bb, parser="test-fake", width=32, embed_dim=16, heads=2, gat_heads=2).eval()
    off = create_method("finecir", bb, parser="test-fake", width=32, embed_dim=16, heads=2, gat_heads=2,
                        entity_guidance=False).eval()
    off.load_state_dict(on.state_dict())  # the same parameters: only the entity tokens differ
    assert set(on.state_dict()) == set(off.state_dict())
    with torch.no_grad():
        ent, pad = on.entity_tokens(text)
        assert ent.shape[:2] == (6, 1) and not pad.any()
        assert not torch.allclose(ent[0], on.empty_entity[0])
        assert torch.allclose(off.entity_tokens(text)[0], on.empty_entity.expand(6, 1, -1))
        q_on, q_off = on.encode_query(ref, text), off.encode_query(ref, text)
        # At init an entity token is the empty token plus a term at the learned tokens' scale, not the GAT's
        # unit-scale output, which would swamp the read-out slot of this pre-norm Q-Former.
        assert float((ent - on.empty_entity).pow(2).mean().sqrt()) < 0.15
        with torch.autocast("cpu", dtype=torch.bfloat16):  # TrainConfig(precision="bf16") trains like this
            q_bf16 = on.encode_query(ref, text)
    assert not torch.allclose(q_on, q_off)
    torch.testing.assert_close(q_bf16.float(), q_on, atol=0.05, rtol=0)
    # Word vectors are the cached text encoder's, each word encoded once.
    words = {w for q in qs for w in ["square", *[c for c in q.text.split() if c in COLOUR_SET]]}
    assert set(on._node_memo) == words
    torch.testing.assert_close(on._node_memo["square"], cache.encode_texts(["square"]).global_[0])
    # Without raw texts (features built by hand) the model still answers, with the empty entity, and says so.
    bare = type(text)(global_=text.global_, tokens=text.tokens, mask=text.mask)
    fresh = create_method("finecir", bb, parser="test-fake", width=32, embed_dim=16, heads=2, gat_heads=2).eval()
    fresh.load_state_dict(on.state_dict())
    with pytest.warns(FineCIRWarning, match="no raw texts"):
        torch.testing.assert_close(fresh.encode_query(ref, bare), q_off)


def edit_parse(texts: list[str]) -> list[dict]:
    """fake_parse plus an 'add' edit of that square."""
    return [{**g, "edits": [{"op": "add", "entity": "square", "attributes": []}] if g["entities"] else []}
            for g in fake_parse(texts)]


register_parser("test-edits", edit_parse, "v1")


def place_parse(texts: list[str]) -> list[dict]:
    """fake_parse, the square placed in the top left corner and changed to its last colour."""
    return [{**g, "entities": [{**e, "places": ["in top left corner"]} for e in g["entities"]],
             "edits": [{"op": "change", "entity": "square", "attributes": g["entities"][0]["attributes"][-1:]}]
             if g["entities"] else []} for g in fake_parse(texts)]


register_parser("test-places", place_parse, "v1")


def test_readout_token_and_edit_node_variants(custom: Path, tmp_path: Path) -> None:
    """The validation study's variants: ``edit_nodes`` adds the edit word to the node set (other entity tokens);
    ``readout="token"`` reads the query at a learned token before the entity slots (one more parameter);
    ``place_nodes`` / ``new_attribute_nodes`` add the places and mark a change's new values."""
    bb, _, qs, ref, text = val_query_features(custom, tmp_path, lambda q: any(c in COLOUR_SET for c in q.text.split()), 4)
    assert qs
    kw: dict = dict(parser="test-edits", width=32, embed_dim=16, heads=2, gat_heads=2)
    torch.manual_seed(0)
    base = create_method("finecir", bb, edit_nodes=False, **kw).eval()
    ops = create_method("finecir", bb, edit_nodes=True, **kw).eval()
    ops.load_state_dict(base.state_dict())
    assert all(s[0][-1] == "add" for s in ops.node_sets(list(text.texts or [])))
    assert all("add" not in s[0] for s in base.node_sets(list(text.texts or [])))
    tok = create_method("finecir", bb, readout="token", edit_nodes=False, **kw).eval()
    assert set(tok.state_dict()) == set(base.state_dict()) | {"readout_token"}
    tok.load_state_dict({**base.state_dict(), "readout_token": tok.readout_token.detach()})
    with torch.no_grad():
        assert not torch.allclose(ops.entity_tokens(text)[0], base.entity_tokens(text)[0])
        q_base, q_tok = base.encode_query(ref, text), tok.encode_query(ref, text)
    assert q_tok.shape == q_base.shape and not torch.allclose(q_tok, q_base)
    with pytest.raises(HyperParameterError, match="readout"):
        create_method("finecir", bb, readout="cls", **kw)
    # place and new-attribute nodes: the same weights, other node sets, other entity tokens
    kw["parser"] = "test-places"
    plain = create_method("finecir", bb, **kw).eval()
    rich = create_method("finecir", bb, place_nodes=True, new_attribute_nodes=True, **kw).eval()
    plain.load_state_dict(base.state_dict())
    rich.load_state_dict(base.state_dict())
    for t, p, r in zip(text.texts or [], plain.node_sets(list(text.texts or [])), rich.node_sets(list(text.texts or [])), strict=True):
        last = [w for w in t.lower().split() if w in COLOUR_SET][-1]
        assert p[0][-1] == "change" and "in top left corner" not in p[0] and last in p[0]
        assert r[0][-2:] == ["change", f"now {last}"] and "in top left corner" in r[0]
    with torch.no_grad():
        assert not torch.allclose(rich.entity_tokens(text)[0], plain.entity_tokens(text)[0])


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {"clip": save_tiny_clip(root / "clip", "clip"), "blip2": save_tiny_blip2(root / "blip2")}


@pytest.mark.parametrize("spec", ["embedded", "colour", "tiny", "hf-clip", "hf-blip2"])
def test_every_backbone_family(spec: str, hf_dirs: dict[str, Path], tmp_path: Path) -> None:
    """FineCIR at tiny size on each backbone's real features (the raw-image API path: texts and encoder attached)."""
    name = {"hf-clip": f"hf-clip:{hf_dirs['clip']}", "hf-blip2": f"hf-blip2:{hf_dirs['blip2']}"}.get(spec, spec)
    bb = create_backbone(name)
    torch.manual_seed(0)
    m = create_method("finecir", bb, parser="test-fake", width=32, embed_dim=16, heads=2, gat_heads=2, num_queries=2)
    model = cirfusion.api.CIRModel(m, {"method": "finecir", "backbone": {"id": bb.backbone_id}}, backbone=bb)
    from PIL import Image

    ims = [Image.new("RGB", (40, 40), c) for c in ("red", "blue", "green")]
    q = model.encode_query(ims[:2], ["make it red", "make it blue and white"])
    g = model.encode_gallery(ims)
    assert q.shape == (2, 16) and g.shape == (3, 2, 16)
    s = model.similarity(q, g)
    assert s.shape == (2, 3) and torch.isfinite(s).all()
    assert set(m._node_memo) == {"square", "red", "blue", "white"}


def test_train_eval_load_and_fuse_on_cached_features(custom: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "cache"
    common = ["--dataset", "custom", "--root", str(custom), "--cache-dir", str(cache), "--no-progress"]
    small = ["--hparam", "width=32", "--hparam", "embed_dim=16", "--hparam", "heads=2", "--hparam", "gat_heads=2",
             "--hparam", "parser=test-fake"]
    assert main(["train", "finecir", *common, "--backbone", "tiny", "--out", str(tmp_path / "f"), "--epochs", "2",
                 "--batch-size", "16", *small]) == 0, capsys.readouterr().err
    assert main(["train", "clip4cir", *common, "--backbone", "tiny:seed=1,resolution=48", "--out", str(tmp_path / "c"),
                 "--epochs", "2", "--batch-size", "16", "--hparam", "embed_dim=16", "--hparam", "hidden_dim=32"]) == 0
    capsys.readouterr()
    # Parses were cached next to the features, once per text.
    assert any(p.name.startswith("parse-test-fake-") for p in cache.iterdir())
    # eval on cached features == the Python API on raw images and texts
    ck = tmp_path / "f" / "best"
    assert main(["eval", str(ck), *common, "--split", "val", "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["method"] == "finecir"
    model = cirfusion.load(ck)
    ds = load_dataset("custom", custom, "val")
    data = load_split_data(FeatureCache(model.backbone, cache), ds)
    _, block = next(score_blocks(model.method, FeatureView(data.images, data.texts), ds))
    q = ds.queries[0]
    got = model.similarity(model.encode_query([ds.gallery.path(q.reference)], [q.text]),
                           model.encode_gallery(list(ds.gallery.paths)))
    torch.testing.assert_close(got[0], block[0], atol=1e-4, rtol=1e-4)
    assert isinstance(model.method, FineCIR) and model.method.params.parser == "test-fake"
    # DAFM over FineCIR (tiny) and CLIP4CIR (another tiny): a multi: backbone, each base reading its own part
    out = tmp_path / "fused"
    rc = main(["fuse", str(ck), str(tmp_path / "c" / "best"), *common, "--out", str(out), "--epochs", "1",
               "--min-steps", "10", "--split-test", "val"])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((out / "metrics.json").read_text())
    assert "fused" in json.dumps(rep) and (out / "best" / "config.json").exists()
    fused = cirfusion.load(out / "best")
    r = fused.rank(ds.gallery.path(q.reference), q.text, list(ds.gallery.paths), k=3)
    assert len(r) == 3


def test_run_finecir_for_the_quickstart(custom: Path, tmp_path: Path) -> None:
    from cirfusion.finecir_run import run_finecir

    cache = FeatureCache(create_backbone("tiny"), tmp_path / "cache")
    tr, va = (load_split_data(cache, load_dataset("custom", custom, s), training=(s == "train")) for s in ("train", "val"))
    fr = run_finecir({"train": tr, "val": va, "test": va}, cache.backbone, tmp_path / "run", epochs=1, batch_size=16,
                     sample_rows=[0, 1], parser="test-fake", width=32, embed_dim=16, heads=2, gat_heads=2)
    assert (fr.checkpoint / "config.json").exists() and fr.val_metric == "R@10" and "R@10" in fr.metrics
    assert [g["qid"] for g in fr.graphs] == [q.qid for q in va.dataset.queries[:2]]
    assert fr.graphs[0]["node_sets"] == [["square", fr.graphs[0]["text"].split()[-1]]]


def test_the_service_explanation_gives_the_parsed_graph() -> None:
    m = create_method("finecir", create_backbone("tiny"), parser="test-fake", width=32, embed_dim=16, heads=2,
                      gat_heads=2)
    assert isinstance(m, FineCIR)
    text = "make it blue and white"
    ex = m.explain_query(None, text)
    assert ex["kind"] == "branches" and ex["method"] == "finecir" and "scene graph" in ex["label"]
    assert ex["parsed"] == ParseCache(get_parser("test-fake"), None).graphs([text])[0]
    assert ex["entities_used"] == entity_node_sets(ex["parsed"], m.params.max_entities, m.params.max_attributes)
    assert ex["entities_used"]  # the fake parser finds an entity in it
    json.dumps(ex)  # what the service sends
