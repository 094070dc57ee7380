"""Coarse -> fine modification texts (``cirfusion data make-fine``), written in the released Fine-CIRR /
Fine-FashionIQ layout that the ``finecir`` loader reads back.

Output layout (under ``out``)::

    captions/cirr.fine.{split}.jsonl            {"pairid", "reference", "target_hard", "finemt", "img_set"} per line
    captions/fiq.fine.{category}.{split}.jsonl  {"target", "candidate", "finemt"} per line
    image_splits/split.rc2.{split}.json         only for generated benchmarks: {image id: path relative to the
                                                source root, or to the images' common directory when they lie
                                                outside it} (read with ``image_dir=<fine.json's image_dir>``)
    fine.json                                   what was made: source, layout, counts, dropped queries and why

``finemt`` is one string, a numbered list of atomic edits ("1. Add a red circle. 2. Remove the blue square."),
as in the released files.

Two sources of fine text:

- **Known edits** (the synthetic and catalog benchmarks): the generator knows every atomic edit. Synthetic: its
  fine lines (one exact line per edit); catalog: the category / colour change or the photo edit it applied.
- **A generator** for a real dataset, the three steps of the FineCIR annotation pipeline:

  1. *select pairs*: queries with one target that differs from the reference (``max_pairs``: a seeded sample);
  2. *construct* the fine text with an image-text-to-text model from the target image and the coarse text, then
     *clean* it with an LLM that keeps only edits the coarse text and the draft agree on
     (:class:`FineTextGenerator`; :mod:`cirfusion.data.fine_hf` loads both from local directories via transformers);
  3. *filter* with cirfusion's own models: drop a query whose fine text is already solved (target at rank <=
     ``solved_k``) by text-only retrieval (the backbone's text vector against image vectors; needs an aligned
     backbone) or by image-only retrieval (the ``image-only`` method), then *compress* each kept text to the text
     encoder's length by dropping trailing edits.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from ..errors import CirfusionError
from ..io import atomic_write_json, atomic_write_text
from .finecir import parse_finemt
from .schema import CIRDataset, Query

LAYOUTS = ("cirr", "fiq")


class FineDataError(CirfusionError, ValueError):
    """A dataset make-fine cannot work on (no known edits, a missing category, an unusable generator output)."""


# ---- the finemt string ------------------------------------------------------------------------------------------------
def _sentence(s: str) -> str:
    s = " ".join(s.split()).strip()
    if not s:
        return s
    s = s[0].upper() + s[1:]
    return s if s[-1] in ".!?" else s + "."


def numbered(edits: Sequence[str]) -> str:
    """The released ``finemt`` form: ``"1. Add a red circle. 2. Remove the square."`` (empty edits dropped)."""
    items = [_sentence(e) for e in edits if e and e.strip()]
    if not items:
        raise FineDataError("a fine text needs at least one edit")
    return " ".join(f"{i}. {e}" for i, e in enumerate(items, 1))


# ---- known edits ------------------------------------------------------------------------------------------------------
def synthetic_edits(q: Query) -> list[str]:
    """The synthetic generator's fine lines: one exact line per atomic edit."""
    if not q.finemt:
        raise FineDataError(f"synthetic query {q.qid}: no fine lines (finemt)")
    return list(q.finemt)


def catalog_edits(q: Query) -> list[str]:
    """The catalog query's known edit(s), from what the generator recorded in ``Query.meta``."""
    m = q.meta
    kind = m.get("kind")
    cat, tcat = m.get("ref_category", "garment"), m.get("target_category")
    col, tcol = m.get("ref_colour"), m.get("target_colour")
    if kind == "category":
        return [f"replace the {cat} with a {tcat}", f"keep the colour {col}"]
    if kind == "colour":
        return [f"change the colour of the {cat} from {col} to {tcol}", f"keep the {cat}"]
    if kind == "both":
        return [f"replace the {cat} with a {tcat}", f"change the colour from {col} to {tcol}"]
    if kind == "edit":
        e = m.get("edit") or {}
        k, p = e.get("kind"), e.get("params", {})
        if k == "recolour":
            return [f"recolour the {cat} {p.get('target')}", "keep everything else"]
        if k == "mirror":
            return ["mirror the photo left to right"]
        if k == "rotate":
            return [f"rotate the photo {p.get('angle')} degrees counter-clockwise"]
        if k == "crop":
            return [f"zoom in {p.get('zoom')}x on the {p.get('region')} of the photo"]
        if k == "brightness":
            return [f"make the photo {'darker' if float(p.get('factor', 1)) < 1 else 'brighter'}"]
    raise FineDataError(f"catalog query {q.qid}: no known edit for kind {kind!r}")


