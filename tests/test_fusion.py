"""DAFM fusion (cirfusion.fusion, methods/dafm.py, `cirfusion fuse`): exact permutation equivariance, parameter budget,
dynamic temperature, tiled = full scoring, memory bounded by the tile, explanations, save -> load, refusal of
incompatible bases, complementary models fused, and the CLI end to end on a tiny dataset with the tiny backbone."""

from __future__ import annotations

import argparse
import ast
import json
import math
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cirfusion
from cirfusion import api
from cirfusion import fusion as FU
from cirfusion.backbones import create_backbone
from cirfusion.backbones.base import ImageFeatures, TextFeatures
from cirfusion.checkpoint import CheckpointError, load_checkpoint, read_config, save_checkpoint
from cirfusion.cli import main
from cirfusion.commands import fuse as fuse_cmd
from cirfusion.data.registry import load_dataset
from cirfusion.data.schema import CIRDataset, Gallery, Query
from cirfusion.embeddings import take_embeddings
from cirfusion.evaluation import evaluate
from cirfusion.features import FeatureCache
from cirfusion.fusion import kernels as K
from cirfusion.methods import CIRMethod, MethodDims, cosine_or_maxsim, create_method
from cirfusion.methods.base import hparam
from cirfusion.methods.dafm import DAFM
from cirfusion.quickstart import QuickstartConfig
from cirfusion.seeding import seed_everything
from cirfusion.views import SplitData, load_split_data
from test_train import ToyImages, ToyTexts, make_custom_dataset, make_toy, toy_dims

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------------------------
# Test-only base models (not registered): each reads a fixed slice of the global features.
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class ProbeParams:
    t: list[int] = hparam(help="text slice", factory=lambda: [0, 0])
    r: list[int] = hparam(help="reference slice", factory=lambda: [0, 0])
    g: list[int] = hparam(help="gallery slice", factory=lambda: [0, 0])
    multi: int = hparam(1, "gallery vectors per image")
    noise: float = hparam(0.0, "noise of the extra gallery vectors")


class Probe(CIRMethod):
    """query = normalised [text[t0:t1], ref[r0:r1]], gallery = normalised [img[g0:g1], img[r0:r1]]; ``multi`` > 1 makes
    the gallery multi-vector (max-sim), the extra vectors being noisy copies."""

    Params = ProbeParams
    params: ProbeParams

    def _img(self, f: torch.Tensor, a: list[int], b: list[int]) -> torch.Tensor:
        return torch.cat([f[:, a[0]:a[1]], f[:, b[0]:b[1]]], 1).float()

    def encode_query(self, ref: ImageFeatures, text: TextFeatures) -> torch.Tensor:
        h = self.params
        return F.normalize(torch.cat([text.global_[:, h.t[0]:h.t[1]], ref.global_[:, h.r[0]:h.r[1]]], 1).float(), dim=-1)

    def encode_gallery(self, img: ImageFeatures) -> torch.Tensor:
        h = self.params
        g = self._img(img.global_, h.g, h.r)
        if h.multi > 1:
            gen = torch.Generator().manual_seed(int(g.abs().sum() * 1000) % (2**31))
            extra = g[:, None, :] + h.noise * torch.randn(g.shape[0], h.multi - 1, g.shape[1], generator=gen)
            g = torch.cat([g[:, None, :], extra], 1)
        return F.normalize(g, dim=-1)


PDIMS = MethodDims(image_dim=16, image_token_dim=4, num_image_tokens=1, text_dim=16, text_token_dim=4, max_text_tokens=1,
                   backbone_id="probe", weights_hash="probehash", preprocess_id="none")
C, S, V = 6, 6, 4  # colours, shapes, variants


