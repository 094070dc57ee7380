"""report.html / results.json writing."""

from __future__ import annotations

import json

from PIL import Image

from cirfusion.io import atomic_directory, atomic_write_json
from cirfusion.report import ResultItem, SampleQuery, write_report, write_results_json


def test_report_renders_table_samples_and_escapes(tmp_path):
    Image.new("RGB", (40, 30), (255, 0, 0)).save(tmp_path / "ref.png")
    Image.new("RGB", (40, 30), (0, 0, 255)).save(tmp_path / "tgt.png")
    results = {"synthetic": {"image-only": {"R@1": 1.5, "num_queries_evaluated": 10}, "clip4cir": {"R@1": 42.25}}}
    samples = [
        SampleQuery("synthetic", "clip4cir", "q7", "make it <blue>", "ref", tmp_path / "ref.png",
                    [ResultItem("tgt", tmp_path / "tgt.png", 0.91, True), ResultItem("ref", tmp_path / "ref.png", 0.5, False)])
    ]
    path = write_report(tmp_path / "out", results, samples, wall_time=12.3)
    html = path.read_text()
    assert "42.25" in html and "1.50" in html and "num_queries_evaluated" not in html
    assert "&lt;blue&gt;" in html and "<blue>" not in html
    assert "✓ target" in html and 'class="best"' in html
    thumbs = list((tmp_path / "out" / "thumbs").glob("*.jpg"))
    assert len(thumbs) == 2  # reference reused, not duplicated
    assert "Shapley" not in html and "base-model weights" not in html  # a plain model has no explanation


def test_report_shows_gate_weights_and_shapley_contributions(tmp_path):
    Image.new("RGB", (40, 30), (255, 0, 0)).save(tmp_path / "ref.png")
    s = SampleQuery("synthetic", "dafm", "q1", "make it red", "ref", tmp_path / "ref.png",
                    [ResultItem("ref", tmp_path / "ref.png", 0.5, True)], weights={"a": 0.75, "b": 0.25},
                    contributions={"a": 1.25, "b": -0.5})
    html = write_report(tmp_path / "out", {"synthetic": {"dafm": {"R@1": 1.0}}}, [s]).read_text()
    assert "base-model weights for this query: a 0.75 · b 0.25" in html
    assert "exact Shapley contribution to the target's fused score: a +1.250 · b -0.500" in html


def test_results_json_roundtrip_and_atomic_dir(tmp_path):
    res = {"catalog": {"clip4cir": {"mAP@10": 12.0}}}
    write_results_json(tmp_path / "results.json", res)
    assert json.loads((tmp_path / "results.json").read_text()) == res

    target = tmp_path / "ckpt"
    with atomic_directory(target) as d:
        atomic_write_json(d / "config.json", {"a": 1})
    assert json.loads((target / "config.json").read_text()) == {"a": 1}
    try:
        with atomic_directory(target) as d:
            (d / "partial").write_text("x")
            raise RuntimeError("crash")
    except RuntimeError:
        pass
    assert sorted(p.name for p in target.iterdir()) == ["config.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt")]


def test_report_shows_detailfusion_alpha_and_finecir_graph(tmp_path):
    """DetailFusion's per-query branch weights and FineCIR's parsed graph, next to the query's results."""
    Image.new("RGB", (40, 30), (255, 0, 0)).save(tmp_path / "ref.png")
    res = [ResultItem("ref", tmp_path / "ref.png", 0.5, True)]
    graph = {"text": "t", "entities": [{"name": "floor lamp", "attributes": ["red", "tall"], "implicit": False},
                                       {"name": "garment", "attributes": [], "implicit": True},
                                       {"name": "cube", "attributes": [], "implicit": False,
                                        "places": ["in top left corner", "to centre"]}],
             "relations": [{"subject": "lamp", "predicate": "left of", "object": "<table>"}],
             "edits": [{"op": "replace", "entity": "carpet", "attributes": ["gray"], "from": "red carpet"},
                       {"op": "remove", "entity": "cat", "attributes": []}]}
    samples = [SampleQuery("synthetic", "detailfusion", "q1", "t", "ref", tmp_path / "ref.png", res,
                           branch_weights={"gm": 0.625, "di": 0.375}),
               SampleQuery("synthetic", "finecir", "q1", "t", "ref", tmp_path / "ref.png", res, graph=graph),
               SampleQuery("synthetic", "finecir", "q2", "u", "ref", tmp_path / "ref.png", res,
                           graph={"entities": [], "relations": [], "edits": []})]
    html = write_report(tmp_path / "out", {"synthetic": {"finecir": {"R@1": 1.0}}}, samples).read_text()
    assert "DetailFusion branch weights α for this query: global (GM) 0.625 · detail (DI) 0.375" in html
    assert html.count("parsed scene graph") == 2
    for line in ("<li>floor lamp: red, tall</li>", "<li>garment (implicit)</li>", "<li>cube @ in top left corner; to centre</li>",
                 "<li>lamp -left of-&gt; &lt;table&gt;</li>",
                 "<li>replace carpet [gray] (from red carpet)</li>", "<li>remove cat</li>", "entities: none"):
        assert line in html, line
    # the graph sits in the results row, after the last result
    row = html.split('<div class="row">')[2]
    assert row.index("result 1") < row.index("parsed scene graph")
