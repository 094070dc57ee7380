"""The backbone protocol every encoder implements.

A backbone encodes images into a global vector plus token (patch/region) features, and texts into a global
vector plus token features with a padding mask. It knows its own preprocessing, dimensions and identity
(``backbone_id``, ``weights_hash``, ``preprocess_id``), which together key the feature cache.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

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
    """``global_``: [B, D_txt]; ``tokens``: [B, L, D_txt_tok]; ``mask``: [B, L] bool, True on real tokens."""

    global_: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor


class Backbone(nn.Module, ABC):
    """Base class. Subclasses set the dimension attributes in ``__init__`` and implement the four methods."""

    backbone_id: str  # e.g. "embedded", "tiny", "hf-clip:/path/to/dir"
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
