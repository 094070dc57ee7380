"""Reusable trainable encoders that sit on top of cached (frozen) backbone features.

Frozen ImageNet global vectors are average-pooled: they lose *where* things are and blur small details. A
:class:`TokenEncoder` re-reads the cached spatial tokens (with learned positions) and pools them with learned
attention queries, optionally after a few transformer blocks, so a method can resolve position and small
attributes without fine-tuning the backbone.
"""

from __future__ import annotations

import torch
from torch import nn

from ..backbones.base import ImageFeatures
from ..options import OptionError


class TokenEncoder(nn.Module):
    """Cached image tokens ``[B, T, Dt]`` (+ global ``[B, Dg]``) -> image vector ``[B, out_dim]``.

    ``tokens -> Linear(width) + learned positions -> layers x transformer block (pre-norm; 0 = none) ->
    attention pooling``: ``queries`` learned query vectors, each offset by a projection of the pooled global
    feature, attend to the tokens (CLIP's attention-pool style, with a residual to the query so the global path is
    always there); the pooled vectors are concatenated and projected to ``out_dim``.

    Cost per image is dominated by ``T x (Dt + 2·width) x width`` (projections) plus ``layers x T x 12·width²``:
    at 64 tokens, ``width=128, layers=0`` is ~3 M multiply-adds, a one-layer ``width=256`` encoder ~50 M.
    """

    def __init__(
        self,
        token_dim: int,
        num_tokens: int,
        out_dim: int,
        global_dim: int = 0,
        width: int = 128,
        layers: int = 0,
        heads: int = 4,
        queries: int = 1,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if width % heads:
            raise OptionError(f"TokenEncoder: width {width} is not divisible by heads {heads}")
        if layers < 0 or queries < 1:
            raise OptionError(f"TokenEncoder: need layers >= 0 and queries >= 1, got {layers}, {queries}")
        self.num_tokens = num_tokens
        self.proj = nn.Linear(token_dim, width)
        self.pos = nn.Parameter(torch.zeros(1, num_tokens, width))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.blocks: nn.Module | None = None
        if layers:
            layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, dropout=dropout,
                                               activation="gelu", batch_first=True, norm_first=True)
            self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.query = nn.Parameter(torch.zeros(1, queries, width))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.global_proj = nn.Linear(global_dim, width) if global_dim else None
        self.norm_kv = nn.LayerNorm(width)
        self.pool = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.norm_out = nn.LayerNorm(width)
        self.head = nn.Linear(queries * width, out_dim)

    def forward(self, feats: ImageFeatures, return_tokens: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The image vector; with ``return_tokens`` also the encoded tokens ``[B, T, width]``."""
        tok = feats.tokens.float()
        if tok.dim() != 3 or tok.shape[1] != self.num_tokens:
            raise ValueError(f"TokenEncoder expects {self.num_tokens} image tokens, got shape {tuple(tok.shape)}")
        x = self.proj(tok) + self.pos
        if self.blocks is not None:
            x = self.blocks(x)
        kv = self.norm_kv(x)
        q = self.query.expand(x.shape[0], -1, -1)
        if self.global_proj is not None:
            q = q + self.global_proj(feats.global_.float())[:, None, :]
        pooled, _ = self.pool(q, kv, kv, need_weights=False)
        out = self.head(self.norm_out(pooled + q).flatten(1))
        if return_tokens:
            return out, x
        return out
