"""The one fusion orchestration, :func:`fuse_checkpoints`: trained checkpoints in, a fused checkpoint and a report
out. ``cirfusion fuse`` and the quickstart both call it; its defaults are :class:`FuseSplits`'s and
:class:`~cirfusion.fusion.fit.FusionConfig`'s.

Steps: read and check the base checkpoints (:mod:`cirfusion.fusion.compat`); load them with their backbones (bases
on several backbones read a ``multi:`` composite of them); encode the fit, validation and test splits once from the
feature cache (:class:`~cirfusion.fusion.tables.SplitTable`); fit the fusion (and, with ``compare_tau``, the other
temperature schedule too); evaluate every base model, the mean of normalised scores and each fused model on the
reported splits; warn when the bases overfit the fit split; write ``OUT/best`` (the fused checkpoint),
``OUT/metrics.json`` (the report), ``OUT/selection.json`` (every choice and the validation figure behind it,
:mod:`cirfusion.selection`) and ``OUT/log.json`` (every step), and with ``incremental`` the order-of-addition
analysis (``OUT/incremental.json`` / ``.png``).

The protocol (``docs/protocol.md``): the fusion is fitted on ``val/fuse``, the part of the validation split the base
models did not choose their epochs on (they choose on ``val/select``); a base model whose run chose on queries the
fusion fits on is named in a warning and in ``selection.json``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..api import load
from ..backbones.base import Backbone
from ..backbones.multi import fusion_backbone
from ..checkpoint import write_checkpoint_files
from ..data.registry import load_dataset
from ..evaluation import pick_val_metric
from ..features import FeatureCache
from ..io import atomic_directory, atomic_write_json
from ..selection import ALL, ProtocolError, SelectionRecord, base_selection, describe_split, overlaps, split_part
from ..views import SplitData, load_split_data
from .compat import check_compatible, pick_base, read_bases
from .experiments import explain_all, explanation_summary, fusion_diagnostics, order_of_addition, plot_incremental
from .fit import FitResult, FusionConfig, baseline_model, fuse
from .kernels import FusionError
from .network import count_parameters
from .tables import SplitTable, evaluate_base, evaluate_fused

if TYPE_CHECKING:  # pragma: no cover
    from ..methods.dafm import DAFM

OVERFIT_GAP = 10.0  # metric points between the base models' fit-split and validation scores worth a warning


@dataclass
class FuseSplits:
    """Which splits a fusion is fitted on, selects its epoch on and is reported on; ``"val/fuse"`` names a part of a
    split (:mod:`cirfusion.selection`).

    The default fits on ``val/fuse``: queries the base models neither trained on (their scores on their own training
    queries overstate their reliability) nor chose their epochs on (``val/select``), with
    :attr:`FusionConfig.holdout` of them held out to pick the epoch; ``test`` reports. ``val``/``test`` None: no
    such split."""

    fit: str = "val/fuse"
    val: str | None = None
    test: str | None = "test"


@dataclass
class FusionRun:
    """What :func:`fuse_checkpoints` made: ``report`` (what ``metrics.json`` holds), the fused ``model`` and its fit
    ``result``, every trained variant (``"fused"``, and ``"fused_fixed_tau"`` / ``"fused_dynamic_tau"`` with
    ``compare_tau``), the split ``tables`` (``"train"`` is the fit split; ``"val"``, ``"test"`` when given), their
    cached features (``data``, same keys, read through the fused model's backbone) and the ``checkpoint`` directory."""

    report: dict[str, Any]
    model: DAFM
    result: FitResult
    variants: dict[str, tuple[DAFM, FitResult]]
    tables: dict[str, SplitTable]
    data: dict[str, SplitData]
    checkpoint: Path
    log: list[dict[str, Any]] = field(default_factory=list)


def _quiet(msg: str) -> None:
    """The default progress reporter: nothing."""


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def fuse_checkpoints(
    checkpoints: Sequence[str | Path],
    dataset: str,
    root: str | Path,
    out: str | Path,
    config: FusionConfig | None = None,
    *,
    cache_dir: str | Path,
    splits: FuseSplits | None = None,
    dataset_options: Mapping[str, Any] | None = None,
    hparams: Mapping[str, Any] | None = None,
    compare_tau: bool = False,
    incremental: str | None = None,
    incremental_seeds: Sequence[int] = (0,),
    diagnostics: bool = True,
    backbones: Mapping[str, Backbone] | None = None,
    backbone_dirs: Sequence[str | Path] = (),
    allow_download: bool = False,
    feature_batch_size: int = 64,
    workers: int = 0,
    overwrite: bool = False,
    progress: bool = False,
    say: Callable[[str], None] = _quiet,
    warn: Callable[[str], None] = _stderr,
) -> FusionRun:
    """Fuse the trained ``checkpoints`` (K >= 2, frozen) on ``dataset`` (under ``root``) into ``out/best``.

    ``config``: how the fusion network is fitted (default :class:`FusionConfig()`); ``splits``: which splits fit,
    select and report (default :class:`FuseSplits()`: fit on val/fuse, report test); ``hparams``: the fused model's
    hyper-parameters (DAFM's defaults otherwise); ``incremental``: ``"all"`` for the order-of-addition analysis over
    every order of adding the models, or a base model (name, index or checkpoint path) for the orders starting from
    it, each fitted with the seeds ``incremental_seeds``; ``diagnostics``: also report, per reported split, the
    learned-against-static diagnostics (:func:`~cirfusion.fusion.experiments.fusion_diagnostics`); ``backbones``: already built backbones by id, used instead of building them
    again; ``backbone_dirs`` / ``allow_download``: where else the checkpoints' backbones may be read from (see
    :func:`cirfusion.load`); ``cache_dir``: the feature cache. Raises :class:`FusionError` (or another
    :class:`~cirfusion.errors.CirfusionError`) on anything the user can fix: an existing ``out/best`` without
    ``overwrite``, incompatible or unreadable checkpoints, a missing split."""
    t_start = time.perf_counter()
    cfg = config or FusionConfig()
    sp = splits or FuseSplits()
    out_dir = Path(out)
    if (out_dir / "best").exists() and not overwrite:
        raise FusionError(f"{out_dir / 'best'} already exists; choose another --out or pass --overwrite")
    ds_kw = dict(dataset_options or {})

    # -- the base checkpoints: readable, compatible -------------------------------------------------------------------
    bases_info = read_bases(checkpoints)
    parts = {role: split_part(split) for role, split in (("train", sp.fit), ("val", sp.val), ("test", sp.test))}
    for role, flag in (("train", "--split-train"), ("val", "--split-val")):
        if parts[role][0] == "test":
            raise ProtocolError(f"{flag} test: the fusion would be fitted or its epoch chosen on test; every choice is "
                                "made on validation and test only reports (docs/protocol.md)")
    ds_fit = load_dataset(dataset, root, sp.fit, **ds_kw)
    notes = check_compatible(bases_info, ds_fit)
    start = pick_base(bases_info, incremental) if incremental not in (None, "", "all") else None
    for n in notes:
        say(f"note: {n}")
    built = dict(backbones or {})
    models = [load(b["path"], backbone=built.get(str(b["config"].get("backbone", {}).get("id"))), backbone_dirs=backbone_dirs,
                   allow_download=allow_download) for b in bases_info]
    backbone = fusion_backbone([m.backbone for m in models])  # bases on several backbones: a multi: composite
    methods = [m.method for m in models]
    names = [b["name"] for b in bases_info]
    info = [{"dataset": b["config"].get("dataset"), "source": str(Path(b["path"]).resolve())} for b in bases_info]
    cache = FeatureCache(backbone, cache_dir, batch_size=feature_batch_size, num_workers=workers)

    data: dict[str, SplitData] = {}
    tables: dict[str, SplitTable] = {}
    t0 = time.perf_counter()
    for role, split in (("train", sp.fit), ("val", sp.val), ("test", sp.test)):
        if split is not None:
            ds = ds_fit if role == "train" else load_dataset(dataset, root, split, **ds_kw)
            data[role] = load_split_data(cache, ds, training=False, progress=progress)
            tables[role] = SplitTable.build(methods, names, data[role], progress=progress)
    encode_s = time.perf_counter() - t0
    val = tables.get("val")
    say(f"encoded {', '.join(f'{k} ({t.dataset.key}: {t.num_queries} queries, {t.num_gallery} images)' for k, t in tables.items())} "
        f"with {len(methods)} base models in {encode_s:.1f} s")

    # -- the protocol: what the base models chose on, against what the fusion fits on ----------------------------------
    sel = SelectionRecord({"fit": sp.fit, "val": sp.val, "test": sp.test, "fusion_config": cfg.to_dict(),
                           "hparams": dict(hparams or {})})
    fit_where = (parts["train"][0], parts["train"][1])
    for b in bases_info:
        bs = base_selection(b["config"], b["manifest"])
        where = "an unrecorded split" if bs["split"] is None else describe_split(bs["split"], bs["part"] or ALL)
        sel.choose(f"epoch of {b['name']}", bs["epoch"], where, bs["metric"], bs["figure"],
                   note=f"chosen when {b['name']} was trained ({b['path']})")
        if bs["split"] is not None and overlaps((bs["split"], bs["part"] or ALL), fit_where):
            msg = (f"warning: {b['name']} chose its epoch on {where}, which shares queries with the fusion's fit split "
                   f"{sp.fit}: the fusion would learn to trust it on queries it was selected on. Train the base models "
                   f"with validation on val/select and fit the fusion on val/fuse (docs/protocol.md).")
            notes.append(msg)
            warn(msg)

    # -- train the fusion ---------------------------------------------------------------------------------------------
    log: list[dict[str, Any]] = []
    variants = [("fused", cfg)]
    if compare_tau:
        other = FusionConfig(**{**cfg.to_dict(), "dynamic_tau": not cfg.dynamic_tau})
        variants.append(("fused_fixed_tau" if cfg.dynamic_tau else "fused_dynamic_tau", other))
    fused: dict[str, tuple[DAFM, FitResult]] = {}

    def logger(label: str) -> Callable[[dict[str, Any]], None]:
        return lambda rec: log.append({"model": label, **rec})

    for label, c in variants:
        say(f"training {label} ({'dynamic' if c.dynamic_tau else 'fixed'} tau, {c.negatives} negatives, {c.epochs} epochs)")
        model, res = fuse(tables["train"], val, c, hparams=hparams, base_info=info, log=logger(label))
        fused[label] = (model, res)
        say(f"  {res.wall_s:.1f} s (setup {res.setup_s:.1f} s); best epoch {res.best_epoch}"
            + (f", {res.val_metric} = {res.best_metric:.2f}" if res.best_metric is not None else "")
            + f"; final tau {res.tau_final:.4f}")
    model, res = fused["fused"]
    hold = (sp.val if val is not None and sp.val else
            describe_split(str(fit_where[0]), fit_where[1], holdout=cfg.holdout or None))
    for label, (_, r) in fused.items():
        sel.choose(f"{label}: epoch", r.best_epoch, hold, r.val_metric, r.best_metric,
                   {str(e["epoch"]): e["val"][r.val_metric] for e in r.epochs if "val" in e and r.val_metric},
                   note="-1 = the untrained network, i.e. the mean of normalised scores" if cfg.keep_initial else "")

    # -- evaluate: bases, mean of normalised scores, best single, fused -----------------------------------------------
    chunk = cfg.eval_chunk
    report: dict[str, Any] = {"dataset": ds_fit.key, "bases": [{"name": b["name"], "checkpoint": b["path"],
                              "method": b["config"]["method"], "trained_on": b["config"].get("dataset")} for b in bases_info],
                              "notes": notes, "config": cfg.to_dict(),
                              "splits_used": {"fit": sp.fit, "val": sp.val, "test": sp.test},
                              "hparams": {k: model.hparams[k] for k in ("hidden", "blocks")},
                              "num_parameters": count_parameters(model.fusion), "splits": {}}
    baseline = baseline_model(tables["train"], hparams=hparams)
    metric_name: str | None = None
    for split, t in tables.items():
        if split == "train":
            continue
        entry: dict[str, Any] = {"dataset": t.dataset.key, "bases": {}}
        for k, n in enumerate(names):
            entry["bases"][n] = evaluate_base(t, k, chunk)
        metric_name = metric_name or pick_val_metric(cfg.val_metric, entry["bases"][names[0]], t.dataset)
        m_name: str = metric_name
        entry["metric"] = m_name
        best = max(names, key=lambda n: entry["bases"][n][m_name])
        entry["best_single"] = {"name": best, m_name: entry["bases"][best][m_name]}
        entry["mean_normalised"] = evaluate_fused(baseline, t, chunk)
        for label, (m, _) in fused.items():
            entry[label] = evaluate_fused(m, t, chunk)
        entry["gain_over_best_single"] = entry["fused"][m_name] - entry["bases"][best][m_name]
        entry["explanation"] = explanation_summary(explain_all(model, t, chunk), names)
        if diagnostics:
            entry["diagnostics"] = fusion_diagnostics(t, model, m_name, chunk=chunk)
        sel.report(f"bases, mean of normalised scores, fused ({split})", t.dataset.key)
        report["splits"][split] = entry
    # The fusion learns how far to trust each model from its scores on the fit queries. Base models that scored
    # those very queries far better than unseen ones (they were trained on them) teach it the wrong trust.
    if "val" in report["splits"] and sp.fit != sp.val and metric_name is not None:
        mn: str = metric_name
        vb = report["splits"]["val"]["bases"]
        tb = {n: evaluate_base(tables["train"], k, chunk) for k, n in enumerate(names)}
        gaps = {n: tb[n][mn] - vb[n][mn] for n in names}
        report["overfit_check"] = {"metric": mn, "train": {n: tb[n][mn] for n in names},
                                   "val": {n: vb[n][mn] for n in names}, "gap": gaps}
        if max(gaps.values()) > OVERFIT_GAP:
            msg = (f"warning: the base models score much higher on the fusion's training queries than on validation "
                   f"({mn} train - val: " + ", ".join(f"{n} {g:+.1f}" for n, g in gaps.items()) + "): they were "
                   "trained on those queries, so their scores there overstate their reliability and the fusion learns the "
                   "wrong trust. Fit the fusion on queries the base models did not train on (the default: --split-train "
                   "val --split-val none, with a test split to report).")
            report["notes"].append(msg)
            warn(msg)
    report["training"] = {label: {"wall_s": r.wall_s, "setup_s": r.setup_s, "best_epoch": r.best_epoch,
                                  "val_metric": r.val_metric, "best": r.best_metric, "tau_final": r.tau_final,
                                  "epochs": r.epochs, "steps": r.steps, "dynamic_tau": c.dynamic_tau}
                          for (label, (_, r)), (_, c) in zip(fused.items(), variants, strict=True)}
    report["encode_s"] = encode_s

    # -- the fused checkpoint -----------------------------------------------------------------------------------------
    extra = {"fusion": {"tau_final": res.tau_final, "best_epoch": res.best_epoch, "val_metric": res.val_metric,
                        "val": res.val, "config": cfg.to_dict()}}
    ckpt = out_dir / "best"
    with atomic_directory(ckpt) as tmp:
        write_checkpoint_files(model, tmp, dataset=ds_fit.key, extra=extra)
    report["checkpoint"] = str(ckpt)

    if incremental is not None:
        ev = tables.get("test") or val
        if ev is None:
            raise FusionError("--incremental needs a split to report on (--split-test or --split-val)")
        say(f"order of addition{f' from {start}' if start else ''} on {ev.dataset.key} ({metric_name}; seeds "
            f"{', '.join(map(str, incremental_seeds))}):")
        figs = order_of_addition(tables["train"], val, ev, cfg, incremental_seeds, start, hparams, metric_name, report=say)
        fin = figs["final"]
        say(f"  final figure over {fin['n']} fits: min {fin['min']:.2f}, median {fin['median']:.2f}, max {fin['max']:.2f},"
            f" std {fin['std']:.2f} (over orders {fin['std_over_orders']:.2f}, over seeds {fin['std_over_seeds']:.2f})")
        atomic_write_json(out_dir / "incremental.json", figs)
        plot_incremental(figs, out_dir / "incremental.png")
        sel.report("order of addition", ev.dataset.key)
        report["incremental"] = {**figs, "json": str(out_dir / "incremental.json"), "plot": str(out_dir / "incremental.png")}
    report["wall_s"] = time.perf_counter() - t_start
    report["selection"] = str(sel.write(out_dir))
    atomic_write_json(out_dir / "metrics.json", report)
    atomic_write_json(out_dir / "log.json", log)
    return FusionRun(report, model, res, fused, tables, data, ckpt, log)


__all__ = ["OVERFIT_GAP", "FuseSplits", "FusionRun", "fuse_checkpoints"]
