"""Evaluation of a method on a split: full-gallery scores in query chunks, the retrieval metrics, and which
validation metric selects the best epoch."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import torch
from tqdm.auto import tqdm

from .data.schema import CIRDataset
from .embeddings import Embedding, cat_embeddings
from .errors import UnknownNameError
from .methods.base import CIRMethod
from .metrics import RetrievalMetrics
from .views import FeatureView, SplitData


@torch.no_grad()
def encode_gallery(method: CIRMethod, view: FeatureView, ids: list[str], chunk: int = 1024) -> Embedding:
    rows = np.array([view.image_row(i) for i in ids], dtype=np.int64)
    parts = [method.encode_gallery(view.image(rows[s : s + chunk], method.uses_image_tokens)) for s in range(0, len(rows), chunk)]
    return cat_embeddings(parts)


@torch.no_grad()
def score_blocks(
    method: CIRMethod, view: FeatureView, dataset: CIRDataset, chunk: int = 512, progress: bool = False
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(row_start, scores [rows, N])`` over every query of ``dataset`` against its whole gallery."""
    was_training = method.training
    method.eval()
    try:
        g = encode_gallery(method, view, dataset.gallery.ids)
        queries = dataset.queries
        bar = tqdm(range(0, len(queries), chunk), desc=f"scoring {dataset.key}", disable=not progress, leave=False)
        for s in bar:
            qs = queries[s : s + chunk]
            ref = view.image(np.array([view.image_row(q.reference) for q in qs]), method.uses_image_tokens)
            text = view.text(np.array([view.text_row(q.text) for q in qs]), method.uses_text_tokens)
            yield s, method.similarity(method.encode_query(ref, text), g).float()
    finally:
        method.train(was_training)


def evaluate(method: CIRMethod, data: SplitData, chunk: int = 512, progress: bool = False, view: FeatureView | None = None) -> dict[str, float]:
    """Retrieval metrics (percent) of ``method`` on a split, computed block by block."""
    view = view or FeatureView(data.images, data.texts)
    metrics = RetrievalMetrics(data.dataset)
    for start, block in score_blocks(method, view, data.dataset, chunk, progress):
        metrics.update(start, block.numpy())
    return metrics.compute()


def pick_val_metric(name: str, metrics: Mapping[str, float], dataset: CIRDataset) -> str:
    if name != "auto":
        if name not in metrics:
            raise UnknownNameError(f"validation metric {name!r} is not computed on {dataset.key}; available: {sorted(metrics)}")
        return name
    if "Rmean" in metrics:
        return "Rmean"
    if any(len(set(q.targets)) > 1 for q in dataset.queries) and "mAP@10" in metrics:
        return "mAP@10"
    return "R@10"
