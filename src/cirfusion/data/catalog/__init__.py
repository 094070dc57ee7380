"""Embedded benchmark B: composed-retrieval triplets bootstrapped from a labelled photo catalog.

``build_catalog`` turns a folder of photos labelled by category (``<photos>/<split>/<category>/*.jpg``,
``<photos>/<category>/*.jpg`` or a CSV ``path,category[,split]``) into a CIR benchmark; ``load_catalog``
(dataset ``"catalog"``) reads it back. Each photo gets two attributes: its category and the named dominant
colour of the item (:mod:`cirfusion.data.colors`). Query kinds:

- ``category``: "show me a skirt instead" — targets: every gallery image of the new category in the
  reference's colour (the colour comes from the image, the category from the text);
- ``colour``: "same but in red" — every image of the reference's category in the new colour;
- ``both``: "a red skirt instead" — every image of the new category and colour;
- ``edit``: the target is a programmatic edit of the reference photo (recolour the item, mirror, zoom,
  rotate, brightness) and the instruction is the text; the subset is the reference plus all its edits.

Kinds ``category``/``colour``/``both`` list *every* matching gallery image (photos and edits) as a target, so they
are scored with Recall-any and mAP@K. The gallery of a split is its photos plus their edits; every image (photos
included) is stored resized to ``image_size`` in a content-addressed cache, so photos and edits go through the
same resize and JPEG encoding and no model can tell an edit by its compression. The (photo, instruction, edit)
pairs double as image-editing pre-training data (:func:`load_edit_pairs`).

Splits follow the photo folder: ``train``, ``val`` and ``test``, where a folder named ``validation``, ``valid`` or
``dev`` is read as ``val``. Photos without a split (a flat category folder, or a CSV without a split column) get one
from their content hash (80/10/10 by default), which does not depend on the seed.

Directory written by ``build_catalog(..., out=ROOT)``::

    ROOT/annotations/manifest.json        config, source digest, palette, per-photo attributes, counts
    ROOT/annotations/gallery.{split}.jsonl   one image per line: id, path, kind (photo|edit), attributes
    ROOT/annotations/queries.{split}.jsonl   Query.to_dict() per line
    ROOT/annotations/edit_pairs.{split}.jsonl  source, instruction, edited
    ROOT/cache/...                        resized photos, edits and colour analyses, keyed by photo hash

``annotations/`` is written to a temporary directory and renamed into place, so it is always one complete build.
The cache is append-only and reused by later builds (also with other seeds); ``cache_dir`` can point elsewhere
to share it between outputs. A rebuild replaces ``annotations/`` only when an earlier build wrote it (its
manifest names make-catalog as the generator and it holds nothing else).

Modules: ``config`` (versions, kinds, ``CatalogConfig``), ``photos`` (finding and sampling the input photos),
``cache`` (resized photos and colour analyses), ``edits`` (recolour and the geometric/photometric edits),
``wording`` (instruction texts), ``queries`` (the queries of a split), ``generation`` (``build_catalog``),
``loader`` (dataset ``"catalog"``, edit pairs), ``stats`` (statistics, contact sheet).
"""

from __future__ import annotations

from ..generated import EditPair
from .config import (
    ANALYSIS_VERSION,
    EDIT_KINDS,
    EDIT_VERSION,
    FORMAT_VERSION,
    IMAGE_EXTS,
    JPEG_QUALITY,
    QUERY_KINDS,
    RECOLOUR_TARGETS,
    SPLIT_ALIASES,
    SPLITS,
    CatalogConfig,
)
from .edits import apply_edit, recolour
from .generation import build_catalog
from .loader import load_catalog, load_edit_pairs
from .photos import PhotoEntry, read_photo_csv, scan_photo_folder
from .stats import benchmark_stats, contact_sheet, format_stats
from .wording import both_texts, category_texts, colour_texts, edit_texts

__all__ = [
    "ANALYSIS_VERSION",
    "EDIT_KINDS",
    "EDIT_VERSION",
    "FORMAT_VERSION",
    "IMAGE_EXTS",
    "JPEG_QUALITY",
    "QUERY_KINDS",
    "RECOLOUR_TARGETS",
    "SPLITS",
    "SPLIT_ALIASES",
    "CatalogConfig",
    "EditPair",
    "PhotoEntry",
    "apply_edit",
    "benchmark_stats",
    "both_texts",
    "build_catalog",
    "category_texts",
    "colour_texts",
    "contact_sheet",
    "edit_texts",
    "format_stats",
    "load_catalog",
    "load_edit_pairs",
    "read_photo_csv",
    "recolour",
    "scan_photo_folder",
]