KNOWN_EDITS: dict[str, Callable[[Query], list[str]]] = {"synthetic": synthetic_edits, "catalog": catalog_edits}


def known_finemt(ds: CIRDataset) -> dict[str, str]:
    """qid -> numbered fine text from the benchmark's known edits."""
    fn = KNOWN_EDITS.get(ds.name)
    if fn is None:
        raise FineDataError(f"dataset {ds.name!r} has no known edits (known: {', '.join(KNOWN_EDITS)}); "
                            "use a generator (--vlm/--llm) for a real dataset")
    return {q.qid: numbered(fn(q)) for q in ds.queries}


# ---- writing ------------------------------------------------------------------------------------------------------------
def _pairid(q: Query, i: int) -> int:
    v = q.meta.get("pairid")
    return int(v) if isinstance(v, int) and not isinstance(v, bool) else i


def gallery_base(datasets: list[CIRDataset]) -> Path:
    """The directory a generated benchmark's gallery paths are written against: its root when every image of every
    split lies inside it, else the images' deepest common directory (a catalog made from photos kept elsewhere)."""
    if not datasets:
        raise FineDataError("no split to take gallery paths from")
    root = datasets[0].root
    paths = [os.path.realpath(p) for ds in datasets for p in ds.gallery.paths]
    if root is not None:
        base = os.path.realpath(root)
        if all(p.startswith(base + os.sep) for p in paths):
            return Path(base)
    if not paths:
        raise FineDataError(f"{datasets[0].key}: no gallery image to write paths for")
    return Path(os.path.commonpath([os.path.dirname(p) for p in paths]))


def write_cirr(out: Path, ds: CIRDataset, finemt: dict[str, str], write_gallery: bool,
               base_dir: Path | None = None) -> list[Path]:
    """``captions/cirr.fine.{split}.jsonl`` (+ the gallery split file for a generated benchmark, its paths relative
    to ``base_dir``: by default the dataset's root; read back with ``image_dir=<base_dir>``)."""
    lines = []
    for i, q in enumerate(ds.queries):
        if q.qid not in finemt:
            continue
        rec: dict[str, Any] = {"pairid": _pairid(q, i), "reference": q.reference}
        if q.targets:
            rec["target_hard"] = q.targets[0]
        rec["finemt"] = finemt[q.qid]
        members = list(dict.fromkeys(q.subset or ()))
        if members and q.reference in members and (not q.targets or q.targets[0] in members):
            rec["img_set"] = {"id": int(q.meta.get("img_set_id", i) or 0), "members": members}
        lines.append(rec)
    path = out / "captions" / f"cirr.fine.{ds.split}.jsonl"
    _write_jsonl(path, lines)
    written = [path]
    if write_gallery:
        against = base_dir if base_dir is not None else ds.root
        if against is None:
            raise FineDataError(f"{ds.key}: the dataset has no root to write gallery paths against")
        base = Path(against).resolve()
        rel = {}
        for image_id, p in zip(ds.gallery.ids, ds.gallery.paths, strict=True):
            rp = Path(p).resolve()
            if not rp.is_relative_to(base):
                raise FineDataError(f"gallery image {image_id} ({p}) is outside {base}, which the gallery paths are "
                                    "written against")
            rel[image_id] = rp.relative_to(base).as_posix()
        gpath = out / "image_splits" / f"split.rc2.{ds.split}.json"
        atomic_write_json(gpath, rel)
        written.append(gpath)
    return written


