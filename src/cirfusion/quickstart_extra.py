"""DetailFusion and FineCIR in the quickstart (issues 12 and 10), next to the DAFM pool but not in it.

Each is trained on a benchmark's train split with its epochs chosen on val/select, as the pool's are
(docs/protocol.md), read once on test for its table row, and explained on the report's sample queries:

- **DetailFusion** (:mod:`cirfusion.methods.detailfusion_run`): the three stages with :data:`QUICKSTART_STAGE_EPOCHS`,
  stage 1 on the benchmark's edit pairs; the row is the fused output; its explanation is the per-query alpha over the
  global (GM) and detail (DI) branches. The branch-alone and static outputs are scored too and go to the manifest.
- **FineCIR** (:mod:`cirfusion.finecir_run`): trained for ``epochs`` epochs; its explanation is the scene graph the
  parser read from the query's text (entities with attributes, relations, edits).

Neither joins the fused pool: the DAFM rows are what they are without them (``cirfusion fuse`` can add them).

Text: on the synthetic benchmark both read the queries' *fine* text by default (the complete ``finemt`` edits), the
text both methods are built for, and their rows say so (``detailfusion (fine text)``). The pool reads the coarse text,
so those rows are the same test queries and targets under a more precise text, not a like-for-like comparison with
the pool; ``text="coarse"`` puts them on the pool's text (rows ``detailfusion``, ``finecir``). The catalog has one text
per query, which every row reads.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint import load_checkpoint
from .data.registry import load_dataset
from .features import FeatureCache
from .finecir_run import parsed_graphs, run_finecir
from .methods.base import CIRMethod
from .methods.detailfusion_run import QUICKSTART_STAGE_EPOCHS, quickstart_detailfusion
from .methods.finecir import FineCIR
from .seeding import seed_everything
from .selection import data_part, describe_split
from .views import SplitData, load_split_data

EXTRA_METHODS = ("detailfusion", "finecir")
TEXTS = ("fine", "coarse")
# FineCIR's quickstart epochs on the synthetic benchmark (and the catalog's): small enough that its part of the
# quickstart stays near two minutes on two quiet cores (measured in the branch report).
FINECIR_EPOCHS = 2
FINECIR_CATALOG_EPOCHS = 1
# DetailFusion on the catalog (2.7x the synthetic train queries): one epoch per stage.
DETAILFUSION_CATALOG_STAGE_EPOCHS = {"di-pretrain": 1, "joint": 1, "compositor": 1}


@dataclass
class ExtraResult:
    """One trained extra method on one benchmark: its table row, what the manifest records, and how to explain it."""

    method: str
    row: str  # its name in results.json and the report's table
    metrics: dict[str, float]  # test metrics of the row
    checkpoint: Path
    model: CIRMethod
    test_data: SplitData
    explain: Callable[[Sequence[int]], list[dict[str, Any]]]  # test query rows -> SampleQuery fields per row
    choice: dict[str, Any]  # the epoch choice on val: name, value, split, metric, figure
    record: dict[str, Any] = field(default_factory=dict)  # manifest: settings and every extra figure
    timings: dict[str, float] = field(default_factory=dict)  # wall and CPU seconds of the part


def row_name(method: str, benchmark: str, text: str) -> str:
    """The table row of ``method``: suffixed with the text it read where the benchmark has two."""
    return f"{method} (fine text)" if benchmark == "synthetic" and text == "fine" else method


def text_options(benchmark: str, text: str) -> dict[str, Any]:
    """Dataset options that select ``text`` (only the synthetic benchmark has a coarse and a fine text)."""
    if text not in TEXTS:
        raise ValueError(f"text must be one of {', '.join(TEXTS)}, got {text!r}")
    return {"text": text} if benchmark == "synthetic" else {}


def load_splits(benchmark: str, root: Path, cache: FeatureCache, text: str, progress: bool = False) -> dict[str, SplitData]:
    """train / val / test of ``benchmark`` with the given text, features from ``cache`` (images already cached by
    the pool; only the new texts are encoded)."""
    opts = text_options(benchmark, text)
    return {s: load_split_data(cache, load_dataset(benchmark, root, s, **opts), training=(s == "train"), progress=progress)
            for s in ("train", "val", "test")}


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> tuple[float, float]:
    return time.perf_counter() - start[0], time.process_time() - start[1]


def _selection_splits(data: Mapping[str, SplitData]) -> dict[str, SplitData]:
    # The epoch is chosen on val/select, as the pool's are; val/fuse stays the fusion's.
    return {"train": data["train"], "val": data_part(data["val"], "select"), "test": data["test"]}


def train_detailfusion_part(benchmark: str, root: Path, cache: FeatureCache, data: Mapping[str, SplitData],
                            run_dir: Path, *, text: str, seed: int = 0, stage_epochs: Mapping[str, int] | None = None,
                            progress: bool = False, backbone_info: Mapping[str, Any] | None = None) -> ExtraResult:
    """DetailFusion on ``benchmark`` (see the module docstring); ``data`` holds its train / val / test."""
    start = _clock()
    # the given stages override the defaults; the others keep them
    epochs = {**(DETAILFUSION_CATALOG_STAGE_EPOCHS if benchmark == "catalog" else QUICKSTART_STAGE_EPOCHS),
              **(stage_epochs or {})}
    seed_everything(seed)  # the model is built inside: same seed, same weights
    run = quickstart_detailfusion(benchmark, root, cache, run_dir, seed=seed, progress=progress,
                                  backbone_info=backbone_info, stage_epochs=epochs, splits=_selection_splits(data))
    wall, cpu = _since(start)

    def explain(rows: Sequence[int]) -> list[dict[str, Any]]:
        return [{"branch_weights": a} for a in run.alpha_of(rows)]

    bid = cache.backbone.backbone_id
    return ExtraResult(
        "detailfusion", row_name("detailfusion", benchmark, text), run.test["fused"], run.checkpoint, run.model,
        data["test"], explain,
        {"name": f"{benchmark}: epoch of detailfusion (on {bid})", "value": run.best_epoch,
         "split": describe_split("val", "select"), "metric": run.val_metric, "figure": run.best_metric},
        {"text": text, "backbone": bid, "stage_epochs": epochs, "best_epoch": run.best_epoch,
         "val_select": run.val, "test_outputs": run.test, "alpha_test": run.alpha},
        {"detailfusion_s": wall, "detailfusion_cpu_s": cpu, **{f"detailfusion_{k}": v for k, v in run.timings.items()}})


def train_finecir_part(benchmark: str, root: Path, cache: FeatureCache, data: Mapping[str, SplitData], run_dir: Path,
                       *, text: str, seed: int = 0, epochs: int | None = None, progress: bool = False,
                       backbone_info: Mapping[str, Any] | None = None) -> ExtraResult:
    """FineCIR on ``benchmark`` (see the module docstring); ``data`` holds its train / val / test."""
    start = _clock()
    n = epochs if epochs is not None else FINECIR_CATALOG_EPOCHS if benchmark == "catalog" else FINECIR_EPOCHS
    fr = run_finecir(_selection_splits(data), cache.backbone, run_dir, epochs=n, seed=seed, progress=progress,
                     backbone_info=backbone_info)
    model = load_checkpoint_finecir(fr.checkpoint)
    wall, cpu = _since(start)
    test = data["test"]

    def explain(rows: Sequence[int]) -> list[dict[str, Any]]:
        return [{"graph": g["graph"]} for g in parsed_graphs(model, test, rows)]

    bid = cache.backbone.backbone_id
    return ExtraResult(
        "finecir", row_name("finecir", benchmark, text), fr.metrics, fr.checkpoint, model, test, explain,
        {"name": f"{benchmark}: epoch of finecir (on {bid})", "value": fr.best_epoch,
         "split": describe_split("val", "select"), "metric": fr.val_metric, "figure": fr.best_metric},
        {"text": text, "backbone": bid, "epochs": n, "best_epoch": fr.best_epoch, "parser": model.params.parser},
        {"finecir_s": wall, "finecir_cpu_s": cpu})


def load_checkpoint_finecir(path: Path) -> FineCIR:
    m = load_checkpoint(path)
    if not isinstance(m, FineCIR):
        raise TypeError(f"{path} holds a {type(m).__name__}, not FineCIR")
    return m


__all__ = ["EXTRA_METHODS", "FINECIR_EPOCHS", "ExtraResult", "load_splits", "row_name", "text_options",
           "train_detailfusion_part", "train_finecir_part"]
