"""Backbones: one protocol (``Backbone``), created by name with :func:`create_backbone`.

A backbone name is ``family`` or ``family:argument``:

- ``embedded`` / ``embedded:resolution=160,tokens=stride32`` - EfficientNet-Lite0 + all-MiniLM-L6-v2, offline;
- ``colour`` - a colour-layout descriptor (CIELab thumbnail, no learned weights) + all-MiniLM-L6-v2, offline: a
  second image view, for base-model diversity in fusion;
- ``tiny`` / ``tiny:seed=1`` - small random backbone for tests;
- ``hf-clip:<dir or hub id>`` (CLIP, SigLIP) and ``hf-blip2:<dir or hub id>`` (BLIP-2 Q-Former); their options
  follow a ``?``: ``hf-clip:/models/clip?tokens=projected``;
- ``multi:ID1|ID2|...`` - several backbones side by side (a fused model over base models on different backbones).

Options are ``KEY=VALUE`` with JSON values (:mod:`cirfusion.options`), checked against the family's options receiver
(its constructor): an unknown key or a wrong type is refused with the valid keys. Keyword arguments given to
:func:`create_backbone` override options in the name. Every backbone's ``backbone_id`` is canonical (defaults
omitted, keys sorted), so ``create_backbone(b.backbone_id)`` rebuilds it - checkpoints and feature-cache keys store
that id.

Downloads and untrusted ids. Hub ids are read from the local Hugging Face cache only, unless ``allow_download=True``
(CLI ``--allow-download``). A backbone id read from a checkpoint is checked with :func:`check_backbone_access` before
anything is read: a located backbone's directory must lie under a directory the user gave (``backbone_dirs``, CLI
``--backbone-dir``) and a hub id needs ``allow_download`` - so a checkpoint can neither trigger a download nor make
cirfusion read a directory the user did not name.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from ..errors import CirfusionError, UnknownNameError
from ..options import OptionError, accepted_options, check_options, parse_pairs, split_option_string
from ..registry import Registry
from .base import Backbone, ImageFeatures, TextFeatures

BackboneFactory = Callable[..., Backbone]

# Modules whose import registers backbones; imported on first look-up so `import cirfusion` stays light
# (the heavy libraries are imported inside the factories).
BACKBONES: Registry[BackboneFactory] = Registry(
    "backbone",
    [
        "cirfusion.backbones.embedded",
        "cirfusion.backbones.tiny",
        "cirfusion.backbones.hf_clip",
        "cirfusion.backbones.hf_blip2",
        "cirfusion.backbones.multi",
        "cirfusion.backbones.colour",
    ],
)
MULTI = "multi"  # the composite family: its argument is a list of backbone names
MULTI_SEP = "|"  # separates the parts of a multi: name

# Whether hub ids may be downloaded, for the backbones being built now (create_backbone sets it, so a composite's
# parts, built by nested create_backbone calls, inherit it).
_ALLOW_DOWNLOAD: ContextVar[bool] = ContextVar("cirfusion_allow_download", default=False)
# Whether the backbone being built comes from an id stored in a checkpoint (backbone_from_checkpoint sets it; a
# composite's parts inherit it): a family whose option default changed reads an omitted option as the old default.
_STORED_ID: ContextVar[bool] = ContextVar("cirfusion_stored_id", default=False)


class BackboneAccessError(CirfusionError, PermissionError):
    """A backbone id (typically read from a checkpoint) that would download or read outside the allowed places."""


def register_backbone(name: str, located: bool = False,
                      options: Callable[..., Any] | type | None = None) -> Callable[[BackboneFactory], BackboneFactory]:
    """Decorator: register ``factory(location=None, **options) -> Backbone`` under ``name``.

    ``located=True``: the part after ``name:`` is a directory or hub id passed as ``location``; options then follow
    a ``?``. Otherwise the part after ``name:`` is ``key=value`` options. ``options``: what the options are checked
    against (a callable or class whose keyword parameters are the valid options; default: the factory itself; a
    factory that only takes ``**kw`` and names no receiver checks its options itself).
    """
    return BACKBONES.register(name, located=located, options=options)


def list_backbones() -> list[str]:
    """Registered backbone families (``hf-*`` families need a location: ``hf-clip:<dir>``)."""
    return BACKBONES.names()


def downloads_allowed() -> bool:
    """Whether the backbone being built may download hub files (see :func:`create_backbone`)."""
    return _ALLOW_DOWNLOAD.get()


def reading_stored_id() -> bool:
    """Whether the backbone being built is named by an id read from a checkpoint (see :func:`backbone_from_checkpoint`)."""
    return _STORED_ID.get()


def _accepted(family: str) -> dict[str, tuple[Any, Any]] | None:
    """``name -> (type, default)`` of a family's options; None when its receiver only takes ``**kw``."""
    receiver = BACKBONES.meta(family).get("options") or BACKBONES.get(family)
    accepted = accepted_options(receiver, skip=("location", "self"))
    if not accepted:
        params = inspect.signature(receiver).parameters.values()
        if any(p.kind is p.VAR_KEYWORD for p in params):
            return None
    return accepted


def _checked(family: str, opts: dict[str, Any], what: str) -> dict[str, Any]:
    accepted = _accepted(family)
    return opts if accepted is None else check_options(opts, accepted, what)


