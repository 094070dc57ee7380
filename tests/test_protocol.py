"""The validation protocol (docs/protocol.md): the val split's select/fuse parts, selection.json, the
order-of-addition analysis and the learned-vs-static fusion diagnostics."""

from __future__ import annotations

import dataclasses
import itertools
import json
import random

import numpy as np
import pytest
from test_fusion import colour_model, colour_shape_world, shape_model
from test_train import make_custom_dataset

import cirfusion.fusion as FU
from cirfusion.data.parts import ProtocolError, dataset_part, image_part, part_rows, split_part
from cirfusion.data.registry import load_dataset
from cirfusion.data.schema import CIRDataset, Gallery, Query
from cirfusion.methods.registry import create_method
from cirfusion.selection import SelectionRecord, base_selection, describe_split, overlaps


# ---------------------------------------------------------------------------------------------------------------------
# The val split rule
# ---------------------------------------------------------------------------------------------------------------------
def _dataset(n_images: int = 60, per_image: int = 3) -> CIRDataset:
    ids = [f"img{i}" for i in range(n_images)]
    qs = [Query(f"q{i}-{j}", ids[i], f"text {j}", (ids[(i + j + 1) % n_images],))
          for i in range(n_images) for j in range(per_image)]
    return CIRDataset("toy", "val", qs, Gallery(ids, [f"{i}.png" for i in ids]))


def test_parts_are_disjoint_by_reference_image_and_cover_the_split():
    ds = _dataset()
    sel, fus = part_rows(ds, "select"), part_rows(ds, "fuse")
    assert len(sel) and len(fus) and not set(sel) & set(fus)
    assert sorted([*sel, *fus]) == list(range(len(ds.queries)))
    # no reference image on both sides: the fusion's queries are new images to the epoch selection
    assert not {ds.queries[i].reference for i in sel} & {ds.queries[i].reference for i in fus}
    # a pure function of the reference id: the same cut whatever the query order or the split's size
    shuffled = dataclasses.replace(ds, queries=random.Random(3).sample(ds.queries, len(ds.queries)))
    assert {shuffled.queries[i].qid for i in part_rows(shuffled, "fuse")} == {ds.queries[i].qid for i in fus}
    small = dataclasses.replace(ds, queries=ds.queries[:30])
    assert {small.queries[i].qid for i in part_rows(small, "fuse")} == {ds.queries[i].qid for i in fus if i < 30}
    # roughly the select share (0.5) of the images
    assert 0.3 < len(sel) / len(ds.queries) < 0.7
    part = dataset_part(ds, "fuse")
    assert part.split == "val:fuse" and part.key == "toy/val:fuse" and len(part.queries) == len(fus)
    assert part.gallery is ds.gallery and part.meta["val_part"] == "fuse"
    assert dataset_part(ds, "all") is ds
    assert image_part("img0", 0.999) == "select" and image_part("img0", 0.001) == "fuse"
    with pytest.raises(ProtocolError, match="unknown validation part"):
        part_rows(ds, "test")
    with pytest.raises(ProtocolError, match="share"):
        image_part("img0", 1.5)
    with pytest.raises(ProtocolError, match="no query falls"):
        dataset_part(dataclasses.replace(ds, queries=[]), "fuse")


def test_split_names_and_overlaps(tmp_path):
    assert split_part("val/fuse") == ("val", "fuse") and split_part("val:select") == ("val", "select")
    assert split_part("test") == ("test", "all") and split_part(None) == (None, "all")
    with pytest.raises(ProtocolError):
        split_part("val/other")
    # the fusion's fit part against what a base model chose on
    assert not overlaps(("val", "select"), ("val", "fuse"))
    assert overlaps(("val", "all"), ("val", "fuse")) and overlaps(("val", "fuse"), ("val", "fuse"))
    assert not overlaps(("train", "all"), ("val", "fuse")) and not overlaps((None, "all"), ("val", "fuse"))
    assert describe_split("val", "fuse", holdout=0.2) == "val/fuse (held-out 20%)"
    # every command loads a part by name
    make_custom_dataset(tmp_path)
    full = load_dataset("custom", tmp_path, "val")
    a, b = load_dataset("custom", tmp_path, "val/select"), load_dataset("custom", tmp_path, "val/fuse")
    assert {q.qid for q in a.queries} | {q.qid for q in b.queries} == {q.qid for q in full.queries}
    assert not {q.qid for q in a.queries} & {q.qid for q in b.queries}


