"""Method registry (timm / open_clip style): ``@register_method("name")``, ``list_methods()``, ``create_method()``.

A method is a :class:`~cirfusion.methods.base.CIRMethod` subclass. Registration happens when its module is imported;
``_METHOD_MODULES`` lists the modules shipped with cirfusion, imported lazily on first use so ``import cirfusion``
stays light.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # pragma: no cover
    from .base import CIRMethod, MethodDims

_METHODS: dict[str, type] = {}

# One module per method. Later methods append their module here.
_METHOD_MODULES = [
    "cirfusion.methods.baselines",
    "cirfusion.methods.clip4cir",
    "cirfusion.methods.blip4cir",
    "cirfusion.methods.tgcir",
    "cirfusion.methods.sprc",
    "cirfusion.methods.dafm",
]
_imported = False

T = TypeVar("T", bound=type)


def register_method(name: str) -> Callable[[T], T]:
    """Class decorator: register a :class:`CIRMethod` subclass under ``name`` (sets ``cls.method_name``)."""

    def deco(cls: T) -> T:
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"method {name!r} is registered twice ({_METHODS[name].__qualname__} and {cls.__qualname__})")
        cls.method_name = name  # type: ignore[attr-defined]
        _METHODS[name] = cls
        return cls

    return deco


def _import_all() -> None:
    global _imported
    if not _imported:
        for m in _METHOD_MODULES:
            importlib.import_module(m)
        _imported = True


def list_methods(trainable: bool | None = None) -> list[str]:
    """Names of every registered method, sorted; ``trainable=True/False`` filters on the class flag."""
    _import_all()
    return sorted(n for n, c in _METHODS.items() if trainable is None or bool(c.trainable) == trainable)


def get_method_class(name: str) -> type:
    _import_all()
    if name not in _METHODS:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def create_method(name: str, dims: "MethodDims | Any", **hparams: Any) -> "CIRMethod":
    """Build method ``name`` for the given dimensions.

    ``dims`` is a :class:`MethodDims` or anything with the backbone attributes (a ``Backbone`` instance works:
    its dims, id and weights hash are read from it). Unknown hyper-parameters are an error (a typo must not be
    silently ignored)."""
    from .base import MethodDims

    cls = get_method_class(name)
    if not isinstance(dims, MethodDims):
        dims = MethodDims.from_backbone(dims)
    return cls(dims, **hparams)
