"""Synthetic benchmark, generation: split sizes and quotas, clusters and images per split, queries (reference, 1-3
edits, target, subset of one-detail distractors) and edit pairs, and ``generate``, which writes the whole
benchmark into a temporary directory swapped into place by ``cirfusion.io.atomic_directory``.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...io import atomic_directory
from ...options import OptionError
from ..generated import OutputKind, write_json, write_jsonl
from ..schema import DataError, Query
from .language import _coarse_phrase, _edits_between, _fine_line, _join_coarse, _modification_graph
from .rendering import _image_spec, _Renderer
from .scenes import (
    COLOURS,
    DETAIL_KINDS,
    EDIT_KINDS,
    FORMAT_NAME,
    GENERATOR_VERSION,
    GRID,
    POSITIONS,
    PRETRAIN_SPLIT,
    SHAPES,
    SIZES,
    SPLITS,
    _choose_held_out,
    _Cluster,
    _hamming,
    _held_out_in,
    _sample_cluster,
    _scene_key,
    _set,
    _truncate,
    scene_graph_of,
)
from .stats import benchmark_stats

_EDIT_PROBS = {1: 0.3, 2: 0.4, 3: 0.3}  # queries by number of atomic edits
_SUBSET_DISTRACTORS = 4
_MIN_QUERY_CLUSTER = 6  # reference + target + 4 distractors (one detail from the target)
_COARSE_DROP = 0.3  # chance the coarse text leaves one edit out (queries with >= 2 edits)
# A make-synthetic output: what --overwrite may replace.
OUTPUT = OutputKind("make-synthetic", "format", FORMAT_NAME,
                    ("manifest.json", "images", "gallery.*.json", "queries.*.jsonl", "scenes.*.jsonl", "edit_pairs.*.jsonl"))


def _split_sizes(n: int, fractions: Sequence[float]) -> list[int]:
    sizes = [round(n * f) for f in fractions[:-1]]
    sizes.append(n - sum(sizes))
    return sizes


def _quota(total: int, weights: Sequence[int]) -> list[int]:
    """Integer quotas proportional to weights, summing to ``total`` (error diffusion, deterministic)."""
    wsum = sum(weights) or 1
    out, acc, given = [], 0.0, 0
    for w in weights:
        acc += total * w / wsum
        q = round(acc) - given
        out.append(q)
        given += q
    return out


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
    train_scenes: int | None = None,
    train_scene_images: int | None = None,
    pretrain_scenes: int = 0,
    pretrain_scene_images: int = 12,
    pretrain_pairs_per_image: float = 4.0,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Generate the synthetic benchmark into ``out`` and return :func:`benchmark_stats` of it.

    Deterministic given ``seed`` and the other arguments: byte-identical files whatever ``workers`` (on the same
    Python, Pillow and zlib versions: PNG bytes depend on the encoder).
    Written into a temporary sibling directory and renamed into place at the end, so an interrupted run never
    leaves a directory that looks complete.

    Diversity (all off by default, and then every file is what it always was):

    - ``train_scenes``: the train split is made of this many distinct base scenes (clusters), each cut to at most
      ``train_scene_images`` images (default: the cluster's natural 12-40), instead of ``split_fractions[0]`` of
      ``n_images`` at the natural cluster size. Val and test are unchanged.
    - ``pretrain_scenes``: a fourth split, ``pretrain``, of that many base scenes of ``pretrain_scene_images``
      images each, which carries only atomic edit pairs (``pretrain_pairs_per_image`` per image; no queries):
      stage-1 pre-training data at scale (the loader's ``edit_pairs`` split joins them with train's pairs).

    The test split stays byte-identical whatever these are: every split's clusters are first drawn exactly as
    without them (so the record of used scenes that test's draw consults is the same), and the new train and
    pretrain scenes are then drawn from their own random streams, disjoint from every val and test scene.
    """
    out = Path(out)
    if n_images < 1:
        raise OptionError(f"n_images must be positive, got {n_images}")
    if image_size < 48:
        raise OptionError(f"image_size must be at least 48 px, got {image_size}")
    fr = [float(f) for f in split_fractions]
    if len(fr) != 3 or any(f <= 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
        raise OptionError(f"split_fractions must be three positive numbers summing to 1, got {list(split_fractions)}")
    sizes = _split_sizes(n_images, fr)
    if min(sizes) < 12:
        raise OptionError(f"every split needs at least 12 images; {n_images} images split {fr} gives {sizes}")
    for name, v in (("train_queries_per_image", train_queries_per_image), ("eval_queries_per_image", eval_queries_per_image),
                    ("edit_pairs_per_image", edit_pairs_per_image)):  # fmt: skip
        if v < 0:
            raise OptionError(f"{name} must be >= 0, got {v}")
    for name, n in (("train_scenes", train_scenes), ("train_scene_images", train_scene_images)):
        if n is not None and n < 1:
            raise OptionError(f"{name} must be >= 1, got {n}")
    if train_scene_images is not None and train_scene_images < _MIN_QUERY_CLUSTER:
        raise OptionError(f"train_scene_images must be >= {_MIN_QUERY_CLUSTER} (a query needs its target's one-detail "
                          f"neighbours in the scene), got {train_scene_images}")
    if pretrain_scenes < 0 or pretrain_pairs_per_image < 0:
        raise OptionError(f"pretrain_scenes and pretrain_pairs_per_image must be >= 0, got {pretrain_scenes}, "
                          f"{pretrain_pairs_per_image}")
    if pretrain_scenes and pretrain_scene_images < 2:
        raise OptionError(f"pretrain_scene_images must be >= 2 (an edit pair needs two images), got {pretrain_scene_images}")
    if not 0.0 <= held_out_test_share <= 1.0:
        raise OptionError(f"held_out_test_share must be in [0, 1], got {held_out_test_share}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise DataError(out, None, "output exists and is not an empty directory; pass --overwrite to replace it")
        OUTPUT.check_replaceable(out)  # --overwrite replaces a make-synthetic output, nothing else
    workers = max(1, min(2, os.cpu_count() or 1)) if workers is None else max(1, int(workers))

    plan = _plan(seed, n_images, image_size, sizes, n_held_out, held_out_test_share, train_scenes, train_scene_images,
                 pretrain_scenes, pretrain_scene_images)
    held_out, held_out_test_share, splits = plan.held_out, plan.held_out_test_share, plan.splits
    all_splits = tuple(splits)

    renderer: _Renderer | None = None
    # Written into a temporary sibling that replaces ``out`` only when complete (a crash leaves ``out`` as it was).
    with atomic_directory(out) as tmp:
        try:
            tasks = []
            for split in all_splits:
                (tmp / "images" / split).mkdir(parents=True, exist_ok=True)
                tasks += [(str(tmp / rec["path"]), rec["render"]) for rec in splits[split].records]
            renderer = _Renderer(tasks, workers, progress)
            renderer.start()
            # 2. Queries and edit pairs, in this process while the workers render.
            counts = {}
            for split in all_splits:
                qpi = {"train": train_queries_per_image, PRETRAIN_SPLIT: 0.0}.get(split, eval_queries_per_image)
                epi = pretrain_pairs_per_image if split == PRETRAIN_SPLIT else edit_pairs_per_image
                counts[split] = _write_split_texts(tmp, plan, split, qpi, epi)
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
                          "positions": list(POSITIONS), "edit_kinds": list(EDIT_KINDS), "detail_kinds": list(DETAIL_KINDS)},
                "held_out_combos": [list(c) for c in held_out],
                "splits": counts,
                "files": {"gallery": "gallery.{split}.json", "queries": "queries.{split}.jsonl", "scenes": "scenes.{split}.jsonl",
                          "edit_pairs": "edit_pairs.{split}.jsonl", "images": "images/{split}/{id}.png"},
                "complete": True,
            }
            if train_scenes is not None or pretrain_scenes:  # only then: default manifests keep their bytes
                manifest["diversity"] = {"train_scenes": train_scenes, "train_scene_images": train_scene_images,
                                         "pretrain_scenes": pretrain_scenes, "pretrain_scene_images": pretrain_scene_images,
                                         "pretrain_pairs_per_image": pretrain_pairs_per_image}
            write_json(tmp / "manifest.json", manifest)  # last: its presence marks a complete benchmark
        except BaseException:
            if renderer is not None:
                renderer.kill()  # never leave orphan renderers behind
            raise
    return benchmark_stats(out)