def colour_shape_world(tmp: Path, n_train: int = 400, n_val: int = 120, seed: int = 0) -> tuple[SplitData, SplitData]:
    """Images = every (colour, shape, variant); a query keeps the reference's variant and asks for a colour and a
    shape. Global image feature = [colour one-hot | shape one-hot | variant one-hot] + noise, text = [colour | shape]."""
    rng = np.random.default_rng(1234)
    combos = [(c, s, v) for c in range(C) for s in range(S) for v in range(V)]
    ids = [f"c{c}s{s}v{v}" for c, s, v in combos]
    glob = np.zeros((len(combos), 16), np.float32)
    for i, (c, s, v) in enumerate(combos):
        glob[i, c], glob[i, 6 + s], glob[i, 12 + v] = 1, 1, 1
    glob += 0.15 * rng.normal(size=glob.shape).astype(np.float32)
    images = ToyImages(ids, glob.astype(np.float16), np.zeros((len(ids), 1, 4), np.float16))
    texts = [f"colour {c} shape {s}" for c in range(C) for s in range(S)]
    tg = np.zeros((len(texts), 16), np.float32)
    for i in range(len(texts)):
        tg[i, i // S], tg[i, 6 + i % S] = 1, 1
    text_table = ToyTexts(texts, tg.astype(np.float16), np.zeros((len(texts), 1, 4), np.float16), np.ones((len(texts), 1), bool))
    gallery = Gallery(ids, [tmp / f"{i}.png" for i in ids])
    qrng = np.random.default_rng(seed)

    def build(split: str, n: int) -> CIRDataset:
        qs = []
        for j in range(n):
            r = int(qrng.integers(len(combos)))
            c, s = int(qrng.integers(C)), int(qrng.integers(S))
            t = ids.index(f"c{c}s{s}v{combos[r][2]}")
            if t == r:
                continue
            qs.append(Query(f"{split}{j}", ids[r], f"colour {c} shape {s}", (ids[t],)))
        return CIRDataset("colourshape", split, qs, gallery)

    return SplitData(build("train", n_train), images, text_table), SplitData(build("val", n_val), images, text_table)


def colour_model() -> Probe:
    return Probe(PDIMS, t=[0, 6], r=[12, 16], g=[0, 6])


def shape_model(multi: int = 1) -> Probe:
    return Probe(PDIMS, t=[6, 12], r=[12, 16], g=[6, 12], multi=multi, noise=0.3)


def randomise(net: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial weights everywhere (the zero-initialised layers would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g))


def tables(tmp: Path, bases: Sequence[CIRMethod], names: list[str]) -> tuple[FU.SplitTable, FU.SplitTable]:
    tr, va = colour_shape_world(tmp)
    return FU.SplitTable.build(bases, names, tr), FU.SplitTable.build(bases, names, va)


# ---------------------------------------------------------------------------------------------------------------------
# Exactness: order-free statistics, permutation equivariance, tiles
# ---------------------------------------------------------------------------------------------------------------------
def test_normalisation_is_order_free_and_right():
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(3, 5, 1037, generator=g) * torch.tensor([1e-3, 1.0, 50.0])[:, None, None]
    excl = torch.zeros(3, 1037, dtype=torch.bool)
    excl[0, 5] = excl[1, 17] = excl[1, 800] = True
    norm = FU.normalise_scores(raw, excl, 32, 4.0)
    for seed in range(3):
        perm = torch.randperm(1037, generator=torch.Generator().manual_seed(seed))
        p = FU.normalise_scores(raw[..., perm], excl[:, perm], 32, 4.0)
        assert torch.equal(p.mean, norm.mean) and torch.equal(p.std, norm.std) and torch.equal(p.stats, norm.stats)
        assert torch.equal(p.z, norm.z[..., perm])
    keep = ~excl[:, None, :].expand_as(raw)
    x = raw.double().masked_fill(~keep, float("nan"))
    mean = x.nanmean(-1)
    std = ((x - mean[..., None]) ** 2).nanmean(-1).sqrt()
    assert ((norm.mean.double() - mean).abs() / std).max() < 1e-4 and torch.allclose(norm.std.double(), std, rtol=1e-3)
    assert torch.equal(norm.stats[..., 0], norm.z.masked_fill(~keep, float("-inf")).amax(-1))
    q = torch.tensor([[3.0, -5.0] * 300 + [1.0]])
    assert FU.integer_sum(q, 3).item() == -599.0 and FU.integer_sum(q[:, torch.randperm(601)], 3).item() == -599.0
    assert torch.equal(K.pow2(torch.tensor([-3, 0, 40])), torch.tensor([0.125, 1.0, 2.0**40]))
    const = FU.normalise_scores(torch.ones(1, 2, 9))
    assert torch.equal(const.std, torch.ones(1, 2)) and const.z.eq(0).all()


@pytest.mark.parametrize("score_dtype", ["float16", "int8"])
def test_permutation_equivariance_is_exact(tmp_path, score_dtype):
    """Permuting the gallery permutes the fused scores bitwise (with the reference exclusion and a multi-vector base)."""
    bases = [colour_model(), shape_model(multi=3), create_method("image-only", PDIMS)]
    m = DAFM.from_bases(bases, names=["colour", "shape", "image"], score_dtype=score_dtype)
    randomise(m.fusion)
    tr, _ = colour_shape_world(tmp_path)
    t = FU.SplitTable.build(bases, ["colour", "shape", "image"], tr)
    q, g = t.query_bundle(slice(0, 37)), t.gallery_bundle(m.score_dtype)
    s = m.similarity(q, g)
    for seed in range(3):
        perm = torch.randperm(t.num_gallery, generator=torch.Generator().manual_seed(seed))
        gp = {"g": tuple(take_embeddings(x, perm) for x in g["g"]), "fp": g["fp"][perm]}
        assert torch.equal(m.similarity(q, gp), s[:, perm])
        assert torch.equal(m.explain(q, gp), m.explain(q, g))
    # the reference is in every row's gallery and was excluded from the statistics
    assert (q["fp"][:, None] == g["fp"][None, :]).sum(1).eq(1).all()


def test_tiled_equals_full_and_eval_paths_agree(tmp_path):
    bases = [colour_model(), shape_model(multi=2)]
    m = DAFM.from_bases(bases, names=["colour", "shape"], score_dtype="float32")
    randomise(m.fusion, 1)
    _tr, va = colour_shape_world(tmp_path)
    t = FU.SplitTable.build(bases, ["colour", "shape"], va)
    q, g = t.query_bundle(slice(0, t.num_queries)), t.gallery_bundle()
    m.params.tile = 10_000
    full = m.similarity(q, g)
    m.params.tile = 7
    tiled = m.similarity(q, g)
    assert torch.allclose(tiled, full, rtol=0, atol=1e-5)
    # raw scores of a tile equal the rows of the whole block
    raw = t.raw_scores(slice(0, t.num_queries))
    assert torch.equal(t.raw_scores(slice(14, 28)), raw[14:28])
    # the table path (cirfusion fuse) and the generic method path (cirfusion eval / train.evaluate) give one result
    assert FU.evaluate_fused(m, t) == evaluate(m, va)
    # float16 scoring: small tiles use float16 matrix-vector products, large ones widened float32 GEMMs; they agree
    # to the float16 rounding of the scores
    m16 = DAFM.from_bases(bases, score_dtype="float16")
    m16.fusion.load_state_dict(m.fusion.state_dict())
    g16 = t.gallery_bundle(torch.float16)
    m16.params.tile = 10_000
    a = m16.similarity(q, g16)
    m16.params.tile = 7
    assert (m16.similarity(q, g16) - a).abs().max() < 1e-2 and (a - full).abs().max() < 5e-2
    assert FU.evaluate_fused(m16, t)["R@10"] == pytest.approx(evaluate(m16, va)["R@10"], abs=2.0)


def test_untrained_network_is_the_mean_of_normalised_scores(tmp_path):
    bases = [colour_model(), shape_model()]
    m = DAFM.from_bases(bases, score_dtype="float16")
    t, _ = tables(tmp_path, bases, ["a", "b"])
    rows = slice(0, 20)
    raw = t.raw_scores(rows, dtype=m.score_dtype)
    norm = FU.normalise_scores(raw, t.exclusion(rows, True), 32, 4.0)
    expect = norm.z.mean(1)
    assert torch.allclose(m.similarity(t.query_bundle(rows), t.gallery_bundle(m.score_dtype)), expect, atol=1e-6)
    # float16 scoring stays within ~1e-3 of exact float32 scoring on the normalised scale
    m32 = DAFM.from_bases(bases, score_dtype="float32")
    exact = FU.normalise_scores(t.raw_scores(rows), t.exclusion(rows, True), 32, 4.0).z.mean(1)
    assert torch.allclose(m32.similarity(t.query_bundle(rows), t.gallery_bundle()), exact, atol=1e-6)
    assert (expect - exact).abs().max() < 5e-3
    assert t.gallery_bundle(torch.float16)["g"][0].dtype == torch.float16 and t.gallery[0].dtype == torch.float32
    # z-scores over the non-excluded columns have mean 0 and std 1
    assert norm.valid is not None
    v = norm.valid[:, None, :].expand_as(norm.z)
    zs = norm.z.double().masked_fill(~v, float("nan"))
    assert torch.allclose(zs.nanmean(-1), torch.zeros(20, 2, dtype=torch.float64), atol=1e-5)
    assert torch.allclose((zs**2).nanmean(-1), torch.ones(20, 2, dtype=torch.float64), atol=1e-3)


# ---------------------------------------------------------------------------------------------------------------------
# Size, memory, temperature
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [2, 4, 8])
def test_parameter_budget(k):
    bases = [create_method("image-only", PDIMS) for _ in range(k)]
    m = DAFM.from_bases(bases)
    n = m.num_parameters()
    assert n == FU.count_parameters(m.fusion) and 0 < n < 100_000
    big = DAFM.from_bases(bases, hidden=64, blocks=4, gate_hidden=64)
    assert big.num_parameters() < 100_000


