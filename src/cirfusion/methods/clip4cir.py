"""CLIP4CIR: the Combiner of Baldrati et al. ("Conditioned and composed image retrieval combining and partially
fine-tuning CLIP-based features", CVPRW 2022 / TOMM 2023), trained on cached backbone features.

The original (github.com/ABaldrati/CLIP4Cir) trains in two stages: ``src/clip_fine_tune.py`` (stage 1) fine-tunes
CLIP's encoders with the element-wise sum ``normalize(image + text)`` as the combining function; ``src/combiner_train.py``
(stage 2) freezes that CLIP and trains the ``Combiner`` of ``src/combiner.py``. **cirfusion implements stage 2 only.**
Its backbones are frozen feature extractors whose outputs are cached (methods own every trainable part, see
:mod:`cirfusion.backbones.base`), so there are no encoder weights to fine-tune; a stage-1 CLIP fine-tuned elsewhere
can be loaded as an ``hf-clip:<dir>`` backbone.

Query side (the Combiner, :class:`Combiner`)::

    t, i   = norm(P_txt(text)), norm(P_img(ref))                # common space, dim D
    t', i' = dropout(relu(W_t t)), dropout(relu(W_i i))         # "projected"
    c      = cat(t', i')
    mix    = W_out(dropout(relu(W_c c)))                        # "mixed"
    λ      = sigmoid(MLP(c))                                    # learned gate, one scalar per query
    q      = norm(mix + λ·t + (1−λ)·i)

Gallery side: ``g = norm(P_img(img))``. Loss: cross-entropy over in-batch targets of ``scale · q·gᵀ``.

``image_encoder="auto"`` (the default) picks by backbone. On an *aligned* backbone (``hf-clip``: CLIP, SigLIP;
``hf-blip2``) whose image and text vectors have one size, ``P_txt`` and ``P_img`` are the identity: the gallery is
the frozen image embedding and this is the original Combiner. On a *non-aligned* backbone (the embedded default:
MiniLM text, EfficientNet images) the two live in different spaces, so both get a learned map to D and the gallery
needs ``P_img`` too; there ``P_img`` is a :class:`~cirfusion.methods.encoders.TokenEncoder` over the cached spatial
tokens, shared by query and gallery so the ``(1−λ)·i`` term is a point in the gallery space (λ→0 falls back to
image-only retrieval). ``image_encoder="tokens"`` / ``"global"`` force one input. Measured on the synthetic
benchmark (4,000 images, seed 0, coarse texts, embedded backbone, 10 epochs, val split): Rmean 23.6 with a linear
``P_img`` on the pooled vector vs 31.5 with the token encoder (image-only: 18.7); linear probes show why: the pooled
EfficientNet vector predicts the colour / shape / size of the object in a given grid cell at 22 / 30 / 42 %
accuracy, the stride-16 tokens at 65 / 95 / 97 %.

Fidelity to ABaldrati/CLIP4Cir, point by point:

================================== ========= =============================================================================
point                              follows?  why / how
================================== ========= =============================================================================
Combiner layers (combiner.py):     follows   :class:`Combiner` has the same layers, ReLUs, dropouts (0.5), gate and
W_t, W_i, W_c, W_out, gate MLP               residual ``λ·t + (1−λ)·i``; output L2-normalised.
projection / hidden width          differs   the original uses 4x / 8x the CLIP dim (2560 / 5120 for RN50x4's 640);
                                             here fixed defaults 512 / 1024 (``projection_dim``/``hidden_dim``) sized
                                             for the small cached features and CPU training.
gallery side (combiner_train.py:   follows   on aligned backbones by default (``image_encoder=auto``): the frozen
frozen CLIP image features)        (aligned) image embedding. Non-aligned backbones have no such common space, so
                                             a learned ``P_img`` (token encoder) maps images on both sides.
Combiner inputs                    differs   the original feeds raw (unnormalised) CLIP features; cached globals are
                                             L2-normalised by every cirfusion backbone, so the inputs are normalised.
logit scale: fixed 100             follows   the default since it won on the synthetic val split (below);
(combiner.py, clip_fine_tune.py)             ``logit_scale=learned`` is the CLIP-style learned scale (init 20, clamped
                                             at 100) cirfusion's other methods train with, and this one did before.
loss: CE over in-batch targets     follows   plus: duplicates of a target in the batch are masked out as negatives,
                                             and mined hard negatives are optional (``--hard-negatives``).
optimiser (Adam, lr 2e-5, batch    differs   the shared loop: AdamW, warm-up + cosine, lr 1e-3, batch 128, grad clip
1024, AMP)                                   (the same for every method, so pools are trained alike).
stage 1: fine-tune CLIP with the   missing   cached frozen features have no encoder weights to train (see above).
element-wise sum (clip_fine_tune)
FashionIQ caption randomisation    elsewhere the dataset loaders' text policy, not the method.
================================== ========= =============================================================================

The logit scale was chosen on the synthetic benchmark's val split (the quickstart's data: 2,500 images, val 750
queries; embedded backbone, shared loop defaults), best epoch's Rmean / R@10 / Rsubset@1:

=====================  ========================  ========================
run                    learned (init 20)         fixed 100
=====================  ========================  ========================
4 epochs, seed 0       24.73 / 51.60 / 18.80     27.07 / 53.07 / 22.27
4 epochs, seed 1       24.40 / 51.60 / 17.87     25.73 / 52.93 / 19.47
10 epochs, seed 0      30.07 / 59.33 / 22.00     31.00 / 61.20 / 22.67
=====================  ========================  ========================
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..backbones.base import ImageFeatures, TextFeatures
from .base import Batch, CIRMethod, HyperParameterError, MethodDims, hparam, l2norm
from .encoders import TokenEncoder
from .registry import register_method


def _add_combiner_layers(module: "Combiner | CLIP4CIR", feature_dim: int, projection_dim: int, hidden_dim: int,
                         dropout: float) -> None:
    """The Combiner's layers as attributes of ``module``: :class:`Combiner` and :class:`CLIP4CIR` both hold them
    under these names, so CLIP4CIR checkpoints keep the parameter names they have always had."""
    p, hid, drop = projection_dim, hidden_dim, dropout
    module.text_projection = nn.Sequential(nn.Linear(feature_dim, p), nn.ReLU(), nn.Dropout(drop))
    module.image_projection = nn.Sequential(nn.Linear(feature_dim, p), nn.ReLU(), nn.Dropout(drop))
    module.combiner = nn.Sequential(nn.Linear(2 * p, hid), nn.ReLU(), nn.Dropout(drop), nn.Linear(hid, feature_dim))
    module.gate = nn.Sequential(nn.Linear(2 * p, hid), nn.ReLU(), nn.Dropout(drop), nn.Linear(hid, 1), nn.Sigmoid())


def _combine(module: "Combiner | CLIP4CIR", image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    c = torch.cat([module.text_projection(text), module.image_projection(image)], dim=-1)
    lam = module.gate(c)
    return l2norm(module.combiner(c) + lam * text + (1 - lam) * image), lam.squeeze(-1)


class Combiner(nn.Module):
    """CLIP4Cir's Combiner (``src/combiner.py``): ``(image [.., F], text [.., F]) -> (query [.., F], λ [..])``.

    ``feature_dim`` is the size of the (common-space) image and text vectors, ``projection_dim`` / ``hidden_dim``
    the widths of the projections and of the mixer and gate MLPs, ``dropout`` that of every dropout (0.5 as in
    the original). The query is ``norm(mix + λ·text + (1−λ)·image)``; :meth:`combine_features` returns it alone,
    as the original's method of that name does."""

    text_projection: nn.Sequential
    image_projection: nn.Sequential
    combiner: nn.Sequential
    gate: nn.Sequential

    def __init__(self, feature_dim: int, projection_dim: int, hidden_dim: int, dropout: float = 0.5) -> None:
        super().__init__()
        if min(feature_dim, projection_dim, hidden_dim) < 1 or not 0.0 <= dropout < 1.0:
            raise HyperParameterError(f"Combiner: dims must be >= 1 and 0 <= dropout < 1, got feature_dim={feature_dim}, "
                                      f"projection_dim={projection_dim}, hidden_dim={hidden_dim}, dropout={dropout}")
        self.feature_dim = feature_dim
        _add_combiner_layers(self, feature_dim, projection_dim, hidden_dim, dropout)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _combine(self, image, text)

    def combine_features(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return _combine(self, image, text)[0]


@dataclass
class Clip4CirParams:
    """CLIP4CIR's hyper-parameters."""

    embed_dim: int = hparam(256, "D when a learned projection is used (ignored when P_img/P_txt are the identity)")
    projection_dim: int = hparam(512, "width of W_t / W_i (the paper: 4x the CLIP dim)")
    hidden_dim: int = hparam(1024, "width of W_c and of the gate MLP (the paper: 8x the CLIP dim)")
    dropout: float = hparam(0.5, "dropout of the combiner (as in the paper)")
    image_encoder: Literal["auto", "tokens", "global"] = hparam(
        "auto", "auto: global on an aligned backbone whose image and text vectors have one size (the gallery is then "
        "the frozen image embedding, as in the original), else tokens; tokens: a TokenEncoder over the cached spatial "
        "tokens (measured better on non-aligned backbones); global: the pooled vector")
    project: Literal["auto", "always"] = hparam(
        "auto", "auto: identity projections only for aligned backbones with global features; always: learned")
    token_width: int = hparam(128, "TokenEncoder width (image_encoder=tokens)")
    token_layers: int = hparam(0, "TokenEncoder transformer blocks")
    token_heads: int = hparam(4, "TokenEncoder attention heads")
    token_queries: int = hparam(1, "TokenEncoder pooling queries")
    token_dropout: float = hparam(0.1, "TokenEncoder dropout")
    logit_scale_init: float = hparam(20.0, "initial InfoNCE logit scale (logit_scale=learned)")
    logit_scale: Literal["learned", "fixed"] = hparam(
        "fixed", "fixed: a constant, fixed_scale, as the original (chosen on synthetic val; kept as a buffer under the "
        "learned scale's name, so a checkpoint of either mode loads into the other); learned: a CLIP-style learned scale "
        "from logit_scale_init, clamped at 100 (the default before issue 9)")
    fixed_scale: float = hparam(100.0, "the logit scale when logit_scale=fixed (the original: 100)")


@register_method("clip4cir")
class CLIP4CIR(CIRMethod):
    """CLIP4Cir's stage 2 (the Combiner over frozen features; stage 1, fine-tuning the encoders with an element-wise
    sum, is not implemented as cirfusion's backbones are frozen and cached): projected text and image features,
    mixed by an MLP, blended with a learned gate lambda*text + (1-lambda)*image. See the module docstring."""

    Params = Clip4CirParams
    params: Clip4CirParams
    text_projection: nn.Sequential
    image_projection: nn.Sequential
    combiner: nn.Sequential
    gate: nn.Sequential

    def __init__(self, dims: MethodDims, **hparams: object) -> None:
        super().__init__(dims, **hparams)
        h = self.params
        if h.logit_scale == "fixed" and not h.fixed_scale > 0:
            raise HyperParameterError(f"{self.method_name}: fixed_scale must be > 0, got {h.fixed_scale}")
        same_space = dims.aligned and dims.image_dim == dims.text_dim
        encoder = h.image_encoder if h.image_encoder != "auto" else ("global" if same_space else "tokens")
        self.image_encoder = encoder
        identity = h.project == "auto" and same_space and encoder == "global"
        d = dims.image_dim if identity else h.embed_dim
        self.embed_dim = d
        if encoder == "tokens":
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
        _add_combiner_layers(self, d, h.projection_dim, h.hidden_dim, h.dropout)
        if h.logit_scale == "learned":
            self.init_logit_scale(h.logit_scale_init)
        else:  # a constant under the learned scale's name: checkpoints of both modes have one layout
            self.register_buffer("logit_scale", torch.tensor(math.log(h.fixed_scale)))
            self._max_log_scale = math.log(max(100.0, h.fixed_scale))

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
        return _combine(self, i, t)

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        i = self._image(batch.ref)
        t = l2norm(self.text_proj(batch.text.global_.float()))
        q, lam = self.combine(i, t)
        g = self._image(batch.target)
        hn = self.hard_negatives(batch)
        loss = self.info_nce(q, g, batch) if hn is None else self.info_nce(q, g, batch, self._image(hn[0]), hn[1])
        return loss, {"loss": float(loss.detach()), "scale": float(self.scale().detach()), "gate": float(lam.mean().detach())}

