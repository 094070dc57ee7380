"""Where a clause's entities are or go: the ``places`` of the rule parser's entities, an extension of the issue's
schema ("move the red cube to the top left corner" -> the cube's places ``["to top left corner"]``).

A place is a place chunk (:mod:`.chunks`: "the top left corner", "the right side") with the preposition before it,
articles dropped ("in the top left corner" -> "in top left corner"); "the middle of the right side" is one place.
A chunk with no preposition before it is a part, not a place ("its side", "curled sides"). A destination (after
"to", "into", "towards", "toward" or "onto", or "at" after "put" / "place") belongs to the clause's first entity
after its verb, the thing moved; any other place to the entity right before it. A place followed by "of" and an
entity is a relation's ("to the left of the table"), not a place.
"""

from __future__ import annotations

from . import lexicon as lx
from .chunks import _Chunker, _Clause
from .graph import Entity

_TO_PREPS = frozenset({"to", "into", "towards", "toward", "onto"})  # a place after these is where a thing goes

__all__ = ["clause_places"]


def clause_places(chunker: _Chunker, c: _Clause, implicit: Entity | None) -> list[tuple[Entity, str]]:
    """``(entity, place)`` for each place of clause ``c`` whose chunks ``chunker`` has read (their entities set);
    ``implicit`` is the text's implicit entity, which a pronoun stands for. Never makes an entity."""
    t = chunker.t
    found: list[tuple[Entity, str]] = []
    moved: Entity | None = None  # the verb's first object
    last: Entity | None = None
    phrase: list[str] | None = None  # the place being read, extended by "of the ..."
    owner: Entity | None = None
    prev_end = -1

    def flush() -> None:
        if phrase and owner is not None:
            found.append((owner, " ".join(phrase)))

    for ch in c.chunks:
        if ch.kind in ("entity", "pronoun"):
            flush()
            phrase, owner = None, None
            last = implicit if ch.kind == "pronoun" else ch.entity
            if moved is None and c.verb is not None and ch.start > c.verb.i:
                moved = last
            continue
        if ch.kind != "place":
            continue
        nxt = chunker.chunk_from(ch.end + 1) if ch.end + 1 < c.end and t[ch.end].lower == "of" else None
        if nxt is not None and nxt.kind in ("entity", "pronoun"):
            continue  # "to the left of the table": a relation's
        words = [x.lower for x in t[ch.start:ch.end] if x.lower not in ("the", "a", "an")]
        if phrase is not None and prev_end + 1 == ch.start and t[prev_end].lower == "of":
            phrase += ["of", *words]  # "the middle of the right side"
        else:
            flush()
            prep = t[ch.start - 1].lower if ch.start > c.start and t[ch.start - 1].pos == "ADP" else ""
            if not prep:  # "its side", "curled sides": a part, not where the thing is
                phrase, owner = None, None
                continue
            destination = prep in _TO_PREPS or (prep == "at" and c.verb is not None and c.verb.lemma in lx.PLACE_VERBS)
            owner = moved if destination and moved is not None else last
            phrase = [prep, *words]
        prev_end = ch.end
    flush()
    return found
