"""Catalog benchmark, reading back: the manifest, the checked annotation files, the ``"catalog"`` dataset and its
edit pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...options import OptionError
from .._jsonio import read_jsonl, require_file
from ..generated import EditPair, read_edit_pairs, read_manifest
from ..ip2p import edit_pairs_dataset
from ..registry import register_dataset
from ..schema import CIRDataset, DataError, Gallery, Query, sha256_file
from .config import EDIT_KINDS, FORMAT_VERSION, QUERY_KINDS, SPLIT_ALIASES


def _read_manifest(root: str | Path) -> dict[str, Any]:
    mf = Path(root) / "annotations" / "manifest.json"
    m = read_manifest(mf, "not a catalog benchmark (no annotations/manifest.json); build one with cirfusion data make-catalog")
    if m.get("format_version") != FORMAT_VERSION:
        raise DataError(mf, None, f"catalog format version {m.get('format_version')!r} is not supported "
                                  f"(expected {FORMAT_VERSION}); rebuild it")  # fmt: skip
    return m


def _read_jsonl(path: Path, manifest: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The objects of one of the build's JSONL files, checked against the sha256 the manifest recorded."""
    require_file(path)
    if manifest is not None:
        want = manifest.get("files", {}).get(path.name)
        if want is not None and sha256_file(path) != want:
            raise DataError(path, None, "file changed since the build (sha256 differs from manifest.json); rebuild the catalog")
    return [r for _, r in read_jsonl(path)]


def _parse_kinds(kinds: str | Sequence[str] | None) -> tuple[str, ...] | None:
    if kinds is None:
        return None
    ks = tuple(k.strip() for k in (kinds.split(",") if isinstance(kinds, str) else kinds) if k.strip())
    bad = [k for k in ks if k not in QUERY_KINDS]
    if bad or not ks:
        raise OptionError(f"unknown query kind(s) {bad or ks}; choose from {', '.join(QUERY_KINDS)}")
    return ks


EDIT_PAIRS_SPLIT = "edit_pairs"


def _split_name(split: str) -> str:
    s = SPLIT_ALIASES.get(split.strip().lower())
    if s is None:
        raise OptionError(f"unknown catalog split {split!r}; expected train, val or test (the dataset also has edit_pairs)")
    return s


@register_dataset("catalog")
def load_catalog(
    root: str | Path, split: str, kinds: str | Sequence[str] | None = None, text_policy: str = "fixed"
) -> CIRDataset:
    """A split of a catalog benchmark written by :func:`build_catalog` (``split`` ``validation`` reads as ``val``).

    ``kinds``: keep only these query kinds (``"category,colour"`` or a list); the gallery is unchanged.
    ``text_policy="random"`` gives a random wording variant of each query at training time.
    Split ``edit_pairs``: the train split's photo edits as one query per pair (DetailFusion's stage-1 data; never
    val's or test's), as the synthetic benchmark's split of that name.
    """
    root = Path(root)
    if split.strip().lower() == EDIT_PAIRS_SPLIT:
        _parse_kinds(kinds)  # a bad option is still an error
        ann = root / "annotations"
        return edit_pairs_dataset(load_edit_pairs(root, "train"), name="catalog", split=EDIT_PAIRS_SPLIT, root=root,
                                  files=[ann / "edit_pairs.train.jsonl", ann / "manifest.json"])
    split = _split_name(split)
    m = _read_manifest(root)
    ann = root / "annotations"
    gfile, qfile = ann / f"gallery.{split}.jsonl", ann / f"queries.{split}.jsonl"
    ids, paths = [], []
    for i, r in enumerate(_read_jsonl(gfile, m), 1):
        if "id" not in r or "path" not in r:
            raise DataError(gfile, f"line {i}", "gallery entry needs 'id' and 'path'")
        p = Path(r["path"])
        ids.append(str(r["id"]))
        paths.append(p if p.is_absolute() else root / p)
    gallery = Gallery(ids, paths, source=gfile)
    keep = _parse_kinds(kinds)
    queries = []
    for i, r in enumerate(_read_jsonl(qfile, m), 1):
        q = Query.from_dict(r, qfile, f"line {i}")
        if keep is None or q.meta.get("kind") in keep:
            queries.append(q)
    ds = CIRDataset(
        name="catalog",
        split=split,
        queries=queries,
        gallery=gallery,
        root=root,
        files=[qfile, gfile, ann / "manifest.json"],
        exclude_reference=True,
        text_policy=text_policy,
        meta={"kinds": list(keep or m["config"]["kinds"]), "seed": m["config"]["seed"], "colours": list(m["palette"])},
    )
    ds.validate()
    return ds


def load_edit_pairs(root: str | Path, split: str) -> list[EditPair]:
    """The edit pairs of a split (``edit_pairs.{split}.jsonl``), paths resolved against ``root``."""
    root = Path(root)
    split = _split_name(split)
    m = _read_manifest(root)
    f = root / "annotations" / f"edit_pairs.{split}.jsonl"

    def resolve(r: dict[str, Any], side: str, entry: str) -> Path:
        p = r.get(f"{side}_path")
        if not isinstance(p, str):
            raise DataError(f, entry, f"missing or non-string field {side + '_path'!r}")
        return Path(p) if Path(p).is_absolute() else root / p

    return read_edit_pairs(f, EDIT_KINDS, resolve, rows=list(enumerate(_read_jsonl(f, m), 1)))
