"""A split's cached features as tensors: :class:`SplitData` (a dataset plus its image and text feature tables),
:func:`load_split_data` (computes them through the feature cache on first use) and :class:`FeatureView` (fast row
gathering). Everything that reads cached features for training, evaluation or fusion goes through here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .backbones.base import ImageFeatures, TextFeatures
from .data.schema import CIRDataset, DataError, Query, join_fashioniq
from .features import dataset_texts


@dataclass
class SplitData:
    """A split with its cached features: ``images`` covers every image the split names, ``texts`` every text it
    can use (query texts, and for training every text ``training_text`` can return)."""

    dataset: CIRDataset
    images: Any  # ImageFeatureTable: .ids, .global_ [N,D], .tokens [N,T,Dt], .index(id)
    texts: Any  # TextFeatureTable: .global_ [M,D], .tokens [M,L,Dt], .mask [M,L], .index(text)



def load_split_data(cache: Any, dataset: CIRDataset, training: bool = False, progress: bool = False,
                    all_texts: bool = False) -> SplitData:
    """A split's cached features (computed on first use): its gallery and the texts its queries use; with
    ``training`` also every text a training step can draw (:func:`training_texts`). ``all_texts`` adds every caption
    variant and fine-grained text the annotations carry (:func:`cirfusion.features.dataset_texts`), for methods that
    read them; encoding only what is used keeps text encoding (the slow part on CPU) to one text per query."""
    images = cache.image_features(dataset.gallery.ids, dataset.gallery.paths, progress=progress)
    texts = list(dict.fromkeys(q.text for q in dataset.queries))
    if all_texts:
        texts += dataset_texts(dataset)
    if training:
        texts += training_texts(dataset)
    return SplitData(dataset, images, cache.text_features(texts, progress=progress))



def candidate_training_texts(dataset: CIRDataset, q: Query) -> list[str]:
    """Every text ``dataset.training_text(q, rng)`` can return (so they can all be encoded up front)."""
    if dataset.text_policy == "fashioniq" and len(q.captions) >= 2:
        c1, c2 = q.captions[0], q.captions[1]
        return list(dict.fromkeys([join_fashioniq(c1, c2), join_fashioniq(c2, c1), join_fashioniq(c1, ""), join_fashioniq(c2, "")]))
    if dataset.text_policy == "random" and q.captions:
        return list(dict.fromkeys(q.captions))
    return [q.text]


def training_texts(dataset: CIRDataset) -> list[str]:
    """The union of every query's candidate training texts, in a stable order."""
    out: dict[str, None] = {}
    for q in dataset.queries:
        if q.targets:
            out.update(dict.fromkeys(candidate_training_texts(dataset, q)))
    return list(out)



class FeatureView:
    """Fast row gathering from a split's feature tables. Global vectors are held as float32 tensors. Tokens are
    only read when the method uses them: the first such read loads that table's tokens into memory (fp16; random
    row gathers from a memory map are slow), e.g. 64 x 112 per image is 14 KB, 10k images 140 MB."""

    def __init__(self, images: Any, texts: Any) -> None:
        self.images, self.texts = images, texts
        self.img_global = torch.from_numpy(np.asarray(images.global_, dtype=np.float32))
        self.txt_global = torch.from_numpy(np.asarray(texts.global_, dtype=np.float32))
        self._img_tokens: np.ndarray | None = None
        self._txt_tokens: tuple[np.ndarray, np.ndarray] | None = None

    def image_row(self, image_id: str) -> int:
        try:
            return int(self.images.index(image_id))
        except (KeyError, ValueError, IndexError, DataError):
            raise DataError(None, image_id, "image id has no cached features (not in the split's image table)") from None

    def text_row(self, text: str) -> int:
        try:
            return int(self.texts.index(text))
        except (KeyError, ValueError, IndexError, DataError):
            raise DataError(None, text, "text has no cached features (not in the split's text table)") from None

    def image(self, rows: np.ndarray, tokens: bool) -> ImageFeatures:
        rows = np.asarray(rows, dtype=np.int64)
        g = self.img_global[torch.from_numpy(rows)]
        if tokens:
            if self._img_tokens is None:
                self._img_tokens = np.ascontiguousarray(self.images.tokens)
            t = torch.from_numpy(self._img_tokens[rows].astype(np.float32))
        else:
            t = torch.zeros(len(rows), 0, self.images.tokens.shape[-1])
        return ImageFeatures(global_=g, tokens=t)

    def text(self, rows: np.ndarray, tokens: bool) -> TextFeatures:
        rows = np.asarray(rows, dtype=np.int64)
        g = self.txt_global[torch.from_numpy(rows)]
        if tokens:
            if self._txt_tokens is None:
                self._txt_tokens = np.ascontiguousarray(self.texts.tokens), np.ascontiguousarray(self.texts.mask, dtype=bool)
            t = torch.from_numpy(self._txt_tokens[0][rows].astype(np.float32))
            m = torch.from_numpy(self._txt_tokens[1][rows])
        else:
            t = torch.zeros(len(rows), 0, self.texts.tokens.shape[-1])
            m = torch.zeros(len(rows), 0, dtype=torch.bool)
        # The raw strings and the table's encoder travel along for methods that read them (FineCIR's parse).
        names = getattr(self.texts, "texts", None)
        return TextFeatures(global_=g, tokens=t, mask=m, texts=None if names is None else [names[int(r)] for r in rows],
                            encoder=getattr(self.texts, "encoder", None))
