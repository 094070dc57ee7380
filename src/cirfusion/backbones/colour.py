"""``colour``: a colour-layout image descriptor (no learned weights) with all-MiniLM-L6-v2 for text.

Why it exists: DAFM's base pool is diverse because its members read different backbones (CLIP, BLIP, BLIP-2). The
only pretrained image network that installs offline is EfficientNet-Lite0, and base models that all read it make
correlated mistakes (measured on the embedded benchmarks, see ``benchmarks/dafm_accuracy.py``). This backbone is a
second, genuinely different view of an image: where colours are, in a perceptual space -- the classic content-based
retrieval descriptor, which ImageNet features are known to be weak at (they are trained to ignore colour shifts).

Image (after the same shorter-side resize + centre crop as ``embedded``, to ``resolution`` px, default 128):
- the crop is area-averaged to a ``grid*4 x grid*4`` thumbnail (default 32 x 32) and converted to CIELab (D65);
- tokens: the ``grid x grid`` cells (default 8 x 8 = 64, row-major), each its 4 x 4 Lab pixels = 48 values, scaled to
  about unit range (L/50 - 1, a/50, b/50);
- global: the 4 x 4 grid of mean Lab (48 values) next to a 4 x 4 x 4 (L, a, b) colour histogram of the thumbnail
  (square-rooted, so a dominant colour does not drown the rest), L2-normalised (112-d).
Text: the same MiniLM features as ``embedded`` (384-d global, ``max_text_tokens`` tokens).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from ..data.colors import srgb_to_lab
from ..options import format_options
from . import register_backbone
from ._util import resize_center_crop, short_hash
from .base import Backbone, ImageFeatures, TextFeatures
from .embedded import MiniLMText

DEFAULTS: dict[str, Any] = {"resolution": 128, "grid": 8, "max_text_tokens": 48}
CELL = 4  # thumbnail pixels per cell side
HIST_BINS = 4  # per Lab axis
# Bump when the descriptor changes: it is part of the weights hash (so of every cache key). v2: Lab from
# cirfusion.data.colors (float64) and greys binned as a = b = 0; v1 binned greys by float32 rounding noise.
VERSION = 2
_GREY_AB = 1e-4  # |a|, |b| below this is a grey's rounding error, not colour (one 8-bit step moves them >= 0.1)

def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` sRGB in [0, 1] -> CIELab (L in [0, 100], a/b about [-128, 127]), float32 on ``rgb``'s device.

    The conversion is ``cirfusion.data.colors.srgb_to_lab`` (the one sRGB -> Lab of the package, in float64 on the
    CPU): thumbnails are small (32 x 32 by default), so the round trip costs nothing next to the text encoder.
    """
    pixels = rgb.detach().permute(0, 2, 3, 1).to("cpu", torch.float64).numpy() * 255.0
    lab = torch.from_numpy(srgb_to_lab(pixels)).permute(0, 3, 1, 2)
    return lab.to(rgb.device, torch.float32).contiguous()


