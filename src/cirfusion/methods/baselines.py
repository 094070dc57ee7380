"""The two baselines every results table needs. Neither has parameters: "training" only writes the checkpoint."""

from __future__ import annotations

import torch

from ..backbones.base import ImageFeatures, TextFeatures
from .base import CIRMethod, HyperParameterError, MethodDims, l2norm
from .registry import register_method


@register_method("image-only")
class ImageOnly(CIRMethod):
    """Rank the gallery by similarity to the reference image, ignoring the text (the lower bound: a method that
    does not beat it is not using the modification)."""

    trainable = False

    def encode_query(self, ref: ImageFeatures, text: TextFeatures) -> torch.Tensor:
        return l2norm(ref.global_.float())

    def encode_gallery(self, img: ImageFeatures) -> torch.Tensor:
        return l2norm(img.global_.float())


@register_method("sum")
class Sum(CIRMethod):
    """Zero-shot composition: normalised image embedding + normalised text embedding (Baldrati et al.'s "image +
    text" baseline). Only meaningful when image and text vectors share one space (CLIP/SigLIP)."""

    trainable = False

    def __init__(self, dims: MethodDims, **hparams: object) -> None:
        super().__init__(dims, **hparams)
        if not dims.aligned:
            raise HyperParameterError(
                f"method 'sum' needs a backbone whose image and text embeddings are aligned (CLIP/SigLIP); "
                f"backbone {dims.backbone_id or '<unknown>'!r} is not (aligned=False): adding its image and text "
                f"vectors is meaningless. Use a trained method such as 'clip4cir' instead."
            )
        if dims.image_dim != dims.text_dim:
            raise HyperParameterError(f"method 'sum': image dim {dims.image_dim} != text dim {dims.text_dim}")

    def encode_query(self, ref: ImageFeatures, text: TextFeatures) -> torch.Tensor:
        return l2norm(l2norm(ref.global_.float()) + l2norm(text.global_.float()))

    def encode_gallery(self, img: ImageFeatures) -> torch.Tensor:
        return l2norm(img.global_.float())
