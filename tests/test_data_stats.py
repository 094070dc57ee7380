"""`cirfusion data stats`: counts on every real annotation file, --ids order files, loader options, errors."""

from __future__ import annotations

import json

import pytest

from cirfusion import cli
from cirfusion.options import OptionError, parse_pairs
from test_loaders import make_circo, make_cirr, make_custom, make_finecir_fiq


def run(argv: list[str]) -> int:
    """`cirfusion data stats ...` through the real entry point (errors become exit 2 + one stderr line there)."""
    return cli.main(["data", "stats", *argv])


def stats_json(capsys, argv: list[str]) -> dict:
    assert run([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


REAL = [  # (dataset, folder, split, extra argv, queries, gallery) on ../shared/data
    ("cirr", "cirr", "val", [], 4181, 2297),
    ("cirr", "cirr", "test1", [], 4148, 2315),
    ("fashioniq", "fashioniq", "train", ["--category", "dress"], 5985, 11452),
    ("fashioniq", "fashioniq", "val", ["--category", "dress"], 2017, 3817),
    ("fashioniq", "fashioniq", "test", ["--category", "dress"], 2024, 3818),
    ("fashioniq", "fashioniq", "train", ["--category", "shirt"], 5988, 19036),
    ("fashioniq", "fashioniq", "val", ["--category", "shirt"], 2038, 6346),
    ("fashioniq", "fashioniq", "test", ["--category", "shirt"], 2038, 6346),
    ("fashioniq", "fashioniq", "train", ["--category", "toptee"], 6027, 16121),
    ("fashioniq", "fashioniq", "val", ["--category", "toptee"], 1961, 5373),
    ("fashioniq", "fashioniq", "test", ["--category", "toptee"], 2056, 5374),
    ("shoes", "shoes", "train", [], 8990, 10000),
    ("shoes", "shoes", "eval", [], 1761, 4658),
]


@pytest.mark.parametrize("dataset,folder,split,extra,nq,ng", REAL, ids=[f"{r[0]}-{r[2]}" + (f"-{r[3][1]}" if r[3] else "") for r in REAL])
def test_stats_on_every_real_file(shared_data, capsys, dataset, folder, split, extra, nq, ng):
    s = stats_json(capsys, [dataset, "--root", str(shared_data / folder), "--split", split, *extra])
    assert (s["queries"], s["gallery"]) == (nq, ng)
    assert s["dataset"] == dataset and s["split"] == split
    has_targets = not split.startswith("test")
    assert s["queries_with_targets"] == (nq if has_targets else 0)
    if has_targets:
        assert s["targets_per_query"] == {"min": 1, "mean": 1.0, "max": 1}
    if dataset == "cirr":
        assert s["subset_sizes"] == {"6": nq} and s["exclude_reference"] is True
        assert s["gallery_images_used"] == ng  # every CIRR split image is used by some query
        assert s["captions_per_query"]["max"] == 5 and s["meta"]["captions_ext"] is True
    if dataset == "fashioniq":
        assert s["captions_per_query"] == {"min": 2, "mean": 2.0, "max": 2} and s["exclude_reference"] is False
        assert s["text_policy"] == ("fashioniq" if split == "train" else "fixed")


def test_stats_real_extras(shared_data, capsys):
    s = stats_json(capsys, ["cirr", "--root", str(shared_data / "cirr"), "--split", "test1"])
    assert s["empty_texts"] == 1 and s["targets_per_query"] is None
    s = stats_json(capsys, ["shoes", "--root", str(shared_data / "shoes"), "--split", "train"])
    assert s["reference_in_targets"] == 26 and s["meta"]["straddling_pairs"] == []
    s = stats_json(capsys, ["fashioniq", "--root", str(shared_data / "fashioniq"), "--split", "val", "--category", "dress"])
    assert s["gallery_images_used"] == 2628 and s["key"] == "fashioniq/dress/val"


def test_ids_file_follows_file_order(shared_data, tmp_path, capsys):
    out = tmp_path / "sub" / "ids.json"
    root = shared_data / "cirr"
    s = stats_json(capsys, ["cirr", "--root", str(root), "--split", "val", "--ids", str(out)])
    ids = json.loads(out.read_text())
    assert set(ids) == {"queries", "gallery"} and s["ids_written"] == str(out)
    assert ids["gallery"] == list(json.loads((root / "image_splits" / "split.rc2.val.json").read_text()))
    assert ids["queries"] == [str(c["pairid"]) for c in json.loads((root / "captions" / "cap.rc2.val.json").read_text())]
    assert [p.name for p in out.parent.iterdir()] == ["ids.json"]  # no temp file left behind
    fiq = tmp_path / "fiq.json"
    assert run(["fashioniq", "--root", str(shared_data / "fashioniq"), "--split", "val", "--category", "shirt",
                "--ids", str(fiq)]) == 0
    f = json.loads(fiq.read_text())
    assert f["gallery"] == json.loads((shared_data / "fashioniq/image_splits/split.shirt.val.json").read_text())
    assert f["queries"][:2] == ["shirt-val-0", "shirt-val-1"] and len(f["queries"]) == 2038


def test_synthetic_files_and_options(tmp_path, capsys):
    make_cirr(tmp_path / "cirr", "train")
    s = stats_json(capsys, ["cirr", "--root", str(tmp_path / "cirr"), "--split", "train"])
    assert (s["queries"], s["gallery"], s["captions_per_query"]["max"]) == (6, 12, 3)
    s = stats_json(capsys, ["cirr", "--root", str(tmp_path / "cirr"), "--split", "train",
                            "--option", "captions_ext=false", "-o", "image_dir=img_raw"])
    assert s["captions_per_query"] == {"min": 1, "mean": 1.0, "max": 1} and s["meta"]["captions_ext"] is False
    make_circo(tmp_path / "circo")
    s = stats_json(capsys, ["circo", "--root", str(tmp_path / "circo"), "--split", "val",
                            "--option", "text_template={relative_caption}"])
    assert s["targets"] == 6 and s["targets_per_query"] == {"min": 1, "mean": 2.0, "max": 3}
    assert s["meta"]["text_template"] == "{relative_caption}"
    make_finecir_fiq(tmp_path / "fine")
    s = stats_json(capsys, ["finecir", "--root", str(tmp_path / "fine"), "--split", "train", "--which", "fiq",
                            "--category", "shirt"])
    assert s["queries_with_finemt"] == 6 and s["finemt_items_per_query"]["mean"] == 2.0
    make_custom(tmp_path / "custom")
    s = stats_json(capsys, ["custom", "--root", str(tmp_path / "custom"), "--split", "train"])
    assert s["queries_with_scene_graph"] == 1 and s["queries_with_subset"] == 1 and s["targets"] == 4


def test_human_output(tmp_path, capsys):
    make_cirr(tmp_path, "val")
    assert run(["cirr", "--root", str(tmp_path), "--split", "val"]) == 0
    out = capsys.readouterr().out
    assert "queries: 6\n" in out and "gallery: 12\n" in out and 'subset_sizes: {"6": 6}' in out


def test_errors_exit_2_with_message(tmp_path, capsys):
    make_cirr(tmp_path, "val")
    p = tmp_path / "captions" / "cap.rc2.val.json"
    data = json.loads(p.read_text())
    data[1]["reference"] = "nope"
    p.write_text(json.dumps(data))
    assert run(["cirr", "--root", str(tmp_path), "--split", "val"]) == 2
    err = capsys.readouterr().err
    assert "cap.rc2.val.json [entry #1 (pairid 101)]: reference 'nope' is not in the gallery" in err
    assert run(["fashioniq", "--root", str(tmp_path), "--split", "val"]) == 2
    assert "category" in capsys.readouterr().err
    assert run(["cirr", "--root", str(tmp_path), "--split", "val", "--category", "dress"]) == 2
    assert "does not take these options ['category']" in capsys.readouterr().err
    assert run(["nosuchdataset", "--root", str(tmp_path), "--split", "val"]) == 2
    assert "unknown dataset 'nosuchdataset'" in capsys.readouterr().err
    assert run(["cirr", "--root", str(tmp_path), "--split", "val", "--option", "oops"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert run(["cirr", "--root", str(tmp_path / "missing"), "--split", "val"]) == 2
    assert "split.rc2.val.json: CIRR image split file not found" in capsys.readouterr().err


def test_option_values_are_json_and_checked_against_the_loader(tmp_path, capsys):
    make_custom(tmp_path / "custom")
    base = ["custom", "--root", str(tmp_path / "custom"), "--split", "train"]
    assert stats_json(capsys, base)["exclude_reference"] is True
    # "false" is JSON false: it used to reach the loader as the (true) string "false".
    assert stats_json(capsys, [*base, "--option", "exclude_reference=false"])["exclude_reference"] is False
    for bad in ("exclude_reference=0", "exclude_reference=flase", "exclude_reference"):
        assert run([*base, "--option", bad]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("cirfusion: error: ")
        if "=" in bad:
            assert "'exclude_reference' must be bool" in err and "image_dir" in err and "text_policy" in err
    assert run([*base, "--option", "exclude_refrence=false"]) == 2
    assert "unknown option 'exclude_refrence'; valid options: exclude_reference (bool)" in capsys.readouterr().err


def test_parse_pairs():
    assert parse_pairs(["a=1", "b=true", "c=text", "d=[\"x\"]", "e=", "f=null"]) == {
        "a": 1, "b": True, "c": "text", "d": ["x"], "e": "", "f": None}
    for bad in (["=1"], ["no-equals"], ["a-b=1"], ["a=1", "a=2"]):
        with pytest.raises(OptionError):
            parse_pairs(bad)


def test_through_the_cli(shared_data, capsys):
    assert cli.main(["data", "stats", "cirr", "--root", str(shared_data / "cirr"), "--split", "val", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert (s["queries"], s["gallery"]) == (4181, 2297)
