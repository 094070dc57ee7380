"""Exact Shapley contributions of the base models to a fused score (cirfusion.fusion.shapley, DAFM.contributions,
fusion.shapley_contributions): efficiency, symmetry, dummy, agreement with a plain permutation average in which an
absent model is really replaced by a constant-scoring one, and the refusal of K > 8."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from cirfusion import fusion as FU
from cirfusion.backbones.base import ImageFeatures, TextFeatures
from cirfusion.fusion import kernels as K
from cirfusion.fusion import shapley as SH
from cirfusion.methods import create_method
from cirfusion.methods.dafm import DAFM
from test_fusion import PDIMS, Probe, colour_model, colour_shape_world, randomise, shape_model

pytestmark = pytest.mark.usefixtures("one_thread")


class Constant(Probe):
    """A base model that tells no candidates apart: every score is the same (non-round) value."""

    def encode_query(self, ref: ImageFeatures, text: TextFeatures) -> torch.Tensor:
        return torch.tensor([0.3712, 0.0, 0.0, 0.0]).expand(ref.global_.shape[0], 4)

    def encode_gallery(self, img: ImageFeatures) -> torch.Tensor:
        return torch.tensor([0.8123, 0.0, 0.0, 0.0]).expand(img.global_.shape[0], 4)


def _setup(tmp_path, bases, names, seed=3):
    m = DAFM.from_bases(bases, names=names)
    randomise(m.fusion, seed)
    _tr, va = colour_shape_world(tmp_path)
    return m, FU.SplitTable.build(bases, names, va)


def test_constant_rows_normalise_to_exact_zeros():
    """A constant score row gives z exactly 0 and std 1 (the fixed-point mean used to leave a residue that the
    division blew up to z = +-1), so its statistics are exactly those of an absent model."""
    raw = torch.randn(3, 3, 50)
    raw[:, 1, :] = 0.3712
    raw[1, 2, :] = -0.01234567
    ex = torch.zeros(3, 50, dtype=torch.bool)
    ex[0, 4] = True
    n = K.normalise_scores(raw, ex, 32, 4.0)
    assert torch.equal(n.z[:, 1], torch.zeros(3, 50)) and torch.equal(n.z[1, 2], torch.zeros(50))
    assert torch.equal(n.std[:, 1], torch.ones(3))
    assert torch.equal(n.stats[:, 1], SH.absent_stats(n, 32, 4.0)[:, 0])
    assert n.z[0, 0].abs().max() > 0.5  # ordinary rows untouched


def test_efficiency_full_value_and_baseline(tmp_path):
    names = ["c", "s", "i"]
    m, v = _setup(tmp_path, [colour_model(), shape_model(), create_method("image-only", PDIMS)], names)
    rows = np.arange(12)
    q, g = v.query_bundle(torch.from_numpy(rows)), v.gallery_bundle(m.score_dtype)
    cols = FU.experiments.target_columns(v, rows)
    phi, vals = m.contributions(q, g, cols)
    assert phi.shape == (12, 3) and vals.shape == (12, 8)
    # efficiency: the contributions add up to v(all) - v(empty)
    assert torch.allclose(phi.sum(1), vals[:, -1] - vals[:, 0], atol=1e-5)
    # v(all) is the fused score the model gives the target
    fused = m.similarity(q, g)[torch.arange(12), cols]
    assert torch.allclose(vals[:, -1], fused, atol=1e-5)
    # v(empty) is a no-information baseline: the same for every candidate of a query
    _, other = m.contributions(q, g, torch.zeros(12, dtype=torch.int64))
    assert torch.equal(other[:, 0], vals[:, 0])
    # the table and the bundle entry points agree; the default column is the target
    assert torch.equal(FU.shapley_contributions(m, v, rows), phi)
    assert torch.equal(FU.shapley_contributions(m, (v.query_bundle(slice(0, v.num_queries)), g), rows, cols), phi)
    with pytest.raises(FU.FusionError, match="gallery columns"):
        FU.shapley_contributions(m, (q, g), rows)
    summary = FU.contribution_summary(phi, names, m.explain(q, g))
    assert summary["num_queries"] == 12 and sum(summary["abs_share"].values()) == pytest.approx(1.0)
    assert sum(summary["mean_gate_weight"].values()) == pytest.approx(1.0)


def test_agrees_with_a_plain_permutation_average(tmp_path):
    """K = 3: the average over the 3! orders of each model's marginal fused score, where a model outside the
    coalition is replaced by a base model that really scores every candidate alike (a separate fused model per
    coalition, same fusion network), equals the exact formula's values."""
    names = ["c", "s", "i"]
    bases = [colour_model(), shape_model(), create_method("image-only", PDIMS)]
    m, _ = _setup(tmp_path, bases, names, seed=5)
    _tr, va = colour_shape_world(tmp_path)
    t = FU.SplitTable.build([*bases, Constant(PDIMS)], [*names, "const"], va)
    rows = torch.arange(10)
    cols = torch.tensor([int(t.positives[r][0]) for r in range(10)]) + torch.tensor([0, 3, 0, 7, 0, 0, 11, 0, 0, 1])

    def value(coalition: set[int]) -> torch.Tensor:
        members = [k if k in coalition else 3 for k in range(3)]
        ts = t.select(members)
        ms = DAFM.from_bases(ts.bases, names=[f"m{j}" for j in range(3)])
        ms.fusion.load_state_dict(m.fusion.state_dict())
        return ms.similarity(ts.query_bundle(rows), ts.gallery_bundle(ms.score_dtype))[torch.arange(10), cols]

    values = {frozenset(s): value(set(s)) for r in range(4) for s in itertools.combinations(range(3), r)}
    brute = torch.zeros(10, 3, dtype=torch.float64)
    for order in itertools.permutations(range(3)):
        before: set[int] = set()
        for k in order:
            brute[:, k] += (values[frozenset(before | {k})] - values[frozenset(before)]).double()
            before.add(k)
    brute /= math.factorial(3)
    phi, vals = m.contributions(t.select([0, 1, 2]).query_bundle(rows), t.select([0, 1, 2]).gallery_bundle(m.score_dtype),
                                cols)
    assert torch.allclose(phi.double(), brute, atol=1e-5), (phi, brute)
    assert torch.allclose(vals[:, 0], values[frozenset()], atol=1e-5)
    assert brute.abs().max() > 0.05  # a non-trivial game


