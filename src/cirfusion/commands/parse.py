"""`cirfusion parse TEXT... | --file F [--json]`: the modification scene graph of each text (entities with their
attributes, relations, edit operations).

Texts come from the command line or from a file with one text per line ("-" reads standard input). Without --json
each text is printed as a short summary; with --json one JSON object per line:
{"text", "entities": [{"name", "attributes", "implicit"}], "relations": [{"subject", "predicate", "object"}],
"edits": [{"op", "entity", "attributes", "from"}]} ("from" on replace edits only).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..options import OptionError, parse_pairs
from ..parsing import PARSERS, SceneGraph, get_parser


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser(
        "parse",
        help="parse modification texts into scene graphs (entities, attributes, relations, edits)",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts to parse")
    p.add_argument("--file", default=None, metavar="F", help="a file with one text per line ('-': standard input)")
    p.add_argument("--json", action="store_true", help="one JSON object per text and line")
    p.add_argument("--backend", default="rules", help="parser backend (rules, seq2seq)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="backend option (repeatable), e.g. implicit_name=shoe, model=DIR for seq2seq")
    p.add_argument("--batch-size", type=int, default=256, help="texts per batch")
    p.set_defaults(func=run)


def read_texts(args: argparse.Namespace) -> list[str]:
    if args.file is not None and args.texts:
        raise OptionError("give texts on the command line or --file, not both")
    if args.file is None:
        if not args.texts:
            raise OptionError("no text to parse: give TEXT... or --file F")
        return list(args.texts)
    if args.file == "-":
        lines = sys.stdin.read().splitlines()
    else:
        path = Path(args.file)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: text file does not exist")
        lines = path.read_text(encoding="utf-8").splitlines()
    return [ln for ln in (x.strip() for x in lines) if ln]


def summary(g: SceneGraph) -> str:
    """A few human-readable lines for one graph."""
    ents = "; ".join(("*" if e.implicit else "") + e.name + (f" [{', '.join(e.attributes)}]" if e.attributes else "")
                     for e in g.entities)
    rels = "; ".join(f"{r.subject} --{r.predicate}--> {r.object}" for r in g.relations)
    edits = "; ".join(f"{e.op} {e.entity}" + (f" [{', '.join(e.attributes)}]" if e.attributes else "") +
                      (f" (from {e.from_})" if e.from_ else "") for e in g.edits)
    return f"{g.text}\n  entities:  {ents or '-'}\n  relations: {rels or '-'}\n  edits:     {edits or '-'}"


def run(args: argparse.Namespace) -> int:
    texts = read_texts(args)
    if args.batch_size < 1:
        raise OptionError(f"--batch-size must be positive, got {args.batch_size}")
    if args.backend not in PARSERS:
        raise OptionError(f"unknown parser backend {args.backend!r}; known: {', '.join(PARSERS.names())}")
    parser = get_parser(args.backend, **parse_pairs(args.option))
    for g in parser.parse_many(texts, batch_size=args.batch_size):
        print(json.dumps(g.to_dict()) if args.json else summary(g))
    return 0
