"""One sRGB -> CIELab: the colour backbone converts with cirfusion.data.colors.srgb_to_lab, and its features are the
ones the former float32 torch converter gave (recorded in tests/data/colour_v1_features.npz before the change)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cirfusion.backbones.colour import HIST_BINS, ColourBackbone, rgb_to_lab
from cirfusion.data.colors import srgb_to_lab

V1 = Path(__file__).parent / "data" / "colour_v1_features.npz"


@pytest.fixture(scope="module")
def backbone() -> ColourBackbone:
    return ColourBackbone()


def test_rgb_to_lab_is_the_data_layer_converter() -> None:
    x = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(0))
    want = srgb_to_lab(x.permute(0, 2, 3, 1).double().numpy() * 255.0)
    got = rgb_to_lab(x)
    assert got.dtype == torch.float32 and got.shape == (2, 3, 5, 7)
    np.testing.assert_allclose(got.permute(0, 2, 3, 1).numpy(), want, rtol=0, atol=1e-4)


def test_features_match_the_former_converter(backbone: ColourBackbone) -> None:
    # The images the reference was recorded on: three random ones, plain white, plain black.
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 256, (150, 170, 3), dtype=np.uint8)) for _ in range(3)]
    imgs += [Image.new("RGB", (128, 128), (255, 255, 255)), Image.new("RGB", (128, 128), (0, 0, 0))]
    f = backbone.encode_image(torch.stack([backbone.preprocess(im) for im in imgs]))
    ref = np.load(V1)
    np.testing.assert_allclose(f.global_.numpy(), ref["global_"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(f.tokens.numpy(), ref["tokens"], rtol=0, atol=1e-5)


def test_greys_fall_in_the_middle_a_b_bin(backbone: ColourBackbone) -> None:
    """Every grey level lands in the a = b = 0 bins, whatever the rounding (the former converter put some grey
    levels on either side of the bin edge by float32 noise)."""
    side = backbone.grid * 4
    levels = torch.arange(side * side, dtype=torch.float32).remainder(256) / 255.0
    px = levels.view(1, 1, side, side).expand(1, 3, side, side).contiguous()
    hist = backbone.encode_image(px).global_[0, 48:]
    bins = torch.nonzero(hist).flatten()
    ai, bi = (bins // HIST_BINS) % HIST_BINS, bins % HIST_BINS
    assert len(bins) > 1 and (ai == HIST_BINS // 2).all() and (bi == HIST_BINS // 2).all()
