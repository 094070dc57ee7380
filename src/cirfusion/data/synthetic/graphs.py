"""Synthetic benchmark, ground truth for the modification parser: each query's fine and coarse text as the
parser's scene graph (:class:`cirfusion.parsing.SceneGraph`), from what the generator knows.

The generator stores, per query, the edits in text order (``scene_graph``: the edited object before and after
each edit, with canonical colour / size / shape, and the ``left_of`` / ``above`` relations its referring
expressions use), the fine lines (``finemt``, one per edit) and the coarse text (``captions[0]``, one phrase per
edit, one edit left out when ``meta["coarse_omitted"]``). Which of an object's attributes a phrase names, and with
which synonym, is drawn at random; it is read back from the text with the generator's own closed vocabulary
(``language._COLOUR_WORDS`` / ``_SIZE_WORDS`` / ``_SHAPE_WORDS``) and every word read is checked against the stored
objects, so a mismatch raises instead of scoring against a wrong graph. Nothing here changes generated output.

The graph of a text, by edit kind (T: the referred object, L: a landmark, N: the new object):

- add: entity N with its size and colour words; edit ``add N``;
- remove: entity T; edit ``remove T`` with T's words;
- change_colour / change_size: entity T, the new value appended to its attributes; edit ``change T [new]``
  (a size said only by the verb, "enlarge", is "larger" / "smaller");
- change_shape: entities T and N; edit ``replace N`` with N's words, ``from`` T;
- move: entity T; edit ``change T []``;
- a landmark: entity L and a relation ``T left of / right of / above / below L``;
- "it" and a phrase without a noun ("blue instead of red") are the implicit entity.

Mentions with the same noun and words are one entity, as in the parser. :func:`canonical` maps every synonym to the
generator's value, for scoring ("disc" and "circle" are one shape).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from ...parsing.graph import Edit, Entity, Relation, SceneGraph
from ..schema import DataError, Query
from .language import _COLOUR_WORDS, _SHAPE_WORDS, _SIZE_WORDS

_PROFORMS = ("one", "shape", "object")
_COMPARATIVES = {"bigger": "large", "larger": "large", "smaller": "small", "tinier": "small"}
_CANON: dict[str, str] = {}
for _table in (_COLOUR_WORDS, _SIZE_WORDS, _SHAPE_WORDS):
    for _value, _words in _table.items():
        for _w in _words:
            _CANON[_w] = _value
_CANON.update(_COMPARATIVES)
_SIZE_SURFACE = set(_CANON) & ({w for ws in _SIZE_WORDS.values() for w in ws} | set(_COMPARATIVES))
_COLOUR_SURFACE = {w for ws in _COLOUR_WORDS.values() for w in ws}
_SHAPE_SURFACE = sorted({w for ws in _SHAPE_WORDS.values() for w in ws}, key=lambda w: -len(w))
_SPATIAL = (("to the left of", "left of"), ("to the right of", "right of"), ("above", "above"), ("below", "below"))
_EDIT_KINDS = ("add", "remove", "change_colour", "change_shape", "change_size", "move")
_DETS = ("the", "a", "an", "another", "no")
_WORD = re.compile(r"[a-z]+|[;,.]")


def canonical(word: str) -> str:
    """The generator's value for a surface word ("violet" -> "purple", "disc" -> "circle", "bigger" -> "large")."""
    w = " ".join(word.lower().split())
    return _CANON.get(w, w)


@dataclass
class _NP:
    det: str | None
    words: list[str]  # size / colour words, surface
    head: str  # a shape word, a pro-form, or "it"


@dataclass
class _Item:
    kind: str  # "np", "colour", "size"
    np: _NP | None = None
    word: str = ""


