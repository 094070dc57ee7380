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

Modules: ``scenes`` (vocabulary, objects, clusters), ``language`` (fine and coarse texts, modification graphs),
``rendering`` (image specs, drawing, render workers), ``generation`` (``generate``: splits, queries, edit pairs,
files), ``loader`` (dataset ``"synthetic"``, edit pairs, scene records), ``stats`` (``benchmark_stats``).

Learnability (measured on the default benchmark, frozen EfficientNet-Lite0 at 128 px): the pooled global vector
does not resolve which object has which attribute, the 8x8 spatial tokens do (a linear probe on one token reads
colour, shape and size of the object under it at >= 99.7% on val) -- methods need token-level image features.
"""

from __future__ import annotations

from ..generated import EditPair
from .generation import generate
from .loader import load_edit_pairs, load_scene_graphs, load_scene_records, load_synthetic
from .rendering import render_scene, shape_extent
from .scenes import (
    COLOURS,
    DETAIL_KINDS,
    EDIT_KINDS,
    FORMAT_NAME,
    GENERATOR_VERSION,
    GRID,
    POSITIONS,
    SHAPES,
    SIZES,
    SPLITS,
    Obj,
    scene_graph_of,
)
from .stats import benchmark_stats

__all__ = [
    "COLOURS",
    "DETAIL_KINDS",
    "EDIT_KINDS",
    "FORMAT_NAME",
    "GENERATOR_VERSION",
    "GRID",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "SPLITS",
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
