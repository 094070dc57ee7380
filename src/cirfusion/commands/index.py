"""cirfusion index build CHECKPOINT --images DIR | --dataset D --root DIR --split S --out INDEX: a faiss index
of a gallery, encoded by a checkpoint, for "cirfusion search INDEX ...".

Gallery. --images DIR: every image file under DIR, recursively (suffixes .jpg .jpeg .png .webp .bmp .gif .tif
.tiff, any case; names starting with "." skipped), sorted by relative path; an image's id is its path relative to
DIR without the suffix (shirts/red_01), as for the custom dataset (two files differing only by suffix are an
error). --dataset D --root DIR --split S: that split's gallery, with the dataset's own image ids.
Images are encoded through the feature cache (--cache-dir), so building again, or searching the same images
with "cirfusion search CHECKPOINT --images DIR", does not run the backbone again.

Kinds. --kind exact (default; faiss IndexFlatIP, results equal brute-force scoring, ties included),
ivf (--nlist, --nprobe) or hnsw (--hnsw-m, --ef-construction, --ef-search); the approximate kinds may miss true
neighbours. Scores are the checkpoint's own similarity: inner products of the L2-normalised embeddings (max over
vector pairs for multi-vector methods such as SPRC).

The index directory (--out) holds index.faiss, ids.json and meta.json; the latter records the checkpoint
(absolute path, method, sha256 of its files), the backbone (id, weights hash, preprocessing) and the gallery
(source and every image's absolute path), so "cirfusion search" can check that it encodes queries with the same
model and print paths. --threads sets both torch's and faiss's CPU threads. --overwrite replaces an index in one
swap; a crash in the middle leaves the previous index, which the next build, search or load puts back.

Backbone. The backbone named in the checkpoint is built only from files shipped with cirfusion, from a directory
inside the checkpoint or under a --backbone-dir, or - with --allow-download - from the Hugging Face hub: a
checkpoint from elsewhere cannot make cirfusion read other directories or download anything.

Methods whose similarity is not the default cosine / max-sim (a DAFM fusion: its fused scores depend on the whole
gallery's score distribution) cannot be represented by a faiss index and are refused; search them directly with
"cirfusion search CHECKPOINT --images DIR" (brute-force scoring through the model).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..api import CIRModel, load
from ..data.custom import IMAGE_SUFFIXES, _gallery_from_folder
from ..data.registry import load_dataset
from ..data.schema import DataError
from ..embeddings import Embedding
from ..errors import CirfusionError
from ..evaluation import encode_gallery
from ..fusion import uses_default_similarity
from ..index import META_FILE, CIRIndexError, build_index
from ..io import recover_directory
from ..threads import set_override
from ..views import FeatureView
from ._common import add_dataset_args, dataset_kwargs
from ._features import add_backbone_access_args, add_feature_args, make_cache

# Recorded in the index meta; `cirfusion search` recognises its indexes by it.
META_CREATOR = "cirfusion index build"


class CommandError(CirfusionError):
    """A user-facing error of `index build` / `search`: printed as ``cirfusion VERB: error: MESSAGE``, exit 2."""


# ------------------------------------------------------------------------------------------------------------------
# helpers shared with `cirfusion search`


def add_gallery_args(p: argparse.ArgumentParser) -> None:
    """``--images DIR`` or ``--dataset D --root DIR --split S`` (+ ``--category``, ``--option``)."""
    p.add_argument("--images", type=Path, default=None, metavar="DIR",
                   help="gallery = every image file under DIR (recursively); id = relative path without suffix")
    add_dataset_args(p, positional=False)
    for action in p._actions:  # --images needs no dataset; gallery_from_args checks the combination
        if action.dest in ("dataset", "root"):
            action.required = False
            action.help = f"{action.help} (instead of --images)"
    p.add_argument("--split", default=None, help="dataset split whose gallery is used (with --dataset)")


def has_gallery_args(args: argparse.Namespace) -> bool:
    return bool(args.images or args.dataset or args.root or args.split)


def folder_gallery(folder: Path) -> tuple[list[str], list[Path]]:
    """Every image file under ``folder`` (the ``custom`` dataset's rules): ids and absolute paths."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(folder, None, "image folder not found" if not folder.exists() else "not a directory")
    gallery = _gallery_from_folder(folder)
    if len(gallery) == 0:
        raise DataError(folder, None, f"image folder is empty: no image files ({', '.join(IMAGE_SUFFIXES)}) found")
    return list(gallery.ids), [p.resolve() for p in gallery.paths]


def gallery_from_args(args: argparse.Namespace) -> tuple[list[str], list[Path], dict[str, Any]]:
    """The gallery the arguments name: ids, absolute paths and a JSON description of the source."""
    if args.images is not None:
        if args.dataset or args.root or args.split:
            raise CommandError("give either --images DIR or --dataset/--root/--split, not both")
        ids, paths = folder_gallery(args.images)
        return ids, paths, {"source": "images", "root": str(Path(args.images).resolve())}
    if not (args.dataset and args.root and args.split):
        raise CommandError("name the gallery: --images DIR, or --dataset D --root DIR --split S")
    kw = dataset_kwargs(args)
    try:
        ds = load_dataset(args.dataset, args.root, args.split, **kw)
    except KeyError as exc:
        raise CommandError(exc.args[0] if exc.args else str(exc)) from None
    if len(ds.gallery) == 0:
        raise DataError(ds.gallery.source or args.root, None, f"split {args.split!r} has an empty gallery")
    info = {"source": "dataset", "dataset": args.dataset, "key": ds.key, "root": str(Path(args.root).resolve()),
            "split": args.split, "options": {k: str(v) for k, v in kw.items()}}
    return list(ds.gallery.ids), [Path(p).resolve() for p in ds.gallery.paths], info


def checkpoint_sha256(path: Path) -> str:
    """sha256 over every file of a checkpoint directory (relative path + content; hidden files skipped), so a
    retrained, edited or different checkpoint never passes for the one an index was built with."""
    h = hashlib.sha256()
    root = Path(path)
    files = sorted(p for p in root.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))
    for p in files:
        h.update(p.relative_to(root).as_posix().encode("utf-8") + b"\0")
        fh = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                fh.update(block)
        h.update(fh.digest())
    return h.hexdigest()