def parse_backbone_name(name: str) -> tuple[str, str | None, dict[str, Any]]:
    """``"hf-clip:/m/clip?tokens=projected"`` -> ``("hf-clip", "/m/clip", {"tokens": "projected"})``.

    Options are checked against the family (unknown key or wrong type: :class:`~cirfusion.options.OptionError`)."""
    if not isinstance(name, str) or not name.strip():
        raise OptionError(f"a backbone name must be a non-empty string, got {name!r}")
    family, _, rest = name.partition(":")
    family = family.strip()
    if family not in BACKBONES:
        raise UnknownNameError(f"unknown backbone {family!r} (from {name!r}); known: {', '.join(BACKBONES.names())}")
    what = f"backbone {name!r}"
    if family == MULTI:  # its argument is a list of backbone names, each with its own options: taken verbatim
        if not rest.strip():
            raise OptionError(f"backbone {MULTI!r} needs its parts: {MULTI}:ID1{MULTI_SEP}ID2...")
        return family, rest.strip(), {}
    if BACKBONES.meta(family).get("located"):
        location, _, opts = rest.partition("?")
        if not location.strip():
            raise OptionError(f"backbone {family!r} needs a location: {family}:<directory or hub id>")
        return family, location.strip(), _checked(family, parse_pairs(split_option_string(opts), what), what)
    return family, None, _checked(family, parse_pairs(split_option_string(rest.replace("?", ",")), what), what)


@contextlib.contextmanager
def _downloads(allowed: bool | None) -> Iterator[None]:
    if allowed is None:  # inherit (a composite's parts)
        yield
        return
    token = _ALLOW_DOWNLOAD.set(bool(allowed))
    try:
        yield
    finally:
        _ALLOW_DOWNLOAD.reset(token)


def create_backbone(name: str, *, allow_download: bool | None = None, **kw: Any) -> Backbone:
    """Build a backbone by name (see the module docstring); ``kw`` overrides options given in the name.

    ``allow_download``: let ``hf-*`` backbones download a hub id that is not in the local Hugging Face cache
    (default: no; None inherits the setting of an enclosing ``create_backbone``, as a composite's parts do)."""
    family, location, opts = parse_backbone_name(name)
    if kw:
        opts.update(_checked(family, kw, f"backbone {name!r}"))
    factory = BACKBONES.get(family)
    with _downloads(allow_download):
        if BACKBONES.meta(family).get("located"):
            return factory(location, **opts)
        return factory(**opts)


def _looks_like_path(location: str) -> bool:
    """A directory rather than a hub id ("name" or "org/name"): what transformers would read from disk."""
    return location.startswith((".", "/", "~")) or location.count("/") > 1 or Path(location).expanduser().exists()


def check_backbone_access(backbone_id: str, backbone_dirs: Iterable[str | os.PathLike[str]] = (),
                          allow_download: bool = False, source: str | os.PathLike[str] | None = None) -> None:
    """Refuse a backbone id (from an untrusted place, e.g. a checkpoint's ``config.json``) that would read outside
    ``backbone_dirs`` or need the Hugging Face hub, before anything is read.

    Non-located families (``embedded``, ``colour``, ``tiny``) read only files shipped with cirfusion and are always
    allowed; their options are still checked. A located family's directory must exist and lie (after resolving
    symlinks) inside one of ``backbone_dirs``; a hub id needs ``allow_download=True``. ``multi:`` parts are checked
    one by one. ``source`` names where the id came from, for the error message.
    """
    where = f"{source}: " if source is not None else ""
    roots = [Path(d).expanduser().resolve() for d in backbone_dirs]
    family, location, _ = parse_backbone_name(backbone_id)
    if family == MULTI:
        for part in str(location).split(MULTI_SEP):
            check_backbone_access(part.strip(), roots, allow_download, source)
        return
    if location is None:
        return
    if _looks_like_path(location):
        real = Path(location).expanduser().resolve()
        if not any(real == r or r in real.parents for r in roots):
            given = ", ".join(str(r) for r in roots) or "none"
            raise BackboneAccessError(
                f"{where}backbone {backbone_id!r} reads the directory {location}, which is not under a backbone "
                f"directory you gave (given: {given}); pass --backbone-dir {location} (API: backbone_dirs=[...]) to "
                "allow it, or give the backbone itself")
        if not real.is_dir():
            raise BackboneAccessError(f"{where}backbone {backbone_id!r}: {location} is not a directory")
        return
    if not allow_download:
        raise BackboneAccessError(
            f"{where}backbone {backbone_id!r} names the hub id {location!r}; a checkpoint's backbone is not fetched "
            "from the Hugging Face hub (or its cache) unless you pass --allow-download (API: allow_download=True); or "
            "save the model to a directory and pass --backbone-dir DIR")


def backbone_from_checkpoint(backbone_id: str, source: str | os.PathLike[str] | None = None,
                             backbone_dirs: Sequence[str | os.PathLike[str]] = (), allow_download: bool = False) -> Backbone:
    """:func:`check_backbone_access`, then :func:`create_backbone`: how a backbone id read from a checkpoint is built.

    An id stored before a family's option default changed omits that option with the old default in mind: while it
    is built, :func:`reading_stored_id` is true (``embedded`` then reads a missing ``precision`` as fp32)."""
    check_backbone_access(backbone_id, backbone_dirs, allow_download, source)
    token = _STORED_ID.set(True)
    try:
        return create_backbone(backbone_id, allow_download=allow_download)
    finally:
        _STORED_ID.reset(token)


__all__ = [
    "BACKBONES",
    "Backbone",
    "BackboneAccessError",
    "ImageFeatures",
    "TextFeatures",
    "backbone_from_checkpoint",
    "check_backbone_access",
    "create_backbone",
    "downloads_allowed",
    "list_backbones",
    "parse_backbone_name",
    "reading_stored_id",
    "register_backbone",
]
