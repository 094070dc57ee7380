"""`cirfusion eval-scores`: a saved score matrix -> metrics table / JSON, with clear errors for bad files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cirfusion import cli
from cirfusion.data import registry
from cirfusion.data.schema import CIRDataset, Gallery, Query
from cirfusion.metrics import evaluate_scores, fashioniq_summary

CALLS: list[dict] = []


def toy_dataset(root, split, category: str | None = None, text: str = "coarse"):
    """CIRR-like toy (val: targets + subsets; test: none); categories get their own gallery sizes."""
    CALLS.append({"root": str(root), "split": split, "category": category, "text": text})
    n_g = {None: 7, "dress": 6, "shirt": 9}[category]
    ids = [f"{category or 'img'}{j}" for j in range(n_g)]
    queries = []
    for i in range(5):
        ref, tgt = ids[i % n_g], ids[(i + 2) % n_g]
        targets = (tgt,) if split == "val" else ()
        queries.append(Query(f"p{i}", ref, f"text {i}", targets, subset=(ref, tgt, ids[(i + 3) % n_g])))
    return CIRDataset("toy-eval", split, queries, Gallery(ids, [f"{x}.png" for x in ids]), root=Path(root),
                      exclude_reference=category is None, category=category)


@pytest.fixture
def run_cli(monkeypatch):
    # The toy registered through the public decorator (unregistered after the test).
    registry.register_dataset("toy-eval")(toy_dataset)
    CALLS.clear()

    def run(*args):
        return cli.main(["eval-scores", *map(str, args)])

    yield run
    registry.DATASETS.unregister("toy-eval")


def scores_for(category=None, seed=0, split="val"):
    ds = toy_dataset(".", split, category)
    CALLS.clear()
    rng = np.random.default_rng(seed)
    return ds, rng.integers(0, 4, size=(len(ds.queries), len(ds.gallery))).astype(np.float32)


def test_table_output(run_cli, tmp_path, capsys):
    ds, s = scores_for()
    np.save(tmp_path / "s.npy", s)
    assert run_cli("--dataset", "toy-eval", "--root", tmp_path, "--split", "val", "--scores", tmp_path / "s.npy") == 0
    out = capsys.readouterr().out
    want = evaluate_scores(s, ds)
    assert "toy-eval/val" in out and "excluded from the ranking" in out
    for key in ("R@1", "R@50", "Rsubset@1", "Rmean", "mAP@10"):
        line = next(ln for ln in out.splitlines() if ln.split()[:1] == [key])
        assert float(line.split()[1]) == pytest.approx(want[key], abs=0.005)
    assert next(ln for ln in out.splitlines() if "num_queries_evaluated" in ln).split()[1] == "5"


def test_json_output_matches_library_and_reference_switch(run_cli, tmp_path, capsys):
    ds, s = scores_for(seed=1)
    np.save(tmp_path / "s.npy", s)
    base = ["--dataset", "toy-eval", "--root", tmp_path, "--split", "val", "--scores", tmp_path / "s.npy", "--json"]
    assert run_cli(*base) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["metrics"] == evaluate_scores(s, ds)
    assert res["dataset"] == "toy-eval/val" and res["exclude_reference"] is True
    assert CALLS[-1]["split"] == "val" and CALLS[-1]["root"] == str(tmp_path)
    assert run_cli(*base, "--no-exclude-reference") == 0
    kept = json.loads(capsys.readouterr().out)
    assert kept["exclude_reference"] is False
    assert kept["metrics"] == evaluate_scores(s, ds, exclude_reference=False)
    assert kept["metrics"] != res["metrics"]


def test_loader_options_are_passed_through(run_cli, tmp_path, capsys):
    _, s = scores_for()
    np.save(tmp_path / "s.npy", s)
    assert run_cli("--dataset", "toy-eval", "--root", tmp_path, "--split", "val", "--scores", tmp_path / "s.npy",
                   "--option", "text=fine", "--json") == 0
    assert CALLS[-1]["text"] == "fine"


def test_loader_options_are_checked_against_the_loader(run_cli, tmp_path, capsys):
    _, s = scores_for()
    np.save(tmp_path / "s.npy", s)
    base = ["--dataset", "toy-eval", "--root", tmp_path, "--split", "val", "--scores", tmp_path / "s.npy"]
    assert run_cli(*base, "--option", "text=3") == 2
    err = capsys.readouterr().err
    assert "option 'text' must be str, got 3" in err and "valid options: category (str | None), text (str)" in err
    assert run_cli(*base, "--option", "nope=1") == 2
    assert "unknown option 'nope'" in capsys.readouterr().err
    assert run_cli(*base, "--option", "category=\"dress\"", "--category", "dress") == 2
    assert "--category and --option category=... are both given" in capsys.readouterr().err
    assert CALLS == []  # refused before the loader ran
    assert run_cli("--dataset", "no-such", "--root", tmp_path, "--split", "val", "--scores", tmp_path / "s.npy") == 2
    assert "unknown dataset 'no-such'; known: " in capsys.readouterr().err


def test_several_categories_and_their_average(run_cli, tmp_path, capsys):
    ds_d, s_d = scores_for("dress", seed=2)
    ds_s, s_s = scores_for("shirt", seed=3)
    np.save(tmp_path / "d.npy", s_d)
    np.save(tmp_path / "s.npy", s_s)
    args = ["--dataset", "toy-eval", "--root", tmp_path, "--split", "val",
            "--category", "dress", "--scores", tmp_path / "d.npy", "--category", "shirt", "--scores", tmp_path / "s.npy"]
    assert run_cli(*args, "--json") == 0
    res = json.loads(capsys.readouterr().out)
    m_d, m_s = evaluate_scores(s_d, ds_d), evaluate_scores(s_s, ds_s)
    assert [r["metrics"] for r in res["results"]] == [m_d, m_s]
    assert [r["exclude_reference"] for r in res["results"]] == [False, False]  # the datasets' convention
    assert res["average"] == fashioniq_summary({"dress": m_d, "shirt": m_s})
    assert run_cli(*args) == 0
    out = capsys.readouterr().out
    assert "FashionIQ average over categories" in out and "average/R@10" in out
    assert run_cli(*args[:-2]) == 2
    assert "one --scores per --category" in capsys.readouterr().err


def test_shape_mismatch_names_file_and_both_shapes(run_cli, tmp_path, capsys):
    np.save(tmp_path / "wrong.npy", np.zeros((5, 6), dtype=np.float32))
    assert run_cli("--dataset", "toy-eval", "--root", tmp_path, "--split", "val",
                   "--scores", tmp_path / "wrong.npy") == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "wrong.npy") in err and "(5, 6)" in err and "(5, 7)" in err


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_scores_are_refused(run_cli, tmp_path, capsys, bad):
    _, s = scores_for()
    s[3, 2] = bad
    np.save(tmp_path / "bad.npy", s)
    assert run_cli("--dataset", "toy-eval", "--root", tmp_path, "--split", "val", "--scores", tmp_path / "bad.npy") == 2
    err = capsys.readouterr().err
    assert "bad.npy" in err and "row 3 (query 'p3'), column 2 (image 'img2')" in err and str(bad) in err


def test_unreadable_score_files(run_cli, tmp_path, capsys):
    args = ["--dataset", "toy-eval", "--root", tmp_path, "--split", "val", "--scores"]
    assert run_cli(*args, tmp_path / "missing.npy") == 2
    assert "missing.npy" in capsys.readouterr().err
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert run_cli(*args, tmp_path / "obj.npy") == 2
    assert "obj.npy" in capsys.readouterr().err
    (tmp_path / "junk.npy").write_bytes(b"not numpy at all")
    assert run_cli(*args, tmp_path / "junk.npy") == 2
    assert "junk.npy" in capsys.readouterr().err
    np.savez(tmp_path / "z.npz", a=np.zeros((5, 7)))
    assert run_cli(*args, tmp_path / "z.npz") == 2
    assert ".npz" in capsys.readouterr().err
    np.save(tmp_path / "flat.npy", np.zeros(35))
    assert run_cli(*args, tmp_path / "flat.npy") == 2
    assert "2-D" in capsys.readouterr().err
    np.save(tmp_path / "str.npy", np.full((5, 7), "x"))
    assert run_cli(*args, tmp_path / "str.npy") == 2
    assert "dtype" in capsys.readouterr().err


def test_split_without_targets_is_refused(run_cli, tmp_path, capsys):
    _, s = scores_for(split="test")
    np.save(tmp_path / "t.npy", s)
    assert run_cli("--dataset", "toy-eval", "--root", tmp_path, "--split", "test", "--scores", tmp_path / "t.npy") == 2
    assert "no targets" in capsys.readouterr().err


def test_real_cirr_val_oracle_scores(shared_data, tmp_path, capsys):
    """Row/column order of the real CIRR loader: a matrix that scores each target highest gives 100 everywhere.
    Needs the real annotations (conftest.shared_data)."""
    ds = registry.load_dataset("cirr", shared_data / "cirr", "val")
    assert (len(ds.queries), len(ds.gallery)) == (4181, 2297)
    s = np.zeros((4181, 2297), dtype=np.float32)
    for i, q in enumerate(ds.queries):
        s[i, ds.gallery.index(q.reference)] = 2.0  # excluded by the CIRR convention
        s[i, ds.gallery.index(q.targets[0])] = 1.0
    np.save(tmp_path / "oracle.npy", s)
    assert cli.main(["eval-scores", "--dataset", "cirr", "--root", str(shared_data / "cirr"), "--split", "val",
                     "--scores", str(tmp_path / "oracle.npy"), "--json"]) == 0
    m = json.loads(capsys.readouterr().out)["metrics"]
    assert m["R@1"] == m["Rsubset@1"] == m["Rmean"] == m["mAP@5"] == 100.0
    assert m["num_queries_evaluated"] == 4181 and m["num_queries_subset"] == 4181


def test_real_fashioniq_val_three_categories_oracle(shared_data, tmp_path, capsys):
    """The multi-category flow on the real FashionIQ annotations (the reference is kept in the ranking there).
    Needs the real annotations (conftest.shared_data)."""
    args = ["eval-scores", "--dataset", "fashioniq", "--root", str(shared_data / "fashioniq"), "--split", "val", "--json"]
    for cat in ("dress", "shirt", "toptee"):
        ds = registry.load_dataset("fashioniq", shared_data / "fashioniq", "val", category=cat)
        s = np.zeros((len(ds.queries), len(ds.gallery)), dtype=np.float32)
        for i, q in enumerate(ds.queries):
            s[i, ds.gallery.index(q.targets[0])] = 1.0
        np.save(tmp_path / f"{cat}.npy", s)
        args += ["--category", cat, "--scores", str(tmp_path / f"{cat}.npy")]
    assert cli.main(args) == 0
    res = json.loads(capsys.readouterr().out)
    assert [r["metrics"]["num_queries_evaluated"] for r in res["results"]] == [2017, 2038, 1961]
    assert all(r["exclude_reference"] is False for r in res["results"])
    assert res["average"]["average/R@10"] == res["average"]["average/R@50"] == res["average"]["average"] == 100.0