def test_selection_record_refuses_test_and_round_trips(tmp_path):
    rec = SelectionRecord({"benchmark": "toy"})
    rec.choose("pool", ["a", "b"], "val/fuse (2-fold cross-fit)", "Rmean", 30.5, {"a + b": 30.5, "a + c": 29.0})
    with pytest.raises(ProtocolError, match="test only reports"):
        rec.choose("pool", ["a"], "test", "Rmean", 31.0)
    with pytest.raises(ProtocolError, match="name the split"):
        rec.choose("pool", ["a"], "")
    rec.report("table", "toy/test")
    path = rec.write(tmp_path)
    assert path.name == "selection.json"
    back = SelectionRecord.read(tmp_path)
    assert back.get("pool").candidates == {"a + b": 30.5, "a + c": 29.0} and back.reports == rec.reports
    assert rec.write(tmp_path / "x.json").name == "x.json"
    cfg = {"extra": {"epoch": 2, "val_metric": "R@10", "val": {"R@10": 40.0}}}
    man = {"datasets": {"val": {"split": "val:select", "num_queries": 12}}}
    assert base_selection(cfg, man) == {"split": "val", "part": "select", "num_queries": 12, "epoch": 2,
                                        "metric": "R@10", "figure": 40.0}
    assert base_selection(cfg, None)["split"] is None


def test_fuse_writes_selection_json_and_warns_when_parts_overlap(tmp_path, capsys):
    from cirfusion.cli import main

    data, cache = tmp_path / "data", tmp_path / "cache"
    make_custom_dataset(data)
    common = ["--dataset", "custom", "--root", str(data), "--cache-dir", str(cache), "--no-progress"]
    tiny = ["--backbone", "tiny", "--epochs", "2", "--batch-size", "16", "--hparam", "embed_dim=16", "--hparam",
            "hidden_dim=32"]
    assert main(["train", "clip4cir", *common, *tiny, "--out", str(tmp_path / "a")]) == 0  # default: val/select
    assert main(["train", "clip4cir", *common, *tiny, "--out", str(tmp_path / "b"), "--seed", "1",
                 "--split-val", "val"]) == 0  # chose on the whole of val: overlaps the fusion's queries
    capsys.readouterr()
    out = tmp_path / "fused"
    assert main(["fuse", str(tmp_path / "a" / "best"), str(tmp_path / "b" / "best"), *common, "--out", str(out),
                 "--epochs", "1", "--min-steps", "10", "--split-test", "val"]) == 0
    err = capsys.readouterr().err
    assert "clip4cir-2 chose its epoch on val" in err and "clip4cir chose" not in err.replace("clip4cir-2 chose", "")
    rec = json.loads((out / "selection.json").read_text())
    by = {c["name"]: c for c in rec["choices"]}
    assert by["epoch of clip4cir"]["split"] == "val/select" and by["epoch of clip4cir-2"]["split"] == "val"
    assert by["fused: epoch"]["split"] == "val/fuse (held-out 20%)" and by["fused: epoch"]["metric"] == "R@10"
    assert "-1" in by["fused: epoch"]["candidates"]  # the mean of normalised scores competed
    assert rec["protocol"]["fit"] == "val/fuse" and rec["reports"][0]["split"] == "custom/val"
    rep = json.loads((out / "metrics.json").read_text())
    assert rep["dataset"] == "custom/val:fuse" and any("clip4cir-2 chose" in n for n in rep["notes"])
    # fitting on test, or choosing the fusion's epoch there, is refused
    for flag in ("--split-train", "--split-val"):
        assert main(["fuse", str(tmp_path / "a" / "best"), str(tmp_path / "b" / "best"), *common, "--out",
                     str(tmp_path / "f2"), flag, "test"]) == 2
        assert "test only reports" in capsys.readouterr().err
    dg = rep["splits"]["test"]["diagnostics"]
    assert dg["learned"] == pytest.approx(rep["splits"]["test"]["fused"]["R@10"])
    assert dg["mean"] == pytest.approx(rep["splits"]["test"]["mean_normalised"]["R@10"])


