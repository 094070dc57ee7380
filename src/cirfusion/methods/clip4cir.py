"""CLIP4CIR: the Combiner of Baldrati et al. ("Conditioned and composed image retrieval combining and partially
fine-tuning CLIP-based features", CVPRW 2022 / TOMM 2023), trained on cached backbone features.

Query side::

    t, i   = norm(P_txt(text)), norm(P_img(ref))                # common space, dim D
    t', i' = dropout(relu(W_t t)), dropout(relu(W_i i))         # "projected"
    c      = cat(t', i')
    mix    = W_out(dropout(relu(W_c c)))                        # "mixed"
    λ      = sigmoid(MLP(c))                                    # learned gate, one scalar per query
    q      = norm(mix + λ·t + (1−λ)·i)

Gallery side: ``g = norm(P_img(img))``.

With an *aligned* backbone (CLIP, SigLIP) and global features, ``P_txt`` and ``P_img`` are the identity: the gallery
is the frozen image embedding and this is exactly the original Combiner. With a *non-aligned* backbone (the
embedded default: MiniLM text, EfficientNet images) text and image vectors live in different spaces, so both get a
learned linear projection to D — and the gallery needs ``P_img`` too. The query's image path shares the gallery's
``P_img`` so the ``(1−λ)·i`` term is a point in the gallery space, which is what makes the gate meaningful (λ→0
falls back to "image-only" retrieval).

``image_encoder="tokens"`` (the default) replaces ``P_img`` by a :class:`~cirfusion.methods.encoders.TokenEncoder`
over the cached spatial tokens (shared by query and gallery); ``"global"`` is the original input. Measured on the
synthetic benchmark (4,000 images, seed 0, coarse texts, embedded backbone, 10 epochs, val split): Rmean 23.6 with
global features vs 31.5 with the token encoder (image-only: 18.7). Linear probes explain it: the pooled EfficientNet
vector predicts the colour / shape / size of the object in a given grid cell at 22 / 30 / 42 % accuracy, the
stride-16 tokens at 65 / 95 / 97 %; an average-pooled vector no longer knows which object is where.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..backbones.base import ImageFeatures, TextFeatures
from .base import Batch, CIRMethod, MethodDims, hparam, l2norm
from .encoders import TokenEncoder
from .registry import register_method


@dataclass
class Clip4CirParams:
    """CLIP4CIR's hyper-parameters."""

    embed_dim: int = hparam(256, "D when a learned projection is used (ignored when P_img/P_txt are the identity)")
    projection_dim: int = hparam(512, "width of W_t / W_i (the paper: 4x the CLIP dim)")
    hidden_dim: int = hparam(1024, "width of W_c and of the gate MLP (the paper: 8x the CLIP dim)")
    dropout: float = hparam(0.5, "dropout of the combiner (as in the paper)")
    image_encoder: Literal["tokens", "global"] = hparam(
        "tokens", "tokens: a TokenEncoder over the cached spatial tokens (measured better); global: a linear P_img on "
        "the pooled vector (the original Combiner's input)")
    project: Literal["auto", "always"] = hparam(
        "auto", "auto: identity projections only for aligned backbones with global features; always: learned")
    token_width: int = hparam(128, "TokenEncoder width (image_encoder=tokens)")
    token_layers: int = hparam(0, "TokenEncoder transformer blocks")
    token_heads: int = hparam(4, "TokenEncoder attention heads")
    token_queries: int = hparam(1, "TokenEncoder pooling queries")
    token_dropout: float = hparam(0.1, "TokenEncoder dropout")
    logit_scale_init: float = hparam(20.0, "initial InfoNCE logit scale (learned)")


@register_method("clip4cir")
class CLIP4CIR(CIRMethod):
    """CLIP4Cir's Combiner: projected text and image features, mixed by an MLP, blended with a learned gate
    lambda*text + (1-lambda)*image. See the module docstring."""

    Params = Clip4CirParams
    params: Clip4CirParams

    def __init__(self, dims: MethodDims, **hparams: object) -> None:
        super().__init__(dims, **hparams)
        h = self.params
        identity = h.project == "auto" and dims.aligned and h.image_encoder == "global" and dims.image_dim == dims.text_dim
        d = dims.image_dim if identity else h.embed_dim
        self.embed_dim = d
        if h.image_encoder == "tokens":
            self.uses_image_tokens = True
            self.image_proj: nn.Module = TokenEncoder(
                dims.image_token_dim,
                dims.num_image_tokens,
                d,
                global_dim=dims.image_dim,
                width=h.token_width,
                layers=h.token_layers,
                heads=h.token_heads,
                queries=h.token_queries,
                dropout=h.token_dropout,
            )
        else:
            self.image_proj = nn.Identity() if identity else nn.Linear(dims.image_dim, d)
        self.text_proj: nn.Module = nn.Identity() if identity else nn.Linear(dims.text_dim, d)

        p, hid, drop = h.projection_dim, h.hidden_dim, h.dropout
        self.text_projection = nn.Sequential(nn.Linear(d, p), nn.ReLU(), nn.Dropout(drop))
        self.image_projection = nn.Sequential(nn.Linear(d, p), nn.ReLU(), nn.Dropout(drop))
        self.combiner = nn.Sequential(nn.Linear(2 * p, hid), nn.ReLU(), nn.Dropout(drop), nn.Linear(hid, d))
        self.gate = nn.Sequential(nn.Linear(2 * p, hid), nn.ReLU(), nn.Dropout(drop), nn.Linear(hid, 1), nn.Sigmoid())
        self.init_logit_scale(h.logit_scale_init)

    def _image(self, img: ImageFeatures) -> torch.Tensor:
        if self.uses_image_tokens:
            return l2norm(self.image_proj(img))
        return l2norm(self.image_proj(img.global_.float()))

    def encode_gallery(self, img: ImageFeatures) -> torch.Tensor:
        return self._image(img)

    def encode_query(self, ref: ImageFeatures, text: TextFeatures) -> torch.Tensor:
        return self.combine(self._image(ref), l2norm(self.text_proj(text.global_.float())))[0]

    def combine(self, i: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Combiner on normalised image and text vectors in the common space -> (query, gate λ)."""
        c = torch.cat([self.text_projection(t), self.image_projection(i)], dim=-1)
        lam = self.gate(c)
        return l2norm(self.combiner(c) + lam * t + (1 - lam) * i), lam.squeeze(-1)

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        i = self._image(batch.ref)
        t = l2norm(self.text_proj(batch.text.global_.float()))
        q, lam = self.combine(i, t)
        g = self._image(batch.target)
        hn = self.hard_negatives(batch)
        loss = self.info_nce(q, g, batch) if hn is None else self.info_nce(q, g, batch, self._image(hn[0]), hn[1])
        return loss, {"loss": float(loss.detach()), "scale": float(self.scale().detach()), "gate": float(lam.mean().detach())}
