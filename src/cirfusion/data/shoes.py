"""Shoes (relative captions) loader.

Layout under ``root``::

    dataset/relative_captions_shoes.json   list of {ImageName (target), ReferenceImageName, RelativeCaption}
    dataset/train_im_names.txt             one image file name per line (10,000 on the real file)
    dataset/eval_im_names.txt              (4,658 on the real file)
    images/<file name>                     (``image_dir`` changes this; the Attribute Discovery zip spreads the
                                            images over ``womens_*`` folders: flatten or symlink them)

Conventions:

* Splits: ``train`` uses ``train_im_names.txt``; ``eval`` (aliases ``val`` and ``test``, the dataset has a
  single held-out split) uses ``eval_im_names.txt``. **Gallery** = that name list in file order; image id = the
  file name as the annotations spell it (``img_womens_clogs_851.jpg``).
* **Queries**: the relative-caption pairs whose reference and target are both in the split's list, in file
  order; ``qid = f"shoes-{index}"`` with ``index`` the position in ``relative_captions_shoes.json`` (stable
  across splits); ``text = RelativeCaption``.
* A pair with an image in neither list is an error. A pair whose two images are in different lists
  ("straddling") cannot be evaluated in either split: by default an error; ``straddling="exclude"`` leaves it out
  of every split and lists its indices in ``meta["straddling_pairs"]``. On the real files 8,990 pairs are train,
  1,761 eval, none straddles and no image is unlisted.
* ``exclude_reference=True``: the reference is removed from its own ranking, as ARTEMIS (naver/artemis,
  ``evaluate.py``: ``cs[img_src_id] = -inf`` before sorting) does for Shoes; Recall@K ranks the rest of the eval
  gallery. The real data holds 27 pairs whose target *is* the reference (26 train, 1 eval; counted in
  ``meta["self_pairs"]``): such a query counts as a miss, as in ARTEMIS. ``--no-exclude-reference``
  (``exclude_reference=False``) keeps the reference in the ranking.
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
    read_json,
    read_name_list,
    resolve_dir,
    str_field,
)
from .registry import register_dataset
from .schema import CIRDataset, DataError, Gallery, Query

SPLIT_LISTS = {"train": "train", "eval": "eval", "val": "eval", "test": "eval"}


@register_dataset("shoes")
def load_shoes(root: Path, split: str, *, image_dir: str | Path = "images", straddling: str = "error") -> CIRDataset:
    """Load Shoes split ``train`` or ``eval`` (``val``/``test`` are aliases of ``eval``)."""
    if split not in SPLIT_LISTS:
        raise OptionError(f"shoes split must be one of {', '.join(SPLIT_LISTS)} (got {split!r})")
    if straddling not in ("error", "exclude"):
        raise OptionError(f"straddling must be 'error' or 'exclude' (got {straddling!r})")
    root = Path(root)
    ddir = root / "dataset"
    cap_path = ddir / "relative_captions_shoes.json"
    list_paths = {k: ddir / f"{k}_im_names.txt" for k in ("train", "eval")}
    names = {k: read_name_list(p, "Shoes image list") for k, p in list_paths.items()}
    where: dict[str, str] = {}
    for k, ns in names.items():
        for n in ns:
            if n in where:
                raise DataError(list_paths[k], n, "image is listed in both train_im_names.txt and eval_im_names.txt")
            where[n] = k
    mine = SPLIT_LISTS[split]
    raw = expect_list(read_json(cap_path, "Shoes relative-captions file"), cap_path)

    queries: list[Query] = []
    straddlers: list[int] = []
    other = 0
    self_pairs = 0
    for i, c in enumerate(raw):
        entry = entry_name(i)
        c = expect_object(c, cap_path, entry, "the entry")
        tgt = id_field(c, "ImageName", cap_path, entry)
        ref = id_field(c, "ReferenceImageName", cap_path, entry)
        text = str_field(c, "RelativeCaption", cap_path, entry)
        assert tgt is not None and ref is not None and text is not None
        for role, name in (("reference", ref), ("target", tgt)):
            if name not in where:
                raise DataError(cap_path, entry, f"{role} {name!r} is in neither train_im_names.txt nor eval_im_names.txt")
        if where[ref] != where[tgt]:
            if straddling == "error":
                raise DataError(cap_path, entry, f"reference {ref!r} is in {where[ref]} but target {tgt!r} is in "
                                f"{where[tgt]} (pass straddling='exclude' to leave such pairs out, counted in meta)")
            straddlers.append(i)
            continue
        if where[ref] != mine:
            other += 1
            continue
        self_pairs += ref == tgt
        queries.append(Query(qid=f"shoes-{i}", reference=ref, text=text, targets=(tgt,), captions=(text,)))

    joiner = ImagePaths(resolve_dir(root, image_dir), list_paths[mine])
    gal_names = names[mine]
    gallery = Gallery(gal_names, [joiner.join(n, repr(n)) for n in gal_names], source=list_paths[mine])
    meta: dict[str, Any] = {
        "pairs_total": len(raw),
        "pairs_in_other_split": other,
        "straddling_pairs": straddlers,
        "self_pairs": self_pairs,
        "gallery_source": str(list_paths[mine]),
    }
    return CIRDataset(
        name="shoes",
        split=split,
        queries=queries,
        gallery=gallery,
        root=root,
        files=[cap_path, list_paths["train"], list_paths["eval"]],
        exclude_reference=True,
        text_policy="fixed",
        meta=meta,
    )
