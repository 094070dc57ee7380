"""Embedded benchmark A: synthetic scene-graph composed image retrieval.

Pillow renders scenes of 1-5 objects on a 3x3 grid (shape x colour x size, plus background and jitter as
nuisance). Every image has its ground-truth scene graph. Queries are (reference, 1-3 atomic edits, target) with
two texts: a *fine* one (``finemt``: one exact line per edit) and a *coarse* one (terse, partly ambiguous).

Design (why it measures what the methods claim):

- Images come in **clusters**: a base scene plus a small grid of variations ("dimensions": the colour, shape or
  size of one object, where one object sits, whether one object is there). Every image of a cluster is one point
  of the grid, so each image has at least five one-detail neighbours in the gallery. A query's reference and
  target are two points 1-3 dimensions apart; its text names exactly those dimensions. The reference's
  neighbourhood is full of images as close to it as the target, so **the text is necessary**: similarity to the
  reference alone cannot say which neighbour was asked for.
- A query's **subset** (CIRR ``img_set``) is reference + target + 4 images that differ from the target in exactly
  one detail, chosen among those closest to the reference (partial edits, wrong value of the right attribute), so
  Recall_subset@K measures whether every detail of the text was applied.
- **Held-out combinations**: some colour x shape pairs never appear in train or val images; a share of the test
  clusters is built around one (``Query.meta["held_out"]`` is true when the reference or the target shows one).
- **Edit pairs** (image, one-edit instruction, edited image) come from one-detail neighbours of the same split.

Files written under ``--out`` (all JSON/JSONL, paths relative to the root)::

    manifest.json                  seed, sizes, vocabulary, held-out combinations, counts, generator version
    gallery.{split}.json           {image id: "images/{split}/{id}.png"} in gallery order
    queries.{split}.jsonl          one Query.to_dict() per line (text = the fine text; captions = [coarse, fine])
    scenes.{split}.jsonl           per image: scene graph, objects with pixel geometry, background
    edit_pairs.{split}.jsonl       {source, instruction, edited, kind}
    images/{split}/{id}.png

Per-image scene graph: one entity per object (``name`` = shape, ``attributes`` = (colour, size, shape,
position)), relations ``left_of`` (column smaller) and ``above`` (row smaller) between every pair they hold for.

Per-query scene graph (the *modification*): for each atomic edit, the object before the edit and/or after it,
linked by the edit kind (``change_colour``, ``change_shape``, ``change_size``, ``move``: before -> after; ``add``
and ``remove``: a self-loop on the added/removed object), plus the landmark objects and the ``left_of``/``above``
relations the fine text uses to refer to the edited objects. Every line of the fine text refers to objects as
they are in the reference image; edits of one object share its "before" entity.

Learnability (measured on the default benchmark, frozen EfficientNet-Lite0 at 128 px): the pooled global vector
does not resolve which object has which attribute, the 8x8 spatial tokens do (a linear probe on one token reads
colour, shape and size of the object under it at >= 99.7% on val) -- methods need token-level image features.
"""

from __future__ import annotations

import colorsys
import json
import math
import os
import random
import shutil
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from ._jsonio import read_jsonl
from .registry import register_dataset
from .schema import CIRDataset, DataError, Entity, Gallery, Query, Relation, SceneGraph

GENERATOR_VERSION = "1.0"
FORMAT_NAME = "cirfusion-synthetic"
SPLITS = ("train", "val", "test")

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
# Saturated, bright colours, far apart in hue and lightness; backgrounds are dark and muted, so every colour
# stands out from every background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "orange": (250, 140, 20),
    "yellow": (245, 225, 40),
    "green": (40, 185, 60),
    "cyan": (40, 215, 225),
    "blue": (45, 85, 235),
    "purple": (155, 65, 215),
    "white": (245, 245, 245),
}
SIZES = ("small", "large")
GRID = 3
POSITIONS = (
    "top-left", "top-middle", "top-right",
    "middle-left", "centre", "middle-right",
    "bottom-left", "bottom-middle", "bottom-right",
)  # fmt: skip
EDIT_KINDS = ("add", "remove", "change_colour", "change_shape", "change_size", "move")
# What varies along one dimension of a cluster; also what a distractor differs from its target in.
DETAIL_KINDS = ("colour", "shape", "size", "position", "presence")

# Object radius as a fraction of the grid cell. Large objects fill most of a cell, small ones about a third of
# its area, so size is visible at 128 px.
_RADIUS = {"small": 0.21, "large": 0.36}
_JITTER_FRAC = 0.07  # centre jitter, fraction of a cell (about +-3 px at 128 px)
_ROT_JITTER = 8  # degrees, polygons only (a square never becomes a diamond)
_PNG_LEVEL = 6  # fixed, so files are byte-identical across runs
_SUPERSAMPLE = 2  # draw at 2x and box-downsample: anti-aliased edges, pure colour inside

