"""Parts of a split (``docs/protocol.md``): the validation split cut in two by reference image, ``select`` (the base
models' choices) and ``fuse`` (the fusion's labelled queries). ``load_dataset(name, root, "val/fuse")`` (also
``"val:fuse"``) loads a part; :mod:`cirfusion.selection` explains the rule and records the choices made on each part.

A query's part is a pure function of its reference image id (a salted SHA-1 compared with the select share), so the
parts share no query and no reference image and do not depend on query order, split size or any seed."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from ..errors import CirfusionError
from .schema import CIRDataset

PARTS = ("select", "fuse")
ALL = "all"  # the whole split (a split that is not cut, e.g. train or test)
SELECT_SHARE = 0.5  # share of the reference images whose queries choose for the base models
_SALT = b"cirfusion/val-part/v1"


class ProtocolError(CirfusionError, ValueError):
    """A split part that does not exist, or a choice recorded without what it was chosen on."""


def _check_part(part: str) -> None:
    if part not in (*PARTS, ALL):
        raise ProtocolError(f"unknown validation part {part!r}; expected one of {', '.join((*PARTS, ALL))}")


def _check_share(share: float) -> None:
    if not 0 < share < 1:
        raise ProtocolError(f"select share must be in (0, 1), got {share}")


def image_part(image_id: str, share: float = SELECT_SHARE) -> str:
    """``"select"`` or ``"fuse"``: the part of the validation split that queries with reference ``image_id`` belong
    to (a salted SHA-1 of the id read as a number in [0, 1), below ``share`` = select)."""
    _check_share(share)
    h = hashlib.sha1(_SALT + image_id.encode("utf-8")).digest()
    u = int.from_bytes(h[:8], "big") / 2.0**64
    return "select" if u < share else "fuse"


def part_rows(dataset: CIRDataset, part: str, share: float = SELECT_SHARE) -> np.ndarray:
    """The query rows (dataset order) of ``part`` (``"all"``: every row)."""
    _check_part(part)
    if part == ALL:
        return np.arange(len(dataset.queries), dtype=np.int64)
    return np.array([i for i, q in enumerate(dataset.queries) if image_part(q.reference, share) == part], dtype=np.int64)


def dataset_part(dataset: CIRDataset, part: str, share: float = SELECT_SHARE) -> CIRDataset:
    """The dataset restricted to the queries of ``part`` (same gallery). Its ``split`` becomes ``"val:select"`` (say;
    a colon, not a slash, keeps ``dataset.key``'s ``name[/category]/split`` form),
    so a run's manifest records which part chose its epoch (:func:`base_selection` reads it back); ``meta`` records
    the part and the share. Refused when the part would be empty."""
    if part == ALL:
        return dataset
    rows = part_rows(dataset, part, share)
    if not len(rows):
        raise ProtocolError(f"{dataset.key}: no query falls in the {part!r} part (select share {share}); "
                            f"{len(dataset.queries)} queries in all -- use the whole split ('all') for so few")
    return dataclasses.replace(dataset, split=f"{dataset.split}:{part}", queries=[dataset.queries[i] for i in rows],
                               meta={**dataset.meta, "val_part": part, "select_share": share})


def split_part(split: str | None) -> tuple[str | None, str]:
    """``"val/fuse"`` (or ``"val:fuse"``, as a part's dataset records it) -> ``("val", "fuse")``; ``"val"`` ->
    ``("val", "all")``; None -> ``(None, "all")``."""
    if split is None:
        return None, ALL
    name, _, part = split.replace(":", "/").partition("/")
    if part:
        _check_part(part)
    return name, part or ALL


__all__ = ["ALL", "PARTS", "SELECT_SHARE", "ProtocolError", "dataset_part", "image_part", "part_rows", "split_part"]
