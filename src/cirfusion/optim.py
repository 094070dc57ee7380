"""The optimiser and learning-rate schedule shared by the training loop and DAFM's fusion fitting."""

from __future__ import annotations

import math

import torch


def lr_at(step: int, total: int, base: float, warmup: float, min_ratio: float) -> float:
    """Linear warm-up over ``warmup * total`` steps, then cosine from ``base`` to ``base * min_ratio``."""
    w = max(1, round(warmup * total))
    if step < w:
        return base * (step + 1) / w
    progress = min(1.0, (step - w) / max(1, total - w))
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(named: list[tuple[str, torch.nn.Parameter]], lr: float, weight_decay: float) -> torch.optim.AdamW:
    # No weight decay on biases, norms, embeddings-like vectors and the logit scale (any tensor with < 2 dims).
    decay = [p for _, p in named if p.dim() >= 2]
    no_decay = [p for _, p in named if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.98), eps=1e-6)
