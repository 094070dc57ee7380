"""Parser backends behind one interface: a registry of factories (``rules``: spaCy dependency rules, the default;
``seq2seq``: a local text-to-text scene-graph model through transformers) and the module-level ``parse`` /
``parse_many``, which share one default ``rules`` parser (spaCy loads once per process)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from ..registry import Registry
from .graph import SceneGraph


class Parser(Protocol):
    """What a backend provides: a name and a batched ``parse_many``."""

    name: str

    def parse_many(self, texts: Sequence[str], batch_size: int | None = None) -> list[SceneGraph]: ...


PARSERS: Registry[Any] = Registry("parser", ["cirfusion.parsing.rules", "cirfusion.parsing.seq2seq"])
_DEFAULT: dict[str, Parser] = {}


def get_parser(name: str = "rules", **options: Any) -> Parser:
    """A new parser of backend ``name`` (``cirfusion.parsing.PARSERS.names()``), built with ``options``."""
    return PARSERS.get(name)(**options)  # type: ignore[no-any-return]


def _default() -> Parser:
    if "rules" not in _DEFAULT:
        _DEFAULT["rules"] = get_parser("rules")
    return _DEFAULT["rules"]


def parse(text: str) -> SceneGraph:
    """``text``'s modification scene graph, by the default ``rules`` parser."""
    return _default().parse_many([text])[0]


def parse_many(texts: Sequence[str], batch_size: int = 256) -> list[SceneGraph]:
    """The scene graphs of ``texts``, in order, parsed in batches of ``batch_size`` (spaCy's ``nlp.pipe``)."""
    return _default().parse_many(list(texts), batch_size=batch_size)
