"""``multi:ID1|ID2|...``: several backbones side by side, for a fused model whose base models read different ones.

DAFM's pool is diverse because its members sit on different backbones (CLIP, BLIP, BLIP-2); base models that all
read one backbone's features make correlated mistakes, and fusing them gains little (measured on the embedded
benchmarks: see ``benchmarks/dafm_accuracy.py``). A composite backbone lets such a fused model keep the one-backbone
contract of every method: its features are its parts' features laid side by side, and the fused model hands each
base model its own part (:func:`part_slices`).

Layout, parts in the order of the id:
- image ``global_``: the parts' global vectors concatenated, ``[B, sum D_i]`` (each part unit-norm, the whole not);
- image ``tokens``: the parts' token maps concatenated along the token axis, each zero-padded to the widest token
  dimension, ``[B, sum T_i, max Dt_i]``;
- text: the same (global vectors concatenated; tokens, each part padded to its ``max_text_tokens``, concatenated
  along the sequence with their masks);
- ``preprocess`` returns the parts' pixel tensors flattened and concatenated (they may differ in resolution); the
  feature cache stacks them like any other; ``encode_image`` splits them back.

The id lists the parts' canonical ids joined by ``|`` (``multi:colour|embedded:precision=bf16``); identity,
weights hash and preprocessing ids combine the parts', so the feature cache keys a composite like any backbone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..errors import CirfusionError
from . import create_backbone, register_backbone
from ._util import short_hash
from .base import Backbone, ImageFeatures, TextFeatures

SEP = "|"
# What must agree between two records of one backbone (a base model's MethodDims): the same id with other weights,
# preprocessing or sizes means another version of it.
PART_FIELDS = ("weights_hash", "preprocess_id", "image_dim", "text_dim", "num_image_tokens", "max_text_tokens")


class CompositeError(CirfusionError, ValueError):
    """Records of one backbone that disagree (base models trained on different versions of it)."""


@dataclass(frozen=True)
class PartSlice:
    """Where one part's features sit in a composite's: global ``[g0, g1)``, tokens ``[t0, t1)`` with ``dt`` channels,
    text global ``[x0, x1)``, text tokens ``[l0, l1)`` with ``lt`` channels."""

    g0: int
    g1: int
    t0: int
    t1: int
    dt: int
    x0: int
    x1: int
    l0: int
    l1: int
    lt: int

    def image(self, f: ImageFeatures) -> ImageFeatures:
        return ImageFeatures(global_=f.global_[:, self.g0 : self.g1], tokens=f.tokens[:, self.t0 : self.t1, : self.dt])

    def text(self, f: TextFeatures) -> TextFeatures:
        enc = f.encoder
        return TextFeatures(global_=f.global_[:, self.x0 : self.x1], tokens=f.tokens[:, self.l0 : self.l1, : self.lt],
                            mask=f.mask[:, self.l0 : self.l1], texts=f.texts,
                            encoder=None if enc is None else (lambda ts: self.text(enc(ts))))


def part_slices(parts: Sequence[Any]) -> list[PartSlice]:
    """The slices of each part (anything with the backbone dimension attributes, e.g. :class:`MethodDims`)."""
    out, g, t, x, l_ = [], 0, 0, 0, 0
    for p in parts:
        out.append(PartSlice(g, g + p.image_dim, t, t + p.num_image_tokens, p.image_token_dim,
                             x, x + p.text_dim, l_, l_ + p.max_text_tokens, p.text_token_dim))
        g, t, x, l_ = g + p.image_dim, t + p.num_image_tokens, x + p.text_dim, l_ + p.max_text_tokens
    return out


def multi_id(part_ids: Sequence[str]) -> str:
    return "multi:" + SEP.join(part_ids)


def composite_fields(parts: Sequence[Any]) -> dict[str, Any]:
    """Dimensions and identity of the composite of ``parts``: backbones, or their :class:`MethodDims` records (whose
    ``weights_hash`` / ``preprocess_id`` are strings rather than methods). One definition for the backbone itself and
    for a fused model that checks its bases against it without building it."""

    def value(p: Any, name: str) -> str:
        v = getattr(p, name)
        return str(v() if callable(v) else v)

    return {
        "image_dim": sum(p.image_dim for p in parts),
        "image_token_dim": max(p.image_token_dim for p in parts),
        "num_image_tokens": sum(p.num_image_tokens for p in parts),
        "text_dim": sum(p.text_dim for p in parts),
        "text_token_dim": max(p.text_token_dim for p in parts),
        "max_text_tokens": sum(p.max_text_tokens for p in parts),
        "backbone_id": multi_id([p.backbone_id for p in parts]),
        "weights_hash": short_hash(SEP.join(value(p, "weights_hash") for p in parts), 32),
        "preprocess_id": "multi[" + SEP.join(value(p, "preprocess_id") for p in parts) + "]",
    }


def feature_parts(dims: Sequence[Any]) -> tuple[list[Any], list[int]] | None:
    """For models on more than one backbone (``dims``: each model's :class:`~cirfusion.methods.base.MethodDims`, or
    anything with the backbone attributes): ``(parts, part_of)``, the distinct backbones' records in order of first
    appearance and each model's index into them; ``None`` when every model reads one backbone."""
    parts: list[Any] = []
    part_of: list[int] = []
    for d in dims:
        ids = [p.backbone_id for p in parts]
        bid = d.backbone_id
        if bid in ids:
            p = parts[ids.index(bid)]
            for f in PART_FIELDS:
                if getattr(p, f) != getattr(d, f):
                    raise CompositeError(f"base models on backbone {bid!r} disagree on its {f} ({getattr(p, f)!r} vs "
                                         f"{getattr(d, f)!r}): they were trained on different versions of it")
            part_of.append(ids.index(bid))
        else:
            parts.append(d)
            part_of.append(len(parts) - 1)
    return (parts, part_of) if len(parts) > 1 else None