def _items(text: str) -> list[_Item]:
    """The closed-vocabulary pieces of a generated text, in order: noun phrases and bare colour / size words."""
    toks = _WORD.findall(text.lower())
    out: list[_Item] = []
    i = 0
    while i < len(toks):
        j, det = i, None
        if toks[j] in _DETS:
            det, j = toks[j], j + 1
            if j < len(toks) and toks[j] == "extra":
                j += 1
        words = []
        while j < len(toks) and (toks[j] in _SIZE_SURFACE and toks[j] not in _COMPARATIVES or toks[j] in _COLOUR_SURFACE) and len(words) < 2:
            words.append(toks[j])
            j += 1
        head = None
        for s in _SHAPE_SURFACE:
            n = s.split()
            if toks[j:j + len(n)] == n:
                head, j = s, j + len(n)
                break
        if head is None and j < len(toks) and toks[j] in _PROFORMS and (det or words):
            head, j = toks[j], j + 1
        if head == "shape" and j < len(toks) and toks[j] == "of":  # "the shape of": a property, not a thing
            head = None
        if head is not None:
            out.append(_Item("np", _NP(det, words, head)))
            i = j
            continue
        t = toks[i]
        if t == "it":
            out.append(_Item("np", _NP(None, [], "it")))
        elif t in _COLOUR_SURFACE:
            out.append(_Item("colour", word=t))
        elif t in _SIZE_SURFACE:
            out.append(_Item("size", word=t))
        i += 1
    return out


@dataclass
class _EditFact:
    kind: str
    before: tuple[str, str, str] | None  # (shape, colour, size), canonical
    after: tuple[str, str, str] | None
    landmarks: list[tuple[str, tuple[str, str, str]]] = field(default_factory=list)  # (predicate, object)


def _edit_facts(q: Query) -> list[_EditFact]:
    """The stored modification graph as one fact per edit, in text order."""
    g = q.scene_graph
    if g is None:
        raise DataError(None, q.qid, "query has no scene graph: not a synthetic benchmark query")

    def obj(i: int) -> tuple[str, str, str]:
        a = g.entities[i].attributes
        return (g.entities[i].name, a[0], a[1])

    facts: list[_EditFact] = []
    pending: list[tuple[int, str, int]] = []
    for r in g.relations:
        if r.predicate in ("left_of", "above"):
            pending.append((r.subject, r.predicate, r.object))
            continue
        if r.predicate not in _EDIT_KINDS:
            raise DataError(None, q.qid, f"unknown relation {r.predicate!r} in the modification graph")
        before = None if r.predicate == "add" else obj(r.subject)
        after = None if r.predicate == "remove" else obj(r.object)
        # the landmark is the relation's other end; its predicate is read from the text
        lands = [(p, obj(o if s_ == r.subject else s_)) for s_, p, o in pending]
        facts.append(_EditFact(r.predicate, before, after, lands))
        pending = []
    return facts


class _Graph:
    def __init__(self, text: str, implicit_name: str) -> None:
        self.g = SceneGraph(text)
        self.implicit_name = implicit_name
        self.by_key: dict[tuple[str, tuple[str, ...]], Entity] = {}

    def entity(self, np: _NP) -> Entity:
        if np.head == "it":
            key: tuple[str, tuple[str, ...]] = (self.implicit_name, ("<implicit>",))
            ent = self.by_key.get(key)
            if ent is None:
                ent = self.by_key[key] = Entity(self.implicit_name, [], implicit=True)
                self.g.entities.append(ent)
            return ent
        key = (np.head, tuple(sorted(np.words)))
        if key not in self.by_key:
            self.by_key[key] = Entity(np.head, list(np.words))
            self.g.entities.append(self.by_key[key])
        return self.by_key[key]

    def implicit(self) -> Entity:
        return self.entity(_NP(None, [], "it"))

    def edit(self, op: str, ent: Entity, attrs: Sequence[str], frm: str | None = None) -> None:
        for a in attrs:
            if op in ("change",) and a not in ent.attributes:
                ent.attributes.append(a)
        self.g.edits.append(Edit(op, ent.name, list(attrs), frm))


class _Mismatch(Exception):
    """The text's words disagree with the stored edit (a wrong alignment, or a generator this does not know)."""