class ColourBackbone(Backbone):
    aligned = False

    def __init__(self, resolution: int = 128, grid: int = 8, max_text_tokens: int = 48) -> None:
        super().__init__()
        if not (isinstance(grid, int) and 2 <= grid <= 32):
            raise ValueError(f"colour backbone: grid={grid!r} must be an int in [2, 32]")
        if not (isinstance(resolution, int) and resolution >= grid * CELL):
            raise ValueError(f"colour backbone: resolution={resolution!r} must be an int >= grid * {CELL}")
        self.resolution, self.grid = resolution, grid
        opts = {"resolution": resolution, "grid": grid, "max_text_tokens": max_text_tokens}
        extra = {k: v for k, v in opts.items() if DEFAULTS[k] != v}
        self.backbone_id = "colour" + (":" + format_options(extra) if extra else "")
        self.image_token_dim = 3 * CELL * CELL  # 48
        self.num_image_tokens = grid * grid
        self.image_dim = 3 * 16 + HIST_BINS**3  # 4x4 mean Lab + histogram = 112
        self.text = MiniLMText(max_text_tokens)
        self.text_dim = self.text_token_dim = self.text.dim
        self.max_text_tokens = max_text_tokens
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    def weights_hash(self) -> str:
        return short_hash(f"colour-layout-v{VERSION}|minilm:{self.text.weights_sha256()}", 32)

    def preprocess_id(self) -> str:
        return f"resize-shorter-bicubic+center-crop:{self.resolution}|area-thumbnail:{self.grid * CELL}|lab-d65"

    def text_preprocess_id(self) -> str:
        return self.text.preprocess_id()

    def text_cache_id(self) -> dict[str, str]:
        return self.text.cache_id()  # the same cached MiniLM features as ``embedded``

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        crop = resize_center_crop(image.convert("RGB"), self.resolution)
        side = self.grid * CELL
        thumb = crop.resize((side, side), Image.Resampling.BOX)  # area average
        return torch.frombuffer(bytearray(thumb.tobytes()), dtype=torch.uint8).view(side, side, 3).permute(2, 0, 1).float() / 255.0

    @torch.inference_mode()
    def encode_image(self, pixels: torch.Tensor) -> ImageFeatures:
        x = pixels.to(self.device, torch.float32)
        side = self.grid * CELL
        if x.shape[-2:] != (side, side):
            raise ValueError(f"colour backbone: expected {side}x{side} thumbnails from its preprocess, got {tuple(x.shape)}")
        lab = rgb_to_lab(x.clamp(0.0, 1.0))
        scaled = torch.stack([lab[:, 0] / 50.0 - 1.0, lab[:, 1] / 50.0, lab[:, 2] / 50.0], 1)  # about unit range
        b, g = x.shape[0], self.grid
        # [B, 3, g, CELL, g, CELL] -> [B, g, g, 3, CELL, CELL] -> [B, g*g, 48]
        tokens = scaled.view(b, 3, g, CELL, g, CELL).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, 3 * CELL * CELL)
        layout = F.adaptive_avg_pool2d(scaled, 4).flatten(1)  # [B, 48]
        # Joint Lab histogram of the thumbnail (L in [0, 100], a/b clamped to [-100, 100]).
        # A grey (R = G = B) has a = b = 0 up to rounding (|a|, |b| < 1e-4), right on the middle bin edge: count it
        # as exactly 0, so its bin never depends on how the arithmetic rounded (float32 vs float64, CPU vs GPU).
        ab = torch.where(lab[:, 1:].abs() < _GREY_AB, torch.zeros_like(lab[:, 1:]), lab[:, 1:])
        li = (lab[:, 0] / 100.0 * HIST_BINS).long().clamp(0, HIST_BINS - 1)
        ai = ((ab[:, 0] + 100.0) / 200.0 * HIST_BINS).long().clamp(0, HIST_BINS - 1)
        bi = ((ab[:, 1] + 100.0) / 200.0 * HIST_BINS).long().clamp(0, HIST_BINS - 1)
        idx = ((li * HIST_BINS + ai) * HIST_BINS + bi).flatten(1)
        hist = torch.zeros(b, HIST_BINS**3, device=x.device).scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float32))
        hist = (hist / idx.shape[1]).sqrt()
        global_ = F.normalize(torch.cat([layout / 4.0, hist], 1), dim=-1)
        return ImageFeatures(global_=global_, tokens=tokens.contiguous())

    def encode_text(self, texts: list[str]) -> TextFeatures:
        return self.text.encode(texts)


@register_backbone("colour", options=ColourBackbone)
def create_colour(**kw: Any) -> ColourBackbone:
    # options are checked against ColourBackbone's signature by the registry (unknown keys, wrong types)
    return ColourBackbone(**kw)


__all__ = ["ColourBackbone", "create_colour", "rgb_to_lab"]
