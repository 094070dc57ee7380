"""TG-CIR: target-guided composed image retrieval (Wen et al., "Target-Guided Composed Image Retrieval", ACM MM 2023),
trained on cached backbone features. Original code: github.com/iLearn-Lab/MM23-TG-CIR (``model.py``: ``Backbone``,
``TokenLearner``, ``VCG_CIR``; ``train.py``: the loss weights).

The idea: composing a query means deciding, token by token, how much of the reference to *remain* and how much of
the text to let *replace* it. With the target in view that is easy to learn, so a target-aware **teacher** learns it
and the target-free **student**, the only branch used at retrieval, is distilled towards it.

Tokens (one function for the reference, the target and any gallery image; the masks and the TokenLearner are shared
by image and text, as in the original ``Backbone``)::

    global tokens   g_p  = relu(M_p) * W_g(global feature)               p = 1..P, learned masks M [P, D]
    token map       x    = Enc(W_l(tokens) [+ positions])                 Enc: ``encoder_layers`` transformer blocks
    local tokens    l_s  = mean_n sigmoid(a_s . x_n) x_n                  s = 1..Q, TokenLearner over the token map
    tokens(.)       = [g_1..g_P; l_1..l_Q]                                 [B, P+Q, D]

    M starts at 0.1 with a block of 1 on dimensions p*D/P .. (p+1)*D/P (the original's initialisation).

Student (target-free)::   remain = sigmoid(MLP_s([r; t]))      per token, [B, P+Q, 1]
                          replace = 1 - remain
                          query   = norm(mean_k(remain * r + replace * t))
    gallery vector        v = norm(mean_k(tokens(target)))

Teacher (target-aware; reference r and text t *detached*, the target's tokens v_k not)::
                          remain_T  = sigmoid(MLP_r([sg(r); v_k]))    replace_T = sigmoid(MLP_a([sg(t); v_k]))
                          f_T = flatten(w * norm(remain_T * sg(r) + replace_T * sg(t)))   w: learned per-token weights
                          y_T = flatten(w * norm(v_k))

Loss (``train.py``: ``stu_rank + lambda tea_rank + eta tea_mask + mu ortho + nu ckd + kappa kl``)::

    L = NCE(query, v)                                         student NCE
      + teacher_weight      (lambda = 1)   NCE(f_T, y_T)                                 teacher NCE
      + mask_sum_weight     (eta    = 1)   MSE(remain_T + replace_T, 1)                  mask-sum constraint
      + ortho_weight        (mu   = 0.1)   mean over r, t, target of MSE(cos(tokens_i, tokens_j), I)
      + mask_distill_weight (nu    = 10)   MSE(remain, sg(remain_T)) + MSE(replace, sg(replace_T))
      + kl_weight           (kappa = 0.5)  KL(softmax(sg(y_T y_T') / tau) || softmax(query v' / tau)), tau = 0.1

NCE is cross-entropy over the in-batch targets (plus any mined hard negatives) with one learned logit scale shared
by the student and the teacher (the original's ``loss_T``, initialised at 10). None of these terms reaches a feature
extractor: the backbone is frozen and its features cached, so all six train this module's own layers (projections,
token encoders, masks, TokenLearner, remain/replace MLPs, ``w``, the scale).

Point by point against the original (ViT-B/16, its default ``--img_encoder``):

============================================  ==========  ===============================================================
what                                           follows?    why / how it differs
============================================  ==========  ===============================================================
P global tokens = relu(mask) * global          follows     ``Backbone.masks``, same 0.1 / block-of-1 initialisation
  feature, masks shared by image and text
Q local tokens: TokenLearner (sigmoid          follows     ``TokenLearner``/``SpatialAttention``: a 1x1 Conv1d per token is
  spatial weights, mean over the token map),                 a Linear; one module for image and text, as in the original
  shared by image and text
text local tokens averaged over real tokens    differs     the original averages all 77 CLIP positions; cached text tokens
  only                                                       are padded to the cache's length, so padding would make a
                                                             query depend on that length. Real tokens only.
token encoder: ``encoder_layers`` pre-norm     differs     stand-in for the original's fine-tuning of CLIP (lr 1e-5): with
  transformer blocks per modality over the                   frozen features and no such blocks the model is nearly linear
  projected token map, learned image                         in the cached features. Image positions: the original's ViT
  positions                                                  tokens carry position, cached grid tokens do not. Chosen on
                                                             synthetic val (see below)
global feature = frozen cached global,         differs     the original fine-tunes CLIP (lr 1e-5) and applies the masks to
  projected by a learned Linear                              CLIP's 512-d projected feature; here the backbone is frozen
                                                             and cached and image/text globals differ in size, so W_g
                                                             per modality is what trains (W_l = the original's ``fc``
                                                             and ``text_fc``)
student: one remain MLP, replace = 1 - remain  follows     ``s_compose_feature``
teacher: remain from [sg(r); target],          follows     ``t_compose_feature`` (``ref_token.detach()``,
  replace from [sg(t); target], target not                   ``mod_token.detach()``)
  detached
teacher features: per-token normalised,        follows     ``compute_loss`` (``local_weight``)
  weighted by learned w, flattened
retrieval: mean of tokens, L2-normalised       follows     ``extract_retrieval_compose`` / ``extract_retrieval_target``
losses and weights lambda, eta, mu, nu,        follows     ``train.py`` defaults (``--lambda_ 1 --eta_ 1 --mu_ 0.1 --nu_ 10
  kappa, tau                                                 --kappa_ 0.5 --tau_ 0.1``); the README's CIRR and Shoes
                                                             settings differ and are reachable as hyper-parameters
KL target detached                             follows     ``kl_div`` wraps the target-target logits in ``Variable()``,
                                                             which detaches them
logit scale: learned, shared, init 10          differs     stored as a log and clamped to 100 (``CIRMethod``'s shared
                                                             scale) instead of a raw multiplier: it stays positive
mined hard negatives                           extension   extra columns of both NCE terms (student: gallery vectors,
                                                             teacher: y_T of the negatives); the KL stays over the
                                                             in-batch targets as in the original. Off by default.
duplicate targets in a batch                   extension   masked out of both NCE terms (``CIRMethod.batch_logits``), so
                                                             a second copy of the target is not a negative
D = 256 (``embed_dim``), MLP width 256         differs     the original uses D = 512 (ViT-B/16) with MLP width D; smaller
  (``width``), P = 4, Q = 8                                  here for CPU training on small data. P and Q follow.
no dropout                                     follows     ``VCG_CIR`` takes ``dropout`` but never applies it
optimiser, schedule, epochs                    differs     cirfusion's shared loop (AdamW, warm-up + cosine, best epoch
                                                             on val) instead of AdamW with step decay every 5 epochs
the CLIP backbone is fine-tuned                not here    cached frozen features; nothing in these losses reaches the
                                                             backbone, and the orthogonality term shapes our own tokens
============================================  ==========  ===============================================================

Measured on the synthetic benchmark's **val** split (``cirfusion train tg-cir --dataset synthetic --backbone colour
--epochs 4``, seed 0, best epoch; Rmean / R@10 / Rsubset@1): the original's design on frozen features
(``encoder_layers=0``) reached 17.1 / 32.4 / 16.9; with the student's NCE alone 19.4 / 34.5 / 18.9, with
``teacher_weight=0`` 19.7 / 32.8 / 19.2 (the teacher's NCE, whose flattened 12-token logits reach 12x the student's,
costs the student most); one encoder block per modality 20.3 / 39.1 / 18.8 (2.5 M parameters on ``embedded``, over
the pool's 2 M budget); one block shared by image and text, the default, 19.1 / 35.6 / 17.6. The pre-issue-9 TG-CIR
(a gated residual MLP composition, not the paper's) reached 22.3 / 47.7 / 16.8 under the same command: the paper's
composition, a per-token convex mix of reference and text tokens, is the weaker one on frozen features. The paper's
loss weights are kept.

``encode_query(ref, text)`` runs the student only: the teacher's MLPs (``teacher.*``) and ``token_weight`` are never
read at retrieval.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.base import ImageFeatures, TextFeatures
from .base import Batch, CIRMethod, HyperParameterError, MethodDims, hparam, l2norm, trim_text_padding
from .registry import register_method


def _gate(inp: int, hidden: int) -> nn.Sequential:
    """The original's remain / replace map: Linear -> ReLU -> Linear(1) -> sigmoid, applied per token."""
    return nn.Sequential(nn.Linear(inp, hidden), nn.ReLU(), nn.Linear(hidden, 1), nn.Sigmoid())


