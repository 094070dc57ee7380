"""DetailFusion (arXiv 2505.17796): a global branch and a detail branch over one backbone, fused per query by an
adaptive compositor, trained in three stages -- on cached backbone features.

The paper, point by point, and what this implementation does:

- **Two branches over the same backbone** (the paper's): *Global Feature Matching* (GM) for holistic semantics and
  *Detail-oriented Inference* (DI) for the fine modification. On ``hf-blip2`` both read the Q-Former outputs (the
  backbone's default image tokens), as in the paper; on the other backbones they read that backbone's tokens.
- **GM internals** (the paper leaves them open; ours): the pool's CLIP4CIR Combiner, reused as a sub-module (its
  token encoder, combiner, gate and InfoNCE loss; hyper-parameters ``gm_*``). Query and gallery are one vector each.
- **DI internals** (open in the paper; ours, chosen on validation, see docs/detailfusion.md): the reference's cell
  tokens (learned positions) attend to the text tokens (``di_layers`` blocks: cross-attention from every cell to
  ``[text global; text tokens]`` then an MLP; ``di_self_attention`` adds attention among the cells) and predict the
  *target's token map*
  as the reference's map plus a predicted change (the change head starts at zero, so an untrained DI returns the
  reference). A gallery image is the same position-aware projection of its own tokens (a per-cell MLP whose input
  carries the cell's learned position). Both maps are flattened and L2-normalised, so the DI score is one cosine
  between two ``T x di_cell_dim`` vectors: cell p of the prediction is matched against cell p of the candidate, and
  the branch stays a single-vector (faiss-indexable) model.
- **L_DI** (the paper names the reference as hard negative but gives no formula; ours): InfoNCE of the predicted map
  over the in-batch targets plus one extra column per query: its *own reference image* (``ref_negative``; off = the
  "no reference negative" ablation, in which a query's own reference is masked out of every column, mined ones
  included, since negatives mined from a subset would otherwise bring it back). Negatives mined by the training loop (``--hard-negatives k``, from the
  reference's neighbours or, with ``--hard-negative-source subset``, from the annotated subset) are further columns:
  that is the "mined negatives" option.
- **Three stages** (the paper's), on the shared loop's stage mechanism (``--stage-epochs STAGE=N``; resume works
  across stages):

  1. ``di-pretrain``: DI alone on image-editing pairs (one atomic edit per pair), split ``pretrain_split``
     (``edit_pairs``: the synthetic benchmark's atomic edits, an InstructPix2Pix folder through
     :mod:`cirfusion.data.ip2p`, the catalog's photo edits); ``none`` skips it (the "no pre-training" ablation);
  2. ``joint``: GM and DI together with ``L_DI + gamma * L_GM`` (the paper suggests gamma = 2 on CIRR; ours is chosen
     on validation);
  3. ``compositor``: both branches frozen, the AFC trained from scratch on the fused score.
- **AFC** (the paper: cross-attention plus an MLP predicting per-query mixing coefficients; inputs ours): a learned
  query attends over ``[GM query vector; DI predicted cell tokens; text global; text tokens]`` (with type
  embeddings), an MLP reads the attended vector beside the pooled inputs and gives three numbers: ``alpha`` =
  softmax of the first two (GM, DI; a point of the simplex per query) and a per-query temperature ``t = exp(third)``
  that only the training loss uses (scaling all of a query's scores does not change its ranking). The last layer
  starts at zero: an untrained AFC is static fusion (alpha = 0.5 each, t = 1).
- **Fused score** (the paper: alpha_GM * s_GM + alpha_DI * s_DI): each branch's *logit* (its cosine times its own
  learned InfoNCE scale tau, so the two are on the scales their losses calibrated) mixed by alpha. As one embedding:
  ``q = [alpha_GM tau_GM q_GM, alpha_DI tau_DI q_DI]``, ``g = [g_GM, g_DI]``, ``<q, g>`` is the fused score, so the
  fused model is a single-vector, inner-product model that faiss can index. Stage 3's loss is InfoNCE over
  ``t * <q, g>`` with the same in-batch and hard-negative columns as L_DI.
- **Explanation**: :meth:`DetailFusion.explain` gives alpha per query (recovered from the query embedding: the norm of
  each half over its branch's tau), as DAFM's ``explain`` gives its per-query model weights.

Ablation switches (hyper-parameters, recorded in the checkpoint): ``branches`` (``both``, or one branch trained
alone), ``fusion`` (``adaptive`` or ``static`` alpha = 0.5, no stage 3). :meth:`DetailFusion.use_output` scores a
trained model through one branch or with static fusion, for analysis (not saved).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.base import ImageFeatures, TextFeatures
from .base import Batch, CIRMethod, HyperParameterError, MethodDims, Stage, hparam, join_negatives, l2norm, trim_text_padding
from .clip4cir import CLIP4CIR
from .registry import register_method

OUTPUTS = ("fused", "static", "gm", "di")


@dataclass
class DetailFusionParams:
    """DetailFusion's hyper-parameters."""

    branches: Literal["both", "gm", "di"] = hparam("both", "both: GM + DI + compositor; gm / di: one branch trained alone")
    fusion: Literal["adaptive", "static"] = hparam("adaptive", "adaptive: the AFC's per-query alpha (stage 3); static: 0.5 each")
    pretrain_split: str = hparam("edit_pairs", "split of image-editing pairs DI pre-trains on (stage 1); 'none' skips stage 1")
    ref_negative: bool = hparam(True, "L_DI: the query's own reference image as an explicit hard negative")
    gamma: float = hparam(1.0, "stage 2 loss: L_DI + gamma * L_GM")
    di_width: int = hparam(64, "DI width")
    di_layers: int = hparam(2, "DI blocks (cross-attention from the cells to the text, MLP)")
    di_self_attention: bool = hparam(False, "DI blocks also attend among the cells (about 2x the cost)")
    di_heads: int = hparam(4, "DI attention heads")
    di_cell_dim: int = hparam(16, "dimension of each cell of the predicted / projected token map")
    di_dropout: float = hparam(0.1, "DI dropout")
    gm_embed_dim: int = hparam(256, "GM (CLIP4CIR) embedding dimension")
    gm_projection_dim: int = hparam(512, "GM (CLIP4CIR) projection width")
    gm_hidden_dim: int = hparam(1024, "GM (CLIP4CIR) combiner / gate width")
    gm_dropout: float = hparam(0.5, "GM (CLIP4CIR) dropout")
    afc_width: int = hparam(64, "AFC attention width")
    afc_hidden: int = hparam(64, "AFC MLP width")
    afc_heads: int = hparam(4, "AFC attention heads")
    logit_scale_init: float = hparam(20.0, "initial InfoNCE logit scale of each branch (learned)")


