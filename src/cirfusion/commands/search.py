"""cirfusion search INDEX|CHECKPOINT --image REF --text "..." -k 10: the k gallery images that best match a
reference image modified by a text, best first.

TARGET is either

- an index directory (from cirfusion index build): the query is encoded with the checkpoint recorded in the
  index (--checkpoint DIR overrides the location, e.g. after moving it; it must be the very same checkpoint:
  same files, same backbone) and searched in the index; or
- a checkpoint directory: then name the gallery with --images DIR (every image file under DIR; id = relative
  path without suffix) or --dataset D --root DIR --split S. The whole gallery is scored through the model
  (gallery features come from the feature cache, so repeated searches only encode the query). This works for
  every method, including fused (DAFM) checkpoints that cannot be indexed. For methods with the default cosine /
  max-sim similarity, scores are computed exactly as by an exact index (float64 accumulation), so the two give the
  same ranking and scores.

The reference image itself is left out of the results when it is in the gallery (same file, or --image given
as a gallery id instead of a path); --keep-reference keeps it. Fewer than k lines are printed when the gallery
is smaller. Each output line: rank, score, id, path; --json prints a JSON list of {rank, score, id, path}.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..data.images import ImageLoadError, load_image
from ..index import META_FILE, CIRIndexError, brute_force_search, load_index
from ..io import recover_directory
from ..threads import set_override
from ._features import add_backbone_access_args, add_feature_args
from .index import (
    META_CREATOR,
    CommandError,
    add_gallery_args,
    checkpoint_sha256,
    gallery_embedding,
    gallery_from_args,
    has_gallery_args,
    indexable,
    load_model,
)

if TYPE_CHECKING:
    from PIL import Image

    from ..api import CIRModel


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("search", help="top-k gallery images for a reference image + text (index or checkpoint)",
                       description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", type=Path, help="index directory (cirfusion index build) or checkpoint directory")
    p.add_argument("--image", required=True, metavar="REF",
                   help="reference image file (or the id of a gallery image)")
    p.add_argument("--text", required=True, help="modification text, e.g. \"same but in red\"")
    p.add_argument("-k", "--k", type=int, default=10, help="number of results (default 10)")
    p.add_argument("--keep-reference", action="store_true",
                   help="do not leave the reference image out of the results")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="index TARGET: encode queries with this checkpoint (must be the one the index was built with)")
    g = p.add_argument_group("gallery (checkpoint TARGET only)")
    add_gallery_args(g)  # type: ignore[arg-type]
    s = p.add_argument_group("approximate index search (index TARGET only)")
    s.add_argument("--nprobe", type=int, default=None, help="ivf: lists searched per query (default: as built)")
    s.add_argument("--ef-search", type=int, default=None, help="hnsw: search beam width (default: as built)")
    add_feature_args(p)
    add_backbone_access_args(p)
    p.add_argument("--json", action="store_true", help="print the results as a JSON list")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    results = _search(args)  # a CommandError (or any CirfusionError) is one line, exit 2, through cli.main
    if args.json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
        return 0
    for r in results:
        print(f"{r['rank']:>3}  {r['score']:+.6f}  {r['id']}  {r['path'] or ''}")
    return 0


def _search(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.k < 1:
        raise CommandError(f"-k must be a positive integer, got {args.k}")
    if args.threads:
        set_override(args.threads)
    target = Path(args.target)
    recover_directory(target)  # an index whose rebuild crashed between its two renames is put back first
    if not target.exists():
        raise CommandError(f"{target}: no such index or checkpoint directory")
    if (target / "meta.json").is_file():
        return _search_index(args, target)
    if (target / "config.json").is_file():
        return _search_checkpoint(args, target)
    raise CommandError(f"{target}: neither an index directory (no meta.json) nor a checkpoint directory (no config.json)")


# ------------------------------------------------------------------------------------------------------------------
# reference image


def resolve_reference(ref: str, ids: Sequence[str], paths: Sequence[Path | None]) -> tuple["Image.Image", str | None]:
    """Load the reference image (a file, or a gallery id when no such file exists) and find its gallery id:
    the gallery image with the same file (after resolving links) or the id given. The file goes through
    data.images.load_image, the one safe loader (byte, pixel and aspect limits; clear errors)."""
    p = Path(ref)
    row_of = {name: i for i, name in enumerate(ids)}
    ref_id: str | None = None
    if not p.exists() and ref in row_of and paths[row_of[ref]] is not None:
        ref_id, p = ref, Path(paths[row_of[ref]])  # type: ignore[arg-type]
    try:
        image = load_image(p)
    except ImageLoadError as exc:
        hint = "" if p.exists() or not ids else " (nor is it a gallery id)"
        raise CommandError(f"reference image {exc}{hint}") from None
    if ref_id is None:
        real = os.path.normcase(os.path.realpath(p))
        for name, gp in zip(ids, paths, strict=True):
            if gp is not None and os.path.normcase(os.path.realpath(gp)) == real:
                ref_id = name
                break
    return image, ref_id


def _exclusion(ref_id: str | None, n: int, k: int, keep: bool) -> tuple[list[list[str]], int]:
    """(exclude lists for one query, k clamped to what the gallery can return)."""
    exclude = [[ref_id]] if ref_id is not None and not keep else [[]]
    available = n - len(exclude[0])
    if available < 1:
        raise CommandError("nothing to return: the gallery holds only the reference image (use --keep-reference)")
    return exclude, min(k, available)


def _results(scores: Any, got: Sequence[str], path_of: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"rank": r + 1, "score": float(s), "id": name, "path": None if path_of.get(name) is None else str(path_of[name])}
            for r, (s, name) in enumerate(zip(scores, got, strict=True))]


def _query(model: "CIRModel", image: "Image.Image", text: str) -> Any:
    return model.encode_query([image], [text])


# ------------------------------------------------------------------------------------------------------------------
# index target


def _search_index(args: argparse.Namespace, target: Path) -> list[dict[str, Any]]:
    if has_gallery_args(args):
        raise CommandError(f"{target} is an index: its gallery is fixed (--images/--dataset/--root/--split apply to a "
                           "checkpoint TARGET)")
    try:
        index = load_index(target, threads=args.threads)
        knobs = {k: v for k, v in (("nprobe", args.nprobe), ("ef_search", args.ef_search)) if v is not None}
        if knobs:
            index.set_search_params(**knobs)
    except CIRIndexError as exc:
        raise CommandError(str(exc)) from None
    meta, meta_path = index.meta, target / META_FILE
    rec: dict[str, Any] = meta["checkpoint"] if isinstance(meta.get("checkpoint"), dict) else {}
    if args.checkpoint is not None:
        ckpt = Path(args.checkpoint)
    elif rec.get("path"):
        ckpt = Path(rec["path"])
    else:
        raise CommandError(f"{meta_path}: the index records no checkpoint (not built by `{META_CREATOR}`); "
                           "pass --checkpoint DIR")
    if not ckpt.exists():
        how = "given with --checkpoint" if args.checkpoint is not None else \
            f"recorded in {meta_path}; pass --checkpoint DIR if it moved"
        raise CommandError(f"{ckpt}: checkpoint not found ({how})")
    model = load_model(ckpt, args.backbone_dir, args.allow_download)
    _check_same_model(model, ckpt, meta, rec, target)

    paths = meta.get("paths") if isinstance(meta.get("paths"), list) and len(meta["paths"]) == len(index) else None
    path_list = [None] * len(index) if paths is None else [Path(p) for p in paths]
    image, ref_id = resolve_reference(args.image, index.ids, path_list)
    exclude, k = _exclusion(ref_id, len(index), args.k, args.keep_reference)
    q = _query(model, image, args.text)
    if not isinstance(q, torch.Tensor):
        raise CommandError(f"{ckpt}: method {model.config['method']!r} gives bundled query embeddings that a faiss "
                           "index cannot search; search the checkpoint directly instead")
    try:
        scores, got = index.search(q.float().numpy(), k, exclude=exclude)
    except CIRIndexError as exc:
        raise CommandError(f"{target}: {exc}") from None
    return _results(scores[0], got[0], dict(zip(index.ids, path_list, strict=True)))


def _check_same_model(model: "CIRModel", ckpt: Path, meta: dict[str, Any], rec: dict[str, Any], target: Path) -> None:
    """The checkpoint must be the one the index was built with: same backbone, same files."""
    bb: dict[str, Any] = meta["backbone"] if isinstance(meta.get("backbone"), dict) else {}
    want_id, want_hash = bb.get("id"), bb.get("weights_hash")
    have_hash = (model.config.get("backbone") or {}).get("weights_hash") or model.method.dims.weights_hash
    if (want_id and want_id != model.backbone_id) or (want_hash and have_hash and want_hash != have_hash):
        raise CommandError(
            f"{ckpt}: uses backbone {model.backbone_id!r} (weights {str(have_hash)[:12]}...), but the index {target} was "
            f"built with backbone {want_id!r} (weights {str(want_hash)[:12]}...); give the checkpoint the index was "
            "built with, or rebuild the index with `cirfusion index build`")
    if rec.get("sha256"):
        have = checkpoint_sha256(ckpt)
        if have != rec["sha256"]:
            raise CommandError(
                f"{ckpt}: not the checkpoint the index {target} was built with ({rec.get('path')}, method "
                f"{rec.get('method')!r}): its files differ (sha256 {have[:12]}... vs {str(rec['sha256'])[:12]}...); "
                "give that checkpoint, or rebuild the index with `cirfusion index build`")


# ------------------------------------------------------------------------------------------------------------------
# checkpoint target: score the whole gallery through the model


def _search_checkpoint(args: argparse.Namespace, target: Path) -> list[dict[str, Any]]:
    if args.checkpoint is not None or args.nprobe is not None or args.ef_search is not None:
        raise CommandError(f"{target} is a checkpoint: --checkpoint, --nprobe and --ef-search apply to an index TARGET")
    if not has_gallery_args(args):
        raise CommandError(f"{target} is a checkpoint: name the gallery to search with --images DIR or "
                           "--dataset D --root DIR --split S (or give an index built by `cirfusion index build`)")
    model = load_model(target, args.backbone_dir, args.allow_download)
    ids, paths, _ = gallery_from_args(args)
    image, ref_id = resolve_reference(args.image, ids, paths)
    exclude, k = _exclusion(ref_id, len(ids), args.k, args.keep_reference)
    g = gallery_embedding(model, args, ids, paths)
    q = _query(model, image, args.text)
    path_of = dict(zip(ids, paths, strict=True))
    if indexable(model) and isinstance(q, torch.Tensor) and isinstance(g, torch.Tensor):
        # The default similarity is the max-max inner product: score it exactly like an exact index does.
        try:
            scores, got = brute_force_search(q.float().numpy(), g.float().numpy(), k, exclude=exclude, ids=ids)
        except CIRIndexError as exc:
            raise CommandError(f"{target}: {exc}") from None
        return _results(scores[0], got[0], path_of)
    with torch.no_grad():
        s = model.similarity(q, g)[0].float().numpy()
    rows = np.arange(len(ids))
    keep = np.ones(len(ids), dtype=bool)
    if exclude[0]:
        keep[ids.index(exclude[0][0])] = False
    order = np.lexsort((rows[keep], -s[keep]))[:k]  # best first, ties by the lower gallery row
    picked = rows[keep][order]
    return _results(s[picked], [ids[r] for r in picked], path_of)