# ---------------------------------------------------------------------------------------------------------------------
# Order of addition
# ---------------------------------------------------------------------------------------------------------------------
def test_addition_orders_enumerate_every_permutation():
    orders = FU.addition_orders(["a", "b", "c", "d"])
    assert len(orders) == 24 and {tuple(o) for o in orders} == set(itertools.permutations("abcd"))
    assert FU.addition_orders(["a", "b", "c", "d"]) == orders  # deterministic
    assert all(o[0] == "c" for o in FU.addition_orders(["a", "b", "c", "d"], start="c"))
    many = FU.addition_orders([f"m{i}" for i in range(6)], max_orders=30, seed=1)
    assert len(many) == 30 and len({tuple(o) for o in many}) == 30
    assert many == FU.addition_orders([f"m{i}" for i in range(6)], max_orders=30, seed=1)
    with pytest.raises(FU.FusionError, match="distinct"):
        FU.addition_orders(["a", "a"])


def test_spread():
    s = FU.spread([1.0, 2.0, 4.0])
    assert s == {"n": 3, "min": 1.0, "median": 2.0, "max": 4.0, "mean": pytest.approx(7 / 3),
                 "std": pytest.approx(float(np.std([1.0, 2.0, 4.0])))}
    with pytest.raises(FU.FusionError):
        FU.spread([])


