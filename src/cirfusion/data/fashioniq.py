"""FashionIQ loader (one category per dataset: ``category`` is dress, shirt or toptee).

Layout under ``root``::

    captions/cap.{category}.{split}.json         list of {candidate, target, captions: [c1, c2]} (no target on test)
    image_splits/split.{category}.{split}.json   list of image ids (ASINs)
    images/<id>.png                              (``image_dir`` and ``ext`` change this)

Conventions:

* **Gallery** = the ``split.{category}.{split}.json`` list in file order: the official evaluation ranks every
  image of the category's split, not only the images the queries mention (on the real val files, dress queries
  use 2,628 of the 3,817 gallery images). Image ``id`` -> ``root/image_dir/<id><ext>``, by default
  ``images/<id>.png`` as in the FashionIQ image release and CLIP4Cir.
* **Queries** in captions-file order; ``qid = f"{category}-{split}-{index}"`` (the file has no ids, and the test
  files hold repeated (candidate, captions) entries, so the position is the only stable id).
  ``text = join_fashioniq(c1, c2)`` = "c1 and c2", trailing punctuation stripped (the evaluation convention);
  ``captions = (c1, c2)``; on ``train`` the dataset's ``text_policy`` is ``"fashioniq"`` (random choice of
  c1+c2, c2+c1, c1, c2 per step), elsewhere ``"fixed"``.
* ``exclude_reference=False``: the FashionIQ protocol ranks the whole split gallery, reference included (the
  original code and CLIP4Cir do not mask it); Recall@10/50 are reported that way.
* A candidate or target that is not in the split file is an error. On the real files none is missing (checked
  for all 3 categories x 3 splits). ``add_missing_to_gallery=True`` instead appends such ids after the split
  file's ids, listed in ``meta["added_to_gallery"]`` (scores then have more columns than the split file).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..options import OptionError
from ._jsonio import (
    ImagePaths,
    entry_name,
    expect_list,
    expect_object,
    id_field,
    id_value,
    is_test_split,
    read_json,
    resolve_dir,
    str_list_field,
)
from .registry import register_dataset
from .schema import CIRDataset, DataError, Gallery, Query, join_fashioniq

CATEGORIES = ("dress", "shirt", "toptee")


def check_category(category: str | None, dataset: str = "fashioniq") -> str:
    if category not in CATEGORIES:
        raise OptionError(f"{dataset} needs category= one of {', '.join(CATEGORIES)} (got {category!r})")
    return category


def read_fiq_split(root: Path, category: str, split: str) -> tuple[list[str], Path]:
    """The ids of ``split.{category}.{split}.json`` in file order (a repeated id is an error)."""
    path = Path(root) / "image_splits" / f"split.{category}.{split}.json"
    data = expect_list(read_json(path, "FashionIQ image split file"), path)
    ids = [id_value(x, "image id", path, entry_name(i)) for i, x in enumerate(data)]
    seen: dict[str, int] = {}
    for i, x in enumerate(ids):
        if x in seen:
            raise DataError(path, entry_name(i), f"duplicate image id {x!r} (first at #{seen[x]})")
        seen[x] = i
    return ids, path


def fiq_gallery(ids: list[str], root: Path, image_dir: str | Path, ext: str, source: Path) -> Gallery:
    base = resolve_dir(Path(root), image_dir)
    if ext and not ext.startswith("."):
        ext = "." + ext
    joiner = ImagePaths(base, source)
    return Gallery(ids, [joiner.join(f"{i}{ext}", repr(i)) for i in ids], source=source)


def resolve_missing(needed: list[tuple[str, str, str]], split_ids: list[str], split_path: Path, ann_path: Path,
                    add_missing: bool) -> list[str]:
    """``needed`` = (image id, role, entry). Error on the first id absent from the split file unless
    ``add_missing``; then return the absent ids in first-use order."""
    known = set(split_ids)
    added: list[str] = []
    for image_id, role, entry in needed:
        if image_id in known:
            continue
        if not add_missing:
            raise DataError(ann_path, entry, f"{role} {image_id!r} is not in the split file {split_path} "
                            "(pass add_missing_to_gallery=True to append such ids to the gallery)")
        known.add(image_id)
        added.append(image_id)
    return added


@register_dataset("fashioniq")
def load_fashioniq(root: Path, split: str, *, category: str | None = None, image_dir: str | Path = "images",
                   ext: str = ".png", add_missing_to_gallery: bool = False) -> CIRDataset:
    """Load FashionIQ ``category`` split ``split`` (``train``, ``val``, ``test``); see the module docstring."""
    category = check_category(category)
    root = Path(root)
    split_ids, split_path = read_fiq_split(root, category, split)
    cap_path = root / "captions" / f"cap.{category}.{split}.json"
    raw = expect_list(read_json(cap_path, "FashionIQ captions file"), cap_path)
    test = is_test_split(split)

    rows: list[tuple[str, str | None, str, str]] = []
    needed: list[tuple[str, str, str]] = []
    for i, c in enumerate(raw):
        entry = entry_name(i)
        c = expect_object(c, cap_path, entry, "the entry")
        ref = id_field(c, "candidate", cap_path, entry)
        assert ref is not None
        tgt = id_field(c, "target", cap_path, entry, optional=test)
        caps = str_list_field(c, "captions", cap_path, entry)
        assert caps is not None
        if len(caps) != 2:
            raise DataError(cap_path, entry, f"expected 2 captions, got {len(caps)}")
        needed.append((ref, "candidate", entry))
        if tgt is not None:
            needed.append((tgt, "target", entry))
        rows.append((ref, tgt, caps[0], caps[1]))

    added = resolve_missing(needed, split_ids, split_path, cap_path, add_missing_to_gallery)
    gallery = fiq_gallery(split_ids + added, root, image_dir, ext, split_path)

    queries = [
        Query(
            qid=f"{category}-{split}-{i}",
            reference=ref,
            text=join_fashioniq(c1, c2),
            targets=() if tgt is None else (tgt,),
            captions=(c1, c2),
        )
        for i, (ref, tgt, c1, c2) in enumerate(rows)
    ]
    meta: dict[str, Any] = {"gallery_source": str(split_path), "added_to_gallery": added,
                            "empty_texts": sum(1 for q in queries if not q.text.strip())}
    return CIRDataset(
        name="fashioniq",
        split=split,
        queries=queries,
        gallery=gallery,
        root=root,
        files=[cap_path, split_path],
        exclude_reference=False,
        text_policy="fashioniq" if split == "train" else "fixed",
        category=category,
        meta=meta,
    )
