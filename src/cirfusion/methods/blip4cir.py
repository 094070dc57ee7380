"""BLIP4CIR (+Bi): a text encoder conditioned on the reference image (Liu et al., "Bi-directional Training for
Composed Image Retrieval via Text Prompt Learning", WACV 2024), trained on cached backbone features.

BLIP's image-grounded text encoder reads the modification text with cross-attention to the reference image's
patch tokens; its [CLS] output is the composed query. At our scale the frozen backbone's text tokens play the
word embeddings and a small pre-norm transformer decoder plays the BLIP text encoder::

    img        = TokenEncoder(image tokens)            -> gallery vector (D) and encoded tokens [T, W]
    memory     = [W_g(image global); encoded tokens]    (what the text cross-attends to)
    seq        = [CLS + W_s(text global); (MARKER); W_t(text tokens) + positions]
    seq        = layers x (self-attention over seq -> cross-attention to memory -> MLP)
    q          = norm(head(LN(seq[CLS])))               the text-side pooled output
    gallery    = norm(TokenEncoder(img))                the same encoder the query's image path uses

**Bi** (``bi_weight > 0``, registered as ``blip4cir-bi`` with 0.3): BLIP4CIR+Bi also trains the *reversed* query:
the TARGET image's tokens as memory and a learned reversed-direction marker token prepended to the same text
(``[CLS; MARKER; text]``) must retrieve the REFERENCE among the batch's references. Its InfoNCE is added with weight
``bi_weight``; the marker is only used in training, so inference is the plain forward query. The paper reports the
reversed loss helps most with a weight well below the forward loss; 0.3 is our default (0.1-0.5 all train).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.base import ImageFeatures, TextFeatures
from .base import Batch, CIRMethod, HyperParameterError, MethodDims, hparam, l2norm, trim_text_padding
from .encoders import TokenEncoder
from .registry import register_method


def _check_tokens(dims: MethodDims, name: str) -> None:
    if dims.num_image_tokens < 1 or dims.max_text_tokens < 1:
        raise HyperParameterError(
            f"method {name!r} cross-attends from text tokens to image tokens; backbone "
            f"{dims.backbone_id or '<unknown>'!r} has {dims.num_image_tokens} image and {dims.max_text_tokens} text tokens"
        )


@dataclass
class Blip4CirParams:
    """BLIP4CIR's hyper-parameters."""

    embed_dim: int = hparam(256, "D of the query and gallery vectors")
    width: int = hparam(128, "transformer width (text encoder and token encoder)")
    layers: int = hparam(2, "text-encoder layers (self-attention + cross-attention + MLP each)")
    heads: int = hparam(4, "attention heads")
    dropout: float = hparam(0.1, "dropout")
    token_layers: int = hparam(0, "TokenEncoder blocks over the image tokens (shared by query memory and gallery)")
    token_queries: int = hparam(1, "TokenEncoder pooling queries")
    bi_weight: float = hparam(0.0, "weight of the reversed (target + marker + text -> reference) InfoNCE; 0 = off")
    logit_scale_init: float = hparam(20.0, "initial InfoNCE logit scale (learned)")


@dataclass
class Blip4CirBiParams(Blip4CirParams):
    """BLIP4CIR+Bi's hyper-parameters: BLIP4CIR's, with the reversed loss on."""

    bi_weight: float = hparam(0.3, "weight of the reversed (target + marker + text -> reference) InfoNCE; 0 = off")


