"""FineCIR loader: fine-grained modification texts (``finemt``) over CIRR or FashionIQ.

Files (looked for in ``root/captions/`` first, then ``root/``, as the FineCIR code keeps them next to the
original captions)::

    cirr.fine.{split}.jsonl             one {pairid, reference, target_hard, finemt, img_set} per line
    fiq.fine.{category}.{split}.jsonl   one {candidate, target, finemt} per line

Pick the family with ``which="cirr"`` (default) or ``which="fiq"`` (+ ``category=``).

Conventions:

* **Gallery**: the matching original split file under ``split_root`` (default ``root``):
  ``image_splits/split.rc2.{split}.json`` (all its images, key order) or ``image_splits/split.{cat}.{split}.json``
  (the list, file order) -- the same galleries, paths and ``exclude_reference`` as the ``cirr`` (True) and
  ``fashioniq`` (False) loaders, so FineCIR numbers are comparable with the original benchmarks. (The FineCIR
  code's FashionIQ evaluation ranks only the images its queries mention; we keep the official split gallery.)
* **finemt**: the released files hold one string per query, written as a numbered list, one edit per line, or a
  paragraph. :func:`parse_finemt` turns it into atomic edits: split on line breaks and on inline "1. ... 2. ..."
  enumerations, strip the enumerators ("1.", "2)", "-", "*"), drop header lines ending in ":" ("To transform the
  reference image to target image:"), and split a lone paragraph into sentences. A JSON list of strings is taken
  as the edits themselves. The original string is kept in ``meta["finemt_raw"]``.
* **Text** (``text_mode``): ``"joined"`` (default) = the edits joined by a space, each ending in a full stop --
  the whole instruction as one clean paragraph; ``"raw"`` = the file's string as is (what FineCIR's code feeds
  its text encoder).
* ``qid``: CIRR: ``str(pairid)``; FIQ: ``f"{category}-{split}-{index}"`` (index = position among the file's
  entries). ``with_captions=True`` also reads the original captions file under ``split_root`` and puts its
  caption(s) into ``Query.captions`` (CIRR matched by pairid, FIQ by (candidate, target)); a query without a
  match is an error.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

from ..options import OptionError
from ._jsonio import (
    entry_name,
    expect_list,
    expect_object,
    find_file,
    get_field,
    id_field,
    int_field,
    is_test_split,
    read_json,
    read_jsonl,
    str_list_field,
)
from .cirr import read_cirr_split, read_img_set
from .fashioniq import check_category, fiq_gallery, read_fiq_split, resolve_missing
from .registry import register_dataset
from .schema import CIRDataset, DataError, Query, join_fashioniq

_ENUM = re.compile(r"^\s*(?:\(?\d{1,2}[.):]|[-*\u2022])\s+")
_INLINE_ENUM = re.compile(r"(?:^|(?<=\s))(\d{1,2})[.)]\s")
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


def _split_inline_enumeration(line: str) -> list[str]:
    """Split "header: 1. do a 2. do b" before each enumerator, but only at the numbers 1, 2, 3... in sequence,
    so "size 10. Then..." or a stray number never cuts an edit in two."""
    cuts: list[int] = []
    expected = 1
    for m in _INLINE_ENUM.finditer(line):
        if int(m.group(1)) == expected:
            cuts.append(m.start())
            expected += 1
    if len(cuts) < 2:
        return [line]
    bounds = [0, *cuts, len(line)]
    return [line[a:b] for a, b in itertools.pairwise(bounds) if line[a:b].strip()]


def parse_finemt(value: Any, path: Path | None = None, entry: Any = None) -> tuple[str, ...]:
    """The atomic edits of a ``finemt`` field (a string or a list of strings); see the module docstring."""
    if isinstance(value, list):
        if not all(isinstance(x, str) for x in value):
            raise DataError(path, entry, "field 'finemt' must be a string or a list of strings")
        items = [x.strip() for x in value if x.strip()]
    elif isinstance(value, str):
        pieces: list[str] = []
        for line in value.splitlines():
            pieces.extend(_split_inline_enumeration(line))
        items = []
        for p in pieces:
            p = _ENUM.sub("", p).strip()
            if p and not p.endswith(":"):
                items.append(p)
        if len(items) == 1:
            items = [s.strip() for s in _SENTENCE.split(items[0]) if s.strip()]
    else:
        raise DataError(path, entry, f"field 'finemt' must be a string or a list of strings, got {type(value).__name__}")
    if not items:
        raise DataError(path, entry, "field 'finemt' holds no edit")
    return tuple(items)


def finemt_text(items: tuple[str, ...]) -> str:
    """The edits as one paragraph, each ending in a full stop."""
    return " ".join(s if s[-1] in ".!?" else s + "." for s in items)


def _annotation_file(root: Path, name: str) -> Path:
    return find_file([root / "captions" / name, root / name], f"FineCIR file {name}")


def _finemt(rec: dict[str, Any], path: Path, entry: str, text_mode: str) -> tuple[tuple[str, ...], str, Any]:
    raw = get_field(rec, "finemt", path, entry)
    items = parse_finemt(raw, path, entry)
    if text_mode == "raw":
        text = raw.strip() if isinstance(raw, str) else " ".join(items)
    else:
        text = finemt_text(items)
    return items, text, raw


def _load_cirr(root: Path, split: str, split_root: Path, image_dir: str | Path, version: str, text_mode: str,
               with_captions: bool) -> CIRDataset:
    gallery, gfile = read_cirr_split(split_root, split, version, image_dir)
    path = _annotation_file(root, f"cirr.fine.{split}.jsonl")
    test = is_test_split(split)
    files = [path, gfile]
    captions_by_pairid: dict[int, dict[str, Any]] = {}
    if with_captions:
        cap_path = split_root / "captions" / f"cap.{version}.{split}.json"
        for i, c in enumerate(expect_list(read_json(cap_path, "CIRR captions file"), cap_path)):
            c = expect_object(c, cap_path, entry_name(i), "the entry")
            pid = int_field(c, "pairid", cap_path, entry_name(i))
            assert pid is not None
            captions_by_pairid[pid] = c
        files.append(cap_path)

    queries: list[Query] = []
    seen: set[int] = set()
    for lineno, rec in read_jsonl(path, "FineCIR file"):
        entry = f"line {lineno}"
        pairid = int_field(rec, "pairid", path, entry)
        assert pairid is not None
        entry = f"line {lineno} (pairid {pairid})"
        if pairid in seen:
            raise DataError(path, entry, f"duplicate pairid {pairid}")
        seen.add(pairid)
        ref = id_field(rec, "reference", path, entry)
        assert ref is not None
        if ref not in gallery:
            raise DataError(path, entry, f"reference {ref!r} is not in the gallery ({gfile})")
        tgt = id_field(rec, "target_hard", path, entry, optional=test)
        if tgt is not None and tgt not in gallery:
            raise DataError(path, entry, f"target_hard {tgt!r} is not in the gallery ({gfile})")
        items, text, raw = _finemt(rec, path, entry, text_mode)
        meta: dict[str, Any] = {"pairid": pairid, "finemt_raw": raw}
        subset = None
        if rec.get("img_set") is not None:
            subset, set_meta = read_img_set(rec, path, entry, gallery, gfile, ref, tgt)
            meta.update(set_meta)
        captions: tuple[str, ...] = ()
        if with_captions:
            orig = captions_by_pairid.get(pairid)
            if orig is None:
                raise DataError(path, entry, f"pairid {pairid} is not in the captions file {files[-1]}")
            if str(orig.get("reference")) != ref:
                raise DataError(path, entry, f"reference {ref!r} disagrees with the captions file ({orig.get('reference')!r})")
            if not isinstance(orig.get("caption"), str):
                raise DataError(files[-1], f"pairid {pairid}", "missing or non-string field 'caption'")
            captions = (orig["caption"],)
        queries.append(Query(qid=str(pairid), reference=ref, text=text, targets=() if tgt is None else (tgt,),
                             captions=captions, finemt=items, subset=subset, meta=meta))
    return CIRDataset(name="finecir", split=split, queries=queries, gallery=gallery, root=root, files=files,
                      exclude_reference=True, text_policy="fixed",
                      meta={"which": "cirr", "text_mode": text_mode, "gallery_source": str(gfile)})


def _load_fiq(root: Path, split: str, category: str, split_root: Path, image_dir: str | Path, ext: str,
              text_mode: str, with_captions: bool, add_missing: bool) -> CIRDataset:
    split_ids, split_path = read_fiq_split(split_root, category, split)
    path = _annotation_file(root, f"fiq.fine.{category}.{split}.jsonl")
    test = is_test_split(split)
    files = [path, split_path]
    caps_by_pair: dict[tuple[str, str | None], tuple[str, str] | None] = {}
    if with_captions:
        cap_path = split_root / "captions" / f"cap.{category}.{split}.json"
        for i, c in enumerate(expect_list(read_json(cap_path, "FashionIQ captions file"), cap_path)):
            c = expect_object(c, cap_path, entry_name(i), "the entry")
            key = (id_field(c, "candidate", cap_path, entry_name(i)) or "",
                   id_field(c, "target", cap_path, entry_name(i), optional=True))
            cs = str_list_field(c, "captions", cap_path, entry_name(i))
            assert cs is not None
            if len(cs) != 2:
                raise DataError(cap_path, entry_name(i), f"expected 2 captions, got {len(cs)}")
            # None marks a (candidate, target) pair the captions file holds twice: unusable for matching.
            caps_by_pair[key] = None if key in caps_by_pair else (cs[0], cs[1])
        files.append(cap_path)

    rows: list[tuple[str, str | None, tuple[str, ...], str, Any, tuple[str, ...]]] = []
    needed: list[tuple[str, str, str]] = []
    for lineno, rec in read_jsonl(path, "FineCIR file"):
        entry = f"line {lineno}"
        ref = id_field(rec, "candidate", path, entry)
        assert ref is not None
        tgt = id_field(rec, "target", path, entry, optional=test)
        items, text, raw = _finemt(rec, path, entry, text_mode)
        needed.append((ref, "candidate", entry))
        if tgt is not None:
            needed.append((tgt, "target", entry))
        captions: tuple[str, ...] = ()
        if with_captions:
            if (ref, tgt) not in caps_by_pair:
                raise DataError(path, entry, f"pair ({ref}, {tgt}) is not in the captions file {files[-1]}")
            match = caps_by_pair[(ref, tgt)]
            if match is None:
                raise DataError(path, entry, f"pair ({ref}, {tgt}) occurs more than once in {files[-1]}: ambiguous")
            captions = match
        rows.append((ref, tgt, items, text, raw, captions))
    added = resolve_missing(needed, split_ids, split_path, path, add_missing)
    gallery = fiq_gallery(split_ids + added, split_root, image_dir, ext, split_path)
    queries = []
    for i, (ref, tgt, items, text, raw, captions) in enumerate(rows):
        meta: dict[str, Any] = {"finemt_raw": raw}
        if captions:
            meta["caption_text"] = join_fashioniq(*captions)
        queries.append(Query(qid=f"{category}-{split}-{i}", reference=ref, text=text,
                             targets=() if tgt is None else (tgt,), captions=captions, finemt=items, meta=meta))
    return CIRDataset(name="finecir", split=split, queries=queries, gallery=gallery, root=root, files=files,
                      exclude_reference=False, text_policy="fixed", category=category,
                      meta={"which": "fiq", "text_mode": text_mode, "gallery_source": str(split_path),
                            "added_to_gallery": added})


@register_dataset("finecir")
def load_finecir(root: Path, split: str, *, which: str = "cirr", category: str | None = None,
                 split_root: str | Path | None = None, image_dir: str | Path | None = None, ext: str = ".png",
                 version: str = "rc2", text_mode: str = "joined", with_captions: bool = False,
                 add_missing_to_gallery: bool = False) -> CIRDataset:
    """Load a FineCIR split over CIRR (``which="cirr"``) or FashionIQ (``which="fiq"``, ``category=``)."""
    if text_mode not in ("joined", "raw"):
        raise OptionError(f"text_mode must be 'joined' or 'raw' (got {text_mode!r})")
    root = Path(root)
    sroot = root if split_root is None else Path(split_root)
    if which == "cirr":
        if category is not None:
            raise OptionError("finecir which='cirr' takes no category")
        return _load_cirr(root, split, sroot, "." if image_dir is None else image_dir, version, text_mode,
                          with_captions)
    if which == "fiq":
        cat = check_category(category, "finecir which='fiq'")
        return _load_fiq(root, split, cat, sroot, "images" if image_dir is None else image_dir, ext, text_mode,
                         with_captions, add_missing_to_gallery)
    raise OptionError(f"finecir which must be 'cirr' or 'fiq' (got {which!r})")
