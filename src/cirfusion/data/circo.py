"""CIRCO loader (many ground truths per query, gallery = COCO 2017 unlabeled).

Layout under ``root`` (the CIRCO repository's)::

    annotations/{split}.json        list of {id, reference_img_id, target_img_id, gt_img_ids, relative_caption,
                                    shared_concept} (test: no target_img_id / gt_img_ids)
    COCO2017_unlabeled/annotations/image_info_unlabeled2017.json   {"images": [{"id", "file_name"}, ...]}
    COCO2017_unlabeled/unlabeled2017/000000xxxxxx.jpg

Conventions:

* **Gallery** = the ``images`` list of the image-info file, in file order (what the CIRCO code indexes); id =
  the COCO integer id as a decimal string (``"9761"``), path = ``root/image_dir/file_name``. ``image_info`` may
  also be a plain JSON list of integer ids, whose file names are then the COCO ``{id:012d}.jpg``. Both
  locations are kwargs (``image_info=``, ``image_dir=``); neither is opened beyond the JSON.
* **Queries** in file order; ``qid = str(id)`` (the test server keys submissions by it);
  ``targets = gt_img_ids`` with ``target_img_id`` (the image the caption was written for, which must be one of
  them) first and the others in file order (the real files already list it first); also kept in
  ``meta["target_img_id"]``; empty on ``test``.
* **Metrics** as the official ``src/evaluation.py`` of miccunifi/CIRCO: ``recall_target="first"``, so Recall@K
  counts only ``target_img_id`` while mAP@K uses every ground truth; the any-ground-truth recall is reported as
  ``Rgt@K``.
* **Text**: ``text_template`` formatted with ``relative_caption`` and ``shared_concept``; the default
  ``"{shared_concept} that {relative_caption}"`` reads as one sentence on CIRCO's captions ("a teddy bear that is
  held by a little girl on a chair") and keeps the shared concept that disambiguates the caption.
  ``captions = (relative_caption,)``; ``meta`` keeps ``shared_concept`` (and ``semantic_aspects`` if present).
* ``exclude_reference=False``: the reference stays in the ranking, as in SEARLE's CIRCO validation
  (``src/validate.py``) and test-submission code and the official evaluation, which scores the submitted lists
  as they are. Pass ``--exclude-reference`` (``exclude_reference=True``) to drop it.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

from ..options import OptionError
from ._jsonio import (
    ImagePaths,
    entry_name,
    expect_list,
    expect_object,
    get_field,
    id_field,
    id_list_field,
    id_value,
    is_test_split,
    read_json,
    resolve_dir,
    str_field,
    str_list_field,
)
from .registry import register_dataset
from .schema import CIRDataset, DataError, Gallery, Query

DEFAULT_TEMPLATE = "{shared_concept} that {relative_caption}"
TEMPLATE_FIELDS = ("relative_caption", "shared_concept")
DEFAULT_IMAGE_INFO = "COCO2017_unlabeled/annotations/image_info_unlabeled2017.json"
DEFAULT_IMAGE_DIR = "COCO2017_unlabeled/unlabeled2017"


def check_template(template: str) -> str:
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise OptionError(f"text_template {template!r} is not a valid format string: {exc}") from None
    bad = [f for f in fields if f not in TEMPLATE_FIELDS]
    if bad or not fields:
        raise OptionError(f"text_template {template!r} may only use {{relative_caption}} and {{shared_concept}} "
                         f"(and at least one of them); got fields {fields}")
    return template


def _coco_id(v: Any, key: str, path: Path, entry: Any) -> str:
    # COCO ids are integers; accept "9761" too but keep one canonical spelling so ids match across files.
    s = id_value(v, key, path, entry)
    if not s.isdigit():
        raise DataError(path, entry, f"{key} {s!r} is not an integer COCO image id")
    return str(int(s))


def read_circo_gallery(info_path: Path, image_base: Path) -> Gallery:
    data = read_json(info_path, "CIRCO image-info file")
    ids: list[str] = []
    paths: list[Path] = []
    joiner = ImagePaths(image_base, info_path)
    if isinstance(data, dict):
        images = expect_list(get_field(data, "images", info_path, None), info_path)
        for i, im in enumerate(images):
            if isinstance(im, dict) and type(im.get("id")) is int and im["id"] >= 0 and isinstance(im.get("file_name"), str):
                image_id, fn = str(im["id"]), im["file_name"]  # fast path: the 123,403-image COCO file
            else:
                im = expect_object(im, info_path, entry_name(i), "an image record")
                image_id = _coco_id(get_field(im, "id", info_path, entry_name(i)), "id", info_path, entry_name(i))
                fn = str_field(im, "file_name", info_path, entry_name(i, id=image_id))
                assert fn is not None
            ids.append(image_id)
            paths.append(joiner.join(fn, f"#{i} (id {image_id})"))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            ids.append(_coco_id(v, "image id", info_path, entry_name(i)))
            paths.append(image_base / f"{int(ids[-1]):012d}.jpg")
    else:
        raise DataError(info_path, None, "expected {\"images\": [...]} or a list of image ids")
    return Gallery(ids, paths, source=info_path)


@register_dataset("circo")
def load_circo(root: Path, split: str, *, text_template: str = DEFAULT_TEMPLATE,
               image_info: str | Path = DEFAULT_IMAGE_INFO, image_dir: str | Path = DEFAULT_IMAGE_DIR) -> CIRDataset:
    """Load CIRCO ``val`` or ``test`` (any ``annotations/{split}.json`` of that shape); see the module docstring."""
    template = check_template(text_template)
    root = Path(root)
    info_path = resolve_dir(root, image_info)
    gallery = read_circo_gallery(info_path, resolve_dir(root, image_dir))
    ann_path = root / "annotations" / f"{split}.json"
    raw = expect_list(read_json(ann_path, "CIRCO annotation file"), ann_path)
    test = is_test_split(split)

    queries: list[Query] = []
    seen: set[str] = set()
    for i, a in enumerate(raw):
        entry = entry_name(i)
        a = expect_object(a, ann_path, entry, "the entry")
        qid = id_field(a, "id", ann_path, entry)
        assert qid is not None
        entry = entry_name(i, id=qid)
        if qid in seen:
            raise DataError(ann_path, entry, f"duplicate query id {qid}")
        seen.add(qid)
        ref = _coco_id(get_field(a, "reference_img_id", ann_path, entry), "reference_img_id", ann_path, entry)
        caption = str_field(a, "relative_caption", ann_path, entry)
        concept = str_field(a, "shared_concept", ann_path, entry)
        assert caption is not None and concept is not None
        if ref not in gallery:
            raise DataError(ann_path, entry, f"reference_img_id {ref} is not in the gallery ({info_path})")
        meta: dict[str, Any] = {"shared_concept": concept}
        gts: list[str] = []
        raw_target = get_field(a, "target_img_id", ann_path, entry, optional=test)
        raw_gts = id_list_field(a, "gt_img_ids", ann_path, entry, optional=test)
        if (raw_target is None) != (raw_gts is None):
            raise DataError(ann_path, entry, "target_img_id and gt_img_ids must be given together")
        if raw_target is not None and raw_gts is not None:
            target = _coco_id(raw_target, "target_img_id", ann_path, entry)
            gts = [_coco_id(g, "gt_img_ids", ann_path, entry) for g in raw_gts]
            if len(set(gts)) != len(gts):  # "9761" and 9761 are the same image
                raise DataError(ann_path, entry, "gt_img_ids repeats an image id")
            if target not in gts:
                raise DataError(ann_path, entry, f"target_img_id {target} is not among gt_img_ids")
            for g in gts:
                if g not in gallery:
                    raise DataError(ann_path, entry, f"ground-truth image {g} is not in the gallery ({info_path})")
            meta["target_img_id"] = target
            gts = [target] + [g for g in gts if g != target]  # Recall@K follows targets[0]
        aspects = str_list_field(a, "semantic_aspects", ann_path, entry, optional=True)
        if aspects is not None:
            meta["semantic_aspects"] = aspects
        text = template.format(relative_caption=caption.strip(), shared_concept=concept.strip()).strip()
        queries.append(Query(qid=qid, reference=ref, text=text, targets=tuple(gts), captions=(caption,), meta=meta))

    return CIRDataset(
        name="circo",
        split=split,
        queries=queries,
        gallery=gallery,
        root=root,
        files=[ann_path, info_path],
        exclude_reference=False,
        text_policy="fixed",
        meta={"text_template": template, "gallery_source": str(info_path)},
        recall_target="first",
    )