def _check_ref(np: _NP, obj: tuple[str, str, str] | None) -> None:
    """``np``'s words name ``obj`` (canonical shape, colour, size)."""
    if obj is None:
        raise _Mismatch("no object")
    if np.head not in _PROFORMS and np.head != "it" and canonical(np.head) != obj[0]:
        raise _Mismatch(f"{np.head!r} is not a {obj[0]}")
    for w in np.words:
        if canonical(w) not in obj[1:]:
            raise _Mismatch(f"{w!r} does not describe {obj}")


def _size_word(text: str, items: list[_Item], after: tuple[str, str, str]) -> str:
    sizes = [it.word for it in items if it.kind == "size"]
    if sizes:
        if canonical(sizes[-1]) != after[2]:
            raise _Mismatch(f"size {sizes[-1]!r} is not {after[2]}")
        return sizes[-1]
    return "larger" if after[2] == "large" else "smaller"


def _fine_line(gr: _Graph, line: str, f: _EditFact) -> None:
    items = _items(line)
    nps = [it.np for it in items if it.np is not None]
    if f.kind == "add":
        assert f.after is not None
        _check_ref(nps[0], f.after)
        ent = gr.entity(nps[0])
        gr.edit("add", ent, nps[0].words)
        return
    if not nps:
        raise _Mismatch("no noun phrase")
    t = nps[0]
    _check_ref(t, f.before)
    t_ent = gr.entity(t)
    n_land = len(f.landmarks)
    for k in range(n_land):
        land = nps[1 + k]
        _check_ref(land, f.landmarks[k][1])
        pred = next((p for phrase, p in _SPATIAL if phrase in line), None)
        if pred is None:
            raise _Mismatch("a landmark without a spatial phrase")
        gr.g.relations.append(Relation(t_ent.name, pred, gr.entity(land).name))
    rest = nps[1 + n_land:]
    if f.kind == "remove":
        gr.edit("remove", t_ent, t.words)
    elif f.kind == "change_colour":
        assert f.after is not None
        c = [it.word for it in items if it.kind == "colour"]
        if not c or canonical(c[-1]) != f.after[1]:
            raise _Mismatch("new colour not found")
        gr.edit("change", t_ent, [c[-1]])
    elif f.kind == "change_size":
        assert f.after is not None
        gr.edit("change", t_ent, [_size_word(line, items, f.after)])
    elif f.kind == "move":
        gr.edit("change", t_ent, [])
    else:  # change_shape
        if len(rest) != 1:
            raise _Mismatch("no new shape")
        _check_ref(rest[0], f.after)
        gr.edit("replace", gr.entity(rest[0]), rest[0].words, t_ent.name)


def fine_graph(q: Query, implicit_name: str = "it") -> SceneGraph:
    """The ground-truth graph of ``q``'s fine text (its ``finemt`` lines joined with "; ", as ``q.text``)."""
    facts = _edit_facts(q)
    lines = list(q.finemt or ())
    if len(lines) != len(facts):
        raise DataError(None, q.qid, f"{len(lines)} fine lines for {len(facts)} edits")
    gr = _Graph("; ".join(lines), implicit_name)
    for line, f in zip(lines, facts, strict=True):
        try:
            _fine_line(gr, line, f)
        except (_Mismatch, IndexError) as exc:
            raise DataError(None, q.qid, f"fine line {line!r} does not match its {f.kind} edit: {exc}") from exc
    return gr.g