def write_fiq(out: Path, ds: CIRDataset, finemt: dict[str, str]) -> list[Path]:
    """``captions/fiq.fine.{category}.{split}.jsonl`` (the gallery is the original FashionIQ split file)."""
    if not ds.category:
        raise FineDataError(f"{ds.key}: the fiq layout needs a FashionIQ category")
    lines = []
    for q in ds.queries:
        if q.qid in finemt:
            rec: dict[str, Any] = {"candidate": q.reference}
            if q.targets:
                rec["target"] = q.targets[0]
            rec["finemt"] = finemt[q.qid]
            lines.append(rec)
    path = out / "captions" / f"fiq.fine.{ds.category}.{ds.split}.jsonl"
    _write_jsonl(path, lines)
    return [path]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


# ---- the three-step pipeline for real datasets ----------------------------------------------------------------------
class FineTextGenerator(Protocol):
    """Step 2: ``draft`` writes a fine text for (reference, target, coarse text) with an image-text-to-text model;
    ``clean`` keeps only the edits the coarse text supports (an LLM removing hallucinations)."""

    def draft(self, reference: Path, target: Path, coarse: str) -> str: ...

    def clean(self, draft: str, coarse: str) -> str: ...


def select_pairs(ds: CIRDataset, max_pairs: int | None = None, seed: int = 0) -> list[Query]:
    """Step 1: queries with exactly one target that is not the reference; a seeded sample of ``max_pairs``."""
    pairs = [q for q in ds.queries if len(set(q.targets)) == 1 and q.targets[0] != q.reference]
    if max_pairs is not None and len(pairs) > max_pairs:
        keep = set(random.Random(f"make-fine/{seed}/{ds.key}").sample(range(len(pairs)), max_pairs))
        pairs = [q for i, q in enumerate(pairs) if i in keep]
    return pairs


def generate_edits(ds: CIRDataset, pairs: Sequence[Query], gen: FineTextGenerator) -> dict[str, list[str]]:
    """Step 2 for each pair: draft with the VLM, clean with the LLM, split into atomic edits (``parse_finemt``).
    A pair whose cleaned text holds no edit is left out."""
    out: dict[str, list[str]] = {}
    for q in pairs:
        ref, tgt = ds.gallery.path(q.reference), ds.gallery.path(q.targets[0])
        cleaned = gen.clean(gen.draft(ref, tgt, q.text), q.text)
        items = [e for e in _edits_of(cleaned) if re.search(r"[A-Za-z]", e)]
        if items:
            out[q.qid] = items
    return out


def _edits_of(text: str) -> list[str]:
    try:
        return list(parse_finemt(text))
    except CirfusionError:
        return []


@dataclass
class FilterReport:
    kept: list[str] = field(default_factory=list)
    text_solved: list[str] = field(default_factory=list)
    image_solved: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"kept": len(self.kept), "dropped_text_only": self.text_solved, "dropped_image_only": self.image_solved}


def _rank_of_target(scores: torch.Tensor, ds: CIRDataset, qs: Sequence[Query]) -> list[int]:
    """1-based rank of each query's target among the gallery (the reference removed when the dataset does)."""
    ranks = []
    for i, q in enumerate(qs):
        s = scores[i].clone()
        if ds.exclude_reference:
            s[ds.gallery.index(q.reference)] = float("-inf")
        t = float(s[ds.gallery.index(q.targets[0])])
        ranks.append(int((s > t).sum()) + 1)
    return ranks


def retrieval_filter(ds: CIRDataset, qs: Sequence[Query], texts: Sequence[str], text_scores: Callable[[list[str]], torch.Tensor],
                     image_scores: Callable[[list[str]], torch.Tensor], solved_k: int = 1) -> FilterReport:
    """Step 3a: drop each query whose target is at rank <= ``solved_k`` under text-only retrieval of its fine text
    or under image-only retrieval from its reference (``*_scores`` give ``[len(qs), gallery]`` scores)."""
    rep = FilterReport()
    if not qs:
        return rep
    t_rank = _rank_of_target(text_scores(list(texts)), ds, qs)
    i_rank = _rank_of_target(image_scores([q.reference for q in qs]), ds, qs)
    for q, tr, ir in zip(qs, t_rank, i_rank, strict=True):
        if tr <= solved_k:
            rep.text_solved.append(q.qid)
        elif ir <= solved_k:
            rep.image_solved.append(q.qid)
        else:
            rep.kept.append(q.qid)
    return rep


