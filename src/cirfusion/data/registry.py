"""Dataset loaders by name: ``load_dataset("cirr", root, "val")``, on the package's one ``Registry``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..registry import Registry
from .parts import dataset_part, split_part
from .schema import CIRDataset

Loader = Callable[..., CIRDataset]  # loader(root, split, **options) -> CIRDataset

# The built-in loaders register themselves when their module is imported, on the first look-up (so that
# `import cirfusion` stays light).
DATASETS: Registry[Loader] = Registry("dataset", [
    "cirfusion.data.cirr",
    "cirfusion.data.fashioniq",
    "cirfusion.data.shoes",
    "cirfusion.data.circo",
    "cirfusion.data.finecir",
    "cirfusion.data.custom",
    "cirfusion.data.synthetic",
    "cirfusion.data.catalog",
    "cirfusion.data.ip2p",
])  # fmt: skip


def register_dataset(name: str) -> Callable[[Loader], Loader]:
    """Decorator: register ``fn(root, split, **options) -> CIRDataset`` under ``name``."""
    return DATASETS.register(name)


def list_datasets() -> list[str]:
    return DATASETS.names()


def dataset_loader(name: str) -> Loader:
    """The loader registered under ``name`` (``KeyError`` listing the known names otherwise): its signature says
    which options (``--option KEY=VALUE``) it accepts, for ``cirfusion.options.check_options``."""
    return DATASETS.get(name)


def load_dataset(name: str, root: str | Path, split: str, **kwargs: Any) -> CIRDataset:
    """Load split ``split`` of dataset ``name`` stored under ``root``. Extra kwargs go to the loader
    (e.g. ``category="dress"`` for FashionIQ). ``"val/select"`` / ``"val/fuse"`` (or ``val:select``) load a part of a
    split (:mod:`cirfusion.data.parts`, ``docs/protocol.md``)."""
    base, part = split_part(split)
    assert base is not None
    return dataset_part(dataset_loader(name)(Path(root), base, **kwargs), part)