class TokenLearner(nn.Module):
    """``num`` spatial attentions over a token map: ``out_s = sum_n sigmoid(a_s . x_n + b_s) x_n / n_real``.

    The original's ``SpatialAttention`` is a 1x1 ``Conv1d(dim, 1)`` + sigmoid per output token, then the mean over all
    positions; ``num`` of them are one ``Linear(dim, num)`` here. With ``mask`` (True = real token) padding positions
    get weight 0 and the mean is over the real tokens (an all-padding row gives zeros)."""

    def __init__(self, num: int, dim: int) -> None:
        super().__init__()
        self.score = nn.Linear(dim, num)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        w = torch.sigmoid(self.score(x))  # [B, L, S]
        if mask is None:
            return torch.einsum("bls,bld->bsd", w, x) / x.shape[1]
        m = mask.to(x.dtype)[:, :, None]
        return torch.einsum("bls,bld->bsd", w * m, x) / m.sum(dim=1, keepdim=True).clamp(min=1.0)


def orthogonality(tokens: torch.Tensor) -> torch.Tensor:
    """The original's ``orthogonal_regularization``: MSE between the tokens' cosine-similarity matrix and I."""
    n = l2norm(tokens)
    cos = n @ n.transpose(1, 2)
    return F.mse_loss(cos, torch.eye(tokens.shape[1], device=tokens.device, dtype=cos.dtype).expand_as(cos))