def load_model(path: Path, backbone_dirs: Sequence[Path] = (), allow_download: bool = False) -> CIRModel:
    """``cirfusion.load(path)`` with the user-facing errors (missing directory, not a checkpoint), its backbone built
    only from where the user allows (:func:`cirfusion.backbones.backbone_from_checkpoint`): files shipped with
    cirfusion, the checkpoint directory itself, ``backbone_dirs``, or the hub with ``allow_download``."""
    path = Path(path)
    if not path.exists():
        raise CommandError(f"{path}: checkpoint not found (no such directory)")
    if not path.is_dir():
        raise CommandError(f"{path}: not a checkpoint directory")
    model = load(path, backbone_dirs=backbone_dirs, allow_download=allow_download)
    if model.backbone_id:
        model.backbone  # noqa: B018 -- built now, so a backbone it may not read fails here as a one-line error
    return model


def indexable(model: CIRModel) -> bool:
    """Whether the method's scores are inner products of its embeddings (the default cosine / max-sim similarity),
    i.e. what a faiss index computes."""
    return uses_default_similarity(model.method)


def gallery_embedding(model: CIRModel, args: argparse.Namespace, ids: Sequence[str], paths: Sequence[Path]) -> Embedding:
    """The gallery's embeddings: backbone features through the feature cache (computed once per image), then the
    method's ``encode_gallery`` exactly as ``cirfusion eval`` does (:func:`cirfusion.evaluation.encode_gallery`)."""
    bb = model.backbone
    cache = make_cache(args, bb)
    table = cache.image_features(list(ids), list(paths), progress=not args.no_progress)
    no_texts = SimpleNamespace(global_=np.zeros((0, bb.text_dim), np.float16))  # the gallery needs no text
    return encode_gallery(model.method, FeatureView(table, no_texts), list(ids))


def model_record(model: CIRModel, path: Path) -> dict[str, Any]:
    """What the index meta records about the checkpoint and its backbone."""
    bcfg = model.config.get("backbone", {}) or {}
    return {
        "checkpoint": {"path": str(Path(path).resolve()), "method": model.config["method"],
                       "sha256": checkpoint_sha256(path), "dataset": model.config.get("dataset")},
        "backbone": {"id": model.backbone_id, "weights_hash": bcfg.get("weights_hash") or model.method.dims.weights_hash,
                     "preprocess_id": bcfg.get("preprocess_id") or model.method.dims.preprocess_id},
    }


def not_indexable_message(model: CIRModel, path: Path) -> str:
    return (f"{path}: method {model.config['method']!r} scores with its own similarity (not inner products of its "
            "embeddings), which a faiss index cannot represent; search it directly with "
            f"`cirfusion search {path} --images DIR` (or --dataset D --root DIR --split S), which scores the whole "
            "gallery through the model")


