"""The ``seq2seq`` parser backend: a text-to-text scene-graph model (for example FACTUAL's flan-t5 parser) loaded
from a local directory through transformers, for users who have the weights (nothing is downloaded).

The model is asked for ``prefix + text`` and is expected to answer with triples in FACTUAL's format,
``( subject , predicate , object ) , ( subject , is , attribute ) , ...``. Triples with ``is`` / ``are`` give the
subject attributes; the others give relations; every subject and object is an entity. A scene-graph model
says nothing about edit operations, so ``edits="rules"`` (the default) takes them from the ``rules`` backend
(spaCy must be installed) and ``edits="none"`` leaves them empty.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import lexicon as lx
from .backends import PARSERS
from .graph import Edit, Entity, Relation, SceneGraph
from .rules import ParserUnavailable, RuleParser

_TRIPLE = re.compile(r"\(\s*([^,()]+?)\s*,\s*([^,()]+?)\s*,\s*([^,()]+?)\s*\)")
_ATTRIBUTE_PREDICATES = frozenset({"is", "are", "has attribute", "attribute"})


def graph_from_triples(text: str, output: str) -> SceneGraph:
    """A scene graph (no edits) from a model's triple string; text outside well-formed triples is ignored."""
    ents: dict[str, Entity] = {}
    rels: list[Relation] = []

    def ent(name: str) -> Entity:
        name = " ".join(name.lower().split())
        if name not in ents:
            ents[name] = Entity(name)
        return ents[name]

    for s, p, o in _TRIPLE.findall(output):
        subj = ent(s)
        pred = " ".join(p.lower().split())
        if pred in _ATTRIBUTE_PREDICATES:
            attr = " ".join(o.lower().split())
            if attr not in subj.attributes:
                subj.attributes.append(attr)
        else:
            r = Relation(subj.name, pred, ent(o).name)
            if r not in rels:
                rels.append(r)
    return SceneGraph(text, list(ents.values()), rels, [])


@PARSERS.register("seq2seq")
class Seq2SeqParser:
    """Scene graphs from a local seq2seq model (see the module docstring). The model loads on first use."""

    name = "seq2seq"

    def __init__(self, model: str | Path, prefix: str = "Generate Scene Graph: ", max_new_tokens: int = 128,
                 batch_size: int = 32, edits: str = "rules", implicit_name: str = lx.IMPLICIT_NAME,
                 device: str = "cpu") -> None:
        if edits not in ("rules", "none"):
            raise ValueError(f"edits must be 'rules' or 'none', got {edits!r}")
        self.model_dir, self.prefix, self.max_new_tokens = Path(model), prefix, int(max_new_tokens)
        self.batch_size, self.edits, self.device = int(batch_size), edits, device
        self._rules = RuleParser(implicit_name=implicit_name) if edits == "rules" else None
        self._model: Any = None
        self._tok: Any = None

    def load(self) -> None:
        if self._model is not None:
            return
        if not self.model_dir.is_dir():
            raise ParserUnavailable(f"{self.model_dir}: seq2seq parser model directory does not exist")
        try:
            # lazy: transformers is heavy and only this backend needs it
            from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
            self._tok = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
            self._model = AutoModelForSeq2SeqLM.from_pretrained(self.model_dir, local_files_only=True).to(self.device)
        except (OSError, ValueError) as exc:
            raise ParserUnavailable(f"{self.model_dir}: cannot load a seq2seq model and tokenizer: {exc}") from exc
        self._model.eval()

    def generate(self, texts: Sequence[str], batch_size: int | None = None) -> list[str]:
        """The model's raw answers (greedy decoding; ``generate`` runs without gradients)."""
        self.load()
        out: list[str] = []
        bs = batch_size or self.batch_size
        for i in range(0, len(texts), bs):
            batch = [self.prefix + t for t in texts[i:i + bs]]
            enc = self._tok(batch, return_tensors="pt", padding=True, truncation=True).to(self.device)
            ids = self._model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False)
            out.extend(self._tok.batch_decode(ids, skip_special_tokens=True))
        return out

    def parse_many(self, texts: Sequence[str], batch_size: int | None = None) -> list[SceneGraph]:
        graphs = [graph_from_triples(t, o) for t, o in zip(texts, self.generate(list(texts), batch_size), strict=True)]
        if self._rules is not None:
            for g, r in zip(graphs, self._rules.parse_many(texts), strict=True):
                names = {e.name for e in g.entities}
                for e in r.entities:  # an edit names an entity of the graph
                    if e.name not in names and any(x.entity == e.name or x.from_ == e.name for x in r.edits):
                        g.entities.append(e)
                        names.add(e.name)
                g.edits = [Edit(x.op, x.entity, list(x.attributes), x.from_) for x in r.edits]
        return graphs
