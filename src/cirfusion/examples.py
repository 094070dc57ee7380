"""Training examples: the trainable queries of a split as feature-table rows, the per-epoch plan (order, sampled
target, training text), mined hard negatives, and the batches the training loop feeds to a method's loss."""

from __future__ import annotations

import random

import numpy as np
import torch

from .data.schema import DataError
from .methods.base import Batch, CIRMethod
from .views import FeatureView, SplitData


def reference_neighbours(global_: torch.Tensor, rows: np.ndarray, k: int, chunk: int = 1024) -> np.ndarray:
    """``[len(rows), k]``: for each image row, its ``k`` most similar other images (cosine of the frozen global
    features), most similar first."""
    g = torch.nn.functional.normalize(global_.float(), dim=-1)
    k = min(k, g.shape[0] - 1)
    out = []
    for s in range(0, len(rows), chunk):
        r = torch.from_numpy(rows[s : s + chunk])
        sims = g[r] @ g.T
        sims[torch.arange(len(r)), r] = float("-inf")  # not itself
        out.append(sims.topk(k, dim=1).indices.numpy())
    return np.concatenate(out) if out else np.zeros((0, k), dtype=np.int64)


class Examples:
    """The trainable queries of a split (those with targets) as image-table rows.

    ``hard_negatives=k > 0``: each example also gets ``k`` hard negatives per epoch, its positives excluded, drawn
    from (``source``) ``"neighbours"``: the ``pool`` images most similar to its reference (frozen global features), or
    ``"subset"``: its annotated subset (CIRR's ``img_set``, the synthetic benchmark's one-detail variants -- the
    reference included), falling back to the neighbours for a query without one. In-batch negatives are mostly
    unrelated images, so a model trained on them alone learns to find the right scene rather than the detail that
    separates the target from its near-duplicates. (On the synthetic benchmark neither source has lifted held-out
    Rsubset@1 above chance yet: the models fit the subsets of their training queries and do not generalise.)
    """

    SOURCES = ("neighbours", "subset")

    def __init__(self, data: SplitData, view: FeatureView, hard_negatives: int = 0, pool: int = 32,
                 source: str = "neighbours") -> None:
        if source not in self.SOURCES:
            raise ValueError(f"hard_negative_source must be one of {self.SOURCES}, got {source!r}")
        self.data, self.view = data, view
        self.queries = [q for q in data.dataset.queries if q.targets]
        if not self.queries:
            raise DataError(data.dataset.files[0] if data.dataset.files else None, None,
                            f"split {data.dataset.key} has no query with a target: nothing to train on")
        self.ref_rows = np.array([view.image_row(q.reference) for q in self.queries], dtype=np.int64)
        self.positives = [np.unique(np.array([view.image_row(t) for t in q.targets], dtype=np.int64)) for q in self.queries]
        self.hard_negatives = int(hard_negatives)
        self.candidates: np.ndarray | None = None
        if self.hard_negatives > 0:
            if source == "subset" and all(q.subset for q in self.queries):
                cand = np.zeros((len(self.queries), 0), dtype=np.int64)  # no fallback needed (~10 s saved on 24k queries)
            else:
                refs, inv = np.unique(self.ref_rows, return_inverse=True)
                cand = reference_neighbours(view.img_global, refs, max(pool, self.hard_negatives))[inv]
            if source == "subset":
                cand = self._subset_candidates(cand)
            for i, p in enumerate(self.positives):
                cand[i, np.isin(cand[i], p)] = -1
            self.candidates = cand

    def _subset_candidates(self, neighbours: np.ndarray) -> np.ndarray:
        """Per example, its subset members' image rows (padded with -1), or its reference's neighbours without one."""
        rows = []
        for i, q in enumerate(self.queries):
            if q.subset:
                rows.append(np.array([self.view.image_row(m) for m in dict.fromkeys(q.subset)], dtype=np.int64))
            else:
                rows.append(neighbours[i])
        width = max(len(r) for r in rows)
        out = np.full((len(rows), width), -1, dtype=np.int64)
        for i, r in enumerate(rows):
            out[i, : len(r)] = r
        return out

    def __len__(self) -> int:
        return len(self.queries)

    def epoch_plan(self, seed: int, stage: int, epoch: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(order, target row per example, text per example) for one epoch; a pure function of its arguments
        (what makes a resumed run identical to an uninterrupted one)."""
        rng = np.random.default_rng([seed, stage, epoch])
        order = rng.permutation(len(self.queries))
        targets = np.array([p[rng.integers(len(p))] if len(p) > 1 else p[0] for p in self.positives], dtype=np.int64)
        text_rng = random.Random(f"{seed}/{stage}/{epoch}")
        texts = [self.data.dataset.training_text(q, text_rng) for q in self.queries]
        return order, targets, texts

    def epoch_negatives(self, seed: int, stage: int, epoch: int) -> np.ndarray | None:
        """``[n, k]`` image rows of this epoch's mined hard negatives per example (-1 = none), or ``None``."""
        if self.candidates is None:
            return None
        rng = np.random.default_rng([seed, stage, epoch, 1])
        keys = rng.random(self.candidates.shape)
        keys[self.candidates < 0] = np.inf  # excluded candidates sort last
        pick = np.argsort(keys, axis=1)[:, : self.hard_negatives]
        return np.take_along_axis(self.candidates, pick, axis=1)

    def batch(self, idx: np.ndarray, targets: np.ndarray, texts: list[str], method: CIRMethod,
              negatives: np.ndarray | None = None) -> Batch:
        """The batch of examples ``idx`` given an epoch's plan (and mined negatives)."""
        t = [texts[i] for i in idx]
        ref_rows, tgt_rows = self.ref_rows[idx], targets[idx]
        neg_feats = neg_rows = None
        if negatives is not None:
            neg = np.unique(negatives[idx])
            neg = neg[neg >= 0]
            neg_feats, neg_rows = self.view.image(neg, method.uses_image_tokens), torch.from_numpy(neg)
        return Batch(
            ref=self.view.image(ref_rows, method.uses_image_tokens),
            text=self.view.text(np.array([self.view.text_row(x) for x in t]), method.uses_text_tokens),
            target=self.view.image(tgt_rows, method.uses_image_tokens),
            ref_rows=torch.from_numpy(ref_rows),
            target_rows=torch.from_numpy(tgt_rows),
            positives=[self.positives[i] for i in idx],
            texts=t,
            queries=[self.queries[i] for i in idx],
            negatives=neg_feats,
            negative_rows=neg_rows,
        )


def shard_batches(order: np.ndarray, batch_size: int, rank: int, world: int) -> list[np.ndarray]:
    """This rank's batches of an epoch: an equal share of ``order`` per rank, cut into full batches (the last
    partial batch is dropped: a tiny batch gives InfoNCE almost no negatives) -- unless the split is smaller than
    one batch, then it is one batch."""
    n = (len(order) // world) * world
    mine = order[:n][rank::world]
    if len(mine) < batch_size:
        return [mine] if len(mine) > 1 else []
    return [mine[s : s + batch_size] for s in range(0, len(mine) - batch_size + 1, batch_size)]