class CellBlock(nn.Module):
    """One DI block over the reference's cells: (optional) self-attention among cells, cross-attention from every
    cell to the text, then a small MLP; pre-norm residuals. Cross-attention alone lets a cell find the words about
    it (most references name the object's attributes); self-attention adds what other cells hold (relations,
    moves) at about 2x the cost."""

    def __init__(self, width: int, heads: int, dropout: float, self_attention: bool) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True) if self_attention else None
        self.norm_s = nn.LayerNorm(width) if self_attention else None
        self.norm_q, self.norm_kv, self.norm_m = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.cross = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * width, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mem: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        if self.self_attn is not None and self.norm_s is not None:
            y = self.norm_s(x)
            x = x + self.drop(self.self_attn(y, y, y, need_weights=False)[0])
        kv = self.norm_kv(mem)
        x = x + self.drop(self.cross(self.norm_q(x), kv, kv, key_padding_mask=pad, need_weights=False)[0])
        return x + self.drop(self.mlp(self.norm_m(x)))


class DetailBranch(CIRMethod):
    """The DI branch (not registered on its own): predicted target token map vs position-aware target tokens. A
    ``CIRMethod`` so that it has its own logit scale and the shared InfoNCE / batch-logit code."""

    Params = DetailFusionParams
    params: DetailFusionParams

    def __init__(self, dims: MethodDims, **hparams: Any) -> None:
        super().__init__(dims, **hparams)
        h = self.params
        t, w, e = dims.num_image_tokens, h.di_width, h.di_cell_dim
        self.uses_image_tokens = self.uses_text_tokens = True
        self.tok_in = nn.Linear(dims.image_token_dim, w)
        self.pos = nn.Parameter(torch.zeros(1, t, w))
        self.cell_norm = nn.LayerNorm(w)
        self.cell_out = nn.Sequential(nn.Linear(w, w), nn.GELU(), nn.Linear(w, e))
        self.text_global_in = nn.Linear(dims.text_dim, w)
        self.text_in = nn.Linear(dims.text_token_dim, w) if dims.max_text_tokens > 0 else None
        self.text_pos = nn.Parameter(torch.zeros(1, max(1, dims.max_text_tokens), w))
        for p in (self.pos, self.text_pos):
            nn.init.trunc_normal_(p, std=0.02)
        self.blocks = nn.ModuleList(CellBlock(w, h.di_heads, h.di_dropout, h.di_self_attention) for _ in range(h.di_layers))
        self.delta_norm = nn.LayerNorm(w)
        self.delta = nn.Linear(w, e)
        nn.init.zeros_(self.delta.weight)  # an untrained DI predicts the reference's own map
        nn.init.zeros_(self.delta.bias)
        self.init_logit_scale(h.logit_scale_init)

    def _tokens(self, img: ImageFeatures) -> torch.Tensor:
        tok = img.tokens.float()
        if tok.dim() != 3 or tok.shape[1] != self.dims.num_image_tokens:
            raise ValueError(f"detailfusion expects {self.dims.num_image_tokens} image tokens, got shape {tuple(tok.shape)}")
        return self.tok_in(tok) + self.pos

    def _cells(self, x: torch.Tensor) -> torch.Tensor:
        """Position-aware per-cell projection ``[B, T, w] -> [B, T, e]`` (the input already carries the positions)."""
        return self.cell_out(self.cell_norm(x))

    def memory(self, text: TextFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        """``([text global; text tokens] [B, 1+L, w], padding mask [B, 1+L], True = ignore)``."""
        g = self.text_global_in(text.global_.float())[:, None]
        b = g.shape[0]
        if self.text_in is None or text.tokens.numel() == 0:
            return g, torch.zeros(b, 1, dtype=torch.bool, device=g.device)
        text = trim_text_padding(text)
        tok = text.tokens.float()
        length = tok.shape[1]
        mem = torch.cat([g, self.text_in(tok) + self.text_pos[:, :length]], dim=1)
        pad = torch.cat([torch.zeros(b, 1, dtype=torch.bool, device=g.device), ~text.mask.bool()], dim=1)
        return mem, pad

    def predict_map(self, ref: ImageFeatures, text: TextFeatures) -> torch.Tensor:
        """The predicted target token map ``[B, T, e]``: the reference's map plus the change the text asks for."""
        x = self._tokens(ref)
        mem, pad = self.memory(text)
        y = x
        for block in self.blocks:
            y = block(y, mem, pad)
        return self._cells(x) + self.delta(self.delta_norm(y))

    def encode_query(self, ref: ImageFeatures, text: TextFeatures) -> torch.Tensor:
        return l2norm(self.predict_map(ref, text).flatten(1))

    def encode_gallery(self, img: ImageFeatures) -> torch.Tensor:
        return l2norm(self._cells(self._tokens(img)).flatten(1))


class Compositor(nn.Module):
    """The AFC: a learned query attends over the branch features and the text; an MLP gives alpha (softmax over
    GM, DI) and a per-query training temperature. The last layer starts at zero (alpha = 0.5, t = 1)."""

    def __init__(self, gm_dim: int, cell_dim: int, dims: MethodDims, width: int, hidden: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise HyperParameterError(f"detailfusion: afc_width {width} is not divisible by afc_heads {heads}")
        self.gm_in = nn.Linear(gm_dim, width)
        self.di_in = nn.Linear(cell_dim, width)
        self.text_global_in = nn.Linear(dims.text_dim, width)
        self.text_in = nn.Linear(dims.text_token_dim, width) if dims.max_text_tokens > 0 else None
        self.kind = nn.Parameter(torch.zeros(4, width))  # type embeddings: GM, DI cell, text global, text token
        self.query = nn.Parameter(torch.zeros(1, 1, width))
        for p in (self.kind, self.query):
            nn.init.trunc_normal_(p, std=0.02)
        self.norm = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.LayerNorm(4 * width), nn.Linear(4 * width, hidden), nn.GELU(), nn.Linear(hidden, 3))
        last = self.mlp[-1]
        assert isinstance(last, nn.Linear)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, q_gm: torch.Tensor, di_map: torch.Tensor, text: TextFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        gm = self.gm_in(q_gm)[:, None] + self.kind[0]
        di = self.di_in(di_map) + self.kind[1]
        tg = self.text_global_in(text.global_.float())[:, None] + self.kind[2]
        parts, b = [gm, di, tg], q_gm.shape[0]
        pads = [torch.zeros(b, 2 + di.shape[1], dtype=torch.bool, device=q_gm.device)]
        if self.text_in is not None and text.tokens.numel():
            text = trim_text_padding(text)
            parts.append(self.text_in(text.tokens.float()) + self.kind[3])
            pads.append(~text.mask.bool())
        seq = self.norm(torch.cat(parts, dim=1))
        att, _ = self.attn(self.query.expand(b, -1, -1), seq, seq, key_padding_mask=torch.cat(pads, dim=1), need_weights=False)
        z = self.mlp(torch.cat([att[:, 0], gm[:, 0], di.mean(dim=1), tg[:, 0]], dim=-1))
        return torch.softmax(z[:, :2], dim=-1), z[:, 2].clamp(-4.0, 4.0).exp()


@register_method("detailfusion")
class DetailFusion(CIRMethod):
    """DetailFusion: a global (GM) and a detail (DI) branch fused per query by an adaptive compositor (AFC), trained
    in three stages (DI pre-training on edit pairs with the reference as hard negative; L_DI + gamma * L_GM; the AFC
    with both branches frozen). See the module docstring."""

    Params = DetailFusionParams
    params: DetailFusionParams

    def __init__(self, dims: MethodDims, **hparams: Any) -> None:
        super().__init__(dims, **hparams)
        h = self.params
        if dims.num_image_tokens < 1:
            raise HyperParameterError(f"method {self.method_name!r} needs image tokens; backbone "
                                      f"{dims.backbone_id or '<unknown>'!r} has none")
        for name in ("gamma", "di_dropout", "gm_dropout"):
            if getattr(h, name) < 0:
                raise HyperParameterError(f"detailfusion: {name} must be >= 0, got {getattr(h, name)}")
        if h.di_width % h.di_heads:
            raise HyperParameterError(f"detailfusion: di_width {h.di_width} is not divisible by di_heads {h.di_heads}")
        if min(h.di_layers, h.di_cell_dim, h.gm_embed_dim) < 1:
            raise HyperParameterError("detailfusion: di_layers, di_cell_dim and gm_embed_dim must be >= 1")
        if not h.pretrain_split:
            raise HyperParameterError("detailfusion: pretrain_split must name a split, or be 'none'")
        self.uses_image_tokens = self.uses_text_tokens = True
        self.gm = CLIP4CIR(dims, embed_dim=h.gm_embed_dim, projection_dim=h.gm_projection_dim, hidden_dim=h.gm_hidden_dim,
                           dropout=h.gm_dropout, image_encoder="tokens", project="always",
                           logit_scale_init=h.logit_scale_init)
        self.di = DetailBranch(dims, **self.hparams)
        self.afc = Compositor(h.gm_embed_dim, h.di_cell_dim, dims, h.afc_width, h.afc_hidden, h.afc_heads)
        self.output: str = {"gm": "gm", "di": "di"}.get(h.branches, "static" if h.fusion == "static" else "fused")

    # ---- analysis switch ------------------------------------------------------------------------------------------
    def use_output(self, output: str) -> "DetailFusion":
        """Score through ``fused`` (the AFC's alpha), ``static`` (alpha = 0.5), or one branch (``gm``, ``di``).
        For analysis of a trained model; not saved with it."""
        if output not in OUTPUTS:
            raise HyperParameterError(f"detailfusion: output must be one of {OUTPUTS}, got {output!r}")
        self.output = output
        return self

    # ---- the contract -------------------------------------------------------------------------------------------
    def scale(self) -> torch.Tensor:
        # The fused embedding already carries each branch's tau (and, in training, the AFC's temperature).
        return torch.tensor(1.0)

    def branch_queries(self, ref: ImageFeatures, text: TextFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        """``(q_GM [B, Dg], predicted DI map [B, T, e])``."""
        return self.gm.encode_query(ref, text), self.di.predict_map(ref, text)

    def alphas(self, q_gm: torch.Tensor, di_map: torch.Tensor, text: TextFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha [B, 2] over (GM, DI), training temperature [B])`` for the current output mode."""
        if self.output == "fused":
            return self.afc(q_gm, di_map, text)
        b = q_gm.shape[0]
        fixed = {"static": (0.5, 0.5), "gm": (1.0, 0.0), "di": (0.0, 1.0)}[self.output]
        return q_gm.new_tensor(fixed).expand(b, 2), q_gm.new_ones(b)

    def _fused(self, q_gm: torch.Tensor, di_map: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        q_di = l2norm(di_map.flatten(1))
        return torch.cat([alpha[:, :1] * self.gm.scale() * q_gm, alpha[:, 1:] * self.di.scale() * q_di], dim=1)

    def encode_query(self, ref: ImageFeatures, text: TextFeatures) -> torch.Tensor:
        if self.output == "gm":
            return self.gm.encode_query(ref, text)
        if self.output == "di":
            return self.di.encode_query(ref, text)
        q_gm, di_map = self.branch_queries(ref, text)
        return self._fused(q_gm, di_map, self.alphas(q_gm, di_map, text)[0])

    def encode_gallery(self, img: ImageFeatures) -> torch.Tensor:
        if self.output == "gm":
            return self.gm.encode_gallery(img)
        if self.output == "di":
            return self.di.encode_gallery(img)
        return torch.cat([self.gm.encode_gallery(img), self.di.encode_gallery(img)], dim=1)

    @torch.no_grad()
    def explain(self, q: torch.Tensor, g: Any = None) -> torch.Tensor:
        """``[B, 2]``: alpha (GM, DI) of each query, read back from fused query embeddings (each half's norm over its
        branch's tau); rows sum to 1. ``g`` is unused (DAFM's signature). Branch-only embeddings are one-hot."""
        if self.output in ("gm", "di"):
            return q.new_tensor([1.0, 0.0] if self.output == "gm" else [0.0, 1.0]).expand(q.shape[0], 2).clone()
        d = self.params.gm_embed_dim
        a = torch.stack([q[:, :d].norm(dim=1) / self.gm.scale(), q[:, d:].norm(dim=1) / self.di.scale()], dim=1)
        return a / a.sum(dim=1, keepdim=True).clamp_min(1e-12)

    def explain_query(self, q: torch.Tensor, text: str) -> dict[str, Any]:
        """The service's explanation of one query (``cirfusion.serve``): its branch weights alpha, as :meth:`explain`
        reads them back from the fused query embedding."""
        a = self.explain(q)[0]
        return {"kind": "branches", "method": self.method_name or "detailfusion",
                "label": "the adaptive compositor's weight of each branch for this query (global features vs the "
                         "detail branch's token maps); the score is the alpha-weighted sum of the two branches' "
                         "similarities",
                "branch_weights": {"global (GM)": round(float(a[0]), 4), "detail (DI)": round(float(a[1]), 4)}}

    # ---- training -------------------------------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        h, out = self.params, []
        if h.branches != "gm" and h.pretrain_split != "none":
            out.append(Stage("di-pretrain", train=("di",), loss="loss_di", split=h.pretrain_split, validate=False))
        if h.branches == "both":
            adaptive = h.fusion == "adaptive"
            out.append(Stage("joint", train=("di", "gm"), loss="loss_joint", validate=not adaptive))
            if adaptive:
                out.append(Stage("compositor", train=("afc",), loss="loss_compositor"))
        elif h.branches == "di":
            out.append(Stage("di", train=("di",), loss="loss_di"))
        else:
            out.append(Stage("gm", train=("gm",), loss="loss_gm"))
        return out

    def negatives(self, batch: Batch) -> tuple[ImageFeatures, torch.Tensor] | None:
        """The extra columns of L_DI and of the fused loss: the loop's mined negatives, plus each query's own
        reference with ``ref_negative``."""
        ref = (batch.ref, batch.ref_rows) if self.params.ref_negative else None
        return join_negatives(self.hard_negatives(batch), ref)

    def _nce(self, logits: torch.Tensor, batch: Batch, hard_rows: torch.Tensor | None) -> torch.Tensor:
        """Cross-entropy of in-batch logits (+ extra columns). Without ``ref_negative`` a query's own reference is no
        negative in any column: mined negatives drawn from a subset include it, and the ablation must measure the
        reference negative itself."""
        if not self.params.ref_negative:
            cols = batch.target_rows if hard_rows is None else torch.cat([batch.target_rows, hard_rows])
            own = cols.to(logits.device)[None, :] == batch.ref_rows.to(logits.device)[:, None]
            own[:, : len(batch.target_rows)].fill_diagonal_(False)  # a query's target is never masked
            logits = logits.masked_fill(own, float("-inf"))
        return F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device))

    def loss_di(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """L_DI: InfoNCE of the predicted map over in-batch targets + the reference (+ mined negatives)."""
        di = self.di
        q, g = di.encode_query(batch.ref, batch.text), di.encode_gallery(batch.target)
        hn = self.negatives(batch)
        hard, rows = (None, None) if hn is None else (di.encode_gallery(hn[0]), hn[1])
        loss = self._nce(di.batch_logits(q, g, batch, hard, rows), batch, rows)
        return loss, {"loss": float(loss.detach()), "loss_di": float(loss.detach()), "scale_di": float(di.scale().detach())}

    def loss_gm(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """L_GM: CLIP4CIR's InfoNCE (in-batch targets + mined negatives)."""
        loss, logs = self.gm.loss(batch)
        return loss, {"loss": logs["loss"], "loss_gm": logs["loss"], "scale_gm": logs["scale"]}

    def loss_joint(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Stage 2: L_DI + gamma * L_GM."""
        l_di, logs_di = self.loss_di(batch)
        l_gm, logs_gm = self.loss_gm(batch)
        loss = l_di + self.params.gamma * l_gm
        return loss, {**logs_di, **logs_gm, "loss": float(loss.detach())}

    def loss_compositor(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Stage 3: InfoNCE over ``t * <q_fused, g_fused>`` (in-batch targets, the reference, mined negatives)."""
        with torch.no_grad():  # the branches are frozen in this stage
            q_gm, di_map = self.branch_queries(batch.ref, batch.text)
            g = self.encode_gallery(batch.target)
            hn = self.negatives(batch)
            hard = None if hn is None else self.encode_gallery(hn[0])
        alpha, temp = self.alphas(q_gm, di_map, batch.text)
        q = temp[:, None] * self._fused(q_gm, di_map, alpha)
        rows = None if hn is None else hn[1]
        loss = self._nce(self.batch_logits(q, g, batch, hard, rows), batch, rows)
        return loss, {"loss": float(loss.detach()), "alpha_gm": float(alpha[:, 0].mean().detach()),
                      "alpha_gm_std": float(alpha[:, 0].std().detach()) if len(alpha) > 1 else 0.0,
                      "temperature": float(temp.mean().detach())}


def describe_alpha(alpha: torch.Tensor) -> dict[str, float]:
    """Summary of per-query alphas ``[B, 2]``: mean, spread and range of alpha_GM."""
    a = alpha[:, 0].float()
    if a.numel() == 0:
        return {"alpha_gm_mean": math.nan, "alpha_gm_std": math.nan, "alpha_gm_min": math.nan, "alpha_gm_max": math.nan}
    return {"alpha_gm_mean": float(a.mean()), "alpha_gm_std": float(a.std()) if a.numel() > 1 else 0.0,
            "alpha_gm_min": float(a.min()), "alpha_gm_max": float(a.max())}


__all__ = ["Compositor", "DetailBranch", "DetailFusion", "DetailFusionParams", "describe_alpha"]