def test_memory_is_bounded_by_the_tile(tmp_path, monkeypatch):
    bases = [colour_model(), shape_model(multi=2)]
    t, v = tables(tmp_path, bases, ["a", "b"])
    n, k = t.num_gallery, 2
    m = DAFM.from_bases(bases, tile=5)
    with FU.observe_score_blocks() as seen:
        FU.evaluate_fused(m, v, chunk=50)
    assert seen and {kind for kind, _ in seen} == {"raw", "hidden", "fused"}
    for kind, shape in seen:
        assert shape[0] <= 5 and math.prod(shape) <= 5 * n * max(k, m.hparams["hidden"]), (kind, shape)
    # fitting: the setup pass uses cfg.tile rows; the steps only their shortlists + random columns
    cfg = FU.FusionConfig(epochs=1, min_steps=0, batch_size=16, tile=6, hard=20, random=30)
    with FU.observe_score_blocks() as seen:
        FU.fit(DAFM.from_bases(bases, tile=5), t, None, cfg)
    assert max(s[0] for _, s in seen) <= 16
    assert all(s[-1] <= max(n, 20 + 1 + 30) for _, s in seen)
    assert all(s[0] <= 6 for kind, s in seen if kind == "raw" and s[-1] == n)
    # a small block budget shrinks the tiles whatever the tile setting
    hidden = m.hparams["hidden"]
    monkeypatch.setattr(K, "BLOCK_ELEMS", 3 * n * hidden)
    assert FU.block_rows(n, hidden, 1000) == 3
    with FU.observe_score_blocks() as seen:
        FU.evaluate_fused(DAFM.from_bases(bases, tile=1000), v)
    assert max(s[0] for _, s in seen) == 3


def test_dynamic_tau_rule_and_clamp():
    cfg = FU.FusionConfig(tau0=0.02, s=100.0, tau_min=0.005, tau_max=0.05)
    assert FU.next_tau(0.02, 10.0, cfg) == pytest.approx(0.02 * 0.9)
    assert FU.next_tau(0.02, 150.0, cfg) == 0.005  # factor <= 0 -> tau_min
    assert FU.next_tau(0.006, 50.0, cfg) == 0.005  # clamped below
    assert FU.next_tau(0.05, -100.0, cfg) == 0.05  # clamped above (a negative loss cannot occur; the clamp holds)
    fixed = FU.FusionConfig(dynamic_tau=False)
    assert FU.next_tau(0.02, 10.0, fixed) == 0.02
    with pytest.raises(ValueError, match="tau_min"):
        FU.FusionConfig(tau0=0.1, tau_max=0.05)


def test_fit_follows_the_tau_schedule_and_fixed_tau_ablation(tmp_path):
    bases = [colour_model(), shape_model()]
    t, v = tables(tmp_path, bases, ["a", "b"])
    cfg = FU.FusionConfig(epochs=2, min_steps=0, batch_size=32, s=50.0, hard=30, random=40)
    m = DAFM.from_bases(bases)
    res = FU.fit(m, t, v, cfg)
    taus = [s["tau"] for s in res.steps]
    assert taus[0] == 0.02 and len(set(taus)) > 1
    for a, b in zip(res.steps, res.steps[1:], strict=False):
        assert b["tau"] == FU.next_tau(a["tau"], a["loss"], cfg)
    assert all(cfg.tau_min <= x <= cfg.tau_max for x in taus)
    assert float(m.tau) == pytest.approx(res.tau_final)
    fixed = DAFM.from_bases(bases)
    rf = FU.fit(fixed, t, v, FU.FusionConfig(**{**cfg.to_dict(), "dynamic_tau": False}))
    assert {s["tau"] for s in rf.steps} == {0.02} and float(fixed.tau) == pytest.approx(0.02)
    # deterministic given the seed
    again = DAFM.from_bases(bases)
    FU.fit(again, t, v, cfg)
    assert all(torch.equal(a, b) for a, b in zip(again.fusion.state_dict().values(), m.fusion.state_dict().values(), strict=True))


