"""Backbones: one protocol (``Backbone``), created by name with :func:`create_backbone`.

A backbone name is ``family`` or ``family:argument``:

- ``embedded`` / ``embedded:resolution=160,tokens=stride32`` — EfficientNet-Lite0 + all-MiniLM-L6-v2, offline;
- ``colour`` — a colour-layout descriptor (CIELab thumbnail, no learned weights) + all-MiniLM-L6-v2, offline: a
  second image view, for base-model diversity in fusion;
- ``tiny`` / ``tiny:seed=1`` — small random backbone for tests;
- ``hf-clip:<dir or hub id>`` (CLIP, SigLIP) and ``hf-blip2:<dir or hub id>`` (BLIP-2 Q-Former); their options
  follow a ``?``: ``hf-clip:/models/clip?tokens=projected``;
- ``multi:ID1|ID2|...`` — several backbones side by side (a fused model over base models on different backbones).

Keyword arguments given to :func:`create_backbone` override options in the name. Every backbone's ``backbone_id`` is
canonical (defaults omitted), so ``create_backbone(b.backbone_id)`` rebuilds it — checkpoints store that id.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from ._util import parse_options
from .base import Backbone, ImageFeatures, TextFeatures

BackboneFactory = Callable[..., Backbone]

_FACTORIES: dict[str, BackboneFactory] = {}
# Families whose argument is a location (directory or hub id) rather than key=value options.
_LOCATED: set[str] = set()

# Modules whose import registers backbones; imported on first use so `import cirfusion` stays light
# (the heavy libraries are imported inside the factories).
_BACKBONE_MODULES = [
    "cirfusion.backbones.embedded",
    "cirfusion.backbones.tiny",
    "cirfusion.backbones.hf_clip",
    "cirfusion.backbones.hf_blip2",
    "cirfusion.backbones.multi",
    "cirfusion.backbones.colour",
]
_imported = False


def register_backbone(name: str, located: bool = False) -> Callable[[BackboneFactory], BackboneFactory]:
    """Decorator: register ``factory(location=None, **options) -> Backbone`` under ``name``.

    ``located=True``: the part after ``name:`` is a directory or hub id passed as ``location``; options then follow
    a ``?``. Otherwise the part after ``name:`` is ``key=value`` options.
    """

    def deco(fn: BackboneFactory) -> BackboneFactory:
        if name in _FACTORIES and _FACTORIES[name] is not fn:
            raise ValueError(f"backbone {name!r} is registered twice")
        _FACTORIES[name] = fn
        if located:
            _LOCATED.add(name)
        return fn

    return deco


def _import_all() -> None:
    global _imported
    if not _imported:
        for m in _BACKBONE_MODULES:
            importlib.import_module(m)
        _imported = True


def list_backbones() -> list[str]:
    """Registered backbone families (``hf-*`` families need a location: ``hf-clip:<dir>``)."""
    _import_all()
    return sorted(_FACTORIES)


def parse_backbone_name(name: str) -> tuple[str, str | None, dict[str, Any]]:
    """``"hf-clip:/m/clip?tokens=projected"`` -> ``("hf-clip", "/m/clip", {"tokens": "projected"})``."""
    _import_all()
    family, sep, rest = name.partition(":")
    family = family.strip()
    if family not in _FACTORIES:
        raise KeyError(f"unknown backbone {family!r} (from {name!r}); known: {', '.join(sorted(_FACTORIES))}")
    if family == "multi":  # its argument is a list of backbone names, each with its own options: taken verbatim
        if not rest.strip():
            raise ValueError("backbone 'multi' needs its parts: multi:ID1|ID2...")
        return family, rest.strip(), {}
    if family in _LOCATED:
        location, _, opts = rest.partition("?")
        if not location.strip():
            raise ValueError(f"backbone {family!r} needs a location: {family}:<directory or hub id>")
        return family, location.strip(), parse_options(opts, f"backbone {name!r}")
    if "?" in rest:
        rest = rest.replace("?", ",")
    return family, None, parse_options(rest, f"backbone {name!r}")


def create_backbone(name: str, **kw: Any) -> Backbone:
    """Build a backbone by name (see the module docstring); ``kw`` overrides options given in the name."""
    family, location, opts = parse_backbone_name(name)
    opts.update(kw)
    factory = _FACTORIES[family]
    if family in _LOCATED:
        return factory(location, **opts)
    return factory(**opts)


__all__ = [
    "Backbone",
    "ImageFeatures",
    "TextFeatures",
    "create_backbone",
    "list_backbones",
    "parse_backbone_name",
    "register_backbone",
]
