"""One triplet schema for every dataset.

Every loader returns a :class:`CIRDataset`: an ordered list of :class:`Query` records plus an ordered
:class:`Gallery`. Methods, metrics and the CLI only ever see these types, never a dataset's raw format.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CirfusionError
from ..options import OptionError


class DataError(CirfusionError, ValueError):
    """Malformed dataset input. The message names the file, the entry and the problem."""

    def __init__(self, file: str | Path | None, entry: Any, problem: str) -> None:
        self.file = None if file is None else str(file)
        self.entry = entry
        self.problem = problem
        where = self.file or "<input>"
        if entry is not None:
            where += f" [entry {entry}]"
        super().__init__(f"{where}: {problem}")


@dataclass(frozen=True)
class Entity:
    """A scene-graph node: an object mentioned by the text or present in an image."""

    name: str
    attributes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "attributes": list(self.attributes)}


@dataclass(frozen=True)
class Relation:
    """A directed scene-graph edge between two entities, given by their positions in ``SceneGraph.entities``."""

    subject: int
    predicate: str
    object: int

    def to_dict(self) -> dict[str, Any]:
        return {"subject": self.subject, "predicate": self.predicate, "object": self.object}


@dataclass(frozen=True)
class SceneGraph:
    entities: tuple[Entity, ...] = ()
    relations: tuple[Relation, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "entities": [e.to_dict() for e in self.entities],
            "relations": [r.to_dict() for r in self.relations],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], file: str | Path | None = None, entry: Any = None) -> "SceneGraph":
        try:
            ents = tuple(Entity(str(e["name"]), tuple(str(a) for a in e.get("attributes", ()))) for e in d.get("entities", ()))
            rels = tuple(Relation(int(r["subject"]), str(r["predicate"]), int(r["object"])) for r in d.get("relations", ()))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DataError(file, entry, f"malformed scene graph: {exc!r}") from exc
        for r in rels:
            if not (0 <= r.subject < len(ents) and 0 <= r.object < len(ents)):
                raise DataError(file, entry, f"scene graph relation {r} points outside its {len(ents)} entities")
        return cls(ents, rels)


@dataclass(frozen=True)
class Query:
    """One composed-retrieval query.

    ``text`` is the text used at evaluation. ``captions`` holds every caption variant the dataset has (FashionIQ's
    two captions, CIRR's extended captions...). ``targets`` is empty on test splits and may hold several ids
    (CIRCO, catalog queries). ``subset`` holds CIRR-style ``img_set.members`` (reference and target included).
    ``meta`` keeps dataset-specific extras (``target_soft``, the query kind, ``shared_concept``...).
    """

    qid: str
    reference: str
    text: str
    targets: tuple[str, ...] = ()
    captions: tuple[str, ...] = ()
    finemt: tuple[str, ...] | None = None
    scene_graph: SceneGraph | None = None
    subset: tuple[str, ...] | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "qid": self.qid,
            "reference": self.reference,
            "text": self.text,
            "targets": list(self.targets),
            "captions": list(self.captions),
        }
        if self.finemt is not None:
            d["finemt"] = list(self.finemt)
        if self.scene_graph is not None:
            d["scene_graph"] = self.scene_graph.to_dict()
        if self.subset is not None:
            d["subset"] = list(self.subset)
        if self.meta:
            d["meta"] = self.meta
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], file: str | Path | None = None, entry: Any = None) -> "Query":
        for key in ("qid", "reference", "text"):
            if key not in d:
                raise DataError(file, entry, f"missing field {key!r}")
        sg = d.get("scene_graph")
        return cls(
            qid=str(d["qid"]),
            reference=str(d["reference"]),
            text=str(d["text"]),
            targets=tuple(str(t) for t in d.get("targets", ())),
            captions=tuple(str(c) for c in d.get("captions", ())),
            finemt=None if d.get("finemt") is None else tuple(str(x) for x in d["finemt"]),
            scene_graph=None if sg is None else SceneGraph.from_dict(sg, file, entry),
            subset=None if d.get("subset") is None else tuple(str(x) for x in d["subset"]),
            meta=dict(d.get("meta", {})),
        )


class Gallery:
    """Ordered mapping image id -> image path. The order is the column order of every score matrix."""

    def __init__(self, ids: Sequence[str], paths: Sequence[str | Path], source: str | Path | None = None) -> None:
        if len(ids) != len(paths):
            raise DataError(source, None, f"gallery has {len(ids)} ids but {len(paths)} paths")
        self.ids: list[str] = [str(i) for i in ids]
        self.paths: list[Path] = [Path(p) for p in paths]
        self._index: dict[str, int] = {}
        for pos, i in enumerate(self.ids):
            if i in self._index:
                raise DataError(source, i, "duplicate image id in gallery")
            self._index[i] = pos
        self.source = None if source is None else str(source)

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._index

    def index(self, image_id: str) -> int:
        try:
            return self._index[image_id]
        except KeyError:
            raise DataError(self.source, image_id, "image id is not in the gallery") from None

    def path(self, image_id: str) -> Path:
        return self.paths[self.index(image_id)]

    def items(self) -> Iterable[tuple[str, Path]]:
        return zip(self.ids, self.paths, strict=True)


# How a dataset turns a query's captions into a training text.
#   "fixed":     always ``query.text``
#   "fashioniq": random choice of c1+" and "+c2, c2+" and "+c1, c1, c2 (the FashionIQ training convention)
#   "random":    a random element of ``captions`` (or ``text`` when there are none)
TEXT_POLICIES = ("fixed", "fashioniq", "random")


def join_fashioniq(c1: str, c2: str) -> str:
    """FashionIQ's caption join: strip whitespace and trailing punctuation of each caption, join with 'and'."""
    a = c1.strip().rstrip(".!?,;: ").strip()
    b = c2.strip().rstrip(".!?,;: ").strip()
    if a and b:
        return f"{a} and {b}"
    return a or b


@dataclass
class CIRDataset:
    """A split of a CIR dataset: ordered queries over an ordered gallery.

    ``exclude_reference``: whether metrics drop the reference image from a query's ranking (CIRR convention).
    ``recall_target``: what Recall@K counts as a hit: ``"any"`` target (default) or only a query's ``"first"``
    target (CIRCO's ``target_img_id``; mAP@K still uses every target, see :mod:`cirfusion.metrics`).
    ``files``: the annotation files it was read from (hashed into run manifests).
    """

    name: str
    split: str
    queries: list[Query]
    gallery: Gallery
    root: Path | None = None
    files: list[Path] = field(default_factory=list)
    exclude_reference: bool = True
    text_policy: str = "fixed"
    category: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    recall_target: str = "any"

    def __post_init__(self) -> None:
        if self.text_policy not in TEXT_POLICIES:
            raise OptionError(f"unknown text_policy {self.text_policy!r}; expected one of {TEXT_POLICIES}")
        if self.recall_target not in ("any", "first"):
            raise OptionError(f"unknown recall_target {self.recall_target!r}; expected 'any' or 'first'")

    def __len__(self) -> int:
        return len(self.queries)

    @property
    def has_targets(self) -> bool:
        return any(q.targets for q in self.queries)

    @property
    def key(self) -> str:
        """A short identifier: name[/category]/split."""
        return "/".join(x for x in (self.name, self.category, self.split) if x)

    def training_text(self, q: Query, rng: random.Random) -> str:
        if self.text_policy == "fashioniq" and len(q.captions) >= 2:
            c1, c2 = q.captions[0], q.captions[1]
            return rng.choice([join_fashioniq(c1, c2), join_fashioniq(c2, c1), join_fashioniq(c1, ""), join_fashioniq(c2, "")])
        if self.text_policy == "random" and q.captions:
            return rng.choice(list(q.captions))
        return q.text

    def validate(self) -> None:
        """Check every cross-reference: reference/targets/subset members are gallery ids; query ids are unique.

        Raises :class:`DataError` naming the first offending query.
        """
        src = self.files[0] if self.files else None
        seen: set[str] = set()
        for q in self.queries:
            if q.qid in seen:
                raise DataError(src, q.qid, "duplicate query id")
            seen.add(q.qid)
            for problem in query_problems(q, self.gallery):
                raise DataError(src, q.qid, problem)

    def files_digest(self) -> dict[str, str]:
        """sha256 of each annotation file (for run manifests)."""
        return {str(f): sha256_file(f) for f in self.files}


def reference_columns(dataset: "CIRDataset", rows: Sequence[int] | None = None, exclude: bool | None = None) -> np.ndarray:
    """The one reference mask: per query row (all rows by default), the gallery column of its reference image when
    the reference is left out of the ranking (``exclude``, default ``dataset.exclude_reference``) and is in the
    gallery, else -1. ``reference_mask`` turns it into a boolean ``[rows, N]`` matrix."""
    rows = range(len(dataset.queries)) if rows is None else rows
    excl = dataset.exclude_reference if exclude is None else bool(exclude)
    out = np.full(len(rows), -1, dtype=np.int64)
    if excl:
        for i, r in enumerate(rows):
            ref = dataset.queries[int(r)].reference
            if ref in dataset.gallery:
                out[i] = dataset.gallery.index(ref)
    return out


def reference_mask(columns: np.ndarray, n: int) -> np.ndarray:
    """``[len(columns), n]`` boolean, True at each row's excluded column (``-1`` = none)."""
    mask = np.zeros((len(columns), n), dtype=bool)
    hit = columns >= 0
    mask[np.flatnonzero(hit), columns[hit]] = True
    return mask


def query_problems(q: Query, gallery: Gallery) -> list[str]:
    """Every cross-reference problem of one query against a gallery (empty list when it is fine)."""
    problems = []
    if q.reference not in gallery:
        problems.append(f"reference {q.reference!r} is not in the gallery")
    for t in q.targets:
        if t not in gallery:
            problems.append(f"target {t!r} is not in the gallery")
    for m in q.subset or ():
        if m not in gallery:
            problems.append(f"subset member {m!r} is not in the gallery")
    return problems


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()
