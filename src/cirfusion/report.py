"""The HTML report: metrics tables per benchmark and sample queries (reference, text, top results, target marked)."""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape

from . import __version__
from .data.images import ImageLoadError, load_image
from .io import atomic_write_bytes, atomic_write_text

THUMB_PX = 128


@dataclass
class ResultItem:
    id: str
    path: Path
    score: float
    is_target: bool


@dataclass
class SampleQuery:
    benchmark: str
    method: str
    qid: str
    text: str
    reference_id: str
    reference_path: Path
    results: list[ResultItem] = field(default_factory=list)
    weights: dict[str, float] | None = None  # a fused model's per-query weight of each base model (explanation)
    # a fused model's per-query exact Shapley contribution of each base model to the target's fused score
    contributions: dict[str, float] | None = None
    # DetailFusion's per-query branch weights alpha ({"gm": a, "di": 1 - a}: global vs detail branch)
    branch_weights: dict[str, float] | None = None
    # FineCIR's parsed scene graph of the query text ({"entities", "relations", "edits"}, cirfusion.parsing's schema)
    graph: dict[str, Any] | None = None


def write_results_json(path: str | Path, results: dict[str, dict[str, dict[str, float]]]) -> None:
    """``results``: benchmark -> method -> metric name -> value."""
    atomic_write_text(path, json.dumps(results, indent=2, sort_keys=False) + "\n")


def _thumb(src: Path, thumbs_dir: Path) -> str:
    """Write (once) a small JPEG of ``src`` under ``thumbs_dir`` and return its path relative to the report."""
    key = hashlib.sha1(str(Path(src).resolve()).encode()).hexdigest()[:16]
    dst = thumbs_dir / f"{key}.jpg"
    if not dst.exists():
        try:
            im = load_image(src)
        except ImageLoadError:
            return ""
        im.thumbnail((THUMB_PX, THUMB_PX))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=85)
        atomic_write_bytes(dst, buf.getvalue())
    return f"{thumbs_dir.name}/{dst.name}"


def graph_lines(graph: dict[str, Any]) -> dict[str, list[str]]:
    """A parsed scene graph as short lines for the report: ``entity: attr, attr`` (``(implicit)`` for an entity the
    text only implies; its places after ``@``), ``subject -predicate-> object`` and ``op entity [attrs] (from X)``."""
    def entity(e: dict[str, Any]) -> str:
        attrs = ", ".join(str(a) for a in e.get("attributes", []))
        places = "; ".join(str(p) for p in e.get("places", []))
        return (f"{e.get('name', '?')}{' (implicit)' if e.get('implicit') else ''}{': ' + attrs if attrs else ''}"
                f"{' @ ' + places if places else ''}")

    def edit(e: dict[str, Any]) -> str:
        attrs = ", ".join(str(a) for a in e.get("attributes", []))
        src = f" (from {e['from']})" if e.get("from") else ""
        return f"{e.get('op', '?')} {e.get('entity', '?')}{' [' + attrs + ']' if attrs else ''}{src}"

    return {"entities": [entity(e) for e in graph.get("entities", [])],
            "relations": [f"{r.get('subject', '?')} -{r.get('predicate', '?')}-> {r.get('object', '?')}"
                          for r in graph.get("relations", [])],
            "edits": [edit(e) for e in graph.get("edits", [])]}


def _best_per_metric(methods: dict[str, dict[str, float]]) -> dict[str, float]:
    best: dict[str, float] = {}
    for metrics in methods.values():
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not k.startswith("num_"):
                best[k] = max(best.get(k, float("-inf")), v)
    return best


def write_report(
    out_dir: str | Path,
    results: dict[str, dict[str, dict[str, float]]],
    samples: list[SampleQuery] | None = None,
    title: str = "cirfusion report",
    wall_time: float | None = None,
    notes: list[str] | None = None,
) -> Path:
    """Render ``report.html`` into ``out_dir`` (thumbnails go to ``out_dir/thumbs``). Returns the report path."""
    out = Path(out_dir)
    thumbs = out / "thumbs"
    thumbs.mkdir(parents=True, exist_ok=True)
    rendered_samples = []
    for s in samples or []:
        rendered_samples.append(
            {
                "benchmark": s.benchmark,
                "method": s.method,
                "qid": s.qid,
                "text": s.text,
                "reference_id": s.reference_id,
                "reference_thumb": _thumb(s.reference_path, thumbs),
                "weights": s.weights,
                "contributions": s.contributions,
                "branch_weights": s.branch_weights,
                "graph": None if s.graph is None else graph_lines(s.graph),
                "results": [
                    {"id": r.id, "thumb": _thumb(r.path, thumbs), "score": float(r.score), "is_target": r.is_target}
                    for r in s.results
                ],
            }
        )
    metric_names = {
        bench: [k for k in dict.fromkeys(k for m in methods.values() for k in m) if not k.startswith("num_")]
        for bench, methods in results.items()
    }
    env = Environment(loader=PackageLoader("cirfusion", "templates"), autoescape=select_autoescape(["html", "j2"]))
    html = env.get_template("report.html.j2").render(
        title=title,
        version=__version__,
        generated=time.strftime("%Y-%m-%d %H:%M:%S"),
        wall_time=wall_time,
        results=results,
        metric_names=metric_names,
        best={b: _best_per_metric(m) for b, m in results.items()},
        samples=rendered_samples,
        notes=notes or [],
    )
    path = out / "report.html"
    atomic_write_text(path, html)
    return path