# ------------------------------------------------------------------------------------------------------------------
# the verb


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("index", help="build a faiss index of a gallery for cirfusion search")
    isub = p.add_subparsers(dest="index_command", required=True, metavar="INDEX_COMMAND")
    b = isub.add_parser("build", help="encode a gallery with a checkpoint and store a faiss index with its ids",
                        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("checkpoint", type=Path, help="checkpoint directory (e.g. runs/clip4cir-synthetic-train/best)")
    add_gallery_args(b)
    b.add_argument("--out", type=Path, required=True, help="index directory to write")
    b.add_argument("--overwrite", action="store_true", help="replace an existing index in --out")
    add_backbone_access_args(b)
    g = b.add_argument_group("index kind")
    g.add_argument("--kind", choices=("exact", "ivf", "hnsw"), default="exact",
                   help="exact (default; equals brute force), ivf or hnsw (approximate)")
    g.add_argument("--nlist", type=int, default=None, help="ivf: number of lists (default ~4*sqrt(#vectors))")
    g.add_argument("--nprobe", type=int, default=None, help="ivf: lists searched per query (default nlist/8, >= 8)")
    g.add_argument("--hnsw-m", "--m", dest="hnsw_m", type=int, default=None, help="hnsw: graph degree M (default 32)")
    g.add_argument("--ef-construction", type=int, default=None, help="hnsw: build-time beam width (default 80)")
    g.add_argument("--ef-search", type=int, default=None, help="hnsw: search-time beam width (default 128)")
    add_feature_args(b)
    b.add_argument("--json", action="store_true", help="print the result as JSON")
    b.set_defaults(func=run_build)


_KIND_OPTIONS = {"nlist": ("ivf", "nlist"), "nprobe": ("ivf", "nprobe"), "hnsw_m": ("hnsw", "M"),
                 "ef_construction": ("hnsw", "ef_construction"), "ef_search": ("hnsw", "ef_search")}


def kind_options(args: argparse.Namespace) -> dict[str, int]:
    """The ``build_index`` options given on the command line; an option of another kind is an error."""
    opts = {}
    for dest, (kind, name) in _KIND_OPTIONS.items():
        value = getattr(args, dest)
        if value is None:
            continue
        flag = "--" + dest.replace("_", "-")
        if kind != args.kind:
            raise CommandError(f"{flag} applies to --kind {kind}, not --kind {args.kind}")
        opts[name] = value
    return opts


def run_build(args: argparse.Namespace) -> int:
    if args.threads:
        set_override(args.threads)
    opts = kind_options(args)
    out = Path(args.out)
    if out.parent.is_dir():
        recover_directory(out)  # an --overwrite that crashed between its two renames: the old index comes back first
    if out.exists() and not args.overwrite and (not out.is_dir() or any(out.iterdir())):
        what = "an index" if (out / META_FILE).is_file() else "files"
        raise CommandError(f"{out}: already holds {what}; pass --overwrite to replace an index, or choose another --out")
    model = load_model(args.checkpoint, args.backbone_dir, args.allow_download)
    if not indexable(model):
        raise CommandError(not_indexable_message(model, args.checkpoint))
    ids, paths, source = gallery_from_args(args)
    emb = gallery_embedding(model, args, ids, paths)
    if not isinstance(emb, torch.Tensor):  # e.g. a custom method with bundled embeddings but default similarity
        raise CommandError(not_indexable_message(model, args.checkpoint))
    meta = {"created_by": META_CREATOR, "cirfusion_version": __version__, **model_record(model, args.checkpoint),
            "gallery": source, "paths": [str(p) for p in paths]}
    try:
        index = build_index(emb.float().numpy(), ids, kind=args.kind, metric="ip", meta=meta, threads=args.threads, **opts)
        index.save(out)
    except CIRIndexError as exc:
        raise CommandError(str(exc)) from None
    summary = {"index": str(out), "kind": index.kind, "num_items": len(index), "dim": index.dim,
               "vectors_per_item": index.vectors_per_item, "params": index.params, "checkpoint": str(args.checkpoint),
               "method": model.config["method"], "backbone": model.backbone_id}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        shape = f"{index.vectors_per_item} x {index.dim}" if index.multi_vector else str(index.dim)
        params = ", ".join(f"{k}={v}" for k, v in index.params.items())
        print(f"indexed {len(index)} images ({model.config['method']}, {shape}-d embeddings, backbone "
              f"{model.backbone_id}) as an {index.kind} index{f' ({params})' if params else ''} -> {out}")
    return 0