def kl_to_target_similarities(query: torch.Tensor, target: torch.Tensor, teacher_target: torch.Tensor,
                              tau: float) -> torch.Tensor:
    """The original's ``kl_div(s_query, s_target, tag_feature, tag_feature, t)``: KL(p || q), batch mean, with
    ``p = softmax(sg(cos(y_T, y_T)) / tau)`` (target-target similarities, detached) and
    ``q = softmax(cos(query, target) / tau)`` (the student's query-target similarities)."""
    y = l2norm(teacher_target.detach())
    p = F.softmax(y @ y.T / tau, dim=-1)
    log_q = F.log_softmax(l2norm(query) @ l2norm(target).T / tau, dim=-1)
    return F.kl_div(log_q, p, reduction="batchmean")


@dataclass
class TgCirParams:
    """TG-CIR's hyper-parameters (the loss weights are the original ``train.py``'s defaults)."""

    embed_dim: int = hparam(256, "D: width of every token (the original: 512 with ViT-B/16)")
    width: int = hparam(256, "hidden width of the remain / replace MLPs (the original: D)")
    global_tokens: int = hparam(4, "P: global tokens, learned masks over the global feature")
    local_tokens: int = hparam(8, "Q: local tokens, TokenLearner over the token map")
    teacher_weight: float = hparam(1.0, "lambda: weight of the teacher's NCE")
    mask_sum_weight: float = hparam(1.0, "eta: weight of MSE(teacher remain + replace, 1)")
    ortho_weight: float = hparam(0.1, "mu: weight of the tokens' orthogonality regulariser")
    mask_distill_weight: float = hparam(10.0, "nu: weight of MSE(student masks, teacher masks)")
    kl_weight: float = hparam(0.5, "kappa: weight of KL(target-target || student query-target similarities)")
    kl_tau: float = hparam(0.1, "tau: temperature of that KL")
    logit_scale_init: float = hparam(10.0, "initial NCE logit scale (learned, shared by student and teacher)")
    encoder_layers: int = hparam(1, "transformer blocks (shared by image and text) over the token maps before the "
                                    "TokenLearner: a trainable stand-in for the original's fine-tuned CLIP layers")
    heads: int = hparam(4, "attention heads of those blocks")
    image_positions: bool = hparam(True, "learned position embeddings on the image token map before the TokenLearner "
                                         "(the original's ViT tokens carry position; cached grid tokens do not)")


# loss term -> the hyper-parameter that weighs it (the student's NCE has weight 1, as in the original)
LOSS_WEIGHTS = {"teacher": "teacher_weight", "mask_sum": "mask_sum_weight", "ortho": "ortho_weight",
                "mask_distill": "mask_distill_weight", "kl": "kl_weight"}