def _coarse_edit(gr: _Graph, items: list[_Item], pos: int, f: _EditFact) -> int:
    """Read edit ``f`` from ``items[pos:]`` into ``gr``; the position after it."""
    it = items[pos] if pos < len(items) else None
    nxt = items[pos + 1] if pos + 1 < len(items) else None
    if it is None:
        raise _Mismatch("text ended")
    if f.kind in ("add", "remove", "move") or it.kind == "np" and f.kind != "change_shape":
        if it.np is None:
            raise _Mismatch(f"{f.kind} without a noun phrase")
        np = it.np
        if f.kind == "add":
            _check_ref(np, f.after)
            gr.edit("add", gr.entity(np), np.words)
            return pos + 1
        if f.kind == "change_colour" and np.det is None and np.head != "it":  # "blue circle"
            assert f.after is not None
            _check_ref(np, f.after)
            gr.edit("change", gr.entity(np), np.words)
            return pos + 1
        if np.head != "it":
            _check_ref(np, f.before)
        ent = gr.entity(np)
        if f.kind == "remove":
            gr.edit("remove", ent, np.words)
            return pos + 1
        if f.kind == "move":
            gr.edit("change", ent, [])
            return pos + 1
        if nxt is None or nxt.kind != ("colour" if f.kind == "change_colour" else "size"):
            raise _Mismatch("no new value after the reference")
        assert f.after is not None
        if canonical(nxt.word) != (f.after[1] if f.kind == "change_colour" else f.after[2]):
            raise _Mismatch(f"{nxt.word!r} is not the new value")
        gr.edit("change", ent, [nxt.word])
        return pos + 2
    if f.kind == "change_colour":  # "blue instead of red"
        assert f.after is not None
        if it.kind != "colour" or nxt is None or nxt.kind != "colour" or canonical(it.word) != f.after[1]:
            raise _Mismatch("not '<new> instead of <old>'")
        gr.edit("change", gr.implicit(), [it.word])
        return pos + 2
    if f.kind == "change_size":  # "bigger circle"
        assert f.after is not None
        if it.kind != "size" or nxt is None or nxt.np is None or canonical(it.word) != f.after[2]:
            raise _Mismatch("not '<size> <shape>'")
        np = _NP(None, [it.word], nxt.np.head)
        _check_ref(_NP(None, [], nxt.np.head), f.before)
        gr.edit("change", gr.entity(np), [it.word])
        return pos + 2
    # change_shape: two noun phrases, the new shape's and the old one's, in either order
    if it.np is None or nxt is None or nxt.np is None:
        raise _Mismatch("change_shape needs two noun phrases")
    assert f.after is not None
    a, b = it.np, nxt.np
    new, old = (a, b) if a.head != "it" and canonical(a.head) == f.after[0] else (b, a)
    _check_ref(new, f.after)
    if old.head != "it":
        _check_ref(old, f.before)
    old_ent, new_ent = gr.entity(a if old is a else b), None
    new_ent = gr.entity(new)
    if old is b:  # keep text order of the entities
        gr.g.entities.remove(old_ent)
        gr.g.entities.append(old_ent)
    gr.edit("replace", new_ent, new.words, old_ent.name)
    return pos + 2


def coarse_graph(q: Query, implicit_name: str = "it") -> SceneGraph:
    """The ground-truth graph of ``q``'s coarse text (``q.captions[0]``)."""
    facts = _edit_facts(q)
    text = q.captions[0]
    items = _items(text)
    omitted = int(q.meta.get("coarse_omitted", 0))
    choices: list[list[_EditFact]] = [facts] if not omitted else [facts[:k] + facts[k + 1:] for k in range(len(facts))]
    last: Exception | None = None
    for kept in choices:
        gr = _Graph(text, implicit_name)
        try:
            pos = 0
            for f in kept:
                pos = _coarse_edit(gr, items, pos, f)
            if pos != len(items):
                raise _Mismatch(f"{len(items) - pos} words left over")
            return gr.g
        except _Mismatch as exc:
            last = exc
    raise DataError(None, q.qid, f"coarse text {text!r} does not match its edits: {last}")


def edit_graphs(queries: Sequence[Query], implicit_name: str = "it") -> list[tuple[SceneGraph, SceneGraph]]:
    """(fine graph, coarse graph) of every query."""
    return [(fine_graph(q, implicit_name), coarse_graph(q, implicit_name)) for q in queries]