_EDIT_PROBS = {1: 0.3, 2: 0.4, 3: 0.3}  # queries by number of atomic edits
_MIN_CLUSTER, _MAX_CLUSTER = 12, 40
# How often each kind of dimension is drawn for a cluster (DETAIL_KINDS order); tuned so the six edit kinds
# are roughly balanced over queries (presence dimensions give both add and remove).
_DIM_WEIGHTS = [0.17, 0.17, 0.2, 0.18, 0.28]
_SUBSET_DISTRACTORS = 4
_COARSE_DROP = 0.3  # chance the coarse text leaves one edit out (queries with >= 2 edits)


# --------------------------------------------------------------------------------------------------------------
# Scenes and clusters


class Obj(NamedTuple):
    """One object of a scene: its attributes and its grid cell (a named tuple: cheap to hash and compare)."""

    shape: str
    colour: str
    size: str
    row: int
    col: int

    @property
    def position(self) -> str:
        return POSITIONS[self.row * GRID + self.col]

    def entity(self) -> Entity:
        return Entity(self.shape, (self.colour, self.size, self.shape, self.position))

    def with_(self, **kw: Any) -> "Obj":
        return self._replace(**kw)


Scene = dict  # object key (index in its cluster) -> Obj, for the objects present


def scene_graph_of(objs: Sequence[Obj]) -> SceneGraph:
    """Scene graph of an image: entities in row-major cell order; ``left_of``/``above`` for every pair."""
    objs = sorted(objs, key=lambda o: (o.row, o.col))
    rels = []
    for i, a in enumerate(objs):
        for j, b in enumerate(objs):
            if a.col < b.col:
                rels.append(Relation(i, "left_of", j))
            if a.row < b.row:
                rels.append(Relation(i, "above", j))
    return SceneGraph(tuple(o.entity() for o in objs), tuple(rels))


def _scene_key(objs: Iterable[Obj]) -> tuple:
    return tuple(sorted((o.row, o.col, o.shape, o.colour, o.size) for o in objs))


@dataclass
class _Dim:
    kind: str  # one of DETAIL_KINDS
    obj: int
    values: tuple  # value 0 is the base object's


@dataclass
class _Cluster:
    objects: list[Obj]  # base objects
    dims: list[_Dim]
    background: tuple[int, int, int]
    configs: list[tuple[int, ...]]  # the grid points kept (all of them unless truncated)

    def scene(self, config: Sequence[int]) -> Scene:
        objs = dict(enumerate(self.objects))
        present = set(objs)
        for dim, v in zip(self.dims, config):
            val = dim.values[v]
            o = objs[dim.obj]
            if dim.kind == "colour":
                objs[dim.obj] = o.with_(colour=val)
            elif dim.kind == "shape":
                objs[dim.obj] = o.with_(shape=val)
            elif dim.kind == "size":
                objs[dim.obj] = o.with_(size=val)
            elif dim.kind == "position":
                objs[dim.obj] = o.with_(row=val[0], col=val[1])
            elif dim.kind == "presence" and not val:
                present.discard(dim.obj)
        return {k: objs[k] for k in sorted(present)}


def _hamming(a: Sequence[int], b: Sequence[int]) -> int:
    return sum(x != y for x, y in zip(a, b))


def _all_configs(dims: Sequence[_Dim]) -> list[tuple[int, ...]]:
    out: list[tuple[int, ...]] = [()]
    for d in dims:
        out = [c + (v,) for c in out for v in range(len(d.values))]
    return out


def _held_out_in(objs: Iterable[Obj], held_out: set[tuple[str, str]]) -> list[tuple[str, str]]:
    return sorted({(o.colour, o.shape) for o in objs if (o.colour, o.shape) in held_out})


