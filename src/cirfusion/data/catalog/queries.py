"""Catalog benchmark, queries: gallery images (photos and edits) and the category / colour / both / edit queries of one
split, whose targets list every matching gallery image.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from typing import Any

from ..colors import (
    COLOUR_NAMES,
)
from ..schema import Query
from .config import CatalogConfig, _h
from .wording import both_texts, category_texts, colour_texts, edit_texts


@dataclass
class _Image:
    id: str
    path: str  # relative to the output root when inside it, else absolute
    kind: str  # "photo" or "edit"
    category: str
    colour: str
    source: str  # the photo id it comes from (itself for a photo)
    edit: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if v is not None}
        return d


def _make_queries(
    gallery: list[_Image], edits_of: dict[str, list[_Image]], cfg: CatalogConfig
) -> tuple[list[Query], Counter]:
    """Queries of one split. Targets list every matching gallery image in gallery order."""
    by_attr: dict[tuple[str, str], list[_Image]] = defaultdict(list)
    for im in gallery:
        by_attr[(im.category, im.colour)].append(im)
    categories = sorted({im.category for im in gallery})
    colours = [c for c in COLOUR_NAMES if any(im.colour == c for im in gallery)]
    queries: list[Query] = []
    skipped: Counter = Counter()

    total = {a: len(v) for a, v in by_attr.items()}

    def matches(cat: str, col: str) -> list[str]:
        return [im.id for im in by_attr.get((cat, col), ())]

    for im in gallery:
        if im.kind != "photo":
            continue
        # The reference and its own edits do not count towards the minimum: the text must pick out other items.
        own = Counter((x.category, x.colour) for x in [im, *edits_of.get(im.id, [])])

        def enough(cat: str, col: str, own: Counter = own) -> bool:  # bound now: a closure would see later photos
            return total.get((cat, col), 0) - own[(cat, col)] >= cfg.min_positives

        rng = random.Random(_h(cfg.seed, "queries", im.id))
        base_meta = {"ref_category": im.category, "ref_colour": im.colour}
        if "category" in cfg.kinds:
            opts = [c for c in categories if c != im.category and enough(c, im.colour)]
            if opts:
                c = rng.choice(opts)
                caps = category_texts(c)
                queries.append(
                    Query(
                        qid=f"category:{im.id}",
                        reference=im.id,
                        text=rng.choice(caps),
                        targets=tuple(matches(c, im.colour)),
                        captions=tuple(caps),
                        meta={"kind": "category", **base_meta, "target_category": c, "target_colour": im.colour},
                    )
                )
            else:
                skipped["category"] += 1
        if "colour" in cfg.kinds:
            opts = [k for k in colours if k != im.colour and enough(im.category, k)]
            if opts:
                k = rng.choice(opts)
                caps = colour_texts(im.category, k)
                queries.append(
                    Query(
                        qid=f"colour:{im.id}",
                        reference=im.id,
                        text=rng.choice(caps),
                        targets=tuple(matches(im.category, k)),
                        captions=tuple(caps),
                        meta={"kind": "colour", **base_meta, "target_category": im.category, "target_colour": k},
                    )
                )
            else:
                skipped["colour"] += 1
        if "both" in cfg.kinds:
            pairs = [(c, k) for c in categories for k in colours if c != im.category and k != im.colour and enough(c, k)]
            if pairs:
                c, k = rng.choice(pairs)
                caps = both_texts(c, k)
                queries.append(
                    Query(
                        qid=f"both:{im.id}",
                        reference=im.id,
                        text=rng.choice(caps),
                        targets=tuple(matches(c, k)),
                        captions=tuple(caps),
                        meta={"kind": "both", **base_meta, "target_category": c, "target_colour": k},
                    )
                )
            else:
                skipped["both"] += 1
        if "edit" in cfg.kinds:
            edits = edits_of.get(im.id, [])
            subset = (im.id, *(e.id for e in edits))
            for e in edits:
                assert e.edit is not None
                caps = edit_texts(e.edit["kind"], e.edit["params"], im.category)
                queries.append(
                    Query(
                        qid=f"edit:{e.id}",
                        reference=im.id,
                        text=rng.choice(caps),
                        targets=(e.id,),
                        captions=tuple(caps),
                        subset=subset,
                        meta={"kind": "edit", **base_meta, "edit": e.edit, "target_colour": e.colour},
                    )
                )
    return queries, skipped
