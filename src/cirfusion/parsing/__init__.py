"""Modification-text parsing: a text ("make the dress red and add a belt") as a scene graph of entities,
attributes, relations and edit operations (see :mod:`cirfusion.parsing.graph` for the schema).

``parse(text)`` and ``parse_many(texts)`` use the default ``rules`` backend (spaCy dependency rules); other
backends are in :data:`PARSERS` and built with :func:`get_parser`.
"""

from __future__ import annotations

from .backends import PARSERS, Parser, get_parser, parse, parse_many
from .graph import EDIT_OPS, Edit, Entity, ParseGraphError, Relation, SceneGraph
from .rules import ParserUnavailable, RuleParser
from .scoring import GraphScores, score_graphs

__all__ = ["EDIT_OPS", "PARSERS", "Edit", "Entity", "GraphScores", "ParseGraphError", "Parser", "ParserUnavailable",
           "Relation", "RuleParser", "SceneGraph", "get_parser", "parse", "parse_many", "score_graphs"]
