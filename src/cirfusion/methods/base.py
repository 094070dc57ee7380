"""The method contract every CIR model implements, plus the pieces the training loop shares.

A method is an ``nn.Module`` that works on *cached backbone features* (:class:`ImageFeatures`,
:class:`TextFeatures`), never on pixels:

- ``encode_query(ref, text)`` -> query embedding, ``[B, D]`` (one vector) or ``[B, M, D]`` (multi-vector);
- ``encode_gallery(img)``     -> gallery embedding, ``[N, D]`` or ``[N, M, D]``;
- ``similarity(q, g)``        -> ``[B, N]`` scores (cosine; max over vectors for multi-vector embeddings);
- ``loss(batch)``             -> ``(loss, logs)``; the default is InfoNCE over in-batch targets plus any hard
  negatives the method supplies (``hard_negatives``), with a learned logit scale;
- ``stages()``                -> the training stages the shared loop runs in order (one by default).

Hyper-parameters are a small dataclass per method (``Params``; one field per hyper-parameter, its type, default and
a one-line help in the field's metadata, see :func:`hparam`). The method reads them typed from ``self.params``;
``self.hparams`` is the same values as a plain dict (what checkpoints store as JSON). Checkpoints are written and
read by :mod:`cirfusion.checkpoint`, which sits above this package (it rebuilds a method through the registry);
nothing here imports it.

Evaluation, indexing and fusion only call ``encode_query`` / ``encode_gallery`` / ``similarity`` and treat the
embeddings as opaque (a tensor, or a tuple/list/dict of tensors, see :mod:`cirfusion.embeddings`), so a method whose
"embedding" is a bundle of several models' embeddings (score fusion) fits the same contract.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, ClassVar, TypeVar, overload

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.base import ImageFeatures, TextFeatures
from ..embeddings import Embedding
from ..errors import CirfusionError
from ..options import OptionError, accepted_options, check_options


@dataclass(frozen=True)
class MethodDims:
    """What a method needs to know about the backbone whose cached features it consumes."""

    image_dim: int
    image_token_dim: int
    num_image_tokens: int
    text_dim: int
    text_token_dim: int
    max_text_tokens: int
    aligned: bool = False
    backbone_id: str = ""
    weights_hash: str = ""
    preprocess_id: str = ""

    @classmethod
    def from_backbone(cls, bb: Any) -> "MethodDims":
        """From a ``Backbone`` (or any object with the same attributes)."""

        def call_or_get(name: str) -> str:
            v = getattr(bb, name, "")
            return str(v() if callable(v) else v)

        return cls(
            image_dim=int(bb.image_dim),
            image_token_dim=int(bb.image_token_dim),
            num_image_tokens=int(bb.num_image_tokens),
            text_dim=int(bb.text_dim),
            text_token_dim=int(bb.text_token_dim),
            max_text_tokens=int(bb.max_text_tokens),
            aligned=bool(getattr(bb, "aligned", False)),
            backbone_id=str(getattr(bb, "backbone_id", "")),
            weights_hash=call_or_get("weights_hash"),
            preprocess_id=call_or_get("preprocess_id"),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MethodDims":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown MethodDims fields: {sorted(unknown)}")
        return cls(**d)


@dataclass(frozen=True)
class Stage:
    """One training stage. The loop runs ``method.stages()`` in order, each with a fresh optimizer and schedule.

    ``train``: parameter-name prefixes that train in this stage (``()`` = every parameter); the rest are frozen.
    ``epochs``: fixed epoch count, or ``None`` for the run's ``--epochs``.
    ``loss``: name of the method attribute computing ``(loss, logs)`` from a :class:`Batch`.
    ``split``: the dataset split this stage trains on; ``None`` = the run's training split (a stage that
    pre-trains on edit pairs names that split).
    ``validate``: compute the validation metric after each epoch (off for stages whose model cannot retrieve yet).
    The best checkpoint is chosen on the *last* stage's validation metric: that stage produces the final model.

    DetailFusion, for example, is three stages::

        Stage("di-pretrain", train=("di",), loss="loss_di", split="edit_pairs", validate=False)  # ref = hard negative
        Stage("joint", train=("di", "gm"), loss="loss_joint")                                     # L_DI + γ·L_GM
        Stage("compositor", train=("compositor",), loss="loss_compositor")                        # DI, GM frozen
    """

    name: str = "main"
    train: tuple[str, ...] = ()
    epochs: int | None = None
    loss: str = "loss"
    split: str | None = None
    lr_scale: float = 1.0
    validate: bool = True

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["train"] = list(self.train)
        return d


@dataclass
class Batch:
    """A training batch gathered from the feature tables.

    Image identity is the row in the split's image table: ``ref_rows``/``target_rows`` ``[B]`` and
    ``positives[i]`` (sorted rows of *every* positive of query i, the sampled target included). Masks built from
    rows keep duplicates of a positive from counting as negatives. ``texts`` are the texts used this epoch (a
    dataset's text policy may vary them), ``queries`` the underlying records.
    """

    ref: ImageFeatures
    text: TextFeatures
    target: ImageFeatures
    ref_rows: torch.Tensor
    target_rows: torch.Tensor
    positives: list[np.ndarray]
    texts: list[str]
    queries: list[Any] = field(default_factory=list)  # the Query records (fine texts, scene graphs, meta...)
    negatives: ImageFeatures | None = None  # mined hard negatives shared by the batch (TrainConfig.hard_negatives)
    negative_rows: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.ref_rows.shape[0])

    def positive_mask(self, rows: torch.Tensor) -> torch.Tensor:
        """``[B, len(rows)]`` bool: True where image ``rows[j]`` is a positive of query i."""
        r = rows.cpu().numpy()
        m = np.zeros((len(self.positives), len(r)), dtype=bool)
        if len(r) and self.positives:
            # Every (query, positive) pair against the sorted columns at once: a row may fill several columns.
            pos = np.concatenate([np.asarray(p, dtype=r.dtype).ravel() for p in self.positives])
            query = np.repeat(np.arange(len(self.positives)), [np.asarray(p).size for p in self.positives])
            order = np.argsort(r, kind="stable")
            lo = np.searchsorted(r[order], pos, "left")
            n = np.searchsorted(r[order], pos, "right") - lo
            k = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
            m[np.repeat(query, n), order[np.repeat(lo, n) + k]] = True
        return torch.from_numpy(m).to(rows.device)


def join_negatives(*parts: tuple[ImageFeatures, torch.Tensor] | None) -> tuple[ImageFeatures, torch.Tensor] | None:
    """Concatenate several ``(features, rows)`` hard-negative sets (``None`` entries are skipped)."""
    got = [p for p in parts if p is not None]
    if not got:
        return None
    feats = ImageFeatures(global_=torch.cat([f.global_ for f, _ in got]), tokens=torch.cat([f.tokens for f, _ in got]))
    return feats, torch.cat([r for _, r in got])


def l2norm(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


def trim_text_padding(text: TextFeatures) -> TextFeatures:
    """Drop the token columns that are padding in every row (cached tokens are padded to ``max_text_tokens``;
    real texts are often much shorter). Masked keys get zero attention, so a token-attending method's outputs are
    unchanged up to float rounding, at a fraction of the cost."""
    if text.mask.numel() == 0:
        return text
    used = text.mask.any(dim=0).nonzero()
    length = int(used.max()) + 1 if used.numel() else 1
    if length == text.mask.shape[1]:
        return text
    return TextFeatures(global_=text.global_, tokens=text.tokens[:, :length], mask=text.mask[:, :length])


def cosine_or_maxsim(q: torch.Tensor, g: torch.Tensor, max_elems: int = 1 << 24) -> torch.Tensor:
    """Scores ``[B, N]`` between L2-normalised embeddings.

    ``[B,D]x[N,D]``: dot product. If either side is multi-vector (``[.., M, D]``), the score is the max over all
    vector pairs (SPRC-style max-sim). Multi-vector products are tiled over the gallery so the intermediate stays
    under ``max_elems`` elements.
    """
    if q.dim() == 2 and g.dim() == 2:
        return q @ g.T
    q3 = q if q.dim() == 3 else q[:, None, :]
    g3 = g if g.dim() == 3 else g[:, None, :]
    b, m, _ = q3.shape
    n, k, _ = g3.shape
    tile = max(1, max_elems // max(1, b * m * k))
    out = []
    for s in range(0, n, tile):
        sims = torch.einsum("bmd,nkd->bnmk", q3, g3[s : s + tile])
        out.append(sims.flatten(2).amax(dim=2))
    return torch.cat(out, dim=1) if out else q3.new_zeros(b, 0)


# ---- typed hyper-parameters -----------------------------------------------------------------------------------------
class HyperParameterError(OptionError):
    """A hyper-parameter a method does not have, or a value of the wrong type."""


class HardNegativesUnsupported(CirfusionError, ValueError):
    """Training with mined hard negatives was asked of a method whose losses cannot use them."""


T = TypeVar("T")


@overload
def hparam(default: T, help: str) -> T: ...
@overload
def hparam(*, help: str, factory: Callable[[], T]) -> T: ...
def hparam(default: Any = MISSING, help: str = "", factory: Callable[[], Any] | None = None) -> Any:
    """A hyper-parameter field: its default (or a ``factory`` for a mutable one) and a one-line help, which
    ``cirfusion train --list`` prints next to the name, type and default. Typed as the default, so a field whose
    annotation disagrees with its default is a type error."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class NoParams:
    """The hyper-parameters of a method that has none."""


def params_help(params: type) -> list[tuple[str, str, Any, str]]:
    """``(name, type, default, help)`` of every field of a hyper-parameter dataclass."""
    out: list[tuple[str, str, Any, str]] = []
    for f in fields(params):
        default = f.default if f.default is not MISSING else (f.default_factory() if f.default_factory is not MISSING else None)
        tp = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        out.append((f.name, str(tp), default, str(f.metadata.get("help", ""))))
    return out


def make_params(params: type, values: Mapping[str, Any], method: str) -> Any:
    """An instance of the dataclass ``params`` from plain values (``--hparam`` options, a checkpoint's JSON): an
    unknown name or a value of the wrong type is a :class:`HyperParameterError` listing the valid names; JSON lists
    become tuples where the field is a tuple."""
    accepted = accepted_options(params)
    unknown = sorted(set(values) - set(accepted))
    if unknown:
        raise HyperParameterError(f"method {method!r}: unknown hyper-parameter(s) {unknown}; accepted: "
                                  f"{', '.join(sorted(accepted)) or 'none'}")
    try:
        checked = check_options(values, accepted, what=f"method {method!r} hyper-parameters")
    except OptionError as exc:
        raise HyperParameterError(str(exc)) from None
    return params(**checked)


class CIRMethod(nn.Module):
    """Base class of every registered method. See the module docstring for the contract.

    Subclasses declare their hyper-parameters as a dataclass, ``Params = MyParams`` (see :func:`hparam`), read them
    from ``self.params`` and set the feature needs (``uses_image_tokens`` / ``uses_text_tokens``) in ``__init__``
    when they depend on the hyper-parameters.
    """

    method_name: ClassVar[str] = ""  # set by @register_method
    trainable: ClassVar[bool] = True  # False: no parameters; training only writes the checkpoint
    # False: the method's losses cannot use mined hard negatives; training refuses hard_negatives > 0.
    supports_hard_negatives: ClassVar[bool] = True
    Params: ClassVar[type] = NoParams
    params: Any  # an instance of ``Params``

    def __init__(self, dims: MethodDims, **hparams: Any) -> None:
        super().__init__()
        self.dims = dims
        self.params = make_params(self.Params, hparams, self.method_name or type(self).__name__)
        # Which cached features the method reads. The loop skips gathering what is not needed.
        self.uses_image_tokens: bool = False
        self.uses_text_tokens: bool = False

    @property
    def hparams(self) -> dict[str, Any]:
        """The hyper-parameters as a plain JSON-able dict (a fresh copy of ``params``)."""
        return asdict(self.params)

    # ---- the contract -------------------------------------------------------------------------------------------
    def encode_query(self, ref: ImageFeatures, text: TextFeatures) -> Embedding:
        raise NotImplementedError(f"{type(self).__name__} must implement encode_query")

    def encode_gallery(self, img: ImageFeatures) -> Embedding:
        raise NotImplementedError(f"{type(self).__name__} must implement encode_gallery")

    def similarity(self, q: Embedding, g: Embedding) -> torch.Tensor:
        """``[B, N]`` scores. Default: cosine (embeddings are L2-normalised), max-sim for multi-vector."""
        return cosine_or_maxsim(q, g)

    def stages(self) -> list[Stage]:
        return [Stage()]

    # ---- training -----------------------------------------------------------------------------------------------
    def init_logit_scale(self, init: float, max_scale: float = 100.0) -> None:
        """A learned logit scale (stored as log), CLIP-style, clamped to ``max_scale``."""
        self.logit_scale = nn.Parameter(torch.tensor(math.log(init), dtype=torch.float32))
        self._max_log_scale = math.log(max_scale)

    def scale(self) -> torch.Tensor:
        if isinstance(getattr(self, "logit_scale", None), torch.Tensor):
            return self.logit_scale.clamp(max=self._max_log_scale).exp()
        return torch.tensor(1.0 / 0.07)

    def hard_negatives(self, batch: Batch) -> tuple[ImageFeatures, torch.Tensor] | None:
        """Extra negatives for the default loss: ``(image features, their image rows)`` or ``None``.

        Default: the negatives the loop mined for the batch, if any. A method adds its own by overriding, e.g. the
        reference image as a hard negative: ``return join_negatives(super().hard_negatives(batch), (batch.ref,
        batch.ref_rows))``."""
        if batch.negatives is None or batch.negative_rows is None or len(batch.negative_rows) == 0:
            return None
        return batch.negatives, batch.negative_rows

    def info_nce(
        self,
        q: Embedding,
        g: Embedding,
        batch: Batch,
        hard: Embedding | None = None,
        hard_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """InfoNCE of queries against in-batch targets (+ hard negatives), on :meth:`batch_logits`."""
        logits = self.batch_logits(q, g, batch, hard, hard_rows)
        labels = torch.arange(logits.shape[0], device=logits.device)
        return F.cross_entropy(logits, labels)

    def batch_logits(
        self,
        q: Embedding,
        g: Embedding,
        batch: Batch,
        hard: Embedding | None = None,
        hard_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scaled logits of queries against in-batch targets, plus one column per hard negative. Column j is masked
        for row i when its image is another positive of query i (duplicates of the same target are not negatives)."""
        scale = self.scale()
        logits = self.similarity(q, g) * scale
        pos = batch.positive_mask(batch.target_rows).to(logits.device)
        pos.fill_diagonal_(False)
        logits = logits.masked_fill(pos, float("-inf"))
        if hard is not None:
            assert hard_rows is not None, "hard negatives need their image rows for masking"
            hl = (self.similarity(q, hard) * scale).masked_fill(batch.positive_mask(hard_rows).to(logits.device),
                                                                float("-inf"))
            logits = torch.cat([logits, hl], dim=1)
        return logits

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        q = self.encode_query(batch.ref, batch.text)
        g = self.encode_gallery(batch.target)
        hn = self.hard_negatives(batch)
        if hn is None:
            loss = self.info_nce(q, g, batch)
        else:
            loss = self.info_nce(q, g, batch, self.encode_gallery(hn[0]), hn[1])
        return loss, {"loss": float(loss.detach()), "scale": float(self.scale().detach())}

    # ---- persistence (written and read by cirfusion.checkpoint) ------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {"method": self.method_name, "hparams": dict(self.hparams), "dims": self.dims.to_dict()}

    def num_parameters(self, trainable_only: bool = True) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


def stage_parameters(method: nn.Module, stage: Stage) -> list[tuple[str, nn.Parameter]]:
    """The named parameters that train in ``stage``; an unknown prefix is an error (a typo would freeze all)."""
    named = list(method.named_parameters())
    if not stage.train:
        return named
    out: list[tuple[str, nn.Parameter]] = []
    for prefix in stage.train:
        p = prefix.rstrip(".")
        hits = [(n, t) for n, t in named if n == p or n.startswith(p + ".")]
        if not hits:
            raise ValueError(f"stage {stage.name!r}: no parameter matches prefix {prefix!r}")
        out.extend(h for h in hits if h[0] not in {n for n, _ in out})
    return out
