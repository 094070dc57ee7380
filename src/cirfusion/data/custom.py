"""Custom dataset: your own triplets as JSON lines plus an image folder. Full schema: ``docs/custom-data.md``.

Layout under ``root``::

    queries.{split}.jsonl      one query per line: {"qid", "reference", "text", "targets"?, "captions"?,
                               "finemt"?, "subset"?, "scene_graph"?, "meta"?}
    gallery.{split}.json       optional: {image id: path relative to root}, in ranking-column order
    gallery.json               optional: the same, shared by every split
    images/**                  the images (``image_dir`` changes the folder)

Gallery: ``gallery.{split}.json`` if present, else ``gallery.json``, else every image file under
``root/image_dir`` (suffixes in :data:`IMAGE_SUFFIXES`, any case; names starting with "." skipped), sorted by
relative path, id = the relative path without its suffix (``shirts/red_01``). ``meta["gallery_source"]`` says
which one was used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..options import OptionError
from ._jsonio import (
    ImagePaths,
    expect_object,
    get_field,
    id_field,
    id_list_field,
    read_json,
    read_jsonl,
    resolve_dir,
    str_field,
    str_list_field,
)
from .finecir import parse_finemt
from .registry import register_dataset
from .schema import TEXT_POLICIES, CIRDataset, DataError, Gallery, Query, SceneGraph

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
QUERY_FIELDS = ("qid", "reference", "text", "targets", "captions", "finemt", "subset", "scene_graph", "meta")


def _gallery_from_json(path: Path, root: Path) -> Gallery:
    data = expect_object(read_json(path, "gallery file"), path, what="the gallery file")
    ids, paths = [], []
    joiner = ImagePaths(root, path)
    for image_id, rel in data.items():
        if not image_id.strip():
            raise DataError(path, repr(image_id), "empty image id")
        ids.append(image_id)
        paths.append(joiner.join(rel, image_id))
    return Gallery(ids, paths, source=path)


def _gallery_from_folder(folder: Path) -> Gallery:
    if not folder.is_dir():
        raise DataError(folder, None, "image folder not found (and no gallery.json names the images)")
    found: list[tuple[str, Path]] = []
    joiner = ImagePaths(folder, folder)
    for p in folder.rglob("*"):
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        # a symlink is kept even when dangling, so that opening it says so instead of the image vanishing
        if p.is_file() or p.is_symlink():
            image_id = rel.with_suffix("").as_posix()
            found.append((image_id, joiner.join(rel.as_posix(), image_id)))
    found.sort(key=lambda t: t[1].relative_to(folder).as_posix())
    seen: dict[str, Path] = {}
    for image_id, p in found:
        if image_id in seen:
            raise DataError(p, image_id, f"two images map to the same id: {seen[image_id].name} and {p.name}")
        seen[image_id] = p
    return Gallery([i for i, _ in found], [p for _, p in found], source=folder)


def _query(rec: dict[str, Any], path: Path, entry: str, gallery: Gallery, gallery_src: str) -> Query:
    unknown = [k for k in rec if k not in QUERY_FIELDS]
    if unknown:
        raise DataError(path, entry, f"unknown field(s) {unknown}; allowed: {', '.join(QUERY_FIELDS)}")
    qid = id_field(rec, "qid", path, entry)
    ref = id_field(rec, "reference", path, entry)
    text = str_field(rec, "text", path, entry)
    assert qid is not None and ref is not None and text is not None
    entry = f"{entry} (qid {qid})"
    targets = id_list_field(rec, "targets", path, entry, optional=True, allow_empty=True) or []
    subset = id_list_field(rec, "subset", path, entry, optional=True)
    for role, ids in (("reference", [ref]), ("target", targets), ("subset member", subset or [])):
        for i in ids:
            if i not in gallery:
                raise DataError(path, entry, f"{role} {i!r} is not in the gallery ({gallery_src})")
    captions = str_list_field(rec, "captions", path, entry, optional=True) or []
    finemt_raw = get_field(rec, "finemt", path, entry, optional=True)
    finemt = None if finemt_raw is None else parse_finemt(finemt_raw, path, entry)
    sg = get_field(rec, "scene_graph", path, entry, optional=True)
    scene_graph = None if sg is None else SceneGraph.from_dict(expect_object(sg, path, entry, "'scene_graph'"), path, entry)
    meta = get_field(rec, "meta", path, entry, optional=True)
    meta = {} if meta is None else dict(expect_object(meta, path, entry, "'meta'"))
    return Query(qid=qid, reference=ref, text=text, targets=tuple(targets), captions=tuple(captions), finemt=finemt,
                 scene_graph=scene_graph, subset=None if subset is None else tuple(subset), meta=meta)


@register_dataset("custom")
def load_custom(root: Path, split: str, *, image_dir: str | Path = "images", exclude_reference: bool = True,
                text_policy: str = "fixed") -> CIRDataset:
    """Load ``root/queries.{split}.jsonl`` over the gallery described in the module docstring."""
    if text_policy not in TEXT_POLICIES:
        raise OptionError(f"text_policy must be one of {TEXT_POLICIES} (got {text_policy!r})")
    root = Path(root)
    qpath = root / f"queries.{split}.jsonl"
    files = [qpath]
    for g in (root / f"gallery.{split}.json", root / "gallery.json"):
        if g.is_file():
            gallery = _gallery_from_json(g, root)
            files.append(g)
            break
    else:
        gallery = _gallery_from_folder(resolve_dir(root, image_dir))
    src = str(gallery.source)

    queries: list[Query] = []
    seen: dict[str, int] = {}
    for lineno, rec in read_jsonl(qpath, "custom queries file"):
        q = _query(rec, qpath, f"line {lineno}", gallery, src)
        if q.qid in seen:
            raise DataError(qpath, f"line {lineno}", f"duplicate qid {q.qid!r} (first on line {seen[q.qid]})")
        seen[q.qid] = lineno
        queries.append(q)
    return CIRDataset(name="custom", split=split, queries=queries, gallery=gallery, root=root, files=files,
                      exclude_reference=bool(exclude_reference), text_policy=text_policy,
                      meta={"gallery_source": src})