def test_order_of_addition_fits_every_prefix_and_is_deterministic(tmp_path):
    bases = [colour_model(), shape_model(), create_method("image-only", colour_model().dims)]
    names = ["colour", "shape", "image"]
    tr, va = colour_shape_world(tmp_path)
    t, v = FU.SplitTable.build(bases, names, tr), FU.SplitTable.build(bases, names, va)
    cfg = FU.FusionConfig(epochs=1, min_steps=0, batch_size=64, hard=30, random=30)
    lines: list[str] = []
    figs = FU.order_of_addition(t, None, v, cfg, seeds=(0, 1), report=lines.append)
    assert [o["order"] for o in figs["orders"]] == [list(p) for p in itertools.permutations(names)]
    assert figs["fits"] == (6 + 6) * 2  # ordered pairs and triples, per seed
    assert all(set(o["seeds"]) == {"0", "1"} and all(len(x) == 3 for x in o["seeds"].values()) for o in figs["orders"])
    # the first figure of an order is its first model alone
    for o in figs["orders"]:
        assert o["seeds"]["0"][0] == pytest.approx(FU.evaluate_base(v, names.index(o["order"][0]))["R@10"])
    assert [p["n"] for p in figs["positions"]] == [12, 12, 12] and figs["final"]["n"] == 12
    full = next(s for s in figs["subsets"] if len(s["models"]) == 3)
    assert full["n"] == 12 and full["min"] == figs["final"]["min"] and full["max"] == figs["final"]["max"]
    assert len(lines) == 6 * 3
    again = FU.order_of_addition(t, None, v, cfg, seeds=(0, 1))
    strip = ("wall_s",)
    assert {k: x for k, x in again.items() if k not in strip} == {k: x for k, x in figs.items() if k not in strip}
    png = FU.plot_incremental(figs, tmp_path / "orders.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------------------------------
# Diagnostics on a hand-made example
# ---------------------------------------------------------------------------------------------------------------------
def _pq(rank, subset_rank, ap):
    return {"rank": np.array(rank), "subset_rank": np.array(subset_rank), "AP@10": np.array(ap, dtype=float)}


def test_per_query_metrics_and_oracle_by_hand():
    # 4 queries; model A finds queries 0 and 1 at rank 1, model B finds query 2 at rank 1; query 3 is found by neither
    a = _pq([1, 1, 9, 20], [1, 1, 3, 3], [1.0, 1.0, 0.0, 0.0])
    b = _pq([7, 3, 1, 20], [2, 1, 1, 3], [0.0, 0.5, 1.0, 0.0])
    assert FU.metric_from_per_query(a, "R@1") == 50.0 and FU.metric_from_per_query(b, "R@1") == 25.0
    assert FU.metric_from_per_query(b, "R@5") == 50.0 and FU.metric_from_per_query(b, "Rsubset@1") == 50.0
    assert FU.metric_from_per_query(b, "Rmean") == 50.0
    assert FU.metric_from_per_query(b, "mAP@10") == pytest.approx(37.5)
    choice = FU.oracle_choice([a, b], "R@1")
    assert choice.tolist() == [0, 0, 1, 0]  # ties go to the first candidate
    best = FU.pick_per_query([a, b], choice)
    assert FU.metric_from_per_query(best, "R@1") == 75.0  # the per-query oracle: 3 of 4 queries
    # Rmean's per-query share: (hit@5 + subset hit@1) / 2
    assert FU.query_scores(b, "Rmean").tolist() == [0.0, 1.0, 1.0, 0.0]
    assert FU.oracle_choice([a, b], "Rmean").tolist() == [0, 0, 1, 0]
    # a query without targets counts for nothing
    c = _pq([-1, 1], [-1, 1], [0.0, 1.0])
    assert FU.metric_from_per_query(c, "R@1") == 100.0 and FU.query_scores(c, "R@1").tolist() == [0.0, 1.0]
    with pytest.raises(FU.FusionError):
        FU.query_scores(a, "nDCG")


def test_simplex_grid():
    g = FU.simplex_grid(3, 4)
    assert len(g) == 15 + 1 and np.allclose(g.sum(1), 1) and (g >= 0).all()
    assert np.isclose(g, 1 / 3).all(1).any()  # the uniform weighting (the mean) is always there
    assert len(FU.simplex_grid(2, 2)) == 3  # (0, 1), (.5, .5), (1, 0)


def test_fusion_diagnostics_on_complementary_models(tmp_path):
    # the colour model knows colour, the shape model shape: a per-query choice could gain a lot over either
    bases = [colour_model(), shape_model()]
    names = ["colour", "shape"]
    tr, va = colour_shape_world(tmp_path)
    t, v = FU.SplitTable.build(bases, names, tr), FU.SplitTable.build(bases, names, va)
    model, _ = FU.fuse(t, None, FU.FusionConfig(epochs=1, min_steps=20, batch_size=64, hard=30, random=30))
    dg = FU.fusion_diagnostics(v, model, "R@10", grid_steps=4)
    assert dg["singles"] == {n: pytest.approx(FU.evaluate_base(v, k)["R@10"]) for k, n in enumerate(names)}
    assert dg["mean"] == pytest.approx(FU.evaluate_fused(FU.baseline_model(v), v)["R@10"])
    assert dg["learned"] == pytest.approx(FU.evaluate_fused(model, v)["R@10"])
    assert dg["oracle_single"] >= max(dg["singles"].values())
    assert dg["oracle_weights"] >= dg["static_best"]["value"] >= dg["mean"]
    assert dg["headroom"]["oracle_single"] == pytest.approx(dg["oracle_single"] - dg["mean"])
    assert sum(dg["oracle_single_share"].values()) == pytest.approx(1.0)
    assert sum(dg["static_best"]["weights"].values()) == pytest.approx(1.0) and dg["grid_size"] == 5
    g = dg["gate"]
    assert sum(g["mean_weight"].values()) == pytest.approx(1.0) and 0 <= g["mean_distance_from_average"] <= 1
    assert all(s >= 0 for s in g["std_weight"].values()) and 0 <= g["argmax_is_oracle_single"] <= 1
    # without a model: the static figures only
    assert "learned" not in FU.fusion_diagnostics(v, None, "R@10")


def test_oracle_predictability(tmp_path):
    bases = [colour_model(), shape_model()]
    names = ["colour", "shape"]
    tr, va = colour_shape_world(tmp_path)
    t, v = FU.SplitTable.build(bases, names, tr), FU.SplitTable.build(bases, names, va)
    op = FU.oracle_predictability(t, v, "R@10", steps=50)
    assert 0 <= op["accuracy"] <= 1 and 0 <= op["majority_accuracy"] <= 1 and op["majority_model"] in names
    assert op["oracle_choice"] >= op["predicted_choice"] and op["oracle_choice"] >= op["best_single"]
    assert op["singles"] == {n: pytest.approx(FU.evaluate_base(v, k)["R@10"]) for k, n in enumerate(names)}
    assert sum(op["predicted_share"].values()) == pytest.approx(1.0)
    assert FU.oracle_predictability(t, v, "R@10", steps=50) == op  # deterministic
    stats = FU.score_statistics(v, FU.baseline_model(v).hparams)
    assert stats.shape == (v.num_queries, 2, FU.NUM_STATS)