def _extra_clusters(rng: random.Random, n: int, max_images: int | None, held_set: set[tuple[str, str]],
                    seen: set[tuple]) -> list[_Cluster]:
    """``n`` new clusters (no held-out combination, no scene already in ``seen``), each cut to ``max_images``."""
    out = []
    for _ in range(n):
        c = _sample_cluster(rng, held_set, "exclude", seen)
        if max_images is not None and len(c.configs) > max_images:
            _truncate(c, max_images, rng)
        for cfg in c.configs:
            seen.add(_scene_key(c.scene(cfg).values()))
        out.append(c)
    return out


@dataclass
class _Plan:
    base: str
    held_out: list[tuple[str, str]]
    held_set: set[tuple[str, str]]
    held_out_test_share: float
    splits: dict[str, "_SplitImages"]


def _plan(seed: int, n_images: int, image_size: int, sizes: Sequence[int], n_held_out: int, held_out_test_share: float,
          train_scenes: int | None, train_scene_images: int | None, pretrain_scenes: int,
          pretrain_scene_images: int) -> _Plan:
    """Clusters and image specs of every split (cheap; no rendering)."""
    base = f"{FORMAT_NAME}/{GENERATOR_VERSION}/{seed}"
    held_out = _choose_held_out(random.Random(f"{base}/held-out"), n_held_out)
    held_set = set(held_out)
    if not held_set:
        held_out_test_share = 0.0

    # 1. Clusters and image specs (cheap), so rendering can start while the texts are written.
    seen: set[tuple] = set()
    splits: dict[str, _SplitImages] = {}
    for split, n_split in zip(SPLITS, sizes, strict=False):
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
    # Diversity: new train / pretrain scenes from their own streams, after (and disjoint from) every drawn scene.
    if train_scenes is not None:
        rng = random.Random(f"{base}/train/clusters/scenes={train_scenes},images={train_scene_images}")
        clusters = _extra_clusters(rng, train_scenes, train_scene_images, held_set, seen)
        splits["train"] = _split_images("train", clusters, image_size, random.Random(f"{base}/train/images/diverse"))
    if pretrain_scenes:
        rng = random.Random(f"{base}/{PRETRAIN_SPLIT}/clusters")
        clusters = _extra_clusters(rng, pretrain_scenes, pretrain_scene_images, held_set, seen)
        splits[PRETRAIN_SPLIT] = _split_images(PRETRAIN_SPLIT, clusters, image_size,
                                               random.Random(f"{base}/{PRETRAIN_SPLIT}/images"))
    return _Plan(base, held_out, held_set, held_out_test_share, splits)


