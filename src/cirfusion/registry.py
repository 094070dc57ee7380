"""One registry implementation (timm's ``@register_model`` / ``list_models()``), used for methods, backbones and
datasets.

Entries register themselves when their module is imported; each registry lists its built-in modules by name and
imports them on first look-up, so ``import cirfusion`` stays light and a plug-in can register more at any time.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, TypeVar

from .errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> entry (a class or a factory), with per-entry metadata (e.g. a backbone family's ``located`` flag)."""

    def __init__(self, kind: str, modules: Sequence[str] = ()) -> None:
        self.kind = kind  # "method", "backbone", ... (in error messages)
        self.modules = list(modules)
        self._entries: dict[str, T] = {}
        self._meta: dict[str, dict[str, Any]] = {}
        self._loaded = False
        self._loading = False

    def register(self, name: str, **meta: Any) -> Callable[[T], T]:
        """Decorator: register the decorated object under ``name``. Registering another object under a taken name
        is an error (re-registering the same object, as a module reload does, is not)."""

        def deco(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            self._meta[name] = dict(meta)
            return obj

        return deco

    def unregister(self, name: str) -> None:
        """Remove ``name`` (for tests that register temporary entries)."""
        self._entries.pop(name, None)
        self._meta.pop(name, None)

    def load(self) -> None:
        """Import the built-in modules (once): their imports register the built-in entries."""
        if self._loaded or self._loading:  # _loading: a built-in module looking names up while it registers
            return
        self._loading = True
        try:
            for m in self.modules:
                importlib.import_module(m)
            self._loaded = True  # only once all loaded: a failed import is raised again, never a partial registry
        finally:
            self._loading = False

    def names(self) -> list[str]:
        self.load()
        return sorted(self._entries)

    def get(self, name: str) -> T:
        self.load()
        if name not in self._entries:
            raise UnknownNameError(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._entries))}")
        return self._entries[name]

    def meta(self, name: str) -> dict[str, Any]:
        self.get(name)
        return self._meta[name]

    def __contains__(self, name: object) -> bool:
        self.load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())