def test_min_steps_adds_epochs_on_a_small_fit_split(tmp_path):
    bases = [colour_model(), shape_model()]
    t, _ = tables(tmp_path, bases, ["a", "b"])
    cfg = FU.FusionConfig(epochs=2, batch_size=32, min_steps=0, hard=30, random=40)
    per_epoch = t.num_queries // 32
    assert len(FU.fit(DAFM.from_bases(bases), t, None, cfg).steps) == 2 * per_epoch
    more = FU.FusionConfig(**{**cfg.to_dict(), "min_steps": 5 * per_epoch + 1})
    assert more.epochs_for(per_epoch) == 6
    res = FU.fit(DAFM.from_bases(bases), t, None, more)
    assert len(res.steps) == 6 * per_epoch and len(res.epochs) == 6
    assert FU.FusionConfig(epochs=7, min_steps=10).epochs_for(100) == 7  # never fewer than epochs
    with pytest.raises(ValueError):
        FU.FusionConfig(min_steps=-1)


def test_shortlist_loss_equals_full_loss_when_it_covers_the_gallery(tmp_path):
    bases = [colour_model(), shape_model()]
    t, _ = tables(tmp_path, bases, ["a", "b"])
    m = DAFM.from_bases(bases, score_dtype="float32")  # one kernel for every batch size: exact comparison
    randomise(m.fusion, 3)
    n = t.num_gallery
    cfg = FU.FusionConfig(hard=n, random=0)
    sl = FU.prepare_shortlists(m, t, cfg)
    idx = np.arange(12)
    short = FU.shortlist_loss(m, t, sl, idx, 0.05, cfg, 0)
    full = FU.full_loss(m, t, sl.rows[idx], 0.05)
    assert torch.allclose(short, full, rtol=1e-5)
    # random columns covering the rest: importance weights are 1, same loss
    cfg2 = FU.FusionConfig(hard=10, random=n)
    sl2 = FU.prepare_shortlists(m, t, cfg2)
    assert torch.allclose(FU.shortlist_loss(m, t, sl2, idx, 0.05, cfg2, 0), full, rtol=1e-5)
    # with few random columns the estimate is still close (unbiased sampled softmax)
    cfg3 = FU.FusionConfig(hard=20, random=40)
    sl3 = FU.prepare_shortlists(m, t, cfg3)
    with torch.no_grad():
        est = np.mean([float(FU.shortlist_loss(m, t, sl3, idx, 0.05, cfg3, s)) for s in range(20)])
    assert est == pytest.approx(float(full.detach()), rel=0.1)


# ---------------------------------------------------------------------------------------------------------------------
# What fusion is for: complementary models
# ---------------------------------------------------------------------------------------------------------------------
def test_complementary_models_fused_beat_both(tmp_path):
    """Model A knows the colour, model B the shape: alone each ranks the target among ~6 look-alikes; fused, first."""
    bases = [colour_model(), shape_model()]
    t, v = tables(tmp_path, bases, ["colour", "shape"])
    single = [FU.evaluate_base(v, k)["R@1"] for k in range(2)]
    model, _res = FU.fuse(t, v, FU.FusionConfig(epochs=3, min_steps=0, batch_size=32, hard=40, random=60))
    fused = FU.evaluate_fused(model, v)["R@1"]
    assert max(single) < 40 and fused > max(single) + 40, (single, fused)
    w = FU.explain(model, v, np.arange(10))
    assert w.shape == (10, 2)


def test_explanations_sum_to_one(tmp_path):
    bases = [colour_model(), shape_model(), create_method("image-only", PDIMS)]
    m = DAFM.from_bases(bases, names=["c", "s", "i"])
    randomise(m.fusion, 4)
    _t, v = tables(tmp_path, bases, ["c", "s", "i"])
    w = FU.explain(m, v, [0, 3, 5, 7])
    assert w.shape == (4, 3) and (w >= 0).all()
    assert torch.allclose(w.sum(1), torch.ones(4), atol=1e-6)
    summary = FU.explanation_summary(FU.explain_all(m, v), ["c", "s", "i"])
    assert set(summary["mean_weight"]) == {"c", "s", "i"}
    assert sum(summary["mean_weight"].values()) == pytest.approx(1.0)
    assert sum(summary["argmax_share"].values()) == pytest.approx(1.0)
    # weights scale the channels: a model with (forced) weight 0 does not change the fused scores
    q, g = v.query_bundle(slice(0, 5)), v.gallery_bundle()
    norm = next(m.normalised_tiles(q, g))
    w0 = torch.tensor([[0.5, 0.5, 0.0]]).expand(5, -1)
    z2 = norm.z.clone()
    z2[:, 2] = torch.randn_like(z2[:, 2])
    assert torch.equal(m.fusion(norm.z, norm.stats, w0), m.fusion(z2, norm.stats, w0))


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints and refusals
# ---------------------------------------------------------------------------------------------------------------------
def test_save_load_gives_identical_fused_scores(tmp_path):
    seed_everything(0)
    tr, va = make_toy(tmp_path, files=False)
    bases = [create_method("clip4cir", toy_dims(), embed_dim=16), create_method("image-only", toy_dims())]
    t = FU.SplitTable.build(bases, ["clip4cir", "image-only"], tr)
    v = FU.SplitTable.build(bases, ["clip4cir", "image-only"], va)
    model, _ = FU.fuse(t, v, FU.FusionConfig(epochs=1, min_steps=0, batch_size=32), base_info=[{"dataset": "toy/train"}] * 2)
    save_checkpoint(model, tmp_path / "fused", dataset="toy/train")
    files = sorted(str(p.relative_to(tmp_path / "fused")) for p in (tmp_path / "fused").rglob("*") if p.is_file())
    assert files == ["bases/00-clip4cir/config.json", "bases/00-clip4cir/model.safetensors",
                     "bases/01-image-only/config.json", "bases/01-image-only/model.safetensors",
                     "config.json", "model.safetensors"]
    cfg = read_config(tmp_path / "fused")
    assert cfg["method"] == "dafm" and cfg["num_parameters"] == model.num_parameters() < 100_000
    assert [b["name"] for b in cfg["hparams"]["bases"]] == ["clip4cir", "image-only"]
    assert read_config(tmp_path / "fused/bases/00-clip4cir")["dataset"] == "toy/train"
    api = cirfusion.load(tmp_path / "fused")
    loaded = api.method
    assert isinstance(loaded, DAFM) and api.backbone_id == "toy"
    q, g = v.query_bundle(slice(0, v.num_queries)), v.gallery_bundle()
    assert torch.equal(loaded.similarity(q, g), model.similarity(q, g))
    assert float(loaded.tau) == float(model.tau)
    assert evaluate(loaded, va) == FU.evaluate_fused(model, v)
    # a base checkpoint alone is a normal checkpoint
    b0 = load_checkpoint(tmp_path / "fused/bases/00-clip4cir")
    assert all(torch.equal(a, b) for a, b in zip(b0.state_dict().values(), bases[0].state_dict().values(), strict=True))
    # a tampered base sub-directory is an error, never a silent mismatch
    p = tmp_path / "fused/bases/00-clip4cir/config.json"
    c = json.loads(p.read_text())
    c["hparams"]["embed_dim"] = 32
    p.write_text(json.dumps(c))
    with pytest.raises(CheckpointError, match="does not match"):
        load_checkpoint(tmp_path / "fused")


