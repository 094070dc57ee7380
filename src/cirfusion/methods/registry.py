"""Method registry (timm / open_clip style): ``@register_method("name")``, ``list_methods()``, ``create_method()``.

A method is a :class:`~cirfusion.methods.base.CIRMethod` subclass. Registration happens when its module is imported;
``METHODS`` lists the modules shipped with cirfusion and imports them on first look-up, so ``import cirfusion``
stays light.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from ..registry import Registry
from .base import CIRMethod, MethodDims

# One module per method. Later methods append their module here.
METHODS: Registry[type[CIRMethod]] = Registry("method", [
    "cirfusion.methods.baselines",
    "cirfusion.methods.clip4cir",
    "cirfusion.methods.blip4cir",
    "cirfusion.methods.tgcir",
    "cirfusion.methods.sprc",
    "cirfusion.methods.dafm",
    "cirfusion.methods.detailfusion",
    "cirfusion.methods.finecir",
])

M = TypeVar("M", bound=type[CIRMethod])


def register_method(name: str) -> Callable[[M], M]:
    """Class decorator: register a :class:`CIRMethod` subclass under ``name`` (sets ``cls.method_name``)."""

    def deco(cls: M) -> M:
        METHODS.register(name)(cls)  # raises first when the name is taken by another class
        cls.method_name = name
        return cls

    return deco


def list_methods(trainable: bool | None = None) -> list[str]:
    """Names of every registered method, sorted; ``trainable=True/False`` filters on the class flag."""
    return [n for n in METHODS.names() if trainable is None or bool(METHODS.get(n).trainable) == trainable]


def get_method_class(name: str) -> type[CIRMethod]:
    return METHODS.get(name)


def create_method(name: str, dims: MethodDims | Any, **hparams: Any) -> CIRMethod:
    """Build method ``name`` for the given dimensions.

    ``dims`` is a :class:`MethodDims` or anything with the backbone attributes (a ``Backbone`` instance works:
    its dims, id and weights hash are read from it). Unknown hyper-parameters, or values of the wrong type, are an
    error (a typo must not be silently ignored)."""
    cls = get_method_class(name)
    if not isinstance(dims, MethodDims):
        dims = MethodDims.from_backbone(dims)
    return cls(dims, **hparams)