def _write_split_texts(directory: Path, plan: _Plan, split: str, queries_per_image: float,
                       edit_pairs_per_image: float) -> dict[str, int]:
    """Write a split's gallery, scenes, queries and edit pairs into ``directory``; return its counts."""
    si = plan.splits[split]
    queries, pairs = _split_texts(split, si, plan.held_set, queries_per_image, edit_pairs_per_image,
                                  random.Random(f"{plan.base}/{split}/queries"), random.Random(f"{plan.base}/{split}/edit-pairs"))
    write_json(directory / f"gallery.{split}.json", {r["id"]: r["path"] for r in si.records})
    write_jsonl(directory / f"scenes.{split}.jsonl", si.records)
    write_jsonl(directory / f"queries.{split}.jsonl", (q.to_dict() for q in queries))
    write_jsonl(directory / f"edit_pairs.{split}.jsonl", pairs)
    return {"images": len(si.records), "clusters": len(si.clusters), "queries": len(queries), "edit_pairs": len(pairs)}


def split_annotations(out: str | Path, split: str = "test", seed: int = 0, n_images: int = 6000, image_size: int = 128,
                      eval_queries_per_image: float = 1.0, edit_pairs_per_image: float = 1.0, **diversity: Any) -> list[Path]:
    """Write the annotation files of one split (gallery, scenes with every image's render spec, queries, edit
    pairs) exactly as :func:`generate` with the same arguments writes them, without rendering a single image (the
    scenes file fixes every pixel): a quick way to check that a split is what it was. Returns the files written."""
    if split not in (*SPLITS, PRETRAIN_SPLIT):
        raise OptionError(f"unknown split {split!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    known = {"train_scenes", "train_scene_images", "pretrain_scenes", "pretrain_scene_images"}
    if set(diversity) - known:
        raise OptionError(f"split_annotations: unknown option(s) {sorted(set(diversity) - known)}")
    plan = _plan(seed, n_images, image_size, _split_sizes(n_images, (0.7, 0.1, 0.2)), 6, 0.4,
                 diversity.get("train_scenes"), diversity.get("train_scene_images"), diversity.get("pretrain_scenes", 0),
                 diversity.get("pretrain_scene_images", 12))
    if split not in plan.splits:
        raise OptionError(f"split {split!r} is not made with these options")
    _write_split_texts(out, plan, split, 2.0 if split == "train" else eval_queries_per_image, edit_pairs_per_image)
    return [out / f"{kind}.{split}.{ext}" for kind, ext in (("gallery", "json"), ("scenes", "jsonl"), ("queries", "jsonl"),
                                                             ("edit_pairs", "jsonl"))]


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
    q_quota = _quota(round(queries_per_image * n_img), [len(c.configs) for c in clusters])
    e_quota = _quota(round(edit_pairs_per_image * n_img), [len(c.configs) for c in clusters])
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