def compress(edits: Sequence[str], fits: Callable[[str], bool]) -> list[str]:
    """Step 3b: the longest prefix of ``edits`` whose numbered text ``fits`` the text encoder (at least the first
    edit, cut word by word if it alone is too long)."""
    items = list(edits)
    while len(items) > 1 and not fits(numbered(items)):
        items.pop()
    words = items[0].split()
    while len(words) > 1 and not fits(numbered([" ".join(words)])):
        words.pop()
    return [" ".join(words), *items[1:]]


class BackboneRetrieval:
    """Text-only and image-only retrieval with cirfusion's own models on cached features: text-only is the
    backbone's text vector against the gallery's image vectors (an aligned backbone: CLIP, SigLIP, BLIP-2, or
    ``tiny:aligned=true``); image-only is the ``image-only`` method; ``fits`` says whether a text stays within the
    encoder's ``max_text_tokens`` (it fills fewer than all of them, so nothing was cut)."""

    def __init__(self, cache: Any, ds: CIRDataset, image_only: Any) -> None:
        bb = cache.backbone
        if not getattr(bb, "aligned", False):
            raise FineDataError(f"step 3 (text-only retrieval) needs an aligned backbone (image and text vectors in "
                                f"one space: hf-clip, hf-blip2, tiny:aligned=true); {bb.backbone_id!r} is not")
        self.cache, self.ds, self.image_only = cache, ds, image_only
        table = cache.image_features(ds.gallery.ids, ds.gallery.paths, progress=False)
        self.images = table.torch()
        self._rows = {i: r for r, i in enumerate(table.ids)}

    def text_scores(self, texts: list[str]) -> torch.Tensor:
        t = self.cache.encode_texts(texts).global_
        return torch.nn.functional.normalize(t, dim=-1) @ torch.nn.functional.normalize(self.images.global_, dim=-1).T

    @torch.no_grad()
    def image_scores(self, refs: list[str]) -> torch.Tensor:
        rows = [self._rows[r] for r in refs]
        from_rows = type(self.images)(global_=self.images.global_[rows], tokens=self.images.tokens[rows])
        m = self.image_only
        return m.similarity(m.encode_gallery(from_rows), m.encode_gallery(self.images))

    def fits(self, text: str) -> bool:
        f = self.cache.backbone.encode_text([text])
        return int(f.mask.sum()) < int(self.cache.backbone.max_text_tokens)


def make_fine_generated(ds: CIRDataset, gen: FineTextGenerator, retrieval: BackboneRetrieval, max_pairs: int | None,
                        seed: int = 0, solved_k: int = 1) -> tuple[dict[str, str], dict[str, Any]]:
    """The three steps on one split: (qid -> numbered fine text, a report of what was dropped and why)."""
    pairs = select_pairs(ds, max_pairs, seed)
    edits = generate_edits(ds, pairs, gen)
    made = [q for q in pairs if q.qid in edits]
    rep = retrieval_filter(ds, made, [numbered(edits[q.qid]) for q in made], retrieval.text_scores,
                           retrieval.image_scores, solved_k)
    out = {qid: numbered(compress(edits[qid], retrieval.fits)) for qid in rep.kept}
    return out, {"selected": len(pairs), "generated": len(made), "no_edit": len(pairs) - len(made), **rep.to_dict()}


def write_fine(out: Path, ds: CIRDataset, finemt: dict[str, str], layout: str, write_gallery: bool,
               base_dir: Path | None = None) -> list[Path]:
    """Write one split in ``layout`` (``cirr`` or ``fiq``); ``base_dir``: see :func:`write_cirr`."""
    if layout not in LAYOUTS:
        raise FineDataError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return write_cirr(out, ds, finemt, write_gallery, base_dir) if layout == "cirr" else write_fiq(out, ds, finemt)


__all__ = [
    "KNOWN_EDITS",
    "LAYOUTS",
    "BackboneRetrieval",
    "FilterReport",
    "FineDataError",
    "FineTextGenerator",
    "catalog_edits",
    "compress",
    "gallery_base",
    "generate_edits",
    "known_finemt",
    "make_fine_generated",
    "numbered",
    "retrieval_filter",
    "select_pairs",
    "synthetic_edits",
    "write_cirr",
    "write_fine",
    "write_fiq",
]
