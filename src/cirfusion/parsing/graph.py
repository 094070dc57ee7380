"""The parser's output: a modification scene graph (entities with attributes, relations between them, edit
operations), one per text, and its JSON form::

    {"text": "...",
     "entities": [{"name": "floor lamp", "attributes": ["red", "tall"], "implicit": false}],
     "relations": [{"subject": "lamp", "predicate": "left of", "object": "table"}],
     "edits": [{"op": "replace", "entity": "carpet", "attributes": ["gray"], "from": "rug"}]}

Entity names are head-noun lemmas with their compounds kept ("floor lamp"); relations and edits name entities by
that name. ``from`` appears only on ``replace`` edits.

An entity may also carry ``"places"``: where the text puts it, each a place phrase with its preposition ("in top
left corner", "to centre left", "at middle of right side"). It is an extension of the schema above (the key is
left out when there is none): places are not entities, so a scorer of the schema's fields never sees them, but a
move ("shift the triangle to the centre left") says nothing without its destination.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import CirfusionError

EDIT_OPS = ("add", "remove", "replace", "change", "keep")


class ParseGraphError(CirfusionError, ValueError):
    """A scene-graph dict (from a file or a caller) that does not follow the schema."""


@dataclass
class Entity:
    name: str
    attributes: list[str] = field(default_factory=list)
    implicit: bool = False  # a subject the text leaves out ("is shiny and silver": the garment)
    places: list[str] = field(default_factory=list)  # "in top left corner", "to centre left" (see the module docstring)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "attributes": list(self.attributes), "implicit": self.implicit}
        if self.places:
            d["places"] = list(self.places)
        return d


@dataclass
class Relation:
    subject: str
    predicate: str
    object: str

    def to_dict(self) -> dict[str, Any]:
        return {"subject": self.subject, "predicate": self.predicate, "object": self.object}


@dataclass
class Edit:
    op: str  # one of EDIT_OPS
    entity: str
    attributes: list[str] = field(default_factory=list)
    from_: str | None = None  # the replaced entity, for op "replace" only

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"op": self.op, "entity": self.entity, "attributes": list(self.attributes)}
        if self.op == "replace" and self.from_ is not None:
            d["from"] = self.from_
        return d


@dataclass
class SceneGraph:
    """One text's modification graph (see the module docstring for the JSON form)."""

    text: str
    entities: list[Entity] = field(default_factory=list)
    relations: list[Relation] = field(default_factory=list)
    edits: list[Edit] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "entities": [e.to_dict() for e in self.entities],
                "relations": [r.to_dict() for r in self.relations], "edits": [e.to_dict() for e in self.edits]}

    @classmethod
    def from_dict(cls, d: Any, where: str = "scene graph") -> SceneGraph:
        """The inverse of :meth:`to_dict`; a malformed dict raises :class:`ParseGraphError` naming ``where``."""
        try:
            if not isinstance(d, dict) or not isinstance(d.get("text"), str):
                raise TypeError("expected an object with a string 'text'")
            ents = [Entity(_s(e["name"]), _strs(e.get("attributes", [])), bool(e.get("implicit", False)),
                           _strs(e.get("places", []))) for e in d.get("entities", [])]
            rels = [Relation(_s(r["subject"]), _s(r["predicate"]), _s(r["object"])) for r in d.get("relations", [])]
            edits = []
            for e in d.get("edits", []):
                op = _s(e["op"])
                if op not in EDIT_OPS:
                    raise ValueError(f"edit op {op!r} is not one of {', '.join(EDIT_OPS)}")
                frm = e.get("from")
                if frm is not None and op != "replace":
                    raise ValueError(f"'from' is only for replace edits, found on a {op!r} edit")
                edits.append(Edit(op, _s(e["entity"]), _strs(e.get("attributes", [])), None if frm is None else _s(frm)))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ParseGraphError(f"{where}: malformed scene graph: {exc}") from exc
        return cls(d["text"], ents, rels, edits)


def _s(x: Any) -> str:
    if not isinstance(x, str):
        raise TypeError(f"expected a string, got {x!r}")
    return x


def _strs(xs: Any) -> list[str]:
    if not isinstance(xs, list):
        raise TypeError(f"expected a list of strings, got {xs!r}")
    return [_s(x) for x in xs]