def _symmetrise(net: torch.nn.Module, i: int, j: int) -> None:
    """Make the fusion network treat models i and j alike (any input swap of i and j swaps nothing else)."""
    with torch.no_grad():
        net.stat_mean[j] = net.stat_mean[i]
        net.stat_std[j] = net.stat_std[i]
        w1 = net.gate[0].weight.view(net.gate[0].weight.shape[0], net.num_models, net.num_stats)
        w1[:, j] = w1[:, i]
        net.gate[2].weight[j] = net.gate[2].weight[i]
        net.gate[2].bias[j] = net.gate[2].bias[i]
        for lin1, lin2 in net._block_layers():
            lin1.weight[:, j] = lin1.weight[:, i]
            lin2.weight[j] = lin2.weight[i]
            lin2.bias[j] = lin2.bias[i]
        net.head.weight[0, j] = net.head.weight[0, i]


def test_symmetry_and_dummy(tmp_path):
    # symmetry: two identical base models, a network that treats them alike -> equal contributions
    names = ["c1", "c2", "s"]
    m, v = _setup(tmp_path, [colour_model(), colour_model(), shape_model()], names, seed=7)
    _symmetrise(m.fusion, 0, 1)
    phi = FU.shapley_contributions(m, v, np.arange(15))
    assert torch.allclose(phi[:, 0], phi[:, 1], atol=1e-6) and phi[:, 0].abs().max() > 1e-3
    # dummy: a model whose scores are constant over the gallery contributes exactly nothing (gate, blocks, head)
    names = ["c", "const", "s"]
    m, v = _setup(tmp_path, [colour_model(), Constant(PDIMS), shape_model()], names, seed=8)
    phi = FU.shapley_contributions(m, v, np.arange(15))
    assert phi[:, 1].abs().max() < 1e-6 and phi[:, [0, 2]].abs().max() > 1e-2


def test_refuses_more_than_eight_models():
    with pytest.raises(FU.FusionError, match="K = 9"):
        SH.coalition_masks(9)
    net = FU.FusionNet(9)
    norm = K.normalise_scores(torch.randn(2, 9, 20))
    with pytest.raises(FU.FusionError, match="at most 8"):
        SH.shapley_values(net, norm, torch.zeros(2, dtype=torch.int64), 32, 4.0)
    assert SH.coalition_masks(8).shape == (256, 8)
    # the matrix is the exact formula: each column's weights sum to 0, and the full coalition's weight is 1/K
    mat = SH.shapley_matrix(4)
    assert torch.allclose(mat.sum(0), torch.zeros(4, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(mat[-1], torch.full((4,), 0.25, dtype=torch.float64))