def _ck(name, dataset="synthetic/train", wh="w0", method="clip4cir", files=None, gallery=100):
    cfg = {"method": method, "dataset": dataset, "backbone": {"id": "embedded", "weights_hash": wh, "preprocess_id": "p"}}
    man = None if files is None else {"datasets": {"train": {"files": files, "num_gallery": gallery}}}
    return {"name": name, "path": f"/runs/{name}/best", "config": cfg, "manifest": man}


def test_refuses_incompatible_bases():
    ok = FU.check_compatible([_ck("a", files={"q": "h1"}), _ck("b", files={"q2": "h1"})])
    assert ok == []
    with pytest.raises(FU.FusionError, match="K >= 2"):
        FU.check_compatible([_ck("a")])
    with pytest.raises(FU.FusionError, match="different datasets"):
        FU.check_compatible([_ck("a"), _ck("b", dataset="catalog/train")])
    with pytest.raises(FU.FusionError, match="weights_hash"):
        FU.check_compatible([_ck("a"), _ck("b", wh="w1")])
    # different backbones are fused side by side (noted); a base on a multi: backbone is refused
    other = _ck("b")
    other["config"]["backbone"] = {"id": "embedded:resolution=192", "weights_hash": "w0", "preprocess_id": "p192"}
    assert any("2 backbones" in n for n in FU.check_compatible([_ck("a"), other]))
    other["config"]["backbone"]["id"] = "multi:tiny|tiny:seed=1"
    with pytest.raises(FU.FusionError, match="multi: backbone"):
        FU.check_compatible([_ck("a"), other])
    with pytest.raises(FU.FusionError, match="different data"):
        FU.check_compatible([_ck("a", files={"q": "h1"}), _ck("b", files={"q": "h2"})])
    with pytest.raises(FU.FusionError, match="different data"):
        FU.check_compatible([_ck("a", files={"q": "h1"}), _ck("b", files={"q": "h1"}, gallery=99)])
    with pytest.raises(FU.FusionError, match="already a fused"):
        FU.check_compatible([_ck("a"), _ck("b", method="dafm")])
    ds = CIRDataset("catalog", "train", [], Gallery([], []))
    with pytest.raises(FU.FusionError, match="fusing on 'catalog'"):
        FU.check_compatible([_ck("a"), _ck("b")], ds)
    notes = FU.check_compatible([_ck("a", dataset=None), _ck("b")])
    assert any("not recorded" in n for n in notes)
    # the method itself refuses bases that read other features, and fewer than two bases
    other = MethodDims(**{**PDIMS.to_dict(), "weights_hash": "other"})
    with pytest.raises(ValueError, match="weights_hash"):
        DAFM.from_bases([colour_model(), create_method("image-only", other)])
    with pytest.raises(ValueError, match="at least two"):
        DAFM.from_bases([colour_model()])


def test_incremental_orders():
    assert FU.incremental_orders(["a", "b"], "a") == [["a", "b"]]
    orders = FU.incremental_orders(["a", "b", "c", "d"], "b")
    assert len(orders) == 6 and all(o[0] == "b" and sorted(o) == ["a", "b", "c", "d"] for o in orders)
    assert len({tuple(o) for o in orders}) == 6
    many = FU.incremental_orders([f"m{i}" for i in range(7)], "m3")
    assert len(many) == 24 and len({tuple(o) for o in many}) == 24
    with pytest.raises(ValueError, match="not one of"):
        FU.incremental_orders(["a", "b"], "z")


