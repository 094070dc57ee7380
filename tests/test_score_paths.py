"""score_dtype="auto": a fused model times the scoring paths once per machine and keeps the fastest that passes the
accuracy guard; an explicit dtype wins; the ranking is cached."""

from __future__ import annotations

import json

import pytest
import torch

from cirfusion.backbones.base import ImageFeatures
from cirfusion.fusion import kernels as K
from cirfusion.fusion import score_paths as SP
from cirfusion.methods import create_method
from cirfusion.methods.dafm import DAFM
from test_train import toy_dims


def _bases() -> list:
    torch.manual_seed(0)
    return [create_method("image-only", toy_dims()), create_method("clip4cir", toy_dims())]


def _images(n: int = 300) -> ImageFeatures:
    g = torch.Generator().manual_seed(1)
    d = toy_dims()
    return ImageFeatures(torch.randn(n, d.image_dim, generator=g), torch.randn(n, d.num_image_tokens, d.image_token_dim, generator=g))


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    path = tmp_path / "paths.json"
    monkeypatch.setenv("CIRFUSION_SCORE_PATHS", str(path))
    SP._memo.clear()
    yield path
    SP._memo.clear()


def test_every_path_scores_close_to_float32():
    g = torch.nn.functional.normalize(torch.randn(500, 32), dim=-1)
    q = torch.nn.functional.normalize(torch.randn(3, 32), dim=-1)
    exact = K.reference_dot_or_maxsim(q, g).float()
    tol = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 3e-2, "int8": 2e-2}
    for name in SP.PATHS:
        dt = K.SCORE_DTYPES[name]
        got = K.dot_or_maxsim(q, g.to(K.storage_dtype(dt)), dt)
        assert (got - exact).abs().max() < tol[name], name


FAKE = {"ms": {"float32": 4.0, "bfloat16": 1.0, "float16": 2.0, "int8": 3.0},
        "overlap": {"float32": 1.0, "bfloat16": 0.95, "float16": 0.995, "int8": 0.999}}


def test_probe_measures_every_path_and_float32_is_exact():
    fig = SP.probe_paths(rows=4096, dim=32)
    assert set(fig["ms"]) == set(fig["overlap"]) == set(SP.PATHS)
    assert fig["overlap"]["float32"] == 1.0 and all(v > 0 for v in fig["ms"].values())
    # the probe is hard on purpose: clustered, so bfloat16's ~1e-2 rounding reorders close neighbours
    assert fig["overlap"]["bfloat16"] < fig["overlap"]["float16"]


def test_figures_are_measured_once_and_cached(fresh_cache, monkeypatch):
    calls = []

    def fake_probe() -> dict:
        calls.append(1)
        return FAKE

    monkeypatch.setattr(SP, "probe_paths", fake_probe)
    assert SP.measured_paths() == FAKE
    saved = json.loads(fresh_cache.read_text())
    assert saved == {SP.machine_key(): FAKE}  # keyed by CPU model, capability and torch version
    SP._memo.clear()  # a new process: read from the file, not measured again
    assert SP.measured_paths() == FAKE and len(calls) == 1
    assert SP.measured_paths(refresh=True) == FAKE and len(calls) == 2
    fresh_cache.write_text("{not json")  # a damaged cache file is measured again, not an error
    SP._memo.clear()
    assert SP.measured_paths() == FAKE and len(calls) == 3


def test_auto_picks_the_fastest_path_that_passes_the_accuracy_guard(fresh_cache, monkeypatch):
    monkeypatch.setattr(SP, "probe_paths", lambda: FAKE)
    choice = SP.choose_score_dtype()
    # bfloat16 is fastest but fails the guard (0.95 < 0.99); float16 is the fastest that passes
    assert choice.how == "auto" and choice.dtype == "float16"
    assert choice.overlap[choice.dtype] >= SP.MIN_TOP10_OVERLAP
    failing = {"ms": FAKE["ms"], "overlap": dict.fromkeys(SP.PATHS, 0.5)}
    monkeypatch.setattr(SP, "probe_paths", lambda: failing)
    SP._memo.clear()
    assert SP.choose_score_dtype(refresh=True).dtype == "float32"  # the reference always passes


def test_dafm_auto_resolves_once_and_explicit_wins(fresh_cache, monkeypatch):
    monkeypatch.setattr(SP, "probe_paths", lambda: FAKE)
    img = _images()
    auto = DAFM.from_bases(_bases())
    assert auto.hparams["score_dtype"] == "auto"
    path = auto.score_path()
    assert path.how == "auto" and path.dtype == "float16" and auto.score_dtype == torch.float16
    g = auto.encode_gallery(img)
    assert g["g"][0].dtype == torch.float16  # fitting, tables and encoded galleries all use the one resolved path
    explicit = DAFM.from_bases(_bases(), score_dtype="int8")
    ge = explicit.encode_gallery(img)
    assert explicit.score_path().to_dict()["how"] == "explicit" and explicit.score_dtype == torch.int8
    assert ge["g"][0].dtype == torch.float16  # int8 scoring reads the cached int8 copy of a float16 gallery
    exact = DAFM.from_bases(_bases(), score_dtype="bfloat16")
    assert exact.encode_gallery(img)["g"][0].dtype == torch.bfloat16 and exact.score_path().dtype == "bfloat16"


def test_info_command_reports_the_choice(fresh_cache, monkeypatch, capsys):
    from cirfusion.cli import main

    monkeypatch.setattr(SP, "probe_paths", lambda: FAKE)
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["fused_scoring"]["auto_choice"] == "float16" and info["torch"] == torch.__version__
    assert set(info["fused_scoring"]["probe_ms"]) == set(SP.PATHS)
    assert main(["info"]) == 0
    assert "score_dtype=auto here: float16" in capsys.readouterr().out


def test_the_choice_does_not_depend_on_the_thread_count(fresh_cache, monkeypatch):
    # a model is fitted on one thread (cirfusion.threads) and queried on every core: one path for both
    from cirfusion.threads import torch_threads

    monkeypatch.setattr(SP, "probe_paths", lambda: FAKE)
    with torch_threads(1):
        one = (SP.machine_key(), SP.choose_score_dtype().dtype)
    with torch_threads(2):
        two = (SP.machine_key(), SP.choose_score_dtype().dtype)
    assert one == two
