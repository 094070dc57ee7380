"""The backbone protocol every encoder implements.

A backbone encodes images into a global vector plus token (patch/region) features, and texts into a global
vector plus token features with a padding mask. It knows its own preprocessing, dimensions and identity
(``backbone_id``, ``weights_hash``, ``preprocess_id``), which together key the feature cache.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from torch import nn


@dataclass
class ImageFeatures:
    """``global_``: [B, D_img]; ``tokens``: [B, T, D_img_tok] (spatial map flattened row-major)."""

    global_: torch.Tensor
    tokens: torch.Tensor


@dataclass
class TextFeatures:
    """``global_``: [B, D_txt]; ``tokens``: [B, L, D_txt_tok]; ``mask``: [B, L] bool, True on real tokens.

    Optional, for methods that read more than the cached features of the text itself (FineCIR parses the text and
    encodes its entity and attribute words): ``texts``, the raw strings of the rows, and ``encoder``, a function
    that encodes other strings with the same (cached) text encoder. Who builds features from a feature table or a
    backbone sets them; features built by hand may leave them out."""

    global_: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor
    texts: list[str] | None = field(default=None, repr=False, compare=False)
    encoder: Callable[[list[str]], TextFeatures] | None = field(default=None, repr=False, compare=False)


class Backbone(nn.Module, ABC):
    """Base class. Subclasses set the dimension attributes in ``__init__`` and implement the four methods.

    Conventions shared by every implementation: global vectors are L2-normalised; token features are raw
    (un-normalised) hidden states; a backbone is frozen feature extraction (methods own every trainable part).
    ``backbone_id`` is canonical: ``create_backbone(b.backbone_id)`` rebuilds the same backbone.
    """

    backbone_id: str  # e.g. "embedded:precision=bf16", "tiny", "hf-clip:/path/to/dir"
    image_dim: int
    image_token_dim: int
    num_image_tokens: int
    text_dim: int
    text_token_dim: int
    max_text_tokens: int
    # True when image and text global vectors live in one space (CLIP, SigLIP): enables the `sum` baseline.
    aligned: bool = False

    @abstractmethod
    def weights_hash(self) -> str:
        """A stable hash of the weights (sha256 hex prefix); part of every cache key and manifest."""

    @abstractmethod
    def preprocess_id(self) -> str:
        """A string that changes whenever preprocessing changes (resolution, normalisation, ...)."""

    @abstractmethod
    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """PIL RGB image -> float tensor [3, H, W] ready for :meth:`encode_image`."""

    @abstractmethod
    def encode_image(self, pixels: torch.Tensor) -> ImageFeatures:
        """Pixels [B, 3, H, W] (output of :meth:`preprocess`, stacked) -> image features."""

    @abstractmethod
    def encode_text(self, texts: list[str]) -> TextFeatures:
        """Raw strings -> text features, tokens padded to at most ``max_text_tokens``."""

    # --- additive helpers (concrete; subclasses may override) ---

    def text_preprocess_id(self) -> str:
        """A string that changes whenever text preprocessing changes (tokenizer, truncation); keys the text cache."""
        return f"max_text_tokens={self.max_text_tokens}"

    def text_cache_id(self) -> dict[str, str]:
        """What identifies the text encoder in the text cache's key (with :meth:`text_preprocess_id`). Default: the
        whole backbone. Backbones sharing one text encoder return its identity, so they share its cached features."""
        return {"backbone_id": self.backbone_id, "weights_hash": self.weights_hash()}

    @property
    def device(self) -> torch.device:
        """Device of the backbone's parameters (CPU for a parameter-free backbone)."""
        for p in self.parameters():
            return p.device
        for b in self.buffers():
            return b.device
        return torch.device("cpu")

    def to_dict(self) -> dict[str, Any]:
        """What a manifest or checkpoint config records about the backbone."""
        return {
            "backbone_id": self.backbone_id,
            "weights_hash": self.weights_hash(),
            "preprocess_id": self.preprocess_id(),
            "text_preprocess_id": self.text_preprocess_id(),
            "image_dim": self.image_dim,
            "image_token_dim": self.image_token_dim,
            "num_image_tokens": self.num_image_tokens,
            "text_dim": self.text_dim,
            "text_token_dim": self.text_token_dim,
            "max_text_tokens": self.max_text_tokens,
            "aligned": self.aligned,
        }
