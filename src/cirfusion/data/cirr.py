"""CIRR (rc2) loader.

Layout under ``root`` (the ``cirr_dataset`` branch of the CIRR repository)::

    captions/cap.rc2.{split}.json          list of {pairid, reference, target_hard, target_soft, caption, img_set}
    captions_ext/cap.ext.rc2.{split}.json  optional: list of {pairid, reference, target_hard, caption_extend}
    image_splits/split.rc2.{split}.json    {image id: "./dev/<id>.png"}

Conventions:

* **Gallery** = every image of ``split.rc2.{split}.json``, in file (key) order, for every split. This is the
  column order of score matrices (``eval-scores``) and what the CIRR evaluation ranks over. Paths are the split
  file's relative paths joined onto ``root / image_dir`` (``image_dir="."``: images next to ``captions/``, as in
  CLIP4Cir; pass ``image_dir="img_raw"`` for the layout of the CIRR README).
* **Queries** in captions-file order; ``qid = str(pairid)``; ``text = caption``; ``targets = (target_hard,)``
  (empty on test splits). ``subset = img_set.members`` (reference and target included; Recall_subset drops the
  reference). ``meta`` keeps ``pairid``, ``target_soft``, ``img_set_id``, ``reference_rank``, ``target_rank``.
* **Scored label: ``target_hard``**, as CLIP4Cir and SPRC score CIRR val. The CIRR authors' own validation code
  scores ``target_soft`` (``meta["target_soft"]``) instead, which gives different figures: on rc2 val
  ``target_hard`` is not among the ``target_soft`` images in 37 queries.
* **Extended captions** (``captions_ext``): ``captions_ext=None`` reads the file when it exists, ``True``
  requires it, ``False`` ignores it. ``Query.captions = (caption, *extended captions)`` where the markers
  "[c] ...", "[cr0] ..." and "[cr1] ..." (no annotation / nothing worth mentioning / covered in query) are not
  captions and are left out; all four raw strings stay in ``meta["caption_extend"]``.
* ``exclude_reference=True``: the CIRR protocol removes the reference image from its own ranking.

Strict checks (a :class:`DataError` naming file and entry): duplicate pair ids, missing fields, reference /
target / ``target_soft`` key / ``img_set`` member not in the split file, reference or target missing from its own
``img_set``, an extended-caption entry for an unknown pair id, a query without its extended captions, or one
whose reference/target disagrees with the captions file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ._jsonio import (
    ImagePaths,
    entry_name,
    expect_list,
    expect_object,
    get_field,
    id_field,
    id_list_field,
    int_field,
    is_test_split,
    read_json,
    resolve_dir,
    str_field,
)
from .registry import register_dataset
from .schema import CIRDataset, DataError, Gallery, Query

# "[c] None existed", "[cr0] Nothing worth mentioning", "[cr1] Covered in query": annotator markers, not captions.
_EXT_MARKER = re.compile(r"^\s*\[(?:c|cr\d)\]")


def split_file(root: Path, split: str, version: str = "rc2") -> Path:
    return Path(root) / "image_splits" / f"split.{version}.{split}.json"


def read_cirr_split(root: Path, split: str, version: str = "rc2", image_dir: str | Path = ".") -> tuple[Gallery, Path]:
    """The gallery of a CIRR split: ``split.{version}.{split}.json`` in key order, paths under ``root/image_dir``."""
    path = split_file(root, split, version)
    data = expect_object(read_json(path, "CIRR image split file"), path, what="the split file")
    joiner = ImagePaths(resolve_dir(Path(root), image_dir), path)
    ids: list[str] = []
    paths: list[Path] = []
    for image_id, rel in data.items():
        if not image_id.strip():
            raise DataError(path, repr(image_id), "empty image id")
        ids.append(image_id)
        paths.append(joiner.join(rel, image_id))
    return Gallery(ids, paths, source=path), path


def read_img_set(c: dict[str, Any], path: Path, entry: str, gallery: Gallery, gallery_file: Path,
                 reference: str, target: str | None) -> tuple[tuple[str, ...], dict[str, Any]]:
    """``img_set`` of a CIRR-style entry: its members (all in the gallery, reference and target among them) and
    its id/ranks for ``Query.meta``."""
    img_set = expect_object(get_field(c, "img_set", path, entry), path, entry, "'img_set'")
    members = id_list_field(img_set, "members", path, entry)
    assert members is not None
    for m in members:
        if m not in gallery:
            raise DataError(path, entry, f"img_set member {m!r} is not in the gallery ({gallery_file})")
    if reference not in members:
        raise DataError(path, entry, f"reference {reference!r} is not among its img_set members")
    if target is not None and target not in members:
        raise DataError(path, entry, f"target {target!r} is not among its img_set members")
    meta = {"img_set_id": int_field(img_set, "id", path, entry, optional=True)}
    for k in ("reference_rank", "target_rank"):
        v = int_field(img_set, k, path, entry, optional=True)
        if v is not None:
            meta[k] = v
    return tuple(members), meta


def _read_ext(path: Path, by_pairid: dict[int, dict[str, Any]]) -> dict[int, list[str]]:
    data = expect_list(read_json(path, "CIRR extended-captions file"), path)
    out: dict[int, list[str]] = {}
    for i, e in enumerate(data):
        entry = entry_name(i)
        e = expect_object(e, path, entry, "the entry")
        pairid = int_field(e, "pairid", path, entry)
        assert pairid is not None
        entry = entry_name(i, pairid=pairid)
        if pairid in out:
            raise DataError(path, entry, f"duplicate pairid {pairid}")
        if pairid not in by_pairid:
            raise DataError(path, entry, f"pairid {pairid} is not in the captions file")
        main = by_pairid[pairid]
        for key in ("reference", "target_hard"):
            v = id_field(e, key, path, entry, optional=True)
            if v is not None and main.get(key) is not None and v != str(main[key]):
                raise DataError(path, entry, f"{key} {v!r} disagrees with the captions file ({main[key]!r})")
        ext = expect_object(get_field(e, "caption_extend", path, entry), path, entry, "'caption_extend'")
        try:
            keys = sorted(ext, key=int)
        except ValueError:
            raise DataError(path, entry, f"caption_extend keys must be integers, got {list(ext)}") from None
        texts = []
        for k in keys:
            if not isinstance(ext[k], str):
                raise DataError(path, entry, f"caption_extend[{k!r}] must be a string, got {type(ext[k]).__name__}")
            texts.append(ext[k])
        out[pairid] = texts
    missing = [p for p in by_pairid if p not in out]
    if missing:
        raise DataError(path, None, f"{len(missing)} pair ids of the captions file have no extended captions, e.g. {missing[:5]}")
    return out


@register_dataset("cirr")
def load_cirr(root: Path, split: str, *, version: str = "rc2", image_dir: str | Path = ".",
              captions_ext: bool | None = None) -> CIRDataset:
    """Load CIRR split ``split`` (``train``, ``val``, ``test1``) from ``root``; see the module docstring."""
    root = Path(root)
    gallery, gfile = read_cirr_split(root, split, version, image_dir)
    cap_path = root / "captions" / f"cap.{version}.{split}.json"
    raw = expect_list(read_json(cap_path, "CIRR captions file"), cap_path)
    test = is_test_split(split)

    by_pairid: dict[int, dict[str, Any]] = {}
    for i, c in enumerate(raw):
        c = expect_object(c, cap_path, entry_name(i), "the entry")
        pairid = int_field(c, "pairid", cap_path, entry_name(i))
        assert pairid is not None
        if pairid in by_pairid:
            raise DataError(cap_path, entry_name(i, pairid=pairid), f"duplicate pairid {pairid}")
        by_pairid[pairid] = c

    # The captions file is checked in full before the extended captions are matched against it.
    rows: list[dict[str, Any]] = []
    empty_texts = 0
    for i, (pairid, c) in enumerate(by_pairid.items()):
        entry = entry_name(i, pairid=pairid)
        reference = id_field(c, "reference", cap_path, entry)
        assert reference is not None
        if reference not in gallery:
            raise DataError(cap_path, entry, f"reference {reference!r} is not in the gallery ({gfile})")
        caption = str_field(c, "caption", cap_path, entry)
        assert caption is not None
        if not caption.strip():
            empty_texts += 1  # real: test1 pair 27098 has caption " "; kept, the test server expects every pair
        target = id_field(c, "target_hard", cap_path, entry, optional=test)
        if target is not None and target not in gallery:
            raise DataError(cap_path, entry, f"target_hard {target!r} is not in the gallery ({gfile})")
        meta: dict[str, Any] = {"pairid": pairid}
        soft = get_field(c, "target_soft", cap_path, entry, optional=True)
        if soft is not None:
            soft = expect_object(soft, cap_path, entry, "'target_soft'")
            for k, v in soft.items():
                if k not in gallery:
                    raise DataError(cap_path, entry, f"target_soft image {k!r} is not in the gallery ({gfile})")
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise DataError(cap_path, entry, f"target_soft[{k!r}] must be a number, got {type(v).__name__}")
            meta["target_soft"] = dict(soft)
        subset, set_meta = read_img_set(c, cap_path, entry, gallery, gfile, reference, target)
        meta.update(set_meta)
        rows.append({"qid": str(pairid), "reference": reference, "text": caption,
                     "targets": () if target is None else (target,), "captions": (caption,), "subset": subset,
                     "meta": meta})

    ext_path = root / "captions_ext" / f"cap.ext.{version}.{split}.json"
    use_ext = ext_path.is_file() if captions_ext is None else bool(captions_ext)
    if use_ext:
        ext = _read_ext(ext_path, by_pairid)
        for pairid, row in zip(by_pairid, rows, strict=True):
            row["meta"]["caption_extend"] = ext[pairid]
            row["captions"] += tuple(t for t in ext[pairid] if t.strip() and not _EXT_MARKER.match(t))
    queries = [Query(**row) for row in rows]

    files = [cap_path, gfile] + ([ext_path] if use_ext else [])
    return CIRDataset(
        name="cirr",
        split=split,
        queries=queries,
        gallery=gallery,
        root=root,
        files=files,
        exclude_reference=True,
        text_policy="fixed",
        meta={"version": version, "captions_ext": use_ext, "empty_texts": empty_texts, "gallery_source": str(gfile)},
    )
