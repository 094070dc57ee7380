"""Parser accuracy and speed: on the synthetic benchmark's fine and coarse texts against the generator's own edit
graphs (:mod:`cirfusion.data.synthetic.graphs`), and on a hand-annotated set of real captions (a JSONL file of
:meth:`SceneGraph.to_dict` rows with a ``source`` field, e.g. ``tests/data/parser_dev.jsonl``). A row may name its
text by reference instead -- ``"text_ref": {"file": PATH, "sha256": HEX}``, PATH relative to the real-data folder
(``../shared/data``) and HEX the hash of the stripped caption -- so that captions of the public datasets are read
from the user's copy and never stored in this repository.

Not imported by ``cirfusion.parsing`` itself (it reads the synthetic generator's modules).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..data.schema import Query
from ..data.synthetic.graphs import canonical, coarse_graph, fine_graph
from .backends import Parser, get_parser
from .graph import ParseGraphError, SceneGraph
from .scoring import score_graphs

# The implicit entity's name by caption source: FashionIQ's subject-less captions speak of a garment, Shoes' of a
# shoe; the synthetic texts' "it" is an object. (The scorer treats implicit entities as one name anyway.)
IMPLICIT_BY_SOURCE = {"shoes": "shoe", "synthetic": "it"}
DEFAULT_IMPLICIT = "garment"
SCORE_KEYS = ("entity_f1", "attribute_f1", "relation_f1", "edit_f1", "edit_op_accuracy")


def _strings(obj: Any) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def _resolver(data_root: Path | None) -> Callable[[dict[str, Any], str], str | None]:
    """``resolve(text_ref, where)``: the caption a reference names, or None when the data folder is absent."""
    by_file: dict[str, dict[str, str]] = {}

    def resolve(ref: dict[str, Any], where: str) -> str | None:
        if data_root is None or not data_root.is_dir():
            return None
        rel = str(ref.get("file", ""))
        if rel.startswith("/") or ".." in Path(rel).parts:
            raise ParseGraphError(f"{where}: text_ref file {rel!r} must be a path inside the data folder")
        if rel not in by_file:
            try:
                data = json.loads((data_root / rel).read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ParseGraphError(f"{where}: cannot read {data_root / rel}: {exc}") from exc
            by_file[rel] = {hashlib.sha256(t.strip().encode()).hexdigest(): t.strip() for t in _strings(data)}
        text = by_file[rel].get(str(ref.get("sha256", "")))
        if text is None:
            raise ParseGraphError(f"{where}: no caption in {data_root / rel} has sha256 {ref.get('sha256')!r}")
        return text

    return resolve


def load_annotated(path: str | Path, data_root: str | Path | None = None) -> list[tuple[str, SceneGraph]]:
    """(source, gold graph) per line of an annotated JSONL file. Rows that name their text by ``text_ref`` are read
    from ``data_root`` (the real-data folder); without it they are left out."""
    resolve = _resolver(Path(data_root) if data_root is not None else None)
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                d = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ParseGraphError(f"{where}: not JSON: {exc}") from exc
            if "text_ref" in d:
                text = resolve(d["text_ref"], where)
                if text is None:
                    continue
                d = {**{k: v for k, v in d.items() if k != "text_ref"}, "text": text}
            out.append((str(d.get("source", "")), SceneGraph.from_dict(d, where)))
    return out


def _rounded(d: dict[str, Any]) -> dict[str, float]:
    return {k: round(float(d[k]), 4) for k in SCORE_KEYS}


def score_annotated(path: str | Path, backend: str = "rules", data_root: str | Path | None = None,
                    **options: Any) -> dict[str, Any]:
    """Scores of ``backend`` on an annotated file: overall and by source (each source parsed with its implicit
    entity name); ``data_root`` resolves the rows' ``text_ref`` captions (:func:`load_annotated`)."""
    items = load_annotated(path, data_root)
    by_source: dict[str, list[int]] = {}
    for i, (src, _) in enumerate(items):
        by_source.setdefault(src.split("-")[0], []).append(i)
    pred: list[SceneGraph | None] = [None] * len(items)
    for src, idx in by_source.items():
        parser = get_parser(backend, implicit_name=IMPLICIT_BY_SOURCE.get(src, DEFAULT_IMPLICIT), **options)
        for i, g in zip(idx, parser.parse_many([items[i][1].text for i in idx]), strict=True):
            pred[i] = g
    preds = [p for p in pred if p is not None]
    gold = [g for _, g in items]
    out: dict[str, Any] = {"n_texts": len(items), **_rounded(score_graphs(preds, gold).to_dict())}
    out["by_source"] = {src: {"n_texts": len(idx), **_rounded(score_graphs([preds[i] for i in idx],
                                                                          [gold[i] for i in idx]).to_dict())}
                        for src, idx in sorted(by_source.items())}
    return out


def synthetic_gold(queries: Sequence[Query]) -> tuple[list[SceneGraph], list[SceneGraph]]:
    """The generator's graphs of the queries' fine texts and of their coarse texts."""
    implicit = IMPLICIT_BY_SOURCE["synthetic"]
    return [fine_graph(q, implicit) for q in queries], [coarse_graph(q, implicit) for q in queries]


def score_synthetic(queries: Sequence[Query], parser: Parser | None = None) -> dict[str, Any]:
    """Scores on the synthetic queries' fine and coarse texts (synonyms scored as the generator's value) and
    both together."""
    parser = parser or get_parser("rules", implicit_name=IMPLICIT_BY_SOURCE["synthetic"])
    fine, coarse = synthetic_gold(queries)
    pf = parser.parse_many([g.text for g in fine])
    pc = parser.parse_many([g.text for g in coarse])
    return {"n_queries": len(queries),
            "fine": _rounded(score_graphs(pf, fine, normalise=canonical).to_dict()),
            "coarse": _rounded(score_graphs(pc, coarse, normalise=canonical).to_dict()),
            "all": _rounded(score_graphs(pf + pc, fine + coarse, normalise=canonical).to_dict())}


def throughput(texts: Sequence[str], parser: Parser | None = None, batch_size: int = 256) -> dict[str, float]:
    """Texts per second of ``parser.parse_many`` over ``texts`` after a warm-up: by wall clock and by this
    process's CPU time (the second does not drop when other processes share the cores)."""
    parser = parser or get_parser("rules")
    parser.parse_many(list(texts[:32]))  # loads the model
    w0, c0 = time.perf_counter(), time.process_time()
    parser.parse_many(list(texts), batch_size=batch_size)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    return {"n_texts": len(texts), "texts_per_s": round(len(texts) / wall, 1),
            "texts_per_cpu_s": round(len(texts) / max(cpu, 1e-9), 1)}
