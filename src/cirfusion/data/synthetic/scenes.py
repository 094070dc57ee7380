"""Synthetic benchmark, scenes: the vocabulary (shapes, colours, sizes, grid positions, edit kinds), objects and
their scene graphs, and clusters (a base scene plus a small grid of one-detail variations) sampled under the
held-out colour x shape constraint.
"""

from __future__ import annotations

import colorsys
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from ...options import OptionError
from ..schema import Entity, Relation, SceneGraph

GENERATOR_VERSION = "1.0"
FORMAT_NAME = "cirfusion-synthetic"
SPLITS = ("train", "val", "test")
PRETRAIN_SPLIT = "pretrain"  # optional: extra scenes whose images only feed stage-1 edit pairs
EDIT_PAIRS_SPLIT = "edit_pairs"  # the loader's split of every trainable edit pair (train + pretrain)

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

_MIN_CLUSTER, _MAX_CLUSTER = 12, 40
# How often each kind of dimension is drawn for a cluster (DETAIL_KINDS order); tuned so the six edit kinds
# are roughly balanced over queries (presence dimensions give both add and remove).
_DIM_WEIGHTS = [0.17, 0.17, 0.2, 0.18, 0.28]


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
        for dim, v in zip(self.dims, config, strict=False):
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
    return sum(x != y for x, y in zip(a, b, strict=False))


def _all_configs(dims: Sequence[_Dim]) -> list[tuple[int, ...]]:
    out: list[tuple[int, ...]] = [()]
    for d in dims:
        out = [(*c, v) for c in out for v in range(len(d.values))]
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
        for _ in range(n_obj):
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
            values: tuple[Any, ...]  # colour/shape/size names, (row, col) cells or presence flags
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
        cluster.background = tuple(round(255 * x) for x in colorsys.hsv_to_rgb(h, s, v))  # type: ignore[assignment]
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
    return (*c[:i], v, *c[i + 1:])


def _choose_held_out(rng: random.Random, n: int) -> list[tuple[str, str]]:
    """``n`` colour x shape pairs, no colour or shape twice, so every colour and shape is still seen in
    training with other partners."""
    if not 0 <= n <= min(len(SHAPES), len(COLOURS)):
        raise OptionError(f"n_held_out must be in 0..{min(len(SHAPES), len(COLOURS))}, got {n}")
    shapes = rng.sample(SHAPES, n)
    colours = rng.sample(list(COLOURS), n)
    return sorted(zip(colours, shapes, strict=False))