@register_method("tg-cir")
class TGCIR(CIRMethod):
    """TG-CIR: global (masked) and local (TokenLearner) tokens, a student that gates reference against text token by
    token (replace = 1 - remain), distilled from a teacher that sees the target. See the module docstring."""

    Params = TgCirParams
    params: TgCirParams

    def __init__(self, dims: MethodDims, **hparams: object) -> None:
        super().__init__(dims, **hparams)
        h = self.params
        if dims.num_image_tokens < 1 or dims.max_text_tokens < 1:
            raise HyperParameterError(f"method {self.method_name!r} needs image and text tokens; backbone "
                                      f"{dims.backbone_id or '<unknown>'!r} has {dims.num_image_tokens} and "
                                      f"{dims.max_text_tokens}")
        for k in LOSS_WEIGHTS.values():
            if getattr(h, k) < 0:
                raise HyperParameterError(f"{self.method_name}: {k} must be >= 0, got {getattr(h, k)}")
        if h.kl_tau <= 0:
            raise HyperParameterError(f"{self.method_name}: kl_tau must be > 0, got {h.kl_tau}")
        if h.embed_dim < 1 or h.width < 1:
            raise HyperParameterError(f"{self.method_name}: embed_dim and width must be >= 1, got {h.embed_dim}, {h.width}")
        if h.global_tokens < 0 or h.local_tokens < 0 or h.global_tokens + h.local_tokens < 1:
            raise HyperParameterError(f"{self.method_name}: global_tokens and local_tokens must be >= 0 with at least "
                                      f"one token, got {h.global_tokens} and {h.local_tokens}")
        if h.encoder_layers < 0 or h.heads < 1 or h.embed_dim % h.heads:
            raise HyperParameterError(f"{self.method_name}: need encoder_layers >= 0 and embed_dim divisible by heads, "
                                      f"got {h.encoder_layers}, {h.embed_dim} and {h.heads}")
        if h.global_tokens > h.embed_dim:
            raise HyperParameterError(f"{self.method_name}: global_tokens {h.global_tokens} > embed_dim {h.embed_dim} "
                                      "(each mask starts on its own block of dimensions)")
        self.uses_image_tokens = self.uses_text_tokens = True
        d, p = h.embed_dim, h.global_tokens
        self.embed_dim = d
        self.image_global = nn.Linear(dims.image_dim, d)
        self.text_global = nn.Linear(dims.text_dim, d)
        self.image_local = nn.Linear(dims.image_token_dim, d)  # the original's fc
        self.image_pos: nn.Parameter | None = None
        if h.image_positions:
            self.image_pos = nn.Parameter(torch.zeros(1, dims.num_image_tokens, d))
            nn.init.trunc_normal_(self.image_pos, std=0.02)
        self.text_local = nn.Linear(dims.text_token_dim, d)  # the original's text_fc
        masks = torch.full((p, d), 0.1)
        block = d // p if p else 0
        for i in range(p):
            masks[i, i * block : (i + 1) * block] = 1.0
        self.masks = nn.Parameter(masks)
        self.token_learner = TokenLearner(h.local_tokens, d) if h.local_tokens else None
        # one token encoder for image and text, shared like the masks and the TokenLearner (half the parameters)
        self.token_encoder = self._encoder(h.encoder_layers, d, h.heads)
        self.remain = _gate(2 * d, h.width)  # the student's s_remain_map
        self.teacher = nn.ModuleDict({"remain": _gate(2 * d, h.width), "replace": _gate(2 * d, h.width)})
        self.token_weight = nn.Parameter(torch.ones(p + h.local_tokens))  # the original's local_weight
        self.init_logit_scale(h.logit_scale_init)

    @staticmethod
    def _encoder(layers: int, width: int, heads: int) -> nn.TransformerEncoder | None:
        if not layers:
            return None
        block = nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        return nn.TransformerEncoder(block, layers, enable_nested_tensor=False)

    # ---- tokens -------------------------------------------------------------------------------------------------
    def _tokens(self, global_: torch.Tensor, local: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        g = F.relu(self.masks)[None] * global_[:, None]  # [B, P, D]
        if self.token_learner is None:
            return g
        return torch.cat([g, self.token_learner(local, mask)], dim=1)

    def image_tokens(self, img: ImageFeatures) -> torch.Tensor:
        """``[B, P+Q, D]``: masked global tokens, then TokenLearner tokens over the image's token map."""
        tok = img.tokens.float()
        if tok.dim() != 3 or tok.shape[1] != self.dims.num_image_tokens:
            raise ValueError(f"{self.method_name} expects {self.dims.num_image_tokens} image tokens, got shape "
                             f"{tuple(tok.shape)}")
        x = self.image_local(tok)
        if self.image_pos is not None:
            x = x + self.image_pos
        if self.token_encoder is not None:
            x = self.token_encoder(x)
        return self._tokens(self.image_global(img.global_.float()), x, None)

    def text_tokens(self, text: TextFeatures) -> torch.Tensor:
        """``[B, P+Q, D]`` from the text: the same masks and TokenLearner, over its real (unpadded) tokens."""
        text = trim_text_padding(text)
        if text.tokens.shape[1] > self.dims.max_text_tokens:
            raise ValueError(f"{self.method_name}: {text.tokens.shape[1]} text tokens, the backbone gives at most "
                             f"{self.dims.max_text_tokens}")
        x, mask = self.text_local(text.tokens.float()), text.mask.bool()
        if self.token_encoder is not None:
            pad = ~mask
            pad[~mask.any(dim=1)] = False  # an all-padding text: attend over its padding (NaN otherwise); the
            x = self.token_encoder(x, src_key_padding_mask=pad)  # TokenLearner ignores it anyway
        return self._tokens(self.text_global(text.global_.float()), x, mask)

    @staticmethod
    def pool(tokens: torch.Tensor) -> torch.Tensor:
        """The retrieval vector of a token set: the normalised mean."""
        return l2norm(tokens.mean(dim=1))

    # ---- the two branches ---------------------------------------------------------------------------------------
    def student(self, r: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(query [B, D], remain [B, K, 1], replace = 1 - remain) of the target-free branch."""
        remain = self.remain(torch.cat([r, t], dim=-1))
        replace = 1.0 - remain
        return self.pool(remain * r + replace * t), remain, replace

    def teacher_branch(self, r: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(teacher feature f_T [B, K*D], remain_T, replace_T) from reference / text tokens (detached here) and the
        target's tokens ``v`` (not detached: the teacher's losses shape the target's tokens, as in the original)."""
        r, t = r.detach(), t.detach()
        remain = self.teacher["remain"](torch.cat([r, v], dim=-1))
        replace = self.teacher["replace"](torch.cat([t, v], dim=-1))
        return self.weighted(remain * r + replace * t), remain, replace

    def weighted(self, tokens: torch.Tensor) -> torch.Tensor:
        """Per-token normalised, times the learned token weights, flattened: the teacher's feature space."""
        return (l2norm(tokens) * self.token_weight[None, :, None]).flatten(1)

    # ---- the contract -------------------------------------------------------------------------------------------
    def encode_gallery(self, img: ImageFeatures) -> torch.Tensor:
        return self.pool(self.image_tokens(img))

    def encode_query(self, ref: ImageFeatures, text: TextFeatures) -> torch.Tensor:
        return self.student(self.image_tokens(ref), self.text_tokens(text))[0]

    def terms(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Every loss term, unweighted (``student``, ``teacher``, ``mask_sum``, ``ortho``, ``mask_distill``, ``kl``),
        plus the mean masks (``remain``, ``teacher_remain``, ``teacher_replace``) for the logs."""
        r, t, v = self.image_tokens(batch.ref), self.text_tokens(batch.text), self.image_tokens(batch.target)
        query, remain, replace = self.student(r, t)
        f_t, remain_t, replace_t = self.teacher_branch(r, t, v)
        target, y_t = self.pool(v), self.weighted(v)

        hn = self.hard_negatives(batch)  # mined negatives: more gallery columns of both NCE terms
        if hn is None:
            student = self.info_nce(query, target, batch)
            teacher = self.info_nce(f_t, y_t, batch)
        else:
            neg = self.image_tokens(hn[0])
            student = self.info_nce(query, target, batch, self.pool(neg), hn[1])
            teacher = self.info_nce(f_t, y_t, batch, self.weighted(neg), hn[1])
        return {
            "student": student,
            "teacher": teacher,
            "mask_sum": F.mse_loss(remain_t + replace_t, torch.ones_like(remain_t)),
            "ortho": (orthogonality(r) + orthogonality(v) + orthogonality(t)) / 3.0,
            "mask_distill": F.mse_loss(remain, remain_t.detach()) + F.mse_loss(replace, replace_t.detach()),
            "kl": kl_to_target_similarities(query, target, y_t, self.params.kl_tau),
            "remain": remain.mean(), "teacher_remain": remain_t.mean(), "teacher_replace": replace_t.mean(),
        }

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        terms = self.terms(batch)
        loss = terms["student"]
        for name, weight in LOSS_WEIGHTS.items():
            loss = loss + getattr(self.params, weight) * terms[name]
        logs = {"loss": float(loss.detach())}
        logs.update({(f"loss_{k}" if k in LOSS_WEIGHTS or k == "student" else k): float(x.detach()) for k, x in terms.items()})
        logs["scale"] = float(self.scale().detach())
        return loss, logs
