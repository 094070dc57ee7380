"""The main job on the embedded default: build the benchmarks, train the DAFM base pool, fuse it, report.

    from cirfusion.quickstart import QuickstartConfig, run_quickstart
    summary = run_quickstart(QuickstartConfig(out="quickstart", photos="../shared/data/clothing-small"))

Steps, top to bottom (``cirfusion quickstart`` is this function):

1. generate the synthetic scene-graph benchmark (and, with ``photos``, the real-photo catalog benchmark); a
   benchmark already in ``out/data`` with the same settings is reused;
2. per benchmark: backbone features of its splits, computed once into the feature cache;
3. train each method of the pool (``image-only`` is the lower bound, then CLIP4CIR, BLIP4CIR+Bi, TG-CIR, SPRC) on
   ``train``, keeping the best epoch on ``val``. Like DAFM's pool, which spans CLIP, BLIP and BLIP-2, ours spans two
   backbones: on the embedded default BLIP4CIR+Bi reads ``embedded``, CLIP4CIR, TG-CIR and SPRC read ``colour``
   (:data:`DEFAULT_POOL_BACKBONES`, chosen on val; ``pool_backbones`` changes it);
4. fit the DAFM fusion of the trained pool on ``val`` (queries the base models never trained on; it reads the
   pool's backbones side by side) and evaluate every model, the mean of normalised scores and the fusion on
   ``test``;
5. train DetailFusion and FineCIR next to the pool, not in it (:mod:`cirfusion.quickstart_extra`: epochs chosen on
   val/select, one test row each; on the synthetic benchmark they read the fine text by default, and their rows say
   so); ``detailfusion=False`` / ``finecir=False`` skip them;
6. write ``results.json`` (benchmark -> method -> metric -> value), ``report.html`` (metrics tables, sample queries
   with their top-5, the fusion's per-query gate weights and each base model's exact Shapley contribution to the
   target's fused score, DetailFusion's per-query branch weights alpha, FineCIR's parsed scene graph) and
   ``manifest.json`` (backbone, weights hash, data hashes, seed, timings, wall and CPU seconds per part).

Everything is deterministic given ``seed``. Checkpoints land in ``out/runs/BENCHMARK/METHOD/best``; the fused one in
``out/runs/BENCHMARK/dafm/best`` (``cirfusion eval``, ``search`` and ``cirfusion.load`` work on all of them).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .api import load
from .backbones import create_backbone
from .backbones.base import Backbone
from .backbones.multi import fusion_backbone
from .checkpoint import load_checkpoint
from .data.catalog import CatalogConfig, build_catalog
from .data.registry import load_dataset
from .data.schema import reference_columns, reference_mask
from .data.synthetic import generate
from .evaluation import encode_gallery, evaluate
from .features import FeatureCache
from .fusion import FuseSplits, FusionConfig, SplitTable, explain, fuse_checkpoints, shapley_contributions
from .io import atomic_write_json
from .manifest import code_version, dataset_record, environment
from .methods.base import CIRMethod
from .methods.registry import create_method, get_method_class
from .quickstart_extra import EXTRA_METHODS, TEXTS, ExtraResult, load_splits, train_detailfusion_part, train_finecir_part
from .report import ResultItem, SampleQuery, write_report, write_results_json
from .seeding import seed_everything
from .selection import SelectionRecord, data_part, describe_split
from .threads import set_override
from .train import TrainConfig, train
from .views import FeatureView, SplitData, load_split_data

# The DAFM base pool (issue "DAFM"), in the order the report lists it; image-only is the table's lower bound.
POOL = ("clip4cir", "blip4cir-bi", "tg-cir", "sprc")
BASELINES = ("image-only",)
FUSED_NAME = "dafm"
MEAN_NAME = "mean-normalised"
SAMPLE_METHODS = ("clip4cir", FUSED_NAME)
# On the embedded default the pool spans two backbones, as DAFM's spans CLIP, BLIP and BLIP-2: CLIP4CIR, TG-CIR and SPRC
# read the colour-layout backbone, BLIP4CIR+Bi `embedded`. Chosen under docs/protocol.md by benchmarks/dafm_accuracy.py
# on the synthetic benchmark's val/fuse part (the mean of normalised scores of all 72 pools of 2+ methods x backbone
# assignments; this one 25.71, the all-`embedded` pool 21.56); the choice is recorded in its selection-synthetic.json.
DEFAULT_POOL_BACKBONES = {"clip4cir": "colour", "tg-cir": "colour", "sprc": "colour"}


@dataclass
class QuickstartConfig:
    out: str | Path = "quickstart"
    photos: str | Path | None = None  # a labelled photo folder for the catalog benchmark (optional)
    seed: int = 0
    n_images: int = 2500  # synthetic benchmark size (train/val/test = 70/10/20 % of the images)
    eval_queries_per_image: float = 3.0  # synthetic val/test queries per image: more queries to fit the fusion on
    epochs: int = 4  # per base method (synthetic benchmark)
    catalog_epochs: int = 2  # per base method on the catalog benchmark (its train split has 2.7x the queries)
    methods: Sequence[str] = POOL
    # The fusion's own defaults (FusionConfig): its fit split, val, is small, hence at least min_steps steps.
    fusion_epochs: int = FusionConfig.epochs
    fusion_min_steps: int = FusionConfig.min_steps
    backbone: str = "embedded"
    # Per-method backbones (method -> backbone name; the rest use ``backbone``): base models on different backbones
    # make the pool diverse, as DAFM's is (CLIP, BLIP, BLIP-2); the fused model then reads their multi: composite.
    # None: DEFAULT_POOL_BACKBONES on any embedded backbone (``embedded:precision=fp32`` too: the options change the
    # features, not which methods the colour view serves), else every method on ``backbone``; {}: all on ``backbone``.
    pool_backbones: dict[str, str] | None = None

    def backbone_for(self, method: str) -> str:
        table = self.pool_backbones
        if table is None:
            table = DEFAULT_POOL_BACKBONES if self.backbone.split(":", 1)[0] == "embedded" else {}
        return table.get(method, self.backbone)
    cache_dir: str | Path | None = None  # default: OUT/cache
    catalog_limit: int | None = None  # keep at most this many photos (seeded sample); None = all
    samples: int = 3  # sample queries per benchmark and method in the report
    fuse: bool = True
    # DetailFusion and FineCIR (quickstart_extra), trained and reported next to the pool, never fused with it.
    detailfusion: bool = True
    finecir: bool = True
    detailfusion_stage_epochs: dict[str, int] | None = None  # None: QUICKSTART_STAGE_EPOCHS (catalog: 1 per stage)
    finecir_epochs: int | None = None  # None: quickstart_extra.FINECIR_EPOCHS (catalog: FINECIR_CATALOG_EPOCHS)
    extra_text: str = "fine"  # the synthetic benchmark's text DetailFusion and FineCIR read: fine | coarse
    progress: bool = True
    threads: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def parse_pool_backbones(items: Sequence[str] | None, methods: Sequence[str] | None = None) -> dict[str, str] | None:
    """``["METHOD=BACKBONE", ...]`` (``"none"``: every method on the main backbone) -> the ``pool_backbones`` table;
    None when no item is given (the default assignment). Raises ValueError on a malformed item or, given
    ``methods``, on a method outside the pool."""
    if not items:
        return None
    table: dict[str, str] = {}
    for item in items:
        if item == "none":
            continue
        m, sep, b = item.partition("=")
        m, b = m.strip(), b.strip()
        if not sep or not m or not b:
            raise ValueError(f"--pool-backbone expects METHOD=BACKBONE, got {item!r}")
        if methods is not None and m not in methods:
            raise ValueError(f"--pool-backbone names {m!r}, which is not in --methods ({', '.join(methods)})")
        table[m] = b
    return table


@dataclass
class BenchmarkRun:
    name: str
    root: Path
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # method -> test metrics
    checkpoints: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    fusion: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, dict[str, Any]] = field(default_factory=dict)  # DetailFusion / FineCIR: manifest records
    datasets: dict[str, Any] = field(default_factory=dict)  # split -> manifest record (sizes, file hashes)


def _say(msg: str) -> None:
    print(f"[quickstart] {msg}", flush=True)


def _same_settings(path: Path, settings: dict[str, Any]) -> bool:
    try:
        return json.loads(path.read_text(encoding="utf-8")) == settings
    except (OSError, json.JSONDecodeError):
        return False


def make_synthetic(out: Path, cfg: QuickstartConfig) -> Path:
    """The synthetic benchmark under ``out/data/synthetic``, generated unless one with the same settings is there."""
    root = out / "data" / "synthetic"
    marker = out / "data" / "synthetic.settings.json"
    settings = {"seed": cfg.seed, "n_images": cfg.n_images, "eval_queries_per_image": cfg.eval_queries_per_image}
    if root.is_dir() and _same_settings(marker, settings):
        _say(f"synthetic benchmark: reusing {root}")
        return root
    t0 = time.perf_counter()
    stats = generate(root, seed=cfg.seed, n_images=cfg.n_images, eval_queries_per_image=cfg.eval_queries_per_image, overwrite=True, progress=cfg.progress)
    atomic_write_json(marker, settings)
    n = sum(s["images"] for s in stats["splits"].values())
    _say(f"synthetic benchmark: {n} images, "
         + ", ".join(f"{k} {s['queries']} queries" for k, s in stats["splits"].items())
         + f" ({time.perf_counter() - t0:.1f} s) -> {root}")
    return root


def make_catalog(out: Path, cfg: QuickstartConfig) -> Path:
    """The catalog benchmark of ``cfg.photos`` under ``out/data/catalog`` (photo and edit cache reused)."""
    assert cfg.photos is not None
    root = out / "data" / "catalog"
    marker = out / "data" / "catalog.settings.json"
    settings = {"photos": str(Path(cfg.photos).resolve()), "seed": cfg.seed, "limit": cfg.catalog_limit}
    if (root / "annotations").is_dir() and _same_settings(marker, settings):
        _say(f"catalog benchmark: reusing {root}")
        return root
    t0 = time.perf_counter()
    m = build_catalog(root, photos=cfg.photos, config=CatalogConfig(seed=cfg.seed, limit=cfg.catalog_limit),
                      cache_dir=out / "data" / "catalog-cache", progress=cfg.progress)
    atomic_write_json(marker, settings)
    _say(f"catalog benchmark from {cfg.photos}: {m['source']['n_photos']} photos "
         f"({time.perf_counter() - t0:.1f} s) -> {root}")
    return root


def top_results(method: CIRMethod, data: SplitData, rows: Sequence[int], k: int = 5) -> list[list[tuple[int, float]]]:
    """The ``k`` best gallery columns ``(column, score)`` of the given query rows, reference left out."""
    view = FeatureView(data.images, data.texts)
    ds = data.dataset
    method.eval()
    with torch.no_grad():
        g = encode_gallery(method, view, ds.gallery.ids)
        qs = [ds.queries[r] for r in rows]
        ref = view.image(np.array([view.image_row(q.reference) for q in qs]), method.uses_image_tokens)
        text = view.text(np.array([view.text_row(q.text) for q in qs]), method.uses_text_tokens)
        s = method.similarity(method.encode_query(ref, text), g).float()
    s[torch.from_numpy(reference_mask(reference_columns(ds, rows), s.shape[1]))] = float("-inf")
    top = torch.topk(s, min(k, s.shape[1]), dim=1)
    return [[(int(c), float(v)) for v, c in zip(top.values[i], top.indices[i], strict=True)] for i in range(len(rows))]


def _samples(bench: str, method_name: str, method: CIRMethod, data: SplitData, rows: Sequence[int],
             weights_of: Callable[[Sequence[int]], list[dict[str, float]]] | None = None,
             contributions_of: Callable[[Sequence[int]], list[dict[str, float] | None]] | None = None,
             fields_of: Callable[[Sequence[int]], list[dict[str, Any]]] | None = None,
             ) -> list[SampleQuery]:
    """``fields_of``: further :class:`SampleQuery` fields per row (a method's own explanation)."""
    ds = data.dataset
    out = []
    weights: Sequence[dict[str, float] | None] = weights_of(rows) if weights_of else [None] * len(rows)
    contrib: Sequence[dict[str, float] | None] = contributions_of(rows) if contributions_of else [None] * len(rows)
    extra: Sequence[dict[str, Any]] = fields_of(rows) if fields_of else [{}] * len(rows)
    for r, res, w, c, x in zip(rows, top_results(method, data, rows), weights, contrib, extra, strict=True):
        q = ds.queries[r]
        targets = set(q.targets)
        items = [ResultItem(ds.gallery.ids[c], Path(ds.gallery.paths[c]), v, ds.gallery.ids[c] in targets) for c, v in res]
        out.append(SampleQuery(bench, method_name, q.qid, q.text, q.reference, ds.gallery.path(q.reference)
                               if q.reference in ds.gallery else Path(""), items, weights=w,
                               contributions=c, **x))
    return out


class Backbones:
    """The backbones (and their feature caches) of a run, built on first use and shared by every benchmark."""

    def __init__(self, cfg: QuickstartConfig, cache_dir: Path) -> None:
        self.cfg, self.cache_dir = cfg, cache_dir
        self._caches: dict[str, FeatureCache] = {}

    def name_for(self, method: str) -> str:
        return self.cfg.backbone_for(method)

    def cache(self, name: str) -> FeatureCache:
        if name not in self._caches:
            t0 = time.perf_counter()
            b = create_backbone(name)
            self._caches[name] = FeatureCache(b, self.cache_dir)
            _say(f"backbone {b.backbone_id} ready ({time.perf_counter() - t0:.1f} s); feature cache {self.cache_dir}")
        return self._caches[name]

    def built(self) -> dict[str, Backbone]:
        """The backbones built so far, by id (the fusion reuses them rather than building them again)."""
        return {c.backbone.backbone_id: c.backbone for c in self._caches.values()}

    def info(self, name: str) -> dict[str, Any]:
        b = self.cache(name).backbone
        return {"id": b.backbone_id, "weights_hash": b.weights_hash(), "preprocess_id": b.preprocess_id()}


def run_benchmark(name: str, root: Path, cfg: QuickstartConfig, backbones: Backbones, out: Path,
                  samples: list[Any], sel: SelectionRecord | None = None) -> BenchmarkRun:
    """Train the pool on one benchmark, fuse it (:func:`cirfusion.fusion.fuse_checkpoints`, as ``cirfusion fuse``
    does, with its defaults: fitted on val, reported on test), evaluate everything on ``test``."""
    run = BenchmarkRun(name, root)
    t0 = time.perf_counter()
    ds = {s: load_dataset(name, root, s) for s in ("train", "val", "test")}
    run.datasets = {s: dataset_record(d) for s, d in ds.items()}
    split_data: dict[str, dict[str, SplitData]] = {}  # backbone name -> split -> SplitData

    def data_for(backbone_name: str) -> dict[str, SplitData]:
        if backbone_name not in split_data:
            t1 = time.perf_counter()
            cache = backbones.cache(backbone_name)
            split_data[backbone_name] = {s: load_split_data(cache, d, training=(s == "train"), progress=cfg.progress)
                                         for s, d in ds.items()}
            run.timings["features_s"] = run.timings.get("features_s", 0.0) + time.perf_counter() - t1
            _say(f"{name}: {backbone_name} features of train/val/test ready ({time.perf_counter() - t1:.1f} s; "
                 + ", ".join(f"{s} {len(d.queries)} queries / {len(d.gallery)} images" for s, d in ds.items()) + ")")
        return split_data[backbone_name]

    rng = np.random.default_rng(cfg.seed)
    sample_rows = sorted(rng.choice(len(ds["test"].queries), size=min(cfg.samples, len(ds["test"].queries)),
                                    replace=False).tolist())
    trained: dict[str, Any] = {}
    # The zero-shot "sum" baseline needs image and text embeddings in one space (CLIP-like backbones).
    aligned = getattr(backbones.cache(cfg.backbone).backbone, "aligned", False)
    baselines = (*BASELINES, "sum") if aligned else BASELINES
    for method_name in (*baselines, *cfg.methods):
        bname = backbones.name_for(method_name)
        data = data_for(bname)
        backbone = backbones.cache(bname).backbone
        backbone_info = {**backbones.info(bname), "cache_dir": str(backbones.cache_dir)}
        t1 = time.perf_counter()
        run_dir = out / "runs" / name / method_name
        if run_dir.exists():  # a quickstart re-run retrains from scratch: same seed, same result
            shutil.rmtree(run_dir)
        seed_everything(cfg.seed)
        method = create_method(method_name, backbone)
        tc = TrainConfig(epochs=cfg.catalog_epochs if name == "catalog" else cfg.epochs, seed=cfg.seed,
                         progress=cfg.progress)
        # The best epoch is chosen on val/select; the fusion fits on val/fuse (docs/protocol.md).
        res = train(method, data["train"], data_part(data["val"], "select"), run_dir, tc, backbone_info=backbone_info)
        if sel is not None:
            sel.choose(f"{name}: epoch of {method_name} (on {bname})", res.best_epoch, describe_split("val", "select"),
                       res.val_metric, res.best_metric)
        best = load_checkpoint(res.best_dir)
        trained[method_name] = best
        run.metrics[method_name] = evaluate(best, data["test"])
        run.checkpoints[method_name] = str(res.best_dir)
        run.timings[f"{method_name}_s"] = time.perf_counter() - t1
        _say(f"{name}: {method_name} trained and evaluated ({run.timings[f'{method_name}_s']:.1f} s): "
             + _brief(run.metrics[method_name]))
        if method_name in SAMPLE_METHODS:
            samples += _samples(name, method_name, best, data["test"], sample_rows)

    if cfg.fuse and len(cfg.methods) >= 2:
        t1 = time.perf_counter()
        names = list(cfg.methods)
        # The fusion's own defaults (FusionConfig, FuseSplits): fitted on val, queries the bases never trained on, a
        # fifth of them held out to pick the epoch (the untrained mean of normalised scores included); test reports.
        # Bases on several backbones are read through their multi: composite.
        metric = headline_metric(name, run.metrics[cfg.methods[0]])
        fc = FusionConfig(epochs=cfg.fusion_epochs, min_steps=cfg.fusion_min_steps, val_metric=metric, seed=cfg.seed)
        fr = fuse_checkpoints([run.checkpoints[m] for m in names], name, root, out / "runs" / name / FUSED_NAME, fc,
                              cache_dir=backbones.cache_dir, splits=FuseSplits(), compare_tau=True,
                              backbones=backbones.built(), overwrite=True, progress=cfg.progress)
        test = fr.report["splits"]["test"]
        run.metrics[MEAN_NAME] = test["mean_normalised"]
        run.metrics[FUSED_NAME] = test["fused"]
        run.metrics[f"{FUSED_NAME} (fixed tau)"] = test["fused_fixed_tau"]
        run.checkpoints[FUSED_NAME] = str(fr.checkpoint)
        if sel is not None:
            c = SelectionRecord.read(fr.report["selection"])
            sel.choices += [replace(x, name=f"{name}: {x.name}") for x in c.choices if "epoch of" not in x.name]
        best_single = test["best_single"]["name"]
        run.fusion = {"metric": metric, "best_single": best_single,
                      "gain_over_best_single": test["gain_over_best_single"],
                      "tau_final": fr.result.tau_final, "fit_s": fr.result.wall_s, "best_epoch": fr.result.best_epoch,
                      "num_parameters": fr.report["num_parameters"]}
        run.timings["fusion_s"] = time.perf_counter() - t1
        _say(f"{name}: DAFM fusion of {', '.join(names)} ({run.timings['fusion_s']:.1f} s): "
             + _brief(run.metrics[FUSED_NAME])
             + f"; {metric} {run.fusion['gain_over_best_single']:+.2f} over the best single model ({best_single})")
        model, test_table = fr.model, fr.tables["test"]

        def weights(rows: Sequence[int]) -> list[dict[str, float]]:
            w = explain(model, test_table, list(rows))
            return [{n: float(w[i, k]) for k, n in enumerate(names)} for i in range(len(rows))]

        def contributions(rows: Sequence[int]) -> list[dict[str, float] | None]:
            # Exact Shapley values over the pool (2^K fused evaluations per query); a query whose target is not in
            # the gallery (other than its reference) has no target score to explain.
            has = [r for r in rows if len(test_table.positives[r])]
            if not has:
                return [None] * len(rows)
            phi = shapley_contributions(model, test_table, has)
            by_row = {r: {n: float(phi[i, k]) for k, n in enumerate(names)} for i, r in enumerate(has)}
            return [by_row.get(r) for r in rows]

        samples += _samples(name, FUSED_NAME, model, fr.data["test"], sample_rows, weights_of=weights,
                            contributions_of=contributions)
    run_extras(name, root, cfg, backbones, out, run, samples, sample_rows, sel, data_for)
    run.timings["total_s"] = time.perf_counter() - t0
    return run


def run_extras(name: str, root: Path, cfg: QuickstartConfig, backbones: Backbones, out: Path, run: BenchmarkRun,
               samples: list[Any], sample_rows: Sequence[int], sel: SelectionRecord | None,
               data_for: Callable[[str], dict[str, SplitData]]) -> None:
    """DetailFusion and FineCIR on one benchmark, after the fusion (which never sees them): a row each in
    ``run.metrics``, their checkpoints, epoch choices, manifest records, sample queries with their explanations, and
    wall and CPU seconds per part in ``run.timings`` (``METHOD_s``, ``METHOD_cpu_s``; ``extra_features_s`` for the
    fine texts' features, which both share)."""
    extras = [m for m in EXTRA_METHODS if getattr(cfg, m)]
    if not extras:
        return
    bname = cfg.backbone
    cache = backbones.cache(bname)
    if name == "synthetic" and cfg.extra_text == "fine":  # the pool's split data hold the coarse text
        w0, c0 = time.perf_counter(), time.process_time()
        data = load_splits(name, root, cache, "fine", cfg.progress)
        run.timings["extra_features_s"] = time.perf_counter() - w0
        run.timings["extra_features_cpu_s"] = time.process_time() - c0
    else:
        data = data_for(bname)
    info = {**backbones.info(bname), "cache_dir": str(backbones.cache_dir)}
    for m in extras:
        w0, c0 = time.perf_counter(), time.process_time()
        x: ExtraResult
        if m == "detailfusion":
            x = train_detailfusion_part(name, root, cache, data, out / "runs" / name / m, text=cfg.extra_text,
                                        seed=cfg.seed, stage_epochs=cfg.detailfusion_stage_epochs,
                                        progress=cfg.progress, backbone_info=info)
        else:
            x = train_finecir_part(name, root, cache, data, out / "runs" / name / m, text=cfg.extra_text,
                                   seed=cfg.seed, epochs=cfg.finecir_epochs, progress=cfg.progress, backbone_info=info)
        run.metrics[x.row] = x.metrics
        run.checkpoints[m] = str(x.checkpoint)
        run.extras[m] = {"row": x.row, **x.record}
        if sel is not None:
            sel.choose(**x.choice)
        samples += _samples(name, x.row, x.model, x.test_data, sample_rows, fields_of=x.explain)
        run.timings.update(x.timings)
        # the part's whole cost: training, its val and test scoring and its report samples
        run.timings[f"{m}_s"] = time.perf_counter() - w0
        run.timings[f"{m}_cpu_s"] = time.process_time() - c0
        _say(f"{name}: {x.row} trained and evaluated ({run.timings[f'{m}_s']:.1f} s, "
             f"{run.timings[f'{m}_cpu_s']:.1f} s CPU): " + _brief(x.metrics))


def pool_tables(out: str | Path, splits: Sequence[str] = ("val", "test")) -> dict[str, tuple[list[Any], dict[str, Any]]]:
    """For a finished quickstart in ``out``: per benchmark, its trained pool (loaded checkpoints, in :data:`POOL`
    order) and the fusion tables of ``splits``, read from the run's feature cache (bases on several backbones through
    their multi: composite)."""
    out = Path(out)
    man = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    cache_dir = man["config"]["cache_dir"] or str(out / "cache")
    result = {}
    for bench, ckpts in man["checkpoints"].items():
        names = [m for m in POOL if m in ckpts]
        models = [load(ckpts[m]) for m in names]
        cache = FeatureCache(fusion_backbone([m.backbone for m in models]), cache_dir)
        tables = {s: SplitTable.build([m.method for m in models], names,
                                      load_split_data(cache, load_dataset(bench, out / "data" / bench, s)))
                  for s in splits}
        result[bench] = (models, tables)
    return result


def headline_metric(benchmark: str, metrics: dict[str, float]) -> str:
    """The metric a benchmark is judged on: mAP@10 on the catalog (most of its queries have several positives),
    else Rmean where there are subsets, else mAP@10, else R@10."""
    if benchmark == "catalog" and "mAP@10" in metrics:
        return "mAP@10"
    for m in ("Rmean", "mAP@10", "R@10"):
        if m in metrics:
            return m
    return next(iter(metrics))


def _brief(metrics: dict[str, float]) -> str:
    keys = [k for k in ("R@1", "R@10", "Rsubset@1", "Rmean", "mAP@10") if k in metrics]
    return ", ".join(f"{k} {metrics[k]:.2f}" for k in keys)


def run_quickstart(cfg: QuickstartConfig) -> dict[str, Any]:
    """Run every step (module docstring) and return the summary also written to ``out/manifest.json``. Torch threads
    follow :mod:`cirfusion.threads` (one for training and fusion fitting, every core for features); with
    ``cfg.threads`` every step runs on that many for the duration of the call (the caller's count is restored)."""
    before = torch.get_num_threads()
    if cfg.threads:
        set_override(cfg.threads)
    try:
        return _run_quickstart(cfg)
    finally:
        if cfg.threads:
            set_override(None)
        torch.set_num_threads(before)


def _run_quickstart(cfg: QuickstartConfig) -> dict[str, Any]:
    t_start = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    for m in cfg.methods:
        get_method_class(m)  # an unknown name fails now, not after the benchmarks are built
    if cfg.extra_text not in TEXTS:
        raise ValueError(f"extra_text must be one of {', '.join(TEXTS)}, got {cfg.extra_text!r}")

    if cfg.photos is not None and not Path(cfg.photos).is_dir():
        raise FileNotFoundError(f"photo folder {cfg.photos}: no such directory")
    benchmarks = {"synthetic": make_synthetic(out, cfg)}
    if cfg.photos is not None:
        benchmarks["catalog"] = make_catalog(out, cfg)

    backbones = Backbones(cfg, Path(cfg.cache_dir) if cfg.cache_dir else out / "cache")
    backbone = backbones.cache(cfg.backbone).backbone

    samples: list[Any] = []
    sel = SelectionRecord({"pool": list(cfg.methods), "pool_backbones": {m: cfg.backbone_for(m) for m in cfg.methods},
                           "pool_chosen_by": "benchmarks/dafm_accuracy.py on val/fuse (docs/protocol.md)"})
    runs = {name: run_benchmark(name, root, cfg, backbones, out, samples, sel) for name, root in benchmarks.items()}
    for name in runs:
        sel.report(f"{name}: every method, the mean of normalised scores and the fusion", f"{name}/test")
    sel.write(out)
    results = {name: r.metrics for name, r in runs.items()}
    wall = time.perf_counter() - t_start

    notes = [f"Base models trained on train (best epoch on val/select); the DAFM fusion fitted on val/fuse (docs/"
             f"protocol.md; every choice in selection.json); every number is on test. Backbone {backbone.backbone_id} (weights {backbone.weights_hash()[:12]}), seed {cfg.seed}."]
    others = {m: cfg.backbone_for(m) for m in cfg.methods if cfg.backbone_for(m) != cfg.backbone}
    if others:
        notes.append("Per-method backbones: " + ", ".join(f"{m} on {b}" for m, b in others.items())
                     + f"; the others on {cfg.backbone}; the fusion reads them side by side.")
    for name, r in runs.items():
        if r.fusion:
            notes.append(f"{name}: fusion {r.fusion['metric']} {r.fusion['gain_over_best_single']:+.2f} over the best "
                         f"single model ({r.fusion['best_single']}); {r.fusion['num_parameters']} fusion parameters; "
                         f"final tau {r.fusion['tau_final']:.4f}"
                         + ("; the held-out fifth of val kept the untrained mean of normalised scores."
                            if r.fusion["best_epoch"] == -1 else f"; epoch {r.fusion['best_epoch']} kept."))
        notes += extra_notes(name, r)
    write_results_json(out / "results.json", results)
    report = write_report(out, results, samples, title="cirfusion quickstart", wall_time=wall, notes=notes)
    summary = {
        "config": cfg.to_dict(),
        "wall_s": wall,
        "backbone": {"id": backbone.backbone_id, "weights_hash": backbone.weights_hash(),
                     "preprocess_id": backbone.preprocess_id()},
        "pool_backbones": {m: backbones.info(backbones.name_for(m)) for m in (*BASELINES, *cfg.methods)},
        "datasets": {name: r.datasets for name, r in runs.items()},
        "checkpoints": {name: r.checkpoints for name, r in runs.items()},
        "timings": {name: r.timings for name, r in runs.items()},
        "fusion": {name: r.fusion for name, r in runs.items()},
        "extra_methods": {name: r.extras for name, r in runs.items()},
        "code": code_version(),
        "environment": environment(),
        "report": str(report),
    }
    atomic_write_json(out / "manifest.json", summary)
    bench = "catalog" if "catalog" in runs else "synthetic"  # serve the fused model, chosen before any test number
    ck, photos = runs[bench].checkpoints, cfg.photos if bench == "catalog" else benchmarks[bench] / "images"
    _say(f"search it in a browser: cirfusion serve {ck.get(FUSED_NAME) or next(iter(ck.values()))} --images {photos} "
         f"--cache-dir {backbones.cache_dir}")
    return summary


_DF_OUTPUTS = (("fused", "adaptive"), ("static", "static (alpha 0.5)"), ("gm", "GM alone"), ("di", "DI alone"))


def extra_notes(name: str, run: BenchmarkRun) -> list[str]:
    """The report's notes on DetailFusion and FineCIR of one benchmark (what they read, what they are not part of,
    DetailFusion's alpha and branch rows)."""
    notes = []
    for m, rec in run.extras.items():
        text = (" It reads the queries' fine text (every edit spelled out); the pool's rows read the coarse text of the"
                " same queries, so the two are not a like-for-like comparison." if rec["row"].endswith("(fine text)")
                else "")
        kept = (f"epoch {rec['best_epoch']} (0-based) of its last stage kept on val/select, the earlier stages' epochs "
                f"fixed ({', '.join(f'{k} {v}' for k, v in rec['stage_epochs'].items())})" if m == "detailfusion"
                else f"epoch {rec['best_epoch']} (0-based) of {rec['epochs']} kept on val/select")
        notes.append(f"{name}: {rec['row']} on {rec['backbone']}, {kept}; not part of the DAFM pool.{text}")
        if m == "detailfusion" and rec.get("alpha_test"):
            a, t = rec["alpha_test"], rec["test_outputs"]
            metric = headline_metric(name, t["fused"])
            notes.append(f"{name}: DetailFusion's per-query weight of its global branch, alpha_GM, on test: mean "
                         f"{a['alpha_gm_mean']:.3f} (sd {a['alpha_gm_std']:.3f}, {a['alpha_gm_min']:.3f}-"
                         f"{a['alpha_gm_max']:.3f}); the detail branch gets 1 - alpha_GM. {metric} on test: "
                         + ", ".join(f"{label} {t[o][metric]:.2f}" for o, label in _DF_OUTPUTS if o in t) + ".")
    return notes


def format_results(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """Plain-text tables of ``results.json``."""
    lines = []
    for bench, methods in results.items():
        metrics = [m for m in ("R@1", "R@5", "R@10", "R@50", "Rsubset@1", "Rsubset@2", "Rsubset@3", "Rmean", "mAP@10")
                   if any(m in v for v in methods.values())]
        width = max(len(n) for n in methods) + 2
        lines.append(f"{bench} (test split)")
        lines.append("  " + "method".ljust(width) + "".join(f"{m:>10}" for m in metrics))
        for n, v in methods.items():
            lines.append("  " + n.ljust(width) + "".join(f"{v[m]:>10.2f}" if m in v else f"{'-':>10}" for m in metrics))
        lines.append("")
    return "\n".join(lines)
