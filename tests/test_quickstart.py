"""End-to-end: `cirfusion quickstart` on both embedded benchmarks at tiny size (tiny backbone, few images, 1 epoch),
DetailFusion and FineCIR included (one epoch per stage / one epoch)."""

from __future__ import annotations

import json

import pytest
import torch

import cirfusion
from cirfusion.cli import main
from test_catalog import make_folder

METHODS = "clip4cir,tg-cir"
EXTRAS_FAST = ["--detailfusion-stage-epochs", "di-pretrain=1", "--detailfusion-stage-epochs", "joint=1",
               "--detailfusion-stage-epochs", "compositor=1", "--finecir-epochs", "1"]
NO_EXTRAS = ["--no-detailfusion", "--no-finecir"]
# the rows DetailFusion and FineCIR add: on the synthetic benchmark they read the fine text and say so
EXTRA_ROWS = {"synthetic": {"detailfusion (fine text)", "finecir (fine text)"}, "catalog": {"detailfusion", "finecir"}}


@pytest.fixture(autouse=True)
def threads_restored():
    """`--threads 1` must not leak: run_quickstart restores the caller's torch thread count (checked from 2 threads,
    so that a count left at 1 fails)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        yield
        assert torch.get_num_threads() == 2, "the quickstart left torch's thread count changed"
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("quickstart")
    photos = base / "photos"
    make_folder(photos)
    out = base / "out"
    argv = ["quickstart", "--out", str(out), "--photos", str(photos), "--backbone", "tiny", "--n-images", "240",
            "--epochs", "1", "--catalog-epochs", "1", "--fusion-epochs", "1", "--fusion-min-steps", "20", "--methods", METHODS, "--no-progress", "--threads", "1", *EXTRAS_FAST]
    assert main(argv) == 0
    return {"out": out, "argv": argv, "photos": photos}


def test_writes_results_report_and_manifest(quickstart_run):
    out = quickstart_run["out"]
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"synthetic", "catalog"}
    for bench, methods in results.items():
        assert set(methods) == {"image-only", "clip4cir", "tg-cir", "mean-normalised", "dafm", "dafm (fixed tau)",
                                *EXTRA_ROWS[bench]}
        for name, metrics in methods.items():
            assert 0.0 <= metrics["R@10"] <= 100.0, (bench, name)
            assert metrics["R@1"] <= metrics["R@5"] <= metrics["R@10"] <= metrics["R@50"]
    assert "Rmean" in results["synthetic"]["clip4cir"]  # subsets
    assert "mAP@10" in results["catalog"]["clip4cir"]  # several positives
    assert "Rsubset@1" in results["synthetic"]["detailfusion (fine text)"] and "mAP@10" in results["catalog"]["finecir"]

    html = (out / "report.html").read_text()
    for bench in ("synthetic", "catalog"):
        assert f"<h2>{bench}</h2>" in html
    assert "reference" in html and "base-model weights for this query" in html
    assert "exact Shapley contribution to the target's fused score" in html
    # DetailFusion's per-query alpha and FineCIR's parsed graph next to their results, for every sample query
    samples = 3 * 2  # 3 sample queries on each benchmark
    assert html.count("DetailFusion branch weights α for this query: global (GM) ") == samples
    assert html.count('<div class="graph"><h4>parsed scene graph</h4>') == samples
    assert "per-query weight of its global branch, alpha_GM, on test" in html
    assert "finecir (fine text) on tiny" in html and "not part of the DAFM pool" in html
    thumbs = list((out / "thumbs").glob("*.jpg"))
    assert thumbs, "sample queries need thumbnails"
    for src in [line.split('src="')[1].split('"')[0] for line in html.splitlines() if 'src="' in line]:
        assert (out / src).is_file(), src

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["backbone"]["id"] == "tiny" and len(manifest["backbone"]["weights_hash"]) >= 16
    assert manifest["config"]["seed"] == 0
    record = manifest["datasets"]["synthetic"]["test"]
    hashes = [h for h in record["files"].values()]  # data file hashes are recorded
    assert hashes and all(len(h) == 64 for h in hashes)
    assert manifest["fusion"]["synthetic"]["num_parameters"] < 100_000
    # the fusion ran through the one orchestration (cirfusion fuse's), with its defaults: fitted on val/fuse, test
    # reported; the base models chose their epochs on val/select (docs/protocol.md), and selection.json says so
    fused = json.loads((out / "runs" / "synthetic" / "dafm" / "metrics.json").read_text())
    assert fused["splits_used"] == {"fit": "val/fuse", "val": None, "test": "test"}
    assert fused["dataset"] == "synthetic/val:fuse" and not any("chose its epoch" in n for n in fused["notes"])
    choices = {c["name"]: c for c in json.loads((out / "selection.json").read_text())["choices"]}
    assert choices["synthetic: epoch of clip4cir (on tiny)"]["split"] == "val/select"
    assert choices["synthetic: fused: epoch"]["split"] == "val/fuse (held-out 20%)"
    assert fused["config"]["holdout"] == 0.2 and fused["config"]["min_steps"] == 20
    assert fused["splits"]["test"]["fused"] == results["synthetic"]["dafm"]
    assert fused["splits"]["test"]["fused_fixed_tau"] == results["synthetic"]["dafm (fixed tau)"]

    # DetailFusion and FineCIR: their epochs chosen on val/select, wall and CPU seconds in the manifest, not fused
    for bench in ("synthetic", "catalog"):
        for m in ("detailfusion", "finecir"):
            assert choices[f"{bench}: epoch of {m} (on tiny)"]["split"] == "val/select"
            t = manifest["timings"][bench]
            assert t[f"{m}_s"] > 0 and t[f"{m}_cpu_s"] > 0
            assert manifest["checkpoints"][bench][m].endswith("best")
    assert manifest["timings"]["synthetic"]["extra_features_s"] > 0  # the fine texts' features
    df = manifest["extra_methods"]["synthetic"]["detailfusion"]
    assert df["text"] == "fine" and df["stage_epochs"] == {"di-pretrain": 1, "joint": 1, "compositor": 1}
    assert df["test_outputs"]["fused"] == results["synthetic"]["detailfusion (fine text)"]
    assert {"gm", "di", "static"} <= set(df["test_outputs"]) and 0 < df["alpha_test"]["alpha_gm_mean"] < 1
    assert manifest["extra_methods"]["catalog"]["finecir"]["text"] == "fine"  # the setting; the catalog has one text
    assert manifest["extra_methods"]["catalog"]["finecir"]["row"] == "finecir"
    assert len(cirfusion.load(manifest["checkpoints"]["synthetic"]["dafm"]).method.base_names) == 2  # the pool only


def test_checkpoints_load_and_eval_reproduces_the_table(quickstart_run, capsys):
    out = quickstart_run["out"]
    manifest = json.loads((out / "manifest.json").read_text())
    results = json.loads((out / "results.json").read_text())
    for name, row, opts in (("clip4cir", "clip4cir", []), ("dafm", "dafm", []),
                            ("detailfusion", "detailfusion (fine text)", ["--option", "text=fine"])):
        ckpt = manifest["checkpoints"]["synthetic"][name]
        assert cirfusion.load(ckpt).config["method"] == name
        capsys.readouterr()
        assert main(["eval", ckpt, "--dataset", "synthetic", "--root", str(out / "data" / "synthetic"), "--split", "test",
                     "--cache-dir", str(out / "cache"), "--no-progress", "--json", *opts]) == 0
        got = json.loads(capsys.readouterr().out)["results"][0]["metrics"]
        for m in ("R@1", "R@10", "Rmean"):
            assert got[m] == pytest.approx(results["synthetic"][row][m], abs=1e-6), (name, m)


def test_rerun_reuses_the_benchmarks_and_gives_the_same_numbers(quickstart_run, capsys):
    out = quickstart_run["out"]
    before = json.loads((out / "results.json").read_text())
    stamp = (out / "data" / "synthetic").stat().st_mtime_ns
    torch.manual_seed(12345)  # global RNG state must not matter: the run seeds itself
    argv = [a for a in quickstart_run["argv"]]
    argv[argv.index("--photos") : argv.index("--photos") + 2] = []  # synthetic only this time
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "reusing" in printed
    assert f"cirfusion serve {out / 'runs' / 'synthetic' / 'dafm'}" in printed  # the command serving the fused model
    assert (out / "data" / "synthetic").stat().st_mtime_ns == stamp
    after = json.loads((out / "results.json").read_text())
    assert set(after) == {"synthetic"}
    assert after["synthetic"] == before["synthetic"]


def test_bad_arguments_are_clear_errors(tmp_path, capsys):
    assert main(["quickstart", "--out", str(tmp_path / "o"), "--methods", "clip4cir,nope", "--backbone", "tiny"]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["quickstart", "--out", str(tmp_path / "o"), "--photos", str(tmp_path / "missing"), "--backbone", "tiny",
                 "--n-images", "120"]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["quickstart", "--out", str(tmp_path / "o"), "--backbone", "tiny", "--detailfusion-stage-epochs", "joint"]) == 2
    assert "STAGE=N" in capsys.readouterr().err


def test_aligned_backbone_adds_the_sum_baseline_and_one_method_skips_fusion(tmp_path):
    out = tmp_path / "o"
    assert main(["quickstart", "--out", str(out), "--backbone", "tiny:aligned=true", "--n-images", "120", "--epochs", "1",
                 "--methods", "clip4cir", "--no-progress", "--threads", "1", *NO_EXTRAS]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["synthetic"]) == {"image-only", "sum", "clip4cir"}  # --no-detailfusion --no-finecir: no rows
    man = json.loads((out / "manifest.json").read_text())
    assert man["extra_methods"] == {"synthetic": {}} and "detailfusion_s" not in man["timings"]["synthetic"]


def test_pool_on_two_backbones(tmp_path, capsys):
    """--pool-backbone: a base method on another backbone; the fusion reads both side by side and loads back."""
    out = tmp_path / "o"
    assert main(["quickstart", "--out", str(out), "--backbone", "tiny", "--pool-backbone", "tg-cir=tiny:seed=1",
                 "--n-images", "120", "--epochs", "1", "--fusion-min-steps", "10", "--methods", METHODS, "--no-progress",
                 "--threads", "1", *NO_EXTRAS]) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["pool_backbones"]["tg-cir"]["id"] == "tiny:seed=1" and man["pool_backbones"]["clip4cir"]["id"] == "tiny"
    fused = cirfusion.load(man["checkpoints"]["synthetic"]["dafm"])
    assert fused.backbone.backbone_id == "multi:tiny|tiny:seed=1"
    assert cirfusion.load(man["checkpoints"]["synthetic"]["tg-cir"]).backbone.backbone_id == "tiny:seed=1"
    results = json.loads((out / "results.json").read_text())
    assert {"dafm", "mean-normalised"} <= set(results["synthetic"])
    capsys.readouterr()
    assert main(["quickstart", "--out", str(out), "--backbone", "tiny", "--pool-backbone", "sprc=tiny:seed=1",
                 "--methods", METHODS]) == 2
    assert "not in --methods" in capsys.readouterr().err


def test_the_default_pool_applies_to_every_embedded_variant():
    from cirfusion.quickstart import DEFAULT_POOL_BACKBONES, QuickstartConfig

    for name in ("embedded", "embedded:precision=fp32", "embedded:resolution=192"):
        cfg = QuickstartConfig(backbone=name)
        assert {m: cfg.backbone_for(m) for m in DEFAULT_POOL_BACKBONES} == DEFAULT_POOL_BACKBONES
        assert cfg.backbone_for("blip4cir-bi") == name
    assert QuickstartConfig(backbone="tiny").backbone_for("clip4cir") == "tiny"
    assert QuickstartConfig(backbone="embedded", pool_backbones={}).backbone_for("clip4cir") == "embedded"
