"""Synthetic benchmark, reading back: the manifest, galleries and queries of a split (dataset ``"synthetic"``), its
edit pairs and its per-image scene records.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .._jsonio import read_jsonl
from ..generated import EditPair, read_edit_pairs, read_manifest
from ..ip2p import edit_pairs_dataset
from ..registry import register_dataset
from ..schema import CIRDataset, DataError, Gallery, Query, SceneGraph
from .scenes import EDIT_KINDS, EDIT_PAIRS_SPLIT, FORMAT_NAME, PRETRAIN_SPLIT


def _read_manifest(root: Path) -> dict[str, Any]:
    path = root / "manifest.json"
    m = read_manifest(path, "not a synthetic benchmark: manifest.json is missing "
                            "(create one with `cirfusion data make-synthetic --out DIR`)")  # fmt: skip
    if m.get("format") != FORMAT_NAME:
        raise DataError(path, None, f"not a {FORMAT_NAME} manifest (format is {m.get('format')!r})")
    if not m.get("complete"):
        raise DataError(path, None, "benchmark is marked incomplete")
    if not isinstance(m.get("splits"), dict):
        raise DataError(path, "splits", "missing or not an object")
    return m


def _check_split(root: Path, m: dict[str, Any], split: str) -> None:
    if split not in m["splits"]:
        raise DataError(root / "manifest.json", split, f"unknown split; available: {', '.join(m['splits'])}")


def _read_gallery(root: Path, split: str) -> tuple[Path, Gallery]:
    path = root / f"gallery.{split}.json"
    if not path.is_file():
        raise DataError(path, None, "file is missing")
    try:
        g = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(path, None, f"invalid JSON: {exc}") from exc
    if not isinstance(g, dict):
        raise DataError(path, None, "expected an object {image id: relative path}")
    for k, v in g.items():
        if not isinstance(v, str):
            raise DataError(path, k, f"path must be a string, got {type(v).__name__}")
    return path, Gallery(list(g), [root / v for v in g.values()], source=path)


@register_dataset("synthetic")
def load_synthetic(root: str | Path, split: str, text: str = "coarse", validate: bool = True, **kwargs: Any) -> CIRDataset:
    """Read split ``split`` of a benchmark written by :func:`generate`.

    ``text``: "coarse" (terse, partly ambiguous, like real CIR captions) or "fine" (the complete ``finemt``
    lines joined with "; ") becomes ``Query.text``; ``Query.captions`` is always (coarse, fine).
    """
    root = Path(root)
    extra = {k: v for k, v in kwargs.items() if v is not None}  # generic callers pass e.g. category=None
    if extra:
        raise DataError(root, None, f"unknown synthetic dataset option(s): {', '.join(sorted(extra))} (known: text, validate)")
    if text not in ("coarse", "fine"):
        raise DataError(root, None, f"synthetic dataset option text must be 'coarse' or 'fine', got {text!r}")
    m = _read_manifest(root)
    if split == EDIT_PAIRS_SPLIT:
        return edit_pairs_split(root, m)
    _check_split(root, m, split)
    gpath, gallery = _read_gallery(root, split)
    qpath = root / f"queries.{split}.jsonl"
    queries = []
    for n, d in read_jsonl(qpath):
        q = Query.from_dict(d, qpath, d.get("qid", f"line {n}"))
        if len(q.captions) != 2 or not q.finemt or not q.targets:
            raise DataError(qpath, q.qid, "a synthetic query needs captions [coarse, fine], finemt and a target")
        chosen = q.captions[0] if text == "coarse" else q.captions[1]
        queries.append(Query(q.qid, q.reference, chosen, q.targets, q.captions, q.finemt, q.scene_graph, q.subset, q.meta))
    ds = CIRDataset(
        name="synthetic",
        split=split,
        queries=queries,
        gallery=gallery,
        root=root,
        files=[root / "manifest.json", gpath, qpath],
        exclude_reference=True,
        text_policy="fixed",
        meta={"text": text, "held_out_combos": m.get("held_out_combos", []), "generator_version": m.get("generator_version"),
              "seed": m.get("seed"), "image_size": m.get("image_size")},
    )
    if validate:
        ds.validate()
    return ds


def edit_pairs_split(root: Path, m: dict[str, Any] | None = None) -> CIRDataset:
    """Split ``edit_pairs``: the atomic edit pairs of every split a model may train on -- ``train`` and, when the
    benchmark has one, ``pretrain`` (extra scenes made only for stage-1 pre-training) -- as one CIR dataset (reference
    = source image, text = the one-edit instruction, target = the edited image). Never val or test."""
    m = m if m is not None else _read_manifest(root)
    parts = [s for s in ("train", PRETRAIN_SPLIT) if s in m["splits"]]
    pairs = [p for s in parts for p in load_edit_pairs(root, s)]
    return edit_pairs_dataset(pairs, name="synthetic", split=EDIT_PAIRS_SPLIT, root=root,
                              files=[root / "manifest.json", *(root / f"edit_pairs.{s}.jsonl" for s in parts)])


def load_edit_pairs(root: str | Path, split: str) -> list[EditPair]:
    """The edit pairs of a split (image, single-edit instruction, edited image), with absolute paths."""
    root = Path(root)
    m = _read_manifest(root)
    _check_split(root, m, split)
    _, gallery = _read_gallery(root, split)
    path = root / f"edit_pairs.{split}.jsonl"

    def resolve(d: dict[str, Any], side: str, entry: str) -> Path:
        if d[side] not in gallery:
            raise DataError(path, entry, f"{side} image {d[side]!r} is not in gallery.{split}.json")
        return gallery.path(d[side])

    return read_edit_pairs(path, EDIT_KINDS, resolve)


def load_scene_records(root: str | Path, split: str) -> dict[str, dict[str, Any]]:
    """Raw per-image records of a split: ``scene_graph`` (dict), ``render`` (objects with pixel geometry,
    background), ``cluster``, ``path``."""
    root = Path(root)
    m = _read_manifest(root)
    _check_split(root, m, split)
    path = root / f"scenes.{split}.jsonl"
    out: dict[str, dict[str, Any]] = {}
    for n, d in read_jsonl(path):
        iid = d.get("id")
        if not isinstance(iid, str):
            raise DataError(path, f"line {n}", "missing or non-string field 'id'")
        if iid in out:
            raise DataError(path, iid, "duplicate image id")
        out[iid] = d
    return out


def load_scene_graphs(root: str | Path, split: str) -> dict[str, SceneGraph]:
    """Ground-truth scene graph of every image of a split, by image id."""
    path = Path(root) / f"scenes.{split}.jsonl"
    return {k: SceneGraph.from_dict(d.get("scene_graph", {}), path, k) for k, d in load_scene_records(root, split).items()}
