"""Image-editing pairs as a CIR dataset, and the InstructPix2Pix layout (dataset ``"ip2p"``).

DetailFusion pre-trains its detail branch on image-editing pairs (IPr2Pr: InstructPix2Pix-style, one atomic edit per
pair). A pair is a composed-retrieval query like any other -- reference = the source image, text = the edit
instruction, target = the edited image -- so :func:`edit_pairs_dataset` turns any list of
:class:`~cirfusion.data.generated.EditPair` (the synthetic benchmark's atomic edits, the catalog's photo edits, the
pairs of an InstructPix2Pix folder) into a :class:`CIRDataset` that a training stage can name in ``Stage.split``.

The InstructPix2Pix layout (the released ``clip-filtered-dataset`` / ``random-sample-dataset`` folders)::

    DIR/<prompt-id>/prompt.json     {"input": caption of the source, "edit": the instruction, "output": caption of
                                     the edited image}
    DIR/<prompt-id>/<seed>_0.jpg    the source image of one sample
    DIR/<prompt-id>/<seed>_1.jpg    the edited image of the same sample

Every ``<seed>`` with both images is one pair (a prompt folder may hold several seeds). Splits: ``edit_pairs``
(every pair), ``train`` and ``val`` (prompt ids split by a hash: about ``VAL_SHARE`` of the prompts are ``val``, the
same ones on every machine). Query texts are the ``edit`` instructions; ``captions`` holds (edit, input, output).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .generated import EditPair
from .registry import register_dataset
from .schema import CIRDataset, DataError, Gallery, Query

VAL_SHARE = 0.05
IP2P_SPLITS = ("edit_pairs", "train", "val")
IP2P_KIND = "instruction"  # InstructPix2Pix edits are free-form: one kind
_IMAGE = re.compile(r"^(?P<seed>[^_/]+)_(?P<side>[01])\.(?:jpg|jpeg|png)$", re.IGNORECASE)


def edit_pairs_dataset(pairs: Sequence[EditPair], name: str = "edit-pairs", split: str = "edit_pairs",
                       root: Path | None = None, files: Sequence[Path] = (), qid_prefix: str = "edit") -> CIRDataset:
    """A CIR dataset of edit pairs: one query per pair (reference = source, text = instruction, target = edited).

    The gallery holds every image the pairs name, in order of first appearance. Pairs with several wordings
    (``EditPair.instructions``, the catalog's) train on a random one of them each epoch (text policy ``random``);
    evaluation uses ``instruction``. A pair whose source and edited image are the same id is an error."""
    if not pairs:
        raise DataError(root, None, f"{name}/{split}: no edit pairs")
    ids: dict[str, Path] = {}
    queries = []
    for n, p in enumerate(pairs):
        if p.source == p.edited:
            raise DataError(root, f"{qid_prefix}{n:06d}", f"edit pair source and edited image are both {p.source!r}")
        for iid, path in ((p.source, p.source_path), (p.edited, p.edited_path)):
            old = ids.setdefault(iid, Path(path))
            if old != Path(path):
                raise DataError(root, iid, f"image id names two files: {old} and {path}")
        wordings = tuple(dict.fromkeys((p.instruction, *p.instructions)))
        queries.append(Query(qid=f"{qid_prefix}{n:06d}", reference=p.source, text=p.instruction, targets=(p.edited,),
                             captions=wordings, meta={"kind": p.kind, "edit_pair": True}))
    gallery = Gallery(list(ids), list(ids.values()), source=root)
    policy = "random" if any(len(q.captions) > 1 for q in queries) else "fixed"
    ds = CIRDataset(name=name, split=split, queries=queries, gallery=gallery, root=root, files=list(files),
                    exclude_reference=True, text_policy=policy, meta={"edit_pairs": len(queries)})
    ds.validate()
    return ds


def _read_prompt(path: Path) -> dict[str, str]:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(path, None, f"unreadable prompt.json: {exc}") from exc
    if not isinstance(d, dict):
        raise DataError(path, None, f"expected a JSON object, got {type(d).__name__}")
    for k in ("input", "edit", "output"):
        if not isinstance(d.get(k), str) or not d[k].strip():
            raise DataError(path, k, "missing or empty caption (prompt.json needs input, edit and output)")
    return {k: d[k].strip() for k in ("input", "edit", "output")}


def _is_val(prompt_id: str) -> bool:
    h = int(hashlib.sha256(prompt_id.encode("utf-8")).hexdigest()[:8], 16)
    return h < VAL_SHARE * 0x1_0000_0000


def load_ip2p_pairs(root: str | Path, split: str = "edit_pairs", limit: int | None = None) -> tuple[list[EditPair], list[dict[str, str]]]:
    """The edit pairs of an InstructPix2Pix folder (sorted by prompt id, then seed) and, per pair, its prompt
    captions. ``limit`` keeps the first N pairs. A prompt folder without ``prompt.json`` or without any complete
    ``<seed>_0`` / ``<seed>_1`` pair is an error naming it; a seed with one image only is skipped."""
    root = Path(root)
    if split not in IP2P_SPLITS:
        raise DataError(root, split, f"unknown ip2p split; expected one of {', '.join(IP2P_SPLITS)}")
    if not root.is_dir():
        raise DataError(root, None, "not a directory (an InstructPix2Pix folder of <prompt-id>/prompt.json)")
    if limit is not None and limit < 1:
        raise DataError(root, None, f"limit must be >= 1, got {limit}")
    pairs: list[EditPair] = []
    prompts: list[dict[str, str]] = []
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if not folders:
        raise DataError(root, None, "no prompt folders (<prompt-id>/prompt.json)")
    for folder in folders:
        pid = folder.name
        if split != "edit_pairs" and _is_val(pid) != (split == "val"):
            continue
        prompt_file = folder / "prompt.json"
        if not prompt_file.is_file():
            raise DataError(folder, None, "prompt folder without prompt.json")
        prompt = _read_prompt(prompt_file)
        sides: dict[str, dict[str, Path]] = {}
        for f in folder.iterdir():
            m = _IMAGE.match(f.name)
            if m:
                sides.setdefault(m["seed"], {})[m["side"]] = f
        complete = sorted(s for s, v in sides.items() if "0" in v and "1" in v)
        if not complete:
            raise DataError(folder, None, "no complete <seed>_0 / <seed>_1 image pair")
        for seed in complete:
            src, dst = sides[seed]["0"], sides[seed]["1"]
            pairs.append(EditPair(source=f"{pid}/{src.name}", instruction=prompt["edit"], edited=f"{pid}/{dst.name}",
                                  kind=IP2P_KIND, source_path=src, edited_path=dst))
            prompts.append(prompt)
            if limit is not None and len(pairs) >= limit:
                return pairs, prompts
    if not pairs:
        raise DataError(root, split, "no edit pairs in this split")
    return pairs, prompts


@register_dataset("ip2p")
def load_ip2p(root: str | Path, split: str = "edit_pairs", limit: int | None = None, **kwargs: Any) -> CIRDataset:
    """Split ``split`` of an InstructPix2Pix folder as a CIR dataset (see the module docstring); ``limit`` keeps
    the first N pairs."""
    extra = {k: v for k, v in kwargs.items() if v is not None}
    if extra:
        raise DataError(root, None, f"unknown ip2p dataset option(s): {', '.join(sorted(extra))} (known: limit)")
    root = Path(root)
    pairs, prompts = load_ip2p_pairs(root, split, None if limit is None else int(limit))
    ds = edit_pairs_dataset(pairs, name="ip2p", split=split, root=root, qid_prefix="ip2p")
    # The source and target captions ride along (captions[1:], meta); training uses the instruction only.
    ds.queries = [Query(q.qid, q.reference, q.text, q.targets, (q.text, p["input"], p["output"]),
                        meta={**q.meta, "input": p["input"], "output": p["output"]})
                  for q, p in zip(ds.queries, prompts, strict=True)]
    ds.text_policy = "fixed"
    return ds


__all__ = ["IP2P_KIND", "IP2P_SPLITS", "VAL_SHARE", "edit_pairs_dataset", "load_ip2p", "load_ip2p_pairs"]
