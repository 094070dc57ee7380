"""FineCIR in one call, for the quickstart and scripts: train on a benchmark's cached features (epoch chosen on
val), evaluate on test once, and return the parsed scene graph of sample test queries for a report.

    from cirfusion.finecir_run import run_finecir
    fr = run_finecir(split_data, backbone, out / "runs" / "synthetic" / "finecir", epochs=4, sample_rows=rows)
    fr.metrics            # test metrics (percent)
    fr.graphs[0]          # {"qid", "text", "graph": {"entities", "relations", "edits"}, "node_sets": [[entity, attr..]]}

``split_data`` maps "train", "val" and "test" to :class:`~cirfusion.views.SplitData` from a
:class:`~cirfusion.features.FeatureCache` (what the quickstart already has per backbone); the parses are cached next
to the features.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint import load_checkpoint
from .evaluation import evaluate
from .methods.finecir import FineCIR
from .methods.registry import create_method
from .parse_cache import ParseCache, get_parser
from .seeding import seed_everything
from .train import TrainConfig, train
from .views import SplitData


@dataclass
class FineCIRRun:
    checkpoint: Path
    metrics: dict[str, float]
    val_metric: str | None
    best_epoch: int | None
    seconds: float
    graphs: list[dict[str, Any]] = field(default_factory=list)
    best_metric: float | None = None  # val_metric's value at best_epoch (the loop's choice on val)


def parsed_graphs(method: FineCIR, data: SplitData, rows: Sequence[int]) -> list[dict[str, Any]]:
    """The graph FineCIR read for each query row of ``data`` (its parser, through the parse cache)."""
    qs = [data.dataset.queries[int(r)] for r in rows]
    encoder = getattr(data.texts, "encoder", None)
    cache_dir = getattr(getattr(encoder, "__self__", None), "cache_dir", None)
    p = method.params
    graphs = ParseCache(get_parser(p.parser), cache_dir).graphs([q.text for q in qs])
    return [{"qid": q.qid, "text": q.text, "graph": g, "node_sets": method.node_sets_of(g)}
            for q, g in zip(qs, graphs, strict=True)]


def run_finecir(data: Mapping[str, SplitData], backbone: Any, run_dir: str | Path, epochs: int = 4, seed: int = 0,
                batch_size: int = 128, progress: bool = False, sample_rows: Sequence[int] = (),
                backbone_info: Mapping[str, Any] | None = None, overwrite: bool = True, **hparams: Any) -> FineCIRRun:
    """Train FineCIR (``hparams`` as ``--hparam``) on ``data["train"]``, keep the best epoch on ``data["val"]``,
    evaluate it on ``data["test"]``; ``sample_rows`` (test query rows) get their parsed graphs."""
    t0 = time.perf_counter()
    seed_everything(seed)
    method = create_method("finecir", backbone, **hparams)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, seed=seed, progress=progress)
    res = train(method, data["train"], data["val"], run_dir, cfg, backbone_info=backbone_info, overwrite=overwrite)
    best = load_checkpoint(res.best_dir)
    assert isinstance(best, FineCIR)
    metrics = evaluate(best, data["test"])
    graphs = parsed_graphs(best, data["test"], sample_rows) if sample_rows else []
    return FineCIRRun(res.best_dir, metrics, res.val_metric, res.best_epoch, time.perf_counter() - t0, graphs,
                      res.best_metric)