def _sample_cluster(
    rng: random.Random, held_out: set[tuple[str, str]], mode: str, seen: set[tuple]
) -> _Cluster:
    """A random cluster (base scene + 3-5 dimensions of variation) meeting every constraint.

    ``mode``: "exclude" (no held-out colour x shape anywhere) or "force" (the base scene has one).
    ``seen``: scene keys already used anywhere in the benchmark; no scene is ever rendered twice.
    """
    colours = list(COLOURS)
    for _ in range(10_000):
        n_obj = rng.choices([1, 2, 3, 4, 5], weights=[1, 3, 4, 3, 1])[0]
        cells = rng.sample(range(GRID * GRID), GRID * GRID)
        objects = []
        for i in range(n_obj):
            r, c = divmod(cells.pop(), GRID)
            objects.append(Obj(rng.choice(SHAPES), rng.choice(colours), rng.choice(SIZES), r, c))
        if mode == "force":
            colour, shape = rng.choice(sorted(held_out))
            objects[0] = objects[0].with_(colour=colour, shape=shape)
        n_dims = rng.choice([3, 3, 4, 4, 5])
        dims: list[_Dim] = []
        used: set[tuple[int, str]] = set()
        presence_objs: set[int] = set()
        for _ in range(n_dims * 4):
            if len(dims) == n_dims:
                break
            kind = rng.choices(DETAIL_KINDS, weights=_DIM_WEIGHTS)[0]
            if kind == "presence":
                # An object that comes and goes: an untouched one, or a new one in a free cell.
                cands = [i for i in range(len(objects)) if not any(u[0] == i for u in used)]
                if len(objects) < 5 and cells and (not cands or rng.random() < 0.5):
                    r, c = divmod(cells.pop(), GRID)
                    objects.append(Obj(rng.choice(SHAPES), rng.choice(colours), rng.choice(SIZES), r, c))
                    cands = [len(objects) - 1]
            else:
                cands = [i for i in range(len(objects)) if i not in presence_objs and (i, kind) not in used]
            if not cands:
                continue
            i = rng.choice(cands)
            o = objects[i]
            if kind == "colour":
                k = rng.choice([2, 3, 4])
                values = (o.colour, *rng.sample([c for c in colours if c != o.colour], k - 1))
            elif kind == "shape":
                k = rng.choice([2, 3])
                values = (o.shape, *rng.sample([s for s in SHAPES if s != o.shape], k - 1))
            elif kind == "size":
                values = (o.size, SIZES[1 - SIZES.index(o.size)])
            elif kind == "position":
                k = rng.choice([2, 3])
                if len(cells) < k - 1:
                    continue
                values = ((o.row, o.col), *(divmod(cells.pop(), GRID) for _ in range(k - 1)))
            else:
                values = (True, False)
                presence_objs.add(i)
            used.add((i, kind))
            dims.append(_Dim(kind, i, values))
        size = math.prod(len(d.values) for d in dims)
        n_neighbours = sum(len(d.values) - 1 for d in dims)
        # >= 3 dimensions for 3-edit queries; >= 5 neighbours so every target has 4 distractors besides its
        # reference; at least one object that is always there (no empty scene).
        if len(dims) < 3 or n_neighbours < 5 or not (_MIN_CLUSTER <= size <= _MAX_CLUSTER):
            continue
        if len(presence_objs) == len(objects):
            continue
        configs = _all_configs(dims)
        cluster = _Cluster(objects, dims, (0, 0, 0), configs)
        keys = [_scene_key(cluster.scene(c).values()) for c in configs]
        if len(set(keys)) != len(keys) or any(k in seen for k in keys):
            continue
        ho = [_held_out_in(cluster.scene(c).values(), held_out) for c in configs]
        if mode == "exclude" and any(ho):
            continue
        h, s, v = rng.random(), rng.uniform(0.0, 0.3), rng.uniform(0.12, 0.42)
        cluster.background = tuple(int(round(255 * x)) for x in colorsys.hsv_to_rgb(h, s, v))  # type: ignore[assignment]
        return cluster
    raise RuntimeError("could not sample a synthetic cluster meeting the constraints (this is a bug)")


def _truncate(cluster: _Cluster, n: int, rng: random.Random) -> None:
    """Keep ``n`` grid points, grown breadth-first from a random one so kept points stay neighbours."""
    start = rng.choice(cluster.configs)
    kept, frontier, seen = [start], [start], {start}
    while frontier and len(kept) < n:
        nxt = []
        for c in frontier:
            nbrs = [_set(c, i, v) for i, d in enumerate(cluster.dims) for v in range(len(d.values)) if v != c[i]]
            rng.shuffle(nbrs)
            for b in nbrs:
                if b not in seen and len(kept) < n:
                    seen.add(b)
                    kept.append(b)
                    nxt.append(b)
        frontier = nxt
    cluster.configs = sorted(kept)


def _set(c: tuple[int, ...], i: int, v: int) -> tuple[int, ...]:
    return c[:i] + (v,) + c[i + 1 :]


# --------------------------------------------------------------------------------------------------------------
# Wording

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
    attrs = rng.choices(_ATTR_SETS[:3] + [_ATTR_SETS[5]], weights=[0.45, 0.15, 0.3, 0.1])[0]
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

    for e, rr in zip(edits, rels):
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


# --------------------------------------------------------------------------------------------------------------
# Rendering


def _polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    if shape == "square":
        pts = [(math.cos(a), math.sin(a)) for a in (math.pi / 4 + k * math.pi / 2 for k in range(4))]
        pts = [(1.2 * x, 1.2 * y) for x, y in pts]
    elif shape == "triangle":
        pts = [(1.25 * math.cos(a), 1.25 * math.sin(a)) for a in (-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))]
    elif shape == "diamond":
        pts = [(0.0, -1.25), (0.85, 0.0), (0.0, 1.25), (-0.85, 0.0)]
    elif shape == "star":
        pts = []
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5
            rr = 1.25 if k % 2 == 0 else 0.52
            pts.append((rr * math.cos(a), rr * math.sin(a)))
    elif shape == "cross":
        w, L = 0.38, 1.1
        pts = [(-w, -L), (w, -L), (w, -w), (L, -w), (L, w), (w, w), (w, L), (-w, L), (-w, w), (-L, w), (-L, -w), (-w, -w)]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    t = math.radians(rot)
    ct, st = math.cos(t), math.sin(t)
    return [(cx + r * (x * ct - y * st), cy + r * (x * st + y * ct)) for x, y in pts]


