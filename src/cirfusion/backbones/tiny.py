"""``tiny``: a small random backbone (seeded, deterministic) for fast tests of everything downstream.

Images: two strided convolutions on a 32x32 input -> a 4x4 map = 16 tokens; global = linear(mean of tokens).
Texts: hashed bag of words (a word's id is a hash of the word, so no vocabulary file) + position embeddings as token
features; global = linear(masked mean of tokens). All dimensions differ from each other on purpose, so a method that
mixes up image/text or global/token sizes fails on ``tiny`` already; ``aligned=true`` makes the two global spaces
the same size (for the ``sum`` baseline).
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..options import format_options
from . import register_backbone
from ._util import state_dict_sha256, to_normalised_tensor
from .base import Backbone, ImageFeatures, TextFeatures

DEFAULTS: dict[str, Any] = {"seed": 0, "resolution": 32, "aligned": False, "max_text_tokens": 16}
_WORD = re.compile(r"\w+", re.UNICODE)


class TinyBackbone(Backbone):
    VOCAB = 4096  # hash buckets; id 0 is padding

    def __init__(self, seed: int = 0, resolution: int = 32, aligned: bool = False, max_text_tokens: int = 16) -> None:
        super().__init__()
        if not (isinstance(resolution, int) and resolution >= 16 and resolution % 16 == 0):
            raise ValueError(f"tiny backbone: resolution={resolution!r} must be a multiple of 16")
        if not (isinstance(max_text_tokens, int) and max_text_tokens >= 1):
            raise ValueError(f"tiny backbone: max_text_tokens={max_text_tokens!r} must be a positive int")
        self.seed, self.resolution, self.aligned = int(seed), resolution, bool(aligned)
        opts = {"seed": self.seed, "resolution": resolution, "aligned": self.aligned, "max_text_tokens": max_text_tokens}
        extra = {k: v for k, v in opts.items() if DEFAULTS[k] != v}
        self.backbone_id = "tiny" + (":" + format_options(extra) if extra else "")

        self.image_dim, self.image_token_dim = 32, 24
        self.text_dim = 32 if self.aligned else 28
        self.text_token_dim, self.max_text_tokens = 20, max_text_tokens
        self.num_image_tokens = 16
        self.conv1 = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(16, self.image_token_dim, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.image_head = nn.Linear(self.image_token_dim, self.image_dim)
        self.word_emb = nn.Embedding(self.VOCAB + 1, self.text_token_dim, padding_idx=0)
        self.pos_emb = nn.Embedding(max_text_tokens, self.text_token_dim)
        self.text_head = nn.Linear(self.text_token_dim, self.text_dim)
        # Initialise from a private generator: identical weights for a seed, whatever the global RNG state is.
        g = torch.Generator().manual_seed(self.seed)
        with torch.no_grad():
            for _name, p in sorted(self.named_parameters()):
                fan_in = p[0].numel() if p.dim() > 1 else p.numel()
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(max(1, fan_in)))
            self.word_emb.weight[0].zero_()
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        self._hash: str | None = None

    def weights_hash(self) -> str:
        if self._hash is None:
            self._hash = state_dict_sha256(self.state_dict())[:32]
        return self._hash

    def preprocess_id(self) -> str:
        return f"resize-bilinear:{self.resolution}|norm:0.5/0.5"

    def text_preprocess_id(self) -> str:
        return f"hashed-words:{self.VOCAB}|max_text_tokens:{self.max_text_tokens}"

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        im = image.convert("RGB").resize((self.resolution, self.resolution), Image.Resampling.BILINEAR)
        return to_normalised_tensor(im, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

    @torch.inference_mode()
    def encode_image(self, pixels: torch.Tensor) -> ImageFeatures:
        x = F.gelu(self.conv1(pixels.to(self.device, torch.float32)))
        x = self.pool(F.gelu(self.conv2(x)))
        tokens = x.flatten(2).transpose(1, 2).contiguous()
        return ImageFeatures(global_=F.normalize(self.image_head(tokens.mean(1)), dim=-1), tokens=tokens)

    def _word_ids(self, text: str) -> list[int]:
        words = _WORD.findall(text.lower())[: self.max_text_tokens]
        return [int.from_bytes(hashlib.blake2b(w.encode(), digest_size=4).digest(), "little") % self.VOCAB + 1 for w in words]

    @torch.inference_mode()
    def encode_text(self, texts: list[str]) -> TextFeatures:
        if isinstance(texts, str):
            raise TypeError("encode_text takes a list of strings")
        ids = [self._word_ids(t) for t in texts]
        L = max(1, max((len(i) for i in ids), default=1))
        mat = torch.zeros(len(ids), L, dtype=torch.long)
        for r, row in enumerate(ids):
            mat[r, : len(row)] = torch.tensor(row, dtype=torch.long)
        mat = mat.to(self.device)
        mask = mat > 0
        tokens = (self.word_emb(mat) + self.pos_emb(torch.arange(L, device=mat.device))) * mask.unsqueeze(-1)
        pooled = tokens.sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        return TextFeatures(global_=F.normalize(self.text_head(pooled), dim=-1), tokens=tokens, mask=mask)


@register_backbone("tiny", options=TinyBackbone)
def create_tiny(**kw: Any) -> TinyBackbone:
    """``tiny`` backbone; ``kw`` are :class:`TinyBackbone`'s options (create_backbone checks them)."""
    return TinyBackbone(**kw)


__all__ = ["TinyBackbone", "create_tiny"]
