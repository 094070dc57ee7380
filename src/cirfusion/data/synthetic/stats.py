"""Synthetic benchmark, statistics of a written benchmark, read from its files only.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from .loader import _read_manifest, load_edit_pairs, load_synthetic
from .scenes import DETAIL_KINDS, EDIT_KINDS


def benchmark_stats(root: str | Path) -> dict[str, Any]:
    """Statistics of a written benchmark, read from its files: per split the gallery size, clusters, queries,
    edits per query, edit kinds, subset sizes, held-out share, coarse texts that omit an edit, words per text,
    distractor details and edit pairs."""
    root = Path(root)
    m = _read_manifest(root)
    splits: dict[str, Any] = {}
    for split in m["splits"]:
        ds = load_synthetic(root, split, text="fine")
        n_q = len(ds.queries)
        per_q = Counter(int(q.meta.get("n_edits", 0)) for q in ds.queries)
        kinds = Counter(k for q in ds.queries for k in q.meta.get("edit_kinds", ()))
        sub = Counter(len(q.subset or ()) for q in ds.queries)
        dd = Counter(v for q in ds.queries for v in q.meta.get("distractor_details", {}).values())
        ho = sum(bool(q.meta.get("held_out")) for q in ds.queries)
        omitted = sum(int(q.meta.get("coarse_omitted", 0)) > 0 for q in ds.queries)
        pairs = load_edit_pairs(root, split)
        splits[split] = {
            "images": len(ds.gallery),
            "clusters": m["splits"][split].get("clusters"),
            "queries": n_q,
            "edits_per_query": {str(k): per_q[k] for k in sorted(per_q)},
            "edit_kinds": {k: kinds[k] for k in EDIT_KINDS},
            "subset_sizes": {str(k): sub[k] for k in sorted(sub)},
            "distractor_details": {k: dd[k] for k in DETAIL_KINDS},
            "held_out_queries": ho,
            "held_out_share": round(ho / n_q, 4) if n_q else 0.0,
            "coarse_omits_an_edit_share": round(omitted / n_q, 4) if n_q else 0.0,
            "words_per_text": {
                "coarse": round(sum(len(q.captions[0].split()) for q in ds.queries) / max(1, n_q), 2),
                "fine": round(sum(len(q.captions[1].split()) for q in ds.queries) / max(1, n_q), 2),
            },
            "edit_pairs": len(pairs),
            "edit_pair_kinds": dict(sorted(Counter(p.kind for p in pairs).items())),
        }
    return {
        "root": str(root),
        "generator_version": m.get("generator_version"),
        "seed": m.get("seed"),
        "image_size": m.get("image_size"),
        "held_out_combos": m.get("held_out_combos"),
        "splits": splits,
    }