def test_incremental_analysis_and_plot(tmp_path):
    bases = [colour_model(), shape_model(), create_method("image-only", PDIMS)]
    names = ["colour", "shape", "image"]
    t, v = tables(tmp_path, bases, names)
    cfg = FU.FusionConfig(epochs=1, min_steps=0, batch_size=64, hard=30, random=30)
    lines: list[str] = []
    figs = FU.incremental_analysis(t, v, v, "image", cfg, report=lines.append)
    assert figs["metric"] == "R@10" and [o["order"] for o in figs["orders"]] == [["image", "colour", "shape"],
                                                                                ["image", "shape", "colour"]]
    assert figs["orders"][0]["values"][0] == FU.evaluate_base(v, 2)["R@10"]
    assert figs["orders"][0]["values"][-1] == figs["orders"][1]["values"][-1]  # the full set is trained once
    assert len(figs["subsets"]) == 4 and len(lines) == 6
    png = FU.plot_incremental(figs, tmp_path / "inc.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------------------------------
# The CLI end to end: tiny backbone, tiny dataset
# ---------------------------------------------------------------------------------------------------------------------
def test_cli_fuse_eval_incremental_and_refusal(tmp_path, capsys):

    data, cache = tmp_path / "data", tmp_path / "cache"
    make_custom_dataset(data)
    common = ["--dataset", "custom", "--root", str(data), "--cache-dir", str(cache), "--no-progress"]
    runs = {}
    for name, extra in [("io", ["image-only"]), ("c1", ["clip4cir", "--hparam", "embed_dim=32", "--hparam", "hidden_dim=64"]),
                        ("c2", ["clip4cir", "--hparam", "embed_dim=16", "--hparam", "hidden_dim=32", "--seed", "1"])]:
        runs[name] = tmp_path / name
        epochs = [] if name == "io" else ["--epochs", "3", "--batch-size", "16"]
        assert main(["train", extra[0], *common, "--backbone", "tiny", "--out", str(runs[name]), *extra[1:], *epochs]) == 0
    capsys.readouterr()
    out = tmp_path / "fused"
    ck = [str(runs[n] / "best") for n in ("io", "c1", "c2")]
    # fitted on the bases' training split, epoch picked on val (not the default, which fits on val)
    rc = main(["fuse", *ck, *common, "--out", str(out), "--split-train", "train", "--split-val", "val", "--epochs", "2",
               "--batch-size", "32", "--compare-tau",
               "--incremental", "--base", "image-only", "--split-test", "val"])
    assert rc == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "mean of normalised" in text and "image-only + clip4cir" in text
    rep = json.loads((out / "metrics.json").read_text())
    val = rep["splits"]["val"]
    assert set(val["bases"]) == {"image-only", "clip4cir", "clip4cir-2"} and val["metric"] == "R@10"
    assert {"mean_normalised", "fused", "fused_fixed_tau", "best_single", "explanation"} <= set(val)
    assert sum(val["explanation"]["mean_weight"].values()) == pytest.approx(1.0)
    steps = rep["training"]["fused_fixed_tau"]["steps"]
    assert {s["tau"] for s in steps} == {0.02} and rep["training"]["fused"]["dynamic_tau"]
    inc = json.loads((out / "incremental.json").read_text())
    assert len(inc["orders"]) == 2 and all(len(o["values"]) == 3 for o in inc["orders"])
    assert (out / "incremental.png").stat().st_size > 0
    # the fused checkpoint is a checkpoint like any other: eval gives the numbers fuse reported
    assert main(["eval", str(out / "best"), *common, "--split", "val", "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["method"] == "dafm" and ev["results"][0]["metrics"] == pytest.approx(val["fused"])
    # an existing output is not overwritten by accident
    assert main(["fuse", *ck, *common, "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    # a base trained on another dataset is refused with a clear error
    cfgp = runs["c2"] / "best" / "config.json"
    c = json.loads(cfgp.read_text())
    c["dataset"] = "synthetic/train"
    cfgp.write_text(json.dumps(c))
    assert main(["fuse", *ck, *common, "--out", str(tmp_path / "f2")]) == 2
    assert "different datasets" in capsys.readouterr().err
    assert main(["fuse", ck[0], *common, "--out", str(tmp_path / "f3")]) == 2
    assert "K >= 2" in capsys.readouterr().err


def test_cli_fuse_bases_on_two_backbones(tmp_path, capsys):
    """Base models on different backbones: the fused model reads their multi: composite, each base its own part; its
    scores equal the bases' own on their own backbones' features; eval, load and search work on it."""

    data, cache = tmp_path / "data", tmp_path / "cache"
    make_custom_dataset(data)
    common = ["--dataset", "custom", "--root", str(data), "--cache-dir", str(cache), "--no-progress"]
    runs = {"a": ("tiny", "clip4cir"), "b": ("tiny:seed=1,resolution=48", "clip4cir")}
    for name, (bb, method) in runs.items():
        assert main(["train", method, *common, "--backbone", bb, "--out", str(tmp_path / name), "--epochs", "2",
                     "--batch-size", "16", "--hparam", "embed_dim=16", "--hparam", "hidden_dim=32"]) == 0
    capsys.readouterr()
    ck = [str(tmp_path / n / "best") for n in runs]
    out = tmp_path / "fused"
    # the default splits: fitted on val/fuse (a fifth of it held out to pick the epoch), reported on --split-test
    assert main(["fuse", *ck, *common, "--out", str(out), "--epochs", "1", "--min-steps", "20", "--split-test", "val"]) == 0, \
        capsys.readouterr().err
    assert "2 backbones" in capsys.readouterr().out
    rep = json.loads((out / "metrics.json").read_text())
    assert rep["splits_used"] == {"fit": "val/fuse", "val": None, "test": "val"} and rep["dataset"] == "custom/val:fuse"
    assert rep["config"]["holdout"] == FU.FusionConfig().holdout > 0 and set(rep["splits"]) == {"test"}
    assert len(rep["training"]["fused"]["steps"]) >= 20 and rep["training"]["fused"]["epochs"][0]["epoch"] == -1
    fused = api.load(out / "best")
    dafm = fused.method
    assert isinstance(dafm, DAFM) and fused.backbone.backbone_id == "multi:tiny|tiny:resolution=48,seed=1"
    # each base, inside the fused model, scores exactly as it does alone on its own backbone's features

    ds = load_dataset("custom", data, "val")
    multi = load_split_data(FeatureCache(fused.backbone, cache), ds)
    t = FU.SplitTable.build(dafm.bases, dafm.base_names, multi)
    for k, n in enumerate(runs):
        alone = api.load(tmp_path / n / "best")
        own = FU.SplitTable.build([alone.method], [n], load_split_data(FeatureCache(alone.backbone, cache), ds))
        assert torch.allclose(t.raw_scores(slice(None))[:, k], own.raw_scores(slice(None))[:, 0], atol=1e-5)
    # the composite's features are its parts' cached ones side by side: never computed under a multi: key
    assert not [p.name for p in cache.iterdir() if "multi" in p.name]
    # eval reads the composite's features and gives the numbers fuse reported
    assert main(["eval", str(out / "best"), *common, "--split", "val", "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["results"][0]["metrics"] == pytest.approx(rep["splits"]["test"]["fused"])
    # search straight from the fused checkpoint over a folder of images
    img_dir = data / "images"
    some = sorted(p for p in img_dir.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    assert main(["search", str(out / "best"), "--images", str(img_dir), "--image", str(some[0]), "--text", "make it red",
                 "-k", "3", "--json", "--no-progress"]) == 0, capsys.readouterr().err
    hits = json.loads(capsys.readouterr().out)
    assert [h["rank"] for h in hits] == [1, 2, 3]
    # the composite rebuilds from its id; a DAFM over bases on different backbones built without it is refused
    assert create_backbone(fused.backbone.backbone_id).weights_hash() == fused.method.dims.weights_hash
    with pytest.raises(ValueError, match="multi: composite"):
        DAFM(dafm.bases[0].dims, _bases=dafm.bases, bases=dafm.hparams["bases"])


def test_fast_maxsim_matches_the_default_similarity():

    g = torch.Generator().manual_seed(0)
    for qs, gs in [((5, 8), (37, 8)), ((5, 8), (37, 3, 8)), ((5, 2, 8), (37, 8)), ((5, 2, 8), (37, 3, 8))]:
        q, gal = torch.randn(qs, generator=g), torch.randn(gs, generator=g)
        assert torch.allclose(FU.dot_or_maxsim(q, gal), cosine_or_maxsim(q, gal), atol=1e-5)


def test_float16_scoring_kernels_agree():
    g = torch.Generator().manual_seed(1)
    q = F.normalize(torch.randn(40, 2, 32, generator=g), dim=-1)
    gal = F.normalize(torch.randn(5000, 3, 32, generator=g), dim=-1)
    exact = FU.dot_or_maxsim(q.half().float(), gal.half().float())  # float32 products of the float16-rounded inputs
    big = FU.dot_or_maxsim(q, gal.half(), torch.float16)  # 40 x 2 query vectors: float32 GEMM on widened tiles
    small = torch.cat([FU.dot_or_maxsim(q[i : i + 4], gal.half(), torch.float16) for i in range(0, 40, 4)])  # fp16 GEMV
    assert torch.allclose(big, exact, atol=1e-6)
    assert (small - exact).abs().max() < 1e-3 and (exact - FU.dot_or_maxsim(q, gal)).abs().max() < 2e-3


def test_int8_scoring_is_close_and_cached():
    """int8 scoring: within a few 1e-3 of the exact scores on unit vectors, the same for a single query and a batch
    up to the bfloat16 query rounding; the int8 copy is made once per gallery tensor and redone after an in-place
    change."""
    g = torch.Generator().manual_seed(2)
    q = F.normalize(torch.randn(40, 2, 64, generator=g), dim=-1)
    gal = F.normalize(torch.randn(3000, 3, 64, generator=g), dim=-1).half()
    exact = FU.dot_or_maxsim(q, gal.float())
    big = FU.dot_or_maxsim(q, gal, torch.int8)  # 80 query vectors: dequantised float32 GEMM
    small = torch.cat([FU.dot_or_maxsim(q[i : i + 4], gal, torch.int8) for i in range(0, 40, 4)])  # int8 kernel
    assert big.shape == small.shape == (40, 3000)
    assert (big - exact).abs().max() < 6e-3 and (small - exact).abs().max() < 8e-3
    assert (small - big).abs().max() < 5e-3
    # the int8 copy: one per tensor, reused, rebuilt when the tensor changes in place
    v1, s1 = FU.int8_copy(gal)
    v2, _ = FU.int8_copy(gal)
    assert v1 is v2 and v1.dtype == torch.int8 and v1.shape == (9000, 64)
    assert torch.allclose(v1.float() * s1[:, None], gal.reshape(-1, 64).float(), atol=1 / 127)
    gal[0] = -gal[0]
    v3, _ = FU.int8_copy(gal)
    assert v3 is not v1 and torch.equal(v3[:3], -v1[:3])
    with pytest.raises(TypeError, match="float gallery"):
        FU.dot_or_maxsim(q, v1, torch.int8)
    # a fused model scoring in int8 stores its gallery in float16
    m = DAFM.from_bases([colour_model(), shape_model(multi=3)], score_dtype="int8")
    assert FU.storage_dtype(m.score_dtype) == torch.float16


def test_single_thread_if_small_restores_the_thread_count():
    """The module runs on one thread (fixture), where the context manager has nothing to do: start from 2 threads so
    that a count left at 1 fails, and restore whatever was set before."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert torch.get_num_threads() == 2
        with FU.single_thread_if_small(10):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with FU.single_thread_if_small(FU.SINGLE_THREAD_ELEMS + 1):
            assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError, match="boom"):
            with FU.single_thread_if_small(10):
                assert torch.get_num_threads() == 1
                raise RuntimeError("boom")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_fast_kernels_match_their_plain_references():
    """Every fast scoring path against the plain float64 definition next to it in kernels.py: float32 tiles exact to
    float32 rounding, float16 and int8 within their documented precision; the fixed-point normalisation against the
    plain masked mean / std, on rows whose scales differ by 5 orders of magnitude."""
    g = torch.Generator().manual_seed(5)
    for qs, gs in [((7, 32), (300, 32)), ((7, 2, 32), (300, 3, 32)), ((40, 32), (300, 32))]:
        q = F.normalize(torch.randn(qs, generator=g), dim=-1)
        gal = F.normalize(torch.randn(gs, generator=g), dim=-1)
        ref = K.reference_dot_or_maxsim(q, gal)
        assert ref.dtype == torch.float64 and ref.shape == (qs[0], gs[0])
        assert (K.dot_or_maxsim(q, gal).double() - ref).abs().max() < 1e-5
        assert (K.dot_or_maxsim(q, gal.half(), torch.float16).double() - ref).abs().max() < 2e-3
        assert (K.dot_or_maxsim(q, gal.half(), torch.int8).double() - ref).abs().max() < 1e-2
    raw = torch.randn(4, 3, 777, generator=g) * torch.tensor([1e-3, 1.0, 80.0])[:, None]
    excl = torch.zeros(4, 777, dtype=torch.bool)
    excl[0, 3] = excl[2, 500] = excl[2, 501] = True
    for exclude in (None, excl):
        fast = K.normalise_scores(raw, exclude)
        z, mean, std = K.reference_normalise(raw, exclude)
        assert ((fast.mean.double() - mean).abs() / std).max() < 1e-4
        assert torch.allclose(fast.std.double(), std, rtol=1e-3)
        keep = torch.ones_like(z, dtype=torch.bool) if exclude is None else ~exclude[:, None, :].expand_as(z)
        assert (fast.z.double() - z).masked_fill(~keep, 0.0).abs().max() < 2e-3
    const = K.reference_normalise(torch.ones(1, 2, 9))
    assert torch.equal(const[2], torch.ones(1, 2, dtype=torch.float64)) and const[0].eq(0).all()


def test_multi_positive_losses():
    """"sum" and "each" agree with one positive; with two, "each" needs both above the negatives (a low second
    positive costs it, not "sum"); unknown modes are refused, in the loss and in the config."""
    logits = torch.tensor([[5.0, 1.0, 0.0, -1.0], [4.0, 3.9, 0.0, -8.0]])
    valid = torch.ones_like(logits, dtype=torch.bool)
    one = torch.tensor([[True, False, False, False], [True, False, False, False]])
    assert torch.allclose(FU.multi_positive_nce(logits, one, valid, "sum"), FU.multi_positive_nce(logits, one, valid, "each"))
    expect = -torch.log_softmax(logits, 1)[:, 0].mean()
    assert torch.allclose(FU.multi_positive_nce(logits, one, valid, "each"), expect)
    two = one.clone()
    two[:, 3] = True  # a second positive ranked last
    assert FU.multi_positive_nce(logits, two, valid, "each") > FU.multi_positive_nce(logits, one, valid, "each") + 1.0
    assert FU.multi_positive_nce(logits, two, valid, "sum") <= FU.multi_positive_nce(logits, one, valid, "sum")
    with pytest.raises(ValueError, match="positive loss mode"):
        FU.multi_positive_nce(logits, one, valid, "max")
    with pytest.raises(ValueError, match="positives"):
        FU.FusionConfig(positives="max")


def test_fit_with_each_positive_loss(tmp_path):
    bases = [colour_model(), shape_model()]
    tr, va = colour_shape_world(tmp_path)
    t = FU.SplitTable.build(bases, ["colour", "shape"], tr)
    v = FU.SplitTable.build(bases, ["colour", "shape"], va)
    _m, res = FU.fuse(t, v, FU.FusionConfig(epochs=2, min_steps=0, positives="each", seed=0))
    assert res.steps and all(math.isfinite(s["loss"]) for s in res.steps)


def test_cli_defaults_are_the_library_defaults():
    """One source of defaults: `cirfusion fuse`'s options default to FusionConfig's and FuseSplits' fields (fit on val,
    a fifth held out, at least 500 steps), and the quickstart's fusion settings to FusionConfig's."""

    parser = argparse.ArgumentParser()
    fuse_cmd.register(parser.add_subparsers())
    args = parser.parse_args(["fuse", "a", "b", "--dataset", "custom", "--root", "r", "--out", "o"])
    d, sp = FU.FusionConfig(), FU.FuseSplits()
    assert (d.holdout, d.min_steps, sp.fit, sp.val, sp.test) == (0.2, 500, "val/fuse", None, "test")
    assert (args.split_train, args.split_val, args.split_test) == ("val/fuse", "none", "test")
    for opt, field in [("epochs", "epochs"), ("holdout", "holdout"), ("min_steps", "min_steps"), ("batch_size", "batch_size"),
                       ("lr", "lr"), ("seed", "seed"), ("tau0", "tau0"), ("s", "s"), ("tau_min", "tau_min"),
                       ("tau_max", "tau_max"), ("negatives", "negatives"), ("hard", "hard"), ("random", "random"),
                       ("val_metric", "val_metric"), ("chunk", "eval_chunk")]:
        assert getattr(args, opt) == getattr(d, field), opt
    assert args.hidden is None and args.blocks is None  # the dafm method's own defaults
    q = QuickstartConfig()
    assert (q.fusion_epochs, q.fusion_min_steps) == (d.epochs, d.min_steps)


def test_dafm_imports_alone_without_a_cycle():
    """methods/dafm.py imports the fusion kernels and network; the fusion package never imports dafm (fitting builds it
    through the method registry). A fresh interpreter importing dafm first (as loading a fused checkpoint does)
    must work; the static graph holds no import of dafm from the fusion package."""
    code = "import cirfusion.methods.dafm as d, cirfusion.fusion as f; print(d.DAFM.__name__, f.fuse.__name__)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.split() == ["DAFM", "fuse"], res.stderr
    pkg = Path(FU.__file__).parent
    for path in pkg.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert "dafm" not in (node.module or "") or _under_type_checking(path, node), (path.name, node.module)


def _under_type_checking(path: Path, node: ast.ImportFrom) -> bool:
    for top in ast.parse(path.read_text()).body:
        if isinstance(top, ast.If) and isinstance(top.test, ast.Name) and top.test.id == "TYPE_CHECKING":
            if any(isinstance(n, ast.ImportFrom) and n.lineno == node.lineno for n in ast.walk(top)):
                return True
    return False
