"""Synthetic benchmark, wording: referring expressions that pick out one object of a scene, the fine text (one exact
line per atomic edit), the coarse text (terse, partly ambiguous) and the per-query modification scene graph.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from ..schema import Entity, Relation, SceneGraph
from .scenes import COLOURS, Obj, Scene, _Cluster

_COLOUR_WORDS = {c: [c] for c in COLOURS}
_COLOUR_WORDS["purple"] = ["purple", "purple", "violet"]
_COLOUR_WORDS["cyan"] = ["cyan", "cyan", "turquoise"]
_SIZE_WORDS = {"small": ["small", "small", "little", "tiny"], "large": ["large", "large", "big"]}
_SHAPE_WORDS = {
    "circle": ["circle", "circle", "disc"],
    "square": ["square"],
    "triangle": ["triangle"],
    "diamond": ["diamond", "diamond", "rhombus"],
    "star": ["star"],
    "cross": ["cross", "cross", "plus sign"],
}
_CELL_PHRASES = {
    (0, 0): ["the top left corner", "the top left"],
    (0, 1): ["the top middle", "the middle of the top row", "the top centre"],
    (0, 2): ["the top right corner", "the top right"],
    (1, 0): ["the middle of the left side", "the left middle", "the centre left"],
    (1, 1): ["the centre", "the middle", "the very centre"],
    (1, 2): ["the middle of the right side", "the right middle", "the centre right"],
    (2, 0): ["the bottom left corner", "the bottom left"],
    (2, 1): ["the bottom middle", "the middle of the bottom row", "the bottom centre"],
    (2, 2): ["the bottom right corner", "the bottom right"],
}
# Attribute subsets a referring expression may use (the noun is the shape unless "shape" is absent).
_ATTR_SETS = [("shape",), ("colour",), ("colour", "shape"), ("size", "shape"), ("size", "colour"), ("size", "colour", "shape")]


def _a(phrase: str) -> str:
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def _noun_phrase(o: Obj, attrs: Sequence[str], rng: random.Random) -> str:
    words = []
    if "size" in attrs:
        words.append(rng.choice(_SIZE_WORDS[o.size]))
    if "colour" in attrs:
        words.append(rng.choice(_COLOUR_WORDS[o.colour]))
    words.append(rng.choice(_SHAPE_WORDS[o.shape]) if "shape" in attrs else rng.choice(["one", "shape", "object"]))
    return " ".join(words)


def _full_phrase(o: Obj, rng: random.Random) -> str:
    return _noun_phrase(o, ("size", "colour", "shape"), rng)


def _matches(c: Obj, o: Obj, attrs: Sequence[str]) -> bool:
    return all(getattr(c, a) == getattr(o, a) for a in attrs)


def _unique_attr_sets(scene: Scene) -> dict[int, list[tuple[str, ...]]]:
    """For each object, the attribute sets of ``_ATTR_SETS`` that no other object of the scene shares."""
    return _unique_attr_sets_cached(tuple(scene.items()))


_ATTR_INDEX = [tuple(Obj._fields.index(f) for f in a) for a in _ATTR_SETS]


@lru_cache(maxsize=8192)  # every line of a query refers to the same reference scene
def _unique_attr_sets_cached(items: tuple[tuple[int, Obj], ...]) -> dict[int, list[tuple[str, ...]]]:
    sigs = {k: [tuple(o[i] for i in idx) for idx in _ATTR_INDEX] for k, o in items}
    counts = [Counter(sig[j] for sig in sigs.values()) for j in range(len(_ATTR_SETS))]
    return {k: [a for j, a in enumerate(_ATTR_SETS) if counts[j][sig[j]] == 1] for k, sig in sigs.items()}


def _cell_phrase(row: int, col: int, rng: random.Random, prep: bool) -> str:
    p = rng.choice(_CELL_PHRASES[(row, col)])
    if not prep:
        return p
    return ("in " if "corner" in p or "middle of" in p else rng.choice(["in ", "at "])) + p


def _refer(scene: Scene, key: int, rng: random.Random) -> tuple[str, list[tuple[int, str, int]]]:
    """An exact referring expression for object ``key`` of ``scene``: "the small red circle on the left".

    Returns the phrase and the spatial relations it uses, as (subject key, predicate, object key) with
    predicates ``left_of``/``above`` only.
    """
    o = scene[key]
    uniq = _unique_attr_sets(scene)
    unique = uniq[key]
    if unique and rng.random() < 0.8:
        # Prefer fuller descriptions a little (the brief's example "the small red circle" is over-specified).
        attrs = rng.choices(unique, weights=[1 + len(a) for a in unique])[0]
        phrase = "the " + _noun_phrase(o, attrs, rng)
        if rng.random() > 0.2:
            return phrase, []
        attrs_for_loc = attrs
    else:
        attrs_for_loc = max(_ATTR_SETS, key=len) if not unique else rng.choice(unique)
        phrase = "the " + _noun_phrase(o, attrs_for_loc, rng)
    # A location: extreme among the look-alikes, an absolute cell, or relative to a landmark object.
    alike = {k: c for k, c in scene.items() if k != key and _matches(c, o, attrs_for_loc)}
    options: list[tuple[str, list[tuple[int, str, int]]]] = []
    if alike:
        for word, ok in (
            ("on the left", all(o.col < c.col for c in alike.values())),
            ("on the right", all(o.col > c.col for c in alike.values())),
            ("at the top", all(o.row < c.row for c in alike.values())),
            ("at the bottom", all(o.row > c.row for c in alike.values())),
        ):
            if ok:
                options.append((f"{phrase} {word}", []))
    options.append((f"{phrase} {_cell_phrase(o.row, o.col, rng, prep=True)}", []))
    for lk, lo in scene.items():
        if lk == key:
            continue
        l_attrs = [a for a in uniq[lk] if a != ("colour",)]
        if not l_attrs:
            continue
        land = "the " + _noun_phrase(lo, rng.choice(l_attrs), rng)
        for word, rel, holds in (
            ("to the left of", (key, "left_of", lk), lambda a, b: a.col < b.col),
            ("to the right of", (lk, "left_of", key), lambda a, b: a.col > b.col),
            ("above", (key, "above", lk), lambda a, b: a.row < b.row),
            ("below", (lk, "above", key), lambda a, b: a.row > b.row),
        ):
            if holds(o, lo) and not any(holds(c, lo) for c in alike.values()):
                options.append((f"{phrase} {word} {land}", [rel]))
    return rng.choice(options)


def _coarse_ref(scene: Scene, key: int, rng: random.Random) -> str:
    """A terse reference, ambiguous when the scene has look-alikes: "the circle", "the red one"."""
    if len(scene) == 1 and rng.random() < 0.3:
        return "it"
    attrs = rng.choices([*_ATTR_SETS[:3], _ATTR_SETS[5]], weights=[0.45, 0.15, 0.3, 0.1])[0]
    return "the " + _noun_phrase(scene[key], attrs, rng)


@dataclass(frozen=True)
class _Edit:
    kind: str  # one of EDIT_KINDS
    key: int  # object key in the cluster
    before: Obj | None  # the object in the reference (None for "add")
    after: Obj | None  # the object after this one edit (None for "remove")

    @property
    def detail(self) -> str:
        return {"add": "presence", "remove": "presence", "change_colour": "colour", "change_shape": "shape",
                "change_size": "size", "move": "position"}[self.kind]  # fmt: skip


def _edits_between(cluster: _Cluster, ref: tuple[int, ...], tgt: tuple[int, ...]) -> list[_Edit]:
    rs, ts = cluster.scene(ref), cluster.scene(tgt)
    out = []
    for i, dim in enumerate(cluster.dims):
        if ref[i] == tgt[i]:
            continue
        k = dim.obj
        val = dim.values[tgt[i]]
        if dim.kind == "presence":
            out.append(_Edit("add", k, None, ts[k]) if val else _Edit("remove", k, rs[k], None))
            continue
        b = rs[k]
        if dim.kind == "colour":
            out.append(_Edit("change_colour", k, b, b.with_(colour=val)))
        elif dim.kind == "shape":
            out.append(_Edit("change_shape", k, b, b.with_(shape=val)))
        elif dim.kind == "size":
            out.append(_Edit("change_size", k, b, b.with_(size=val)))
        else:
            out.append(_Edit("move", k, b, b.with_(row=val[0], col=val[1])))
    return out


def _fine_line(e: _Edit, ref: Scene, rng: random.Random) -> tuple[str, list[tuple[int, str, int]]]:
    """One complete, exact instruction for one atomic edit, referring to the reference scene."""
    rels: list[tuple[int, str, int]] = []
    if e.kind == "add":
        assert e.after is not None
        obj = _a(_full_phrase(e.after, rng))
        loc = _cell_phrase(e.after.row, e.after.col, rng, prep=True)
        t = rng.choice(["add {o} {l}", "put {o} {l}", "place {o} {l}", "{L}, add {o}", "insert {o} {l}", "draw {o} {l}"])
        return t.format(o=obj, l=loc, L=loc[:1].upper() + loc[1:]), rels
    ref_phrase, rels = _refer(ref, e.key, rng)
    assert e.before is not None
    if e.kind == "remove":
        t = rng.choice(["remove {r}", "delete {r}", "take away {r}", "get rid of {r}", "erase {r}"])
        return t.format(r=ref_phrase), rels
    assert e.after is not None
    if e.kind == "change_colour":
        new = rng.choice(_COLOUR_WORDS[e.after.colour])
        t = rng.choice(["make {r} {n}", "change the {cw} of {r} to {n}", "recolour {r} {n}", "turn {r} {n}",
                        "paint {r} {n}", "{r} should be {n}", "give {r} a {n} {cw}"])  # fmt: skip
        return t.format(r=ref_phrase, n=new, cw=rng.choice(["colour", "color"])), rels
    if e.kind == "change_shape":
        new = rng.choice(_SHAPE_WORDS[e.after.shape])
        t = rng.choice(["turn {r} into {an}", "change {r} into {an}", "make {r} {an}",
                        "change the shape of {r} to {an}", "replace {r} with {same}"])  # fmt: skip
        same = _a(_noun_phrase(e.after, ("size", "colour", "shape"), rng))
        return t.format(r=ref_phrase, an=_a(new), same=same), rels
    if e.kind == "change_size":
        if e.after.size == "large":
            t = rng.choice(["make {r} bigger", "make {r} larger", "make {r} large", "enlarge {r}",
                            "increase the size of {r}", "scale up {r}"])  # fmt: skip
        else:
            t = rng.choice(["make {r} smaller", "make {r} small", "shrink {r}", "reduce the size of {r}",
                            "scale down {r}"])  # fmt: skip
        return t.format(r=ref_phrase), rels
    # move
    cell = _cell_phrase(e.after.row, e.after.col, rng, prep=False)
    t = rng.choice(["move {r} to {c}", "shift {r} to {c}", "put {r} {pc} instead", "relocate {r} to {c}",
                    "move {r} over to {c}"])  # fmt: skip
    return t.format(r=ref_phrase, c=cell, pc=_cell_phrase(e.after.row, e.after.col, rng, prep=True)), rels


def _direction(b: Obj, a: Obj) -> str:
    v = "up" if a.row < b.row else "down" if a.row > b.row else ""
    h = "left" if a.col < b.col else "right" if a.col > b.col else ""
    if v and h:
        return f"{v} and to the {h}"
    return v or f"to the {h}"


def _coarse_phrase(e: _Edit, ref: Scene, rng: random.Random) -> str:
    """A terse, often under-specified phrase for one edit, like a real CIR caption fragment."""
    if e.kind == "add":
        assert e.after is not None
        attrs = rng.choices([("shape",), ("colour", "shape"), ("size", "colour", "shape")], weights=[0.45, 0.4, 0.15])[0]
        o = _noun_phrase(e.after, attrs, rng)
        return rng.choice(["add {a}", "add {a}", "plus {a}", "with another {o}", "an extra {o}"]).format(a=_a(o), o=o)
    r = _coarse_ref(ref, e.key, rng)
    assert e.before is not None
    if e.kind == "remove":
        o = r[4:] if r.startswith("the ") else "one"
        return rng.choice(["remove {r}", "no {o}", "without {r}", "drop {r}", "lose {r}"]).format(r=r, o=o)
    assert e.after is not None
    if e.kind == "change_colour":
        n = rng.choice(_COLOUR_WORDS[e.after.colour])
        s = rng.choice(_SHAPE_WORDS[e.after.shape])
        return rng.choice(["make {r} {n}", "{n} {s}", "{r} in {n}", "{n} instead of {old}", "{r} {n}"]).format(
            r=r, n=n, s=s, old=rng.choice(_COLOUR_WORDS[e.before.colour])
        )
    if e.kind == "change_shape":
        n = rng.choice(_SHAPE_WORDS[e.after.shape])
        return rng.choice(["{an} instead of {old}", "make {r} {an}", "{n} not {old}", "{r} as {an}"]).format(
            an=_a(n), n=n, r=r, old=_a(rng.choice(_SHAPE_WORDS[e.before.shape]))
        )
    if e.kind == "change_size":
        word = rng.choice(["bigger", "larger"] if e.after.size == "large" else ["smaller", "tinier"])
        return rng.choice(["make {r} {w}", "{r} {w}", "{w} {s}"]).format(r=r, w=word, s=rng.choice(_SHAPE_WORDS[e.before.shape]))
    u = rng.random()
    if u < 0.6:
        return rng.choice(["move {r} {d}", "{r} goes {d}", "shift {r} {d}"]).format(r=r, d=_direction(e.before, e.after))
    if u < 0.8:
        return rng.choice(["move {r}", "{r} somewhere else"]).format(r=r)
    return f"move {r} to {_cell_phrase(e.after.row, e.after.col, rng, prep=False)}"


def _modification_graph(
    edits: Sequence[_Edit], rels: Sequence[Sequence[tuple[int, str, int]]], ref: Scene
) -> SceneGraph:
    """Ground-truth scene graph of a modification (see the module docstring)."""
    entities: list[Entity] = []
    before_idx: dict[int, int] = {}
    relations: list[Relation] = []

    def ref_entity(key: int) -> int:
        if key not in before_idx:
            before_idx[key] = len(entities)
            entities.append(ref[key].entity())
        return before_idx[key]

    for e, rr in zip(edits, rels, strict=False):
        if e.kind == "add":
            assert e.after is not None
            entities.append(e.after.entity())
            relations.append(Relation(len(entities) - 1, "add", len(entities) - 1))
            continue
        b = ref_entity(e.key)
        for s, p, o in rr:
            relations.append(Relation(ref_entity(s), p, ref_entity(o)))
        if e.kind == "remove":
            relations.append(Relation(b, "remove", b))
        else:
            assert e.after is not None
            entities.append(e.after.entity())
            relations.append(Relation(b, e.kind, len(entities) - 1))
    return SceneGraph(tuple(entities), tuple(relations))


def _join_coarse(phrases: list[str], rng: random.Random) -> str:
    if len(phrases) == 1:
        text = phrases[0]
    else:
        sep = rng.choice([", ", " and ", "; ", ", "])
        text = sep.join(phrases[:-1]) + (" and " if sep == ", " and rng.random() < 0.5 else sep) + phrases[-1]
    return rng.choice(["", "", "", "same but ", "now "]) + text
