"""Train and report DetailFusion on a benchmark in one call: its stage-1 edit pairs found for the benchmark, the three
stages through the shared loop, every output (fused, static, each branch) scored on val and test, and the per-query
alpha summarised -- what the quickstart and ``benchmarks/detailfusion_ablation.py`` call.

    from cirfusion.methods.detailfusion_run import quickstart_detailfusion
    run = quickstart_detailfusion("synthetic", root, feature_cache, out / "runs" / "synthetic" / "detailfusion")
    run.test["fused"]        # test metrics of DetailFusion; run.test["gm"], ["di"], ["static"] the ablations
    run.alpha_of(rows)       # [{"gm": a, "di": 1 - a}] per test query row, for a report's samples

Stage-1 data per benchmark (:func:`edit_pair_dataset`): the synthetic benchmark's ``edit_pairs`` split (train's atomic
edits plus its ``pretrain`` scenes'), the catalog's photo edits of its train split, or a dataset's own
``edit_pairs`` split (an InstructPix2Pix folder through ``ip2p``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import load_checkpoint
from ..data.registry import load_dataset
from ..data.schema import CIRDataset
from ..evaluation import evaluate
from ..seeding import seed_everything
from ..train import TrainConfig, train
from ..views import FeatureView, SplitData, load_split_data
from .detailfusion import OUTPUTS, DetailFusion, describe_alpha
from .registry import create_method

# The quickstart's DetailFusion schedule (epochs per stage) on its small synthetic benchmark: about a minute and a
# half on one free core (the DI branch is ~0.3 s per 128-query step there).
QUICKSTART_STAGE_EPOCHS = {"di-pretrain": 2, "joint": 3, "compositor": 1}


def edit_pair_dataset(benchmark: str, root: str | Path, **options: Any) -> CIRDataset:
    """The stage-1 image-editing pairs that go with ``benchmark`` (see the module docstring)."""
    return load_dataset(benchmark, root, "edit_pairs", **options)


@dataclass
class DetailFusionRun:
    """A trained DetailFusion and its numbers: ``val`` / ``test`` map an output (``fused``, ``static``, ``gm``, ``di``;
    those the model has) to its metrics; ``alpha`` summarises the per-query alpha of the fused output on test."""

    model: DetailFusion
    checkpoint: Path
    val: dict[str, dict[str, float]]
    test: dict[str, dict[str, float]]
    alpha: dict[str, float]
    seconds: float
    test_data: SplitData | None = None
    timings: dict[str, float] = field(default_factory=dict)
    # the training loop's choice on val: the kept epoch, the metric it was judged on and its value
    best_epoch: int | None = None
    val_metric: str | None = None
    best_metric: float | None = None

    def alpha_of(self, rows: Sequence[int]) -> list[dict[str, float]]:
        """``{"gm": alpha_GM, "di": alpha_DI}`` of the given test query rows (the fused output's explanation)."""
        if self.test_data is None:
            raise ValueError("alpha_of needs the run's test split (train_detailfusion(..., test=True))")
        a = query_alphas(self.model, self.test_data, rows)
        return [{"gm": float(x[0]), "di": float(x[1])} for x in a]


def query_alphas(model: DetailFusion, data: SplitData, rows: Sequence[int] | None = None, chunk: int = 512) -> torch.Tensor:
    """``[Q, 2]`` alpha (GM, DI) of the fused output for the given query rows of ``data`` (all by default)."""
    ds, view = data.dataset, FeatureView(data.images, data.texts)
    rows = list(range(len(ds.queries))) if rows is None else list(rows)
    before = model.output
    model.use_output("fused" if model.params.branches == "both" and model.params.fusion == "adaptive" else before)
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for s in range(0, len(rows), chunk):
                qs = [ds.queries[r] for r in rows[s : s + chunk]]
                ref = view.image(np.array([view.image_row(q.reference) for q in qs]), True)
                text = view.text(np.array([view.text_row(q.text) for q in qs]), True)
                out.append(model.explain(model.encode_query(ref, text)))
    finally:
        model.use_output(before)
    return torch.cat(out) if out else torch.zeros(0, 2)


def outputs_of(model: DetailFusion) -> tuple[str, ...]:
    """The outputs a trained model can score with: every one for the full model, else its single branch."""
    h = model.params
    if h.branches != "both":
        return (h.branches,)
    return OUTPUTS if h.fusion == "adaptive" else ("static", "gm", "di")


def score_outputs(model: DetailFusion, data: SplitData, outputs: Sequence[str]) -> dict[str, dict[str, float]]:
    before, res = model.output, {}
    try:
        for o in outputs:
            res[o] = evaluate(model.use_output(o), data, progress=False)
    finally:
        model.use_output(before)
    return res


def train_detailfusion(
    benchmark: str,
    root: str | Path,
    cache: Any,
    run_dir: str | Path,
    *,
    hparams: Mapping[str, Any] | None = None,
    config: TrainConfig | None = None,
    splits: Mapping[str, SplitData] | None = None,
    dataset_options: Mapping[str, Any] | None = None,
    test: bool = True,
    progress: bool = False,
    backbone_info: Mapping[str, Any] | None = None,
) -> DetailFusionRun:
    """Train DetailFusion (``hparams``) on ``benchmark``'s train split with its best epoch on val, then score every
    output on val and (with ``test``) on test. ``cache`` is a :class:`~cirfusion.features.FeatureCache`; ``splits``
    may hand in already loaded ``train`` / ``val`` / ``test`` / ``edit_pairs`` data (loaded from the cache
    otherwise)."""
    t0 = time.perf_counter()
    opts = dict(dataset_options or {})
    cfg = config or TrainConfig(progress=progress)
    data = dict(splits or {})
    timings: dict[str, float] = {}
    for s in ("train", "val", *(("test",) if test else ())):
        if s not in data:
            data[s] = load_split_data(cache, load_dataset(benchmark, root, s, **opts), training=(s == "train"), progress=progress)
    # The initial weights come from the config's seed, not from whatever the process's RNG holds (the loop seeds
    # itself only after the model is built): the same call gives the same model in any process, after any job.
    seed_everything(cfg.seed)
    method = create_method("detailfusion", cache.backbone, **dict(hparams or {}))
    assert isinstance(method, DetailFusion)
    extra = {}
    for stage in method.stages():
        if stage.split is not None and stage.split not in extra:
            if stage.split not in data:
                ds = edit_pair_dataset(benchmark, root) if stage.split == "edit_pairs" else load_dataset(benchmark, root, stage.split)
                data[stage.split] = load_split_data(cache, ds, training=True, progress=progress)
            extra[stage.split] = data[stage.split]
    timings["data_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    res = train(method, data["train"], data["val"], run_dir, cfg, extra_splits=extra, overwrite=True,
                backbone_info=backbone_info)
    timings["train_s"] = time.perf_counter() - t1
    best = load_checkpoint(res.best_dir)
    assert isinstance(best, DetailFusion)
    outs = outputs_of(best)
    val = score_outputs(best, data["val"], outs)
    test_metrics = score_outputs(best, data["test"], outs) if test else {}
    alpha = describe_alpha(query_alphas(best, data["test"])) if test and "fused" in outs else {}
    return DetailFusionRun(best, Path(res.best_dir), val, test_metrics, alpha, time.perf_counter() - t0,
                           data.get("test"), timings, res.best_epoch, res.val_metric, res.best_metric)


def quickstart_detailfusion(benchmark: str, root: str | Path, cache: Any, run_dir: str | Path, seed: int = 0,
                            progress: bool = False, backbone_info: Mapping[str, Any] | None = None,
                            stage_epochs: Mapping[str, int] | None = None,
                            splits: Mapping[str, SplitData] | None = None) -> DetailFusionRun:
    """DetailFusion as the quickstart trains it: the default hyper-parameters, :data:`QUICKSTART_STAGE_EPOCHS`, the
    benchmark's stage-1 edit pairs; every output scored on val and test (``run.test["fused"]`` is the table row).
    ``splits``: already loaded data, as :func:`train_detailfusion` takes it."""
    cfg = TrainConfig(epochs=1, seed=seed, progress=progress, stage_epochs=dict(stage_epochs or QUICKSTART_STAGE_EPOCHS))
    return train_detailfusion(benchmark, root, cache, run_dir, config=cfg, splits=splits, progress=progress,
                              backbone_info=backbone_info)


__all__ = ["QUICKSTART_STAGE_EPOCHS", "DetailFusionRun", "edit_pair_dataset", "outputs_of", "query_alphas",
           "quickstart_detailfusion", "score_outputs", "train_detailfusion"]
