"""Python entry point: ``model = cirfusion.load("runs/clip4cir/best")``.

A :class:`CIRModel` is a trained method plus the backbone its checkpoint names (created on first use, and checked
against the checkpoint's weights hash), so it works on raw images and texts::

    model = cirfusion.load("runs/clip4cir/best")
    q = model.encode_query(["shirt.jpg"], ["same but in red"])
    g = model.encode_gallery(["a.jpg", "b.jpg", "c.jpg"])
    model.similarity(q, g)                           # [1, 3]
    model.rank("shirt.jpg", "same but in red", ["a.jpg", "b.jpg", "c.jpg"], k=2)

Backbone outputs are rounded to float16 exactly as the feature cache stores them, so scores computed here equal
the scores of ``cirfusion eval`` on the same images.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .backbones import backbone_from_checkpoint
from .backbones.base import Backbone, ImageFeatures, TextFeatures
from .checkpoint import CONFIG_FILE, CheckpointError, load_checkpoint, read_config
from .data.images import load_image
from .embeddings import Embedding, cat_embeddings, embedding_len
from .errors import CirfusionError
from .methods.base import CIRMethod

# A file path, the bytes of an image file, or a PIL image: all go through data.images.load_image (EXIF rotation,
# alpha on white, 16-bit/float rescaling, size and aspect limits).
ImageLike = Image.Image | str | Path | bytes


class CIRInputError(CirfusionError, ValueError, TypeError):
    """A bad argument to the Python API (no images, no text, k < 1, ...); the message says which and why.
    Both a ValueError and a TypeError, as the errors these checks replace were one or the other."""


class CIRModel:
    """A loaded checkpoint (``.method``, ``.config``) with lazy access to its backbone."""

    def __init__(self, method: CIRMethod, config: dict[str, Any], path: Path | None = None, backbone: Backbone | None = None,
                 *, backbone_dirs: Sequence[str | Path] = (), allow_download: bool = False) -> None:
        self.method = method.eval()
        self.config = config
        self.path = path
        self._backbone = backbone
        # Where the backbone named in the (untrusted) checkpoint may be read from: see backbone_from_checkpoint.
        self._backbone_dirs = [*([path] if path is not None else []), *(Path(d) for d in backbone_dirs)]
        self._allow_download = allow_download
        if backbone is not None:
            self._check_backbone(backbone)

    def __repr__(self) -> str:
        return f"CIRModel(method={self.config['method']!r}, backbone={self.backbone_id!r}, path={str(self.path)!r})"

    @property
    def backbone_id(self) -> str:
        return str(self.config.get("backbone", {}).get("id") or self.method.dims.backbone_id)

    def _check_backbone(self, bb: Backbone) -> None:
        want = self.config.get("backbone", {}).get("weights_hash") or self.method.dims.weights_hash
        got = bb.weights_hash()
        if want and got != want:
            raise CheckpointError(
                f"{self.path}: trained on features of backbone {self.backbone_id!r} with weights {want[:12]}..., "
                f"but the backbone given has weights {got[:12]}...; its features would not match the model"
            )

    @property
    def backbone(self) -> Backbone:
        if self._backbone is None:
            if not self.backbone_id:
                raise CheckpointError(f"{self.path}: the checkpoint names no backbone; pass backbone= to cirfusion.load")
            source = self.path / CONFIG_FILE if self.path is not None else None
            bb = backbone_from_checkpoint(self.backbone_id, source, self._backbone_dirs, self._allow_download)
            self._check_backbone(bb)
            self._backbone = bb.eval()
        return self._backbone

    # ---- features ----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def image_features(self, images: Sequence[ImageLike], batch_size: int = 32) -> ImageFeatures:
        images = _image_list(images, "image_features")
        bb = self.backbone
        parts = []
        for s in range(0, len(images), batch_size):
            pix = [bb.preprocess(load_image(im)) for im in images[s : s + batch_size]]
            f = bb.encode_image(torch.stack(pix))
            parts.append(ImageFeatures(global_=_fp16(f.global_), tokens=_fp16(f.tokens)))
        return ImageFeatures(global_=torch.cat([p.global_ for p in parts]), tokens=torch.cat([p.tokens for p in parts]))

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> TextFeatures:
        texts = _text_list(texts, "text_features")
        bb = self.backbone
        f = bb.encode_text(list(texts))
        n, length = f.mask.shape
        tokens = torch.zeros(n, bb.max_text_tokens, f.tokens.shape[-1])
        mask = torch.zeros(n, bb.max_text_tokens, dtype=torch.bool)
        tokens[:, :length], mask[:, :length] = _fp16(f.tokens), f.mask.bool()  # padded like the cache
        tokens[~mask] = 0
        # The raw strings and this encoder travel along for methods that read them (FineCIR's parse).
        return TextFeatures(global_=_fp16(f.global_), tokens=tokens, mask=mask, texts=list(texts), encoder=self.text_features)

    # ---- embeddings and scores ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_query(self, images: Sequence[ImageLike], texts: Sequence[str]) -> Embedding:
        images, texts = _image_list(images, "encode_query"), _text_list(texts, "encode_query")
        if len(images) != len(texts):
            raise CIRInputError(f"encode_query: {len(images)} reference images but {len(texts)} texts")
        return self.method.encode_query(self.image_features(images), self.text_features(texts))

    @torch.no_grad()
    def encode_gallery(self, images: Sequence[ImageLike], batch_size: int = 64) -> Embedding:
        images = _image_list(images, "encode_gallery", "the gallery is empty: give at least one image")
        return cat_embeddings([self.method.encode_gallery(self.image_features(images[s : s + batch_size]))
                               for s in range(0, len(images), batch_size)])

    @torch.no_grad()
    def similarity(self, q: Embedding, g: Embedding) -> torch.Tensor:
        return self.method.similarity(q, g)

    @torch.no_grad()
    def rank(self, image: ImageLike, text: str, gallery: Sequence[ImageLike] | Embedding, k: int = 10, *,
             keep_reference: bool = False) -> list[tuple[int, float]]:
        """The ``k`` best gallery positions for one query, best first, as ``(index, score)``. ``gallery`` is a list
        of images or an embedding from :meth:`encode_gallery` (encode once, rank many).

        The reference is not its own answer: a gallery entry that is the reference image (the same backbone
        features, i.e. the same picture) is left out, so fewer than ``k`` results come back when the gallery is
        small; ``keep_reference=True`` keeps it (it then usually ranks first)."""
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise CIRInputError(f"rank: k must be a positive integer, got {k!r}")
        if not isinstance(text, str):
            raise CIRInputError(f"rank: text must be a string (the modification text), got {type(text).__name__}")
        ref = self.image_features(_image_list([image], "rank"))
        if isinstance(gallery, (list, tuple)) and all(isinstance(x, (Image.Image, str, Path, bytes)) for x in gallery):
            feats = self.image_features(_image_list(gallery, "rank", "the gallery is empty: give at least one image"))
            g = cat_embeddings([self.method.encode_gallery(_feature_rows(feats, s, s + 64))
                                for s in range(0, int(feats.global_.shape[0]), 64)])
            same = (feats.global_ == ref.global_).all(1)  # both rounded to float16: equal features, equal picture
        else:
            g = gallery
            if embedding_len(g) == 0:
                raise CIRInputError("rank: the gallery embedding has no rows")
            same = _same_rows(g, self.method.encode_gallery(ref))
        s = self.similarity(self.encode_query_features(ref, [text]), g)[0].float()
        if not keep_reference:
            s = s.masked_fill(same, float("-inf"))
        available = int(s.shape[0]) - (0 if keep_reference else int(same.sum()))
        if available < 1:
            return []
        top = torch.topk(s, min(int(k), available))
        return [(int(i), float(v)) for v, i in zip(top.values, top.indices, strict=True)]

    @torch.no_grad()
    def encode_query_features(self, ref: ImageFeatures, texts: Sequence[str]) -> Embedding:
        """:meth:`encode_query` for reference images whose features are already computed (:meth:`image_features`)."""
        return self.method.encode_query(ref, self.text_features(_text_list(texts, "encode_query_features")))


def _feature_rows(f: ImageFeatures, start: int, stop: int) -> ImageFeatures:
    return ImageFeatures(global_=f.global_[start:stop], tokens=f.tokens[start:stop])


def _same_rows(g: Embedding, one: Embedding) -> torch.Tensor:
    """``[N]`` True where gallery row ``n`` of ``g`` is the one-row embedding ``one`` (every leaf equal: integer
    leaves exactly, float leaves within the rounding of their storage dtype, as batched and single encodings may
    differ in the last bits)."""
    leaves_g, leaves_1 = _leaves(g), _leaves(one)
    out = torch.ones(int(leaves_g[0].shape[0]), dtype=torch.bool)
    for a, b in zip(leaves_g, leaves_1, strict=True):
        a2, b2 = a.reshape(a.shape[0], -1), b.reshape(1, -1).to(a.dtype)
        if a.is_floating_point():
            tol = 4e-3 if a.dtype in (torch.float16, torch.bfloat16) else 1e-5
            out &= ((a2.float() - b2.float()).abs() <= tol).all(1)
        else:
            out &= (a2 == b2).all(1)
    return out


def _leaves(e: Embedding) -> list[torch.Tensor]:
    if isinstance(e, torch.Tensor):
        return [e]
    parts = e.values() if isinstance(e, dict) else e
    return [leaf for p in parts for leaf in _leaves(p)]


def _image_list(images: Sequence[ImageLike], where: str, empty: str = "no images given") -> list[ImageLike]:
    """``images`` as a list, refusing a lone image (a string would be read as a list of characters) and none."""
    if images is None or isinstance(images, (str, Path, bytes, Image.Image)):
        raise CIRInputError(f"{where}: expected a list of images, got {type(images).__name__}")
    out = list(images)
    if not out:
        raise CIRInputError(f"{where}: {empty}")
    return out


def _text_list(texts: Sequence[str], where: str) -> list[str]:
    """``texts`` as a non-empty list of strings: a lone string or a None among them is a clear error."""
    if texts is None or isinstance(texts, str):
        raise CIRInputError(f"{where}: expected a list of strings, got {type(texts).__name__}")
    out = list(texts)
    if not out:
        raise CIRInputError(f"{where}: no texts given")
    bad = next((i for i, t in enumerate(out) if not isinstance(t, str)), None)
    if bad is not None:
        raise CIRInputError(f"{where}: text #{bad} is {type(out[bad]).__name__}, not a string")
    return out


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.detach().float().cpu().half().float()


def load(path: str | Path, backbone: Backbone | None = None, *, backbone_dirs: Sequence[str | Path] = (),
         allow_download: bool = False) -> CIRModel:
    """Load a checkpoint directory (``config.json`` + ``model.safetensors``) as a ready :class:`CIRModel`.

    ``backbone``: an already built backbone to use (must match the checkpoint's weights hash); by default the
    backbone named in the checkpoint is created when first needed, and only from files shipped with cirfusion, the
    checkpoint directory, ``backbone_dirs``, or (``allow_download=True``) the Hugging Face hub: a checkpoint from
    elsewhere never makes cirfusion download or read other directories."""
    path = Path(path)
    config = read_config(path)
    return CIRModel(load_checkpoint(path), config, path, backbone, backbone_dirs=backbone_dirs, allow_download=allow_download)


def load_method(path: str | Path) -> CIRMethod:
    """Just the method (works on cached features; no backbone)."""
    return load_checkpoint(path)
