"""Scores of predicted scene graphs against gold ones, micro-averaged over texts.

Units, counted as multisets per text (names and attributes lower-cased, whitespace collapsed, then passed through
``normalise`` when given):

- entity: the entity's name;
- attribute: (entity name, attribute), each entity's attributes counted once;
- relation: (subject, predicate, object);
- edit: (op, entity name);
- edit-op accuracy: each gold edit is paired with an unpaired predicted edit on the same entity (one with the same
  op first); the share of gold edits whose pair has the same op (an unpaired gold edit counts as wrong).

The implicit entity's name is a convention ("garment", "shoe", "it"): with ``implicit_as_one`` (the default) it is
scored as one name, ``<implicit>``, wherever a graph uses it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .graph import SceneGraph

KINDS = ("entity", "attribute", "relation", "edit")


@dataclass
class GraphScores:
    entity_f1: float
    attribute_f1: float
    relation_f1: float
    edit_f1: float
    edit_op_accuracy: float
    n_texts: int
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # kind -> {"tp", "fp", "fn"}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _f1(tp: int, fp: int, fn: int) -> float:
    if tp + fp + fn == 0:
        return 1.0  # nothing to find and nothing found
    return 2 * tp / (2 * tp + fp + fn)


def _clean(s: str) -> str:
    return " ".join(s.lower().split())


IMPLICIT = "<implicit>"


def _namer(g: SceneGraph, normalise: Callable[[str], str] | None, implicit_as_one: bool) -> Callable[[str], str]:
    implicit = {_clean(e.name) for e in g.entities if e.implicit} if implicit_as_one else set()

    def n(s: str) -> str:
        c = _clean(s)
        if c in implicit:
            return IMPLICIT
        return normalise(c) if normalise is not None else c

    return n


def units(g: SceneGraph, normalise: Callable[[str], str] | None = None,
          implicit_as_one: bool = True) -> dict[str, Counter[Any]]:
    """The counted units of one graph, by kind (see the module docstring)."""
    n = _namer(g, normalise, implicit_as_one)
    a = (lambda s: normalise(_clean(s))) if normalise is not None else _clean
    return {
        "entity": Counter(n(e.name) for e in g.entities),
        "attribute": Counter((n(e.name), x) for e in g.entities for x in {a(y) for y in e.attributes}),
        "relation": Counter((n(r.subject), _clean(r.predicate), n(r.object)) for r in g.relations),
        "edit": Counter((e.op, n(e.entity)) for e in g.edits),
    }


def _op_hits(pred: SceneGraph, gold: SceneGraph, np_: Callable[[str], str], n: Callable[[str], str]) -> int:
    free = [(e.op, np_(e.entity)) for e in pred.edits]
    hits = 0
    pending = []
    for e in gold.edits:  # exact pairs first, so a wrong op elsewhere cannot steal one
        key = (e.op, n(e.entity))
        if key in free:
            free.remove(key)
            hits += 1
        else:
            pending.append(n(e.entity))
    for name in pending:  # the rest take any edit on their entity, which is then a wrong op
        for k in free:
            if k[1] == name:
                free.remove(k)
                break
    return hits


def score_graphs(pred: Sequence[SceneGraph], gold: Sequence[SceneGraph],
                 normalise: Callable[[str], str] | None = None, implicit_as_one: bool = True) -> GraphScores:
    """Micro-averaged F1 per unit kind and edit-op accuracy of ``pred`` against ``gold`` (paired by position)."""
    if len(pred) != len(gold):
        raise ValueError(f"{len(pred)} predicted graphs for {len(gold)} gold graphs")
    counts = {k: {"tp": 0, "fp": 0, "fn": 0} for k in KINDS}
    op_hits = n_gold_edits = 0
    for p, g in zip(pred, gold, strict=True):
        up, ug = units(p, normalise, implicit_as_one), units(g, normalise, implicit_as_one)
        for k in KINDS:
            tp = sum((up[k] & ug[k]).values())
            counts[k]["tp"] += tp
            counts[k]["fp"] += sum(up[k].values()) - tp
            counts[k]["fn"] += sum(ug[k].values()) - tp
        op_hits += _op_hits(p, g, _namer(p, normalise, implicit_as_one), _namer(g, normalise, implicit_as_one))
        n_gold_edits += len(g.edits)
    f = {k: _f1(**counts[k]) for k in KINDS}
    return GraphScores(f["entity"], f["attribute"], f["relation"], f["edit"],
                       op_hits / n_gold_edits if n_gold_edits else 1.0, len(gold), counts)
