"""Embeddings as trees: a method's query or gallery embedding is a tensor, or a tuple/list/dict of tensors whose
first dimension is the batch (e.g. a global vector and a token map). :func:`tree_map` is the one recursion over that
structure; batching helpers are one-liners on top of it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

Embedding = Any  # a Tensor, or a tuple/list/dict of Tensors whose first dimension is the batch


def tree_map(fn: Callable[..., torch.Tensor], *trees: Embedding) -> Embedding:
    """Apply ``fn`` leaf-wise over one or more embeddings of the same structure."""
    first = trees[0]
    if isinstance(first, torch.Tensor):
        return fn(*trees)
    if isinstance(first, (tuple, list)):
        return type(first)(tree_map(fn, *parts) for parts in zip(*trees, strict=True))
    if isinstance(first, dict):
        return {k: tree_map(fn, *(t[k] for t in trees)) for k in first}
    raise TypeError(f"not an embedding (a tensor, or a tuple/list/dict of tensors): {type(first).__name__}")


def first_leaf(emb: Embedding) -> torch.Tensor:
    if isinstance(emb, torch.Tensor):
        return emb
    if isinstance(emb, (tuple, list)) and emb:
        return first_leaf(emb[0])
    if isinstance(emb, dict) and emb:
        return first_leaf(next(iter(emb.values())))
    raise TypeError(f"not an embedding (a tensor, or a tuple/list/dict of tensors): {type(emb).__name__}")


def embedding_len(emb: Embedding) -> int:
    """The batch size of an embedding."""
    return int(first_leaf(emb).shape[0])


def cat_embeddings(chunks: Sequence[Embedding]) -> Embedding:
    """Concatenate embedding chunks along the batch dimension."""
    return tree_map(lambda *xs: torch.cat(xs, dim=0), *chunks)


def slice_embeddings(emb: Embedding, start: int, stop: int | None) -> Embedding:
    """Rows ``start:stop`` of an embedding."""
    return tree_map(lambda x: x[start:stop], emb)


def take_embeddings(emb: Embedding, index: torch.Tensor) -> Embedding:
    """Rows ``index`` (1-D int tensor) of an embedding."""
    return tree_map(lambda x: x.index_select(0, index), emb)


def rows_of(emb: Embedding, rows: slice | torch.Tensor) -> Embedding:
    """Rows given as a slice or an index tensor."""
    if isinstance(rows, slice):
        return slice_embeddings(emb, rows.start or 0, rows.stop)
    return take_embeddings(emb, rows)