@register_method("blip4cir")
class BLIP4CIR(CIRMethod):
    """BLIP4CIR: text tokens cross-attend to the reference image's tokens; the [CLS] output is the query. See the
    module docstring (``bi_weight`` > 0 adds the reversed target -> reference query)."""

    Params = Blip4CirParams
    params: Blip4CirParams

    def __init__(self, dims: MethodDims, **hparams: object) -> None:
        super().__init__(dims, **hparams)
        h = self.params
        _check_tokens(dims, self.method_name)
        if h.bi_weight < 0:
            raise HyperParameterError(f"{self.method_name}: bi_weight must be >= 0, got {h.bi_weight}")
        self.uses_image_tokens = self.uses_text_tokens = True
        d, w, heads, drop = h.embed_dim, h.width, h.heads, h.dropout
        self.embed_dim = d
        self.image_enc = TokenEncoder(dims.image_token_dim, dims.num_image_tokens, d, global_dim=dims.image_dim,
                                      width=w, layers=h.token_layers, heads=heads,
                                      queries=h.token_queries, dropout=drop)
        self.image_global_in = nn.Linear(dims.image_dim, w)  # the pooled image as one more memory token
        self.text_in = nn.Linear(dims.text_token_dim, w)
        self.text_global_in = nn.Linear(dims.text_dim, w)  # seeds [CLS] with the sentence vector
        self.text_pos = nn.Parameter(torch.zeros(1, dims.max_text_tokens, w))
        self.cls = nn.Parameter(torch.zeros(1, 1, w))
        for p in (self.text_pos, self.cls):
            nn.init.trunc_normal_(p, std=0.02)
        # Only built when the reversed direction trains: an unused parameter would just decay.
        self.marker: nn.Parameter | None = None
        if h.bi_weight > 0:
            self.marker = nn.Parameter(torch.zeros(1, 1, w))
            nn.init.trunc_normal_(self.marker, std=0.02)
        self.layers = nn.ModuleList(
            nn.TransformerDecoderLayer(w, heads, dim_feedforward=4 * w, dropout=drop, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(h.layers)
        )
        self.norm = nn.LayerNorm(w)
        self.head = nn.Linear(w, d)
        self.init_logit_scale(h.logit_scale_init)

    # ---- pieces -------------------------------------------------------------------------------------------------
    def image(self, img: ImageFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised gallery vector [B, D], cross-attention memory [B, 1+T, W]) from one TokenEncoder pass."""
        vec, tokens = self.image_enc(img, return_tokens=True)
        memory = torch.cat([self.image_global_in(img.global_.float())[:, None], tokens], dim=1)
        return l2norm(vec), memory

    def text_encoder(self, memory: torch.Tensor, text: TextFeatures, reverse: bool = False) -> torch.Tensor:
        """The image-grounded text encoder: normalised [CLS] output [B, D]. ``reverse`` prepends the marker."""
        text = trim_text_padding(text)
        tok = text.tokens.float()
        b, length = tok.shape[0], tok.shape[1]
        if length > self.dims.max_text_tokens:
            raise ValueError(f"{self.method_name}: {length} text tokens, the backbone gives at most {self.dims.max_text_tokens}")
        cls = self.cls.expand(b, -1, -1) + self.text_global_in(text.global_.float())[:, None]
        parts, pad = [cls], [torch.zeros(b, 1, dtype=torch.bool, device=tok.device)]
        if reverse:
            if self.marker is None:
                raise ValueError(f"{self.method_name}: the reversed query needs bi_weight > 0 (no marker token was built)")
            parts.append(self.marker.expand(b, -1, -1))
            pad.append(pad[0])
        parts.append(self.text_in(tok) + self.text_pos[:, :length])
        pad.append(~text.mask.bool())
        x, key_pad = torch.cat(parts, dim=1), torch.cat(pad, dim=1)  # [CLS] is never padding: no empty rows
        for layer in self.layers:
            x = layer(x, memory, tgt_key_padding_mask=key_pad)
        return l2norm(self.head(self.norm(x[:, 0])))

    # ---- the contract -------------------------------------------------------------------------------------------
    def encode_gallery(self, img: ImageFeatures) -> torch.Tensor:
        return self.image(img)[0]

    def encode_query(self, ref: ImageFeatures, text: TextFeatures) -> torch.Tensor:
        return self.text_encoder(self.image(ref)[1], text)

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        ref_vec, ref_mem = self.image(batch.ref)
        tgt_vec, tgt_mem = self.image(batch.target)
        q = self.text_encoder(ref_mem, batch.text)
        hn = self.hard_negatives(batch)  # mined negatives join the forward direction's gallery columns
        forward = self.info_nce(q, tgt_vec, batch) if hn is None else self.info_nce(q, tgt_vec, batch, self.image(hn[0])[0], hn[1])
        logs = {"loss_forward": float(forward.detach())}
        loss = forward
        bi = self.params.bi_weight
        if bi > 0:
            reverse = self.reverse_info_nce(self.text_encoder(tgt_mem, batch.text, reverse=True), ref_vec, batch)
            loss = loss + bi * reverse
            logs["loss_reverse"] = float(reverse.detach())
        logs.update(loss=float(loss.detach()), scale=float(self.scale().detach()))
        return loss, logs

    def reverse_info_nce(self, q: torch.Tensor, refs: torch.Tensor, batch: Batch) -> torch.Tensor:
        """InfoNCE of reversed queries against the batch's references; a column holding the same reference image
        as row i (a duplicate) is not a negative."""
        logits = self.similarity(q, refs) * self.scale()
        rows = batch.ref_rows.to(logits.device)
        same = rows[:, None] == rows[None, :]
        same.fill_diagonal_(False)
        logits = logits.masked_fill(same, float("-inf"))
        return F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device))


@register_method("blip4cir-bi")
class BLIP4CIRBi(BLIP4CIR):
    """BLIP4CIR+Bi: BLIP4CIR plus the reversed (target + marker + text -> reference) query as an auxiliary loss
    (the variant DAFM's base pool uses)."""

    Params = Blip4CirBiParams
    params: Blip4CirBiParams
