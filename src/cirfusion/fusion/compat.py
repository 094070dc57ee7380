"""Which trained checkpoints can be fused: reading their records (config and run manifest) and refusing base models
trained on different datasets, data files or versions of a backbone."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..checkpoint import read_config
from ..data.schema import CIRDataset
from .kernels import FusionError


def read_bases(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Each checkpoint's record for :func:`check_compatible`: ``{"name", "path", "config", "manifest"}``. Names are the
    method names, made unique (``clip4cir``, ``clip4cir-2``); ``manifest`` is the run's ``manifest.json`` beside the
    checkpoint directory, or None."""
    out: list[dict[str, Any]] = []
    used: set[str] = set()
    seen: dict[Path, Path] = {}
    for p in map(Path, paths):
        real = p.resolve()
        if real in seen:
            raise FusionError(f"{p}: the same checkpoint is given twice (also as {seen[real]})")
        seen[real] = p
        cfg = read_config(p)
        man = None
        mp = p.parent / "manifest.json"
        if mp.is_file():
            try:
                man = json.loads(mp.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                man = None  # a damaged manifest only means the training data files cannot be compared (noted)
        name, j = cfg["method"], 2
        while name in used:
            name, j = f"{cfg['method']}-{j}", j + 1
        used.add(name)
        out.append({"name": name, "path": str(p), "config": cfg, "manifest": man})
    return out


def pick_base(bases: Sequence[Mapping[str, Any]], spec: str | None) -> str:
    """The name of the base model ``spec`` designates (its name, its checkpoint path or its index)."""
    if spec is None:
        raise FusionError("--incremental needs --base NAME (one of: " + ", ".join(b["name"] for b in bases) + ")")
    for b in bases:
        if spec == b["name"] or Path(spec).resolve() == Path(b["path"]).resolve():
            return str(b["name"])
    if spec.isdigit() and int(spec) < len(bases):
        return str(bases[int(spec)]["name"])
    raise FusionError(f"--base {spec!r} is none of the base models: " + ", ".join(f"{b['name']} ({b['path']})" for b in bases))


def dataset_family(key: str | None) -> str | None:
    """``"synthetic/train"`` -> ``"synthetic"``; ``"fashioniq/dress/train"`` -> ``"fashioniq/dress"``."""
    if not key:
        return None
    parts = key.split("/")
    return "/".join(parts[:-1]) if len(parts) > 1 else key


def check_compatible(bases: Sequence[Mapping[str, Any]], dataset: CIRDataset | None = None) -> list[str]:
    """Refuse base checkpoints that cannot be fused; returns notes for what could not be verified.

    Each entry: ``{"name", "path", "config"}`` (``config``: the checkpoint's config.json) and optionally
    ``"manifest"`` (the run's manifest.json). Raises :class:`FusionError` when fewer than two models are given, a base
    is itself a fusion, bases on the same backbone differ in its weights or preprocessing (bases on different
    backbones are fine: the fused model reads a ``multi:`` backbone of them), the training datasets differ (also from
    ``dataset``), or the runs' training annotation files differ (same dataset name, different data: different
    galleries)."""
    notes: list[str] = []
    if len(bases) < 2:
        raise FusionError(f"DAFM fuses K >= 2 base models; got {len(bases)}")
    for b in bases:
        if b["config"].get("method") == "dafm":
            raise FusionError(f"{b['path']}: is already a fused (dafm) checkpoint; fuse its base models directly")
    first: dict[str, Mapping[str, Any]] = {}
    for b in bases:
        bb = b["config"].get("backbone", {})
        bid = bb.get("id")
        if isinstance(bid, str) and bid.startswith("multi:"):
            raise FusionError(f"{b['path']}: trained on a multi: backbone; a base model must read one backbone")
        ref = first.setdefault(bid, b)
        for field_ in ("weights_hash", "preprocess_id"):
            a, c = ref["config"].get("backbone", {}).get(field_), bb.get(field_)
            if a != c:
                raise FusionError(
                    f"{b['path']} uses backbone {bid!r} with {field_} {c!r} but {ref['path']} uses {a!r}: base models "
                    "on the same backbone must use the same weights and preprocessing")
    if len(first) > 1:
        notes.append(f"the base models read {len(first)} backbones ({', '.join(map(str, first))}): the fused model "
                     "reads them side by side (a multi: backbone)")
    fams = {b["name"]: dataset_family(b["config"].get("dataset")) for b in bases}
    known = {n: f for n, f in fams.items() if f}
    if len(set(known.values())) > 1:
        raise FusionError("base models were trained on different datasets: "
                          + ", ".join(f"{n} on {b['config'].get('dataset')!r}" for n, b in zip(fams, bases, strict=True)))
    unknown = [n for n, f in fams.items() if not f]
    if unknown:
        notes.append(f"training dataset not recorded for {', '.join(unknown)}: not checked")
    if dataset is not None:
        fam = dataset_family(dataset.key)
        wrong = {n: f for n, f in known.items() if f != fam}
        if wrong:
            raise FusionError(f"fusing on {fam!r} but " + ", ".join(f"{n} was trained on {f!r}" for n, f in wrong.items()))
    digests = {}
    for b in bases:
        man = b.get("manifest")
        rec = (man or {}).get("datasets", {}).get("train") if isinstance(man, Mapping) else None
        if rec and rec.get("files"):
            digests[b["name"]] = (tuple(sorted(rec["files"].values())), rec.get("num_gallery"))
    if len(set(digests.values())) > 1:
        raise FusionError("base models were trained on different data (annotation files or gallery sizes differ): "
                          + "; ".join(f"{n}: gallery {d[1]}, files {[h[:12] for h in d[0]]}" for n, d in digests.items()))
    missing = [b["name"] for b in bases if b["name"] not in digests]
    if missing and len(bases) > 1:
        notes.append(f"no run manifest for {', '.join(missing)}: training data files not compared")
    return notes


__all__ = ["check_compatible", "dataset_family", "pick_base", "read_bases"]