def fusion_backbone(backbones: Sequence[Backbone]) -> Backbone:
    """The one backbone a fused model over base models on ``backbones`` (one per base, instances) reads: the shared
    one, or a ``multi:`` composite of the distinct ones in order of first appearance."""
    distinct: dict[str, Backbone] = {}
    for b in backbones:
        distinct.setdefault(b.backbone_id, b)
    return backbones[0] if len(distinct) == 1 else MultiBackbone(list(distinct.values()))


class MultiBackbone(Backbone):
    def __init__(self, parts: Sequence[Backbone]) -> None:
        super().__init__()
        if len(parts) < 2:
            raise ValueError(f"multi backbone: needs at least two parts, got {len(parts)}")
        ids = [p.backbone_id for p in parts]
        if len(set(ids)) != len(ids):
            raise ValueError(f"multi backbone: parts must differ, got {ids}")
        for i in ids:
            if SEP in i or i.startswith("multi:"):
                raise ValueError(f"multi backbone: part id {i!r} cannot contain {SEP!r} or be a multi backbone itself")
        self.parts = nn.ModuleList(parts)
        self._parts: list[Backbone] = list(parts)  # the same modules, typed (iterating a ModuleList gives Modules)
        fields = composite_fields(parts)
        self._weights_hash, self._preprocess_id = fields.pop("weights_hash"), fields.pop("preprocess_id")
        for k, v in fields.items():  # backbone_id and the dimensions
            setattr(self, k, v)
        self.aligned = False  # the concatenated global spaces are not one space
        # Each part's pixel tensor shape, to split the concatenated preprocess output back.
        probe = Image.new("RGB", (64, 48))
        self._pixel_shapes = [tuple(p.preprocess(probe).shape) for p in self._parts]
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    def weights_hash(self) -> str:
        return self._weights_hash

    def preprocess_id(self) -> str:
        return self._preprocess_id

    def text_preprocess_id(self) -> str:
        return "multi[" + SEP.join(p.text_preprocess_id() for p in self._parts) + "]"

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return torch.cat([p.preprocess(image).reshape(-1) for p in self._parts])

    def encode_image(self, pixels: torch.Tensor) -> ImageFeatures:
        if pixels.dim() != 2:
            raise ValueError(f"multi backbone: encode_image takes the [B, P] output of its preprocess, got {tuple(pixels.shape)}")
        sizes = [math.prod(s) for s in self._pixel_shapes]
        if pixels.shape[1] != sum(sizes):
            raise ValueError(f"multi backbone: expected {sum(sizes)} values per image, got {pixels.shape[1]}")
        feats = [p.encode_image(x.reshape(-1, *s)) for p, x, s in zip(self._parts, pixels.split(sizes, dim=1), self._pixel_shapes, strict=True)]
        d = self.image_token_dim
        return ImageFeatures(global_=torch.cat([f.global_ for f in feats], 1),
                             tokens=torch.cat([F.pad(f.tokens, (0, d - f.tokens.shape[2])) for f in feats], 1))

    def encode_text(self, texts: list[str]) -> TextFeatures:
        if isinstance(texts, str):
            raise TypeError("encode_text takes a list of strings")
        feats = [p.encode_text(texts) for p in self._parts]
        d = self.text_token_dim
        toks, masks = [], []
        for p, f in zip(self._parts, feats, strict=True):
            pad_l = p.max_text_tokens - f.tokens.shape[1]  # every part padded to its own maximum: fixed offsets
            toks.append(F.pad(f.tokens, (0, d - f.tokens.shape[2], 0, pad_l)))
            masks.append(F.pad(f.mask, (0, pad_l), value=False))
        return TextFeatures(global_=torch.cat([f.global_ for f in feats], 1), tokens=torch.cat(toks, 1),
                            mask=torch.cat(masks, 1))


@register_backbone("multi", located=True)
def create_multi(location: str, **kw: Any) -> MultiBackbone:
    if kw:
        raise ValueError(f"multi backbone: takes no options (give them to its parts), got {sorted(kw)}")
    ids = [p.strip() for p in location.split(SEP)]
    if any(not i for i in ids):
        raise ValueError(f"multi backbone: empty part in {location!r}; expected multi:ID1{SEP}ID2...")
    return MultiBackbone([create_backbone(i) for i in ids])


__all__ = ["CompositeError", "MultiBackbone", "PartSlice", "composite_fields", "create_multi", "feature_parts",
           "fusion_backbone", "multi_id", "part_slices"]
