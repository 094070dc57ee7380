"""Dataset loaders by name: ``load_dataset("cirr", root, "val")``."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .schema import CIRDataset

_LOADERS: dict[str, Callable[..., CIRDataset]] = {}

# Modules whose import registers loaders. Imported on first use so `import cirfusion` stays light.
_LOADER_MODULES = [
    "cirfusion.data.cirr",
    "cirfusion.data.fashioniq",
    "cirfusion.data.shoes",
    "cirfusion.data.circo",
    "cirfusion.data.finecir",
    "cirfusion.data.custom",
    "cirfusion.data.synthetic",
    "cirfusion.data.catalog",
]
_imported = False


def register_dataset(name: str) -> Callable[[Callable[..., CIRDataset]], Callable[..., CIRDataset]]:
    """Decorator: register ``fn(root, split, **kwargs) -> CIRDataset`` under ``name``."""

    def deco(fn: Callable[..., CIRDataset]) -> Callable[..., CIRDataset]:
        if name in _LOADERS and _LOADERS[name] is not fn:
            raise ValueError(f"dataset loader {name!r} is registered twice")
        _LOADERS[name] = fn
        return fn

    return deco


def _import_all() -> None:
    global _imported
    if not _imported:
        for m in _LOADER_MODULES:
            importlib.import_module(m)
        _imported = True


def list_datasets() -> list[str]:
    _import_all()
    return sorted(_LOADERS)


def load_dataset(name: str, root: str | Path, split: str, **kwargs: Any) -> CIRDataset:
    """Load split ``split`` of dataset ``name`` stored under ``root``. Extra kwargs go to the loader
    (e.g. ``category="dress"`` for FashionIQ)."""
    _import_all()
    if name not in _LOADERS:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(sorted(_LOADERS))}")
    return _LOADERS[name](Path(root), split, **kwargs)