def shape_extent(shape: str) -> float:
    """Largest distance from the centre to the shape's outline, in units of its radius (any rotation)."""
    if shape == "circle":
        return 1.0
    return max(math.hypot(x, y) for x, y in _polygon(shape, 0.0, 0.0, 1.0, 0.0))


def render_scene(spec: dict[str, Any]) -> Image.Image:
    """Render one image from its spec (as stored in ``scenes.{split}.jsonl``: ``size``, ``background``,
    ``gradient`` [angle degrees, amplitude], ``objects`` with ``shape``, ``colour``, ``center``, ``radius``,
    ``rotation``)."""
    size = int(spec["size"])
    s = _SUPERSAMPLE
    S = size * s
    angle, amp = spec["gradient"]
    t = math.radians(angle)
    # A linear gradient survives bilinear upsampling, so build it at 9x9 and let Pillow scale it (4x faster).
    ramp = (np.arange(9, dtype=np.float32) / 8.0 - 0.5) * 2.0
    field = math.cos(t) * ramp[None, :] + math.sin(t) * ramp[:, None]  # in [-2, 2]
    bg = np.asarray(spec["background"], dtype=np.float32)
    small = np.clip(np.rint(bg[None, None, :] + (amp / 2.0) * field[:, :, None]), 0, 255).astype(np.uint8)
    im = Image.fromarray(small, "RGB").resize((S, S), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(im)
    for o in spec["objects"]:
        cx, cy = o["center"]
        cx, cy, r = (cx + 0.5) * s, (cy + 0.5) * s, o["radius"] * s  # pixel centres
        fill = COLOURS[o["colour"]]
        if o["shape"] == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon(_polygon(o["shape"], cx, cy, r, o["rotation"]), fill=fill)
    return im.reduce(s)


def _image_spec(scene: Scene, cluster: _Cluster, size: int, rng: random.Random) -> dict[str, Any]:
    cell = size / GRID
    jit = max(1, int(round(_JITTER_FRAC * cell)))
    objects = []
    for o in sorted(scene.values(), key=lambda o: (o.row, o.col)):
        radius = round(min(_RADIUS[o.size] * cell * rng.uniform(0.95, 1.05), (cell / 2 - 1) / shape_extent(o.shape)), 2)
        # Jitter never pushes a shape out of its cell, so objects never touch and the grid cell is the truth.
        j = max(0, min(jit, int(cell / 2 - shape_extent(o.shape) * radius - 1)))
        cx = int((o.col + 0.5) * cell) + rng.randint(-j, j)
        cy = int((o.row + 0.5) * cell) + rng.randint(-j, j)
        rot = 0 if o.shape == "circle" else rng.randint(-_ROT_JITTER, _ROT_JITTER)
        objects.append({"shape": o.shape, "colour": o.colour, "size": o.size, "cell": [o.row, o.col],
                        "center": [cx, cy], "radius": radius, "rotation": rot})  # fmt: skip
    bg = [min(255, max(0, c + rng.randint(-6, 6))) for c in cluster.background]
    return {"size": size, "background": bg, "gradient": [rng.randint(0, 359), rng.randint(0, 14)], "objects": objects}


def _render_task(task: tuple[str, dict[str, Any]]) -> None:
    path, spec = task
    render_scene(spec).save(path, format="PNG", compress_level=_PNG_LEVEL)


# --------------------------------------------------------------------------------------------------------------
# Generation


def _split_sizes(n: int, fractions: Sequence[float]) -> list[int]:
    sizes = [int(round(n * f)) for f in fractions[:-1]]
    sizes.append(n - sum(sizes))
    return sizes


def _quota(total: int, weights: Sequence[int]) -> list[int]:
    """Integer quotas proportional to weights, summing to ``total`` (error diffusion, deterministic)."""
    wsum = sum(weights) or 1
    out, acc, given = [], 0.0, 0
    for w in weights:
        acc += total * w / wsum
        q = int(round(acc)) - given
        out.append(q)
        given += q
    return out


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


def _write_json(path: Path, obj: Any) -> None:
    _write_text(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    _write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _choose_held_out(rng: random.Random, n: int) -> list[tuple[str, str]]:
    """``n`` colour x shape pairs, no colour or shape twice, so every colour and shape is still seen in
    training with other partners."""
    if not 0 <= n <= min(len(SHAPES), len(COLOURS)):
        raise ValueError(f"n_held_out must be in 0..{min(len(SHAPES), len(COLOURS))}, got {n}")
    shapes = rng.sample(SHAPES, n)
    colours = rng.sample(list(COLOURS), n)
    return sorted(zip(colours, shapes))


def generate(
    out: str | Path,
    seed: int = 0,
    n_images: int = 6000,
    image_size: int = 128,
    split_fractions: Sequence[float] = (0.7, 0.1, 0.2),
    train_queries_per_image: float = 2.0,
    eval_queries_per_image: float = 1.0,
    edit_pairs_per_image: float = 1.0,
    n_held_out: int = 6,
    held_out_test_share: float = 0.4,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Generate the synthetic benchmark into ``out`` and return :func:`benchmark_stats` of it.

    Deterministic given ``seed`` and the other arguments: byte-identical files whatever ``workers`` (on the same
    Python, Pillow and zlib versions: PNG bytes depend on the encoder).
    Written into a temporary sibling directory and renamed into place at the end, so an interrupted run never
    leaves a directory that looks complete.
    """
    out = Path(out)
    if n_images < 1:
        raise ValueError(f"n_images must be positive, got {n_images}")
    if image_size < 48:
        raise ValueError(f"image_size must be at least 48 px, got {image_size}")
    fr = [float(f) for f in split_fractions]
    if len(fr) != 3 or any(f <= 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
        raise ValueError(f"split_fractions must be three positive numbers summing to 1, got {list(split_fractions)}")
    sizes = _split_sizes(n_images, fr)
    if min(sizes) < 12:
        raise ValueError(f"every split needs at least 12 images; {n_images} images split {fr} gives {sizes}")
    for name, v in (("train_queries_per_image", train_queries_per_image), ("eval_queries_per_image", eval_queries_per_image),
                    ("edit_pairs_per_image", edit_pairs_per_image)):  # fmt: skip
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    if not 0.0 <= held_out_test_share <= 1.0:
        raise ValueError(f"held_out_test_share must be in [0, 1], got {held_out_test_share}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise DataError(out, None, "output exists and is not an empty directory; pass --overwrite to replace it")
    workers = max(1, min(2, os.cpu_count() or 1)) if workers is None else max(1, int(workers))

    base = f"{FORMAT_NAME}/{GENERATOR_VERSION}/{seed}"
    held_out = _choose_held_out(random.Random(f"{base}/held-out"), n_held_out)
    held_set = set(held_out)
    if not held_set:
        held_out_test_share = 0.0

    # 1. Clusters and image specs (cheap), so rendering can start while the texts are written.
    seen: set[tuple] = set()
    splits: dict[str, _SplitImages] = {}
    for split, n_split in zip(SPLITS, sizes):
        rng = random.Random(f"{base}/{split}/clusters")
        clusters: list[_Cluster] = []
        remaining = n_split
        while remaining > 0:
            if split == "test":
                # Built around a held-out combination, or free of them, so the share is what was asked for.
                mode = "force" if held_set and rng.random() < held_out_test_share else "exclude"
            else:
                mode = "exclude"  # train and val never see a held-out combination
            c = _sample_cluster(rng, held_set, mode, seen)
            if len(c.configs) > remaining:
                _truncate(c, remaining, rng)
            for cfg in c.configs:
                seen.add(_scene_key(c.scene(cfg).values()))
            clusters.append(c)
            remaining -= len(c.configs)
        splits[split] = _split_images(split, clusters, image_size, random.Random(f"{base}/{split}/images"))

    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    renderer: _Renderer | None = None
    try:
        tasks = []
        for split in SPLITS:
            (tmp / "images" / split).mkdir(parents=True, exist_ok=True)
            tasks += [(str(tmp / rec["path"]), rec["render"]) for rec in splits[split].records]
        renderer = _Renderer(tasks, workers, progress)
        renderer.start()
        # 2. Queries and edit pairs, in this process while the workers render.
        counts = {}
        for split in SPLITS:
            si = splits[split]
            qpi = train_queries_per_image if split == "train" else eval_queries_per_image
            queries, pairs = _split_texts(split, si, held_set, qpi, edit_pairs_per_image, random.Random(f"{base}/{split}/queries"),
                                          random.Random(f"{base}/{split}/edit-pairs"))  # fmt: skip
            _write_json(tmp / f"gallery.{split}.json", {r["id"]: r["path"] for r in si.records})
            _write_jsonl(tmp / f"scenes.{split}.jsonl", si.records)
            _write_jsonl(tmp / f"queries.{split}.jsonl", (q.to_dict() for q in queries))
            _write_jsonl(tmp / f"edit_pairs.{split}.jsonl", pairs)
            counts[split] = {"images": len(si.records), "clusters": len(si.clusters), "queries": len(queries), "edit_pairs": len(pairs)}
        renderer.finish()
        manifest = {
            "format": FORMAT_NAME,
            "generator_version": GENERATOR_VERSION,
            "seed": seed,
            "n_images": n_images,
            "image_size": image_size,
            "grid": GRID,
            "split_fractions": fr,
            "train_queries_per_image": train_queries_per_image,
            "eval_queries_per_image": eval_queries_per_image,
            "edit_pairs_per_image": edit_pairs_per_image,
            "held_out_test_share": held_out_test_share,
            "vocab": {"shapes": list(SHAPES), "colours": {k: list(v) for k, v in COLOURS.items()}, "sizes": list(SIZES),
                      "positions": list(POSITIONS), "edit_kinds": list(EDIT_KINDS), "detail_kinds": list(DETAIL_KINDS)},  # fmt: skip
            "held_out_combos": [list(c) for c in held_out],
            "splits": counts,
            "files": {"gallery": "gallery.{split}.json", "queries": "queries.{split}.jsonl", "scenes": "scenes.{split}.jsonl",
                      "edit_pairs": "edit_pairs.{split}.jsonl", "images": "images/{split}/{id}.png"},  # fmt: skip
            "complete": True,
        }
        _write_json(tmp / "manifest.json", manifest)  # last: its presence marks a complete benchmark
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, out)
    except BaseException:
        if renderer is not None:
            renderer.kill()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return benchmark_stats(out)


class _Renderer:
    """Renders image specs to PNG files: inline (``workers == 1``) or in ``workers`` fresh interpreters
    (``python -m cirfusion.data.synthetic --render FILE``) running while the caller does other work.

    Plain subprocesses rather than multiprocessing: fork can deadlock a parent holding threads (torch,
    tokenizers), and spawn re-imports the caller's ``__main__``, which fails for stdin scripts and notebooks.
    """

    def __init__(self, tasks: list[tuple[str, dict[str, Any]]], workers: int, progress: bool) -> None:
        self.tasks = tasks
        self.workers = 1 if len(tasks) < 200 else workers
        self.bar = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=len(tasks), desc="rendering", unit="img")
        self.procs: list[Any] = []
        self.threads: list[Any] = []
        self.errfiles: list[Any] = []
        self.tmpdir: Any = None

    def start(self) -> None:
        if self.workers == 1:
            return
        import subprocess
        import sys
        import tempfile
        import threading

        # The worker must import this very package, even when the caller put it on sys.path by hand.
        env = dict(os.environ)
        src = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        lock = threading.Lock()

        def pump(stream: Any) -> None:
            for _ in stream:  # one line per rendered image: a progress tick
                if self.bar is not None:
                    with lock:
                        self.bar.update()

        self.tmpdir = tempfile.TemporaryDirectory(prefix="cirfusion-render-")
        td = Path(self.tmpdir.name)
        for k in range(self.workers):
            job = td / f"tasks-{k}.json"
            job.write_text(json.dumps(self.tasks[k :: self.workers]), encoding="utf-8")
            errf = open(td / f"stderr-{k}.txt", "w+", encoding="utf-8")
            self.errfiles.append(errf)
            p = subprocess.Popen([sys.executable, "-m", "cirfusion.data.synthetic", "--render", str(job)],
                                 stdout=subprocess.PIPE, stderr=errf, text=True, env=env)  # fmt: skip
            self.procs.append(p)
            th = threading.Thread(target=pump, args=(p.stdout,), daemon=True)
            th.start()
            self.threads.append(th)

    def finish(self) -> None:
        try:
            if self.workers == 1:
                for t in self.tasks:
                    _render_task(t)
                    if self.bar is not None:
                        self.bar.update()
                return
            errors = []
            for k, (p, th) in enumerate(zip(self.procs, self.threads)):
                rc = p.wait()
                th.join()
                if rc != 0:
                    self.errfiles[k].seek(0)
                    errors.append(f"render worker {k} failed (exit {rc}): {self.errfiles[k].read().strip()[-2000:]}")
            if errors:
                raise RuntimeError("; ".join(errors))
        finally:
            self._close()

    def kill(self) -> None:
        """Interrupted: never leave orphan renderers behind."""
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        self._close()

    def _close(self) -> None:
        for f in self.errfiles:
            f.close()
        self.errfiles = []
        if self.tmpdir is not None:
            self.tmpdir.cleanup()
            self.tmpdir = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _render_main(job: str) -> int:
    import sys

    tasks = json.loads(Path(job).read_text(encoding="utf-8"))
    for path, spec in tasks:
        try:
            _render_task((path, spec))
        except Exception as exc:  # report the image, not a traceback into runpy
            print(f"{path}: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        print(1, flush=True)
    return 0


@dataclass
class _SplitImages:
    clusters: list[_Cluster]
    ident: dict[tuple[int, tuple[int, ...]], str]  # (cluster, grid point) -> image id
    records: list[dict[str, Any]]  # scenes.{split}.jsonl rows, in gallery order


def _split_images(split: str, clusters: list[_Cluster], image_size: int, rng: random.Random) -> _SplitImages:
    # Image ids carry no cluster information and the gallery order is shuffled, so neither leaks a target.
    members = [(ci, cfg) for ci, c in enumerate(clusters) for cfg in c.configs]
    order = list(range(len(members)))
    rng.shuffle(order)
    ident = {members[m]: f"{split}_{pos:05d}" for pos, m in enumerate(order)}
    records = []
    for m in order:
        ci, cfg = members[m]
        c = clusters[ci]
        scene = c.scene(cfg)
        iid = ident[(ci, cfg)]
        records.append({
            "id": iid,
            "path": f"images/{split}/{iid}.png",
            "cluster": ci,
            "scene_graph": scene_graph_of(list(scene.values())).to_dict(),
            "render": _image_spec(scene, c, image_size, rng),
        })  # fmt: skip
    return _SplitImages(clusters, ident, records)


def _split_texts(
    split: str,
    si: _SplitImages,
    held_out: set[tuple[str, str]],
    queries_per_image: float,
    edit_pairs_per_image: float,
    rng_q: random.Random,
    rng_e: random.Random,
) -> tuple[list[Query], list[dict[str, Any]]]:
    clusters, ident = si.clusters, si.ident
    n_img = len(si.records)
    queries: list[Query] = []
    edit_pairs: list[dict[str, Any]] = []
    q_quota = _quota(int(round(queries_per_image * n_img)), [len(c.configs) for c in clusters])
    e_quota = _quota(int(round(edit_pairs_per_image * n_img)), [len(c.configs) for c in clusters])
    carry = 0
    for ci, c in enumerate(clusters):
        present = set(c.configs)
        nbrs = {cfg: [b for i, d in enumerate(c.dims) for v in range(len(d.values)) if v != cfg[i]
                      for b in [_set(cfg, i, v)] if b in present] for cfg in c.configs}  # fmt: skip
        by_n: dict[int, list[tuple[tuple[int, ...], tuple[int, ...]]]] = {1: [], 2: [], 3: []}
        for r in c.configs:
            for t in c.configs:
                n = _hamming(r, t)
                if 1 <= n <= 3 and len([b for b in nbrs[t] if b != r]) >= _SUBSET_DISTRACTORS:
                    by_n[n].append((r, t))
        want = q_quota[ci] + carry  # a (truncated) cluster short of valid pairs hands its share on
        made = 0
        while made < want and any(by_n.values()):
            avail = [n for n in (1, 2, 3) if by_n[n]]
            n = rng_q.choices(avail, weights=[_EDIT_PROBS[k] for k in avail])[0]
            r, t = by_n[n].pop(rng_q.randrange(len(by_n[n])))
            queries.append(_make_query(f"{split}_q{len(queries):05d}", c, ci, r, t, nbrs[t], ident, held_out, rng_q))
            made += 1
        carry = want - made
        pairs = [(a, b) for a in c.configs for b in nbrs[a]]
        rng_e.shuffle(pairs)
        for a, b in pairs[: e_quota[ci]]:
            (e,) = _edits_between(c, a, b)
            line, _ = _fine_line(e, c.scene(a), rng_e)
            edit_pairs.append({"source": ident[(ci, a)], "instruction": line, "edited": ident[(ci, b)], "kind": e.kind})
    return queries, edit_pairs


def _make_query(
    qid: str,
    c: _Cluster,
    ci: int,
    r: tuple[int, ...],
    t: tuple[int, ...],
    t_nbrs: list[tuple[int, ...]],
    ident: dict[tuple[int, tuple[int, ...]], str],
    held_out: set[tuple[str, str]],
    rng: random.Random,
) -> Query:
    ref, tgt = c.scene(r), c.scene(t)
    edits = _edits_between(c, r, t)
    rng.shuffle(edits)  # word order of the edits varies
    lines, rels = [], []
    for e in edits:
        line, rr = _fine_line(e, ref, rng)
        lines.append(line)
        rels.append(rr)
    graph = _modification_graph(edits, rels, ref)
    coarse_edits = list(edits)
    omitted = 0
    if len(coarse_edits) >= 2 and rng.random() < _COARSE_DROP:
        coarse_edits.pop(rng.randrange(len(coarse_edits)))
        omitted = 1
    coarse = _join_coarse([_coarse_phrase(e, ref, rng) for e in coarse_edits], rng)
    fine = "; ".join(lines)
    # Distractors: one detail away from the target, closest to the reference first (partial edits, the wrong
    # value of the right attribute), so neither "copy the reference" nor "apply part of the text" wins.
    cands = [b for b in t_nbrs if b != r]
    keyed = sorted(cands, key=lambda b: (_hamming(r, b), rng.random()))
    distractors = keyed[:_SUBSET_DISTRACTORS]
    subset = [r, t, *distractors]
    rng.shuffle(subset)
    ho = sorted(set(_held_out_in(ref.values(), held_out)) | set(_held_out_in(tgt.values(), held_out)))
    detail_of = {}
    for b in distractors:
        (i,) = [i for i in range(len(t)) if b[i] != t[i]]
        detail_of[ident[(ci, b)]] = c.dims[i].kind
    return Query(
        qid=qid,
        reference=ident[(ci, r)],
        text=fine,
        targets=(ident[(ci, t)],),
        captions=(coarse, fine),
        finemt=tuple(lines),
        scene_graph=graph,
        subset=tuple(ident[(ci, m)] for m in subset),
        meta={
            "cluster": ci,
            "n_edits": len(edits),
            "edit_kinds": [e.kind for e in edits],
            "coarse_omitted": omitted,
            "held_out": bool(ho),
            "held_out_combos": [list(h) for h in ho],
            "distractor_details": detail_of,
        },
    )


# --------------------------------------------------------------------------------------------------------------
# Reading back


def _read_manifest(root: Path) -> dict[str, Any]:
    path = root / "manifest.json"
    if not path.is_file():
        raise DataError(path, None, "not a synthetic benchmark: manifest.json is missing "
                                    "(create one with `cirfusion data make-synthetic --out DIR`)")  # fmt: skip
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(path, None, f"invalid JSON: {exc}") from exc
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        raise DataError(path, None, f"not a {FORMAT_NAME} manifest (format is {m.get('format') if isinstance(m, dict) else None!r})")
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
              "seed": m.get("seed"), "image_size": m.get("image_size")},  # fmt: skip
    )
    if validate:
        ds.validate()
    return ds


@dataclass(frozen=True)
class EditPair:
    """An image-editing example: ``source`` image, a one-edit ``instruction``, the ``edited`` image."""

    source: str
    instruction: str
    edited: str
    kind: str
    source_path: Path
    edited_path: Path


def load_edit_pairs(root: str | Path, split: str) -> list[EditPair]:
    """The edit pairs of a split (image, single-edit instruction, edited image), with absolute paths."""
    root = Path(root)
    m = _read_manifest(root)
    _check_split(root, m, split)
    _, gallery = _read_gallery(root, split)
    path = root / f"edit_pairs.{split}.jsonl"
    out = []
    for n, d in read_jsonl(path):
        for k in ("source", "instruction", "edited", "kind"):
            if not isinstance(d.get(k), str):
                raise DataError(path, f"line {n}", f"missing or non-string field {k!r}")
        for k in ("source", "edited"):
            if d[k] not in gallery:
                raise DataError(path, f"line {n}", f"{k} image {d[k]!r} is not in gallery.{split}.json")
        if d["kind"] not in EDIT_KINDS:
            raise DataError(path, f"line {n}", f"unknown edit kind {d['kind']!r}")
        out.append(EditPair(d["source"], d["instruction"], d["edited"], d["kind"], gallery.path(d["source"]), gallery.path(d["edited"])))
    return out


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


def benchmark_stats(root: str | Path) -> dict[str, Any]:
    """Statistics of a written benchmark, read from its files: per split the gallery size, clusters, queries,
    edits per query, edit kinds, subset sizes, held-out share, coarse texts that omit an edit, words per text,
    distractor details and edit pairs."""
    root = Path(root)
    m = _read_manifest(root)
    splits: dict[str, Any] = {}
    for split in m["splits"]:
        ds = load_synthetic(root, split, text="fine")
        n_q = len(ds.queries)
        per_q = Counter(int(q.meta.get("n_edits", 0)) for q in ds.queries)
        kinds = Counter(k for q in ds.queries for k in q.meta.get("edit_kinds", ()))
        sub = Counter(len(q.subset or ()) for q in ds.queries)
        dd = Counter(v for q in ds.queries for v in q.meta.get("distractor_details", {}).values())
        ho = sum(bool(q.meta.get("held_out")) for q in ds.queries)
        omitted = sum(int(q.meta.get("coarse_omitted", 0)) > 0 for q in ds.queries)
        pairs = load_edit_pairs(root, split)
        splits[split] = {
            "images": len(ds.gallery),
            "clusters": m["splits"][split].get("clusters"),
            "queries": n_q,
            "edits_per_query": {str(k): per_q[k] for k in sorted(per_q)},
            "edit_kinds": {k: kinds[k] for k in EDIT_KINDS},
            "subset_sizes": {str(k): sub[k] for k in sorted(sub)},
            "distractor_details": {k: dd[k] for k in DETAIL_KINDS},
            "held_out_queries": ho,
            "held_out_share": round(ho / n_q, 4) if n_q else 0.0,
            "coarse_omits_an_edit_share": round(omitted / n_q, 4) if n_q else 0.0,
            "words_per_text": {
                "coarse": round(sum(len(q.captions[0].split()) for q in ds.queries) / max(1, n_q), 2),
                "fine": round(sum(len(q.captions[1].split()) for q in ds.queries) / max(1, n_q), 2),
            },
            "edit_pairs": len(pairs),
            "edit_pair_kinds": dict(sorted(Counter(p.kind for p in pairs).items())),
        }
    return {
        "root": str(root),
        "generator_version": m.get("generator_version"),
        "seed": m.get("seed"),
        "image_size": m.get("image_size"),
        "held_out_combos": m.get("held_out_combos"),
        "splits": splits,
    }


__all__ = [
    "COLOURS",
    "DETAIL_KINDS",
    "EDIT_KINDS",
    "GENERATOR_VERSION",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "EditPair",
    "Obj",
    "benchmark_stats",
    "generate",
    "load_edit_pairs",
    "load_scene_graphs",
    "load_scene_records",
    "load_synthetic",
    "render_scene",
    "scene_graph_of",
    "shape_extent",
]


if __name__ == "__main__":  # render worker, started by _Renderer
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "--render":
        sys.exit(_render_main(sys.argv[2]))
    sys.exit("usage: python -m cirfusion.data.synthetic --render TASKS.json (internal; use `cirfusion data make-synthetic`)")
