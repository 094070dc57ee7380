"""Building a :class:`~cirfusion.serve.catalog.Catalog` at start-up: :func:`load_catalog` from an index directory
(``cirfusion index build``) or from a checkpoint and a folder of images (features from the cache, then the method's
gallery embedding: an exact index for inner-product methods, exact scoring through the model for any other, fused
DAFM checkpoints included)."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from ..api import CIRModel, load
from ..data.custom import IMAGE_SUFFIXES, _gallery_from_folder
from ..data.schema import DataError
from ..errors import CirfusionError
from ..evaluation import encode_gallery
from ..features import FeatureCache
from ..fusion import uses_default_similarity
from ..index import META_FILE, build_index, load_index
from ..views import FeatureView
from .catalog import Catalog, Limits, ServeError, _Gallery, file_sha256

log = logging.getLogger("cirfusion.serve")


def _hashes(paths: Sequence[Path], threads: int) -> list[str | None]:
    with ThreadPoolExecutor(max(1, threads)) as pool:
        return list(pool.map(file_sha256, paths))


def _gallery(ids: list[str], paths: list[Path], hashes: list[str | None], **kw: Any) -> _Gallery:
    row_of_hash: dict[str, int] = {}
    for i, h in enumerate(hashes):
        if h is not None:
            row_of_hash.setdefault(h, i)  # duplicate files: the first row stands for the content
    return _Gallery(ids, paths, hashes, {name: i for i, name in enumerate(ids)}, row_of_hash, **kw)


def load_catalog(target: Path, images: Path | None = None, *, cache_dir: Path | None = None,
                 backbone_dirs: Sequence[Path] = (), allow_download: bool = False, limits: Limits | None = None,
                 upload_dir: Path | None = None, threads: int = 1, progress: bool = False,
                 say: Callable[[str], None] = log.info) -> Catalog:
    """Load a checkpoint (with ``images``, a folder) or an index directory as a :class:`Catalog` (module doc)."""
    t0 = time.perf_counter()
    target = Path(target)
    if (target / META_FILE).is_file():
        if images is not None:
            raise CirfusionError(f"{target} is an index: its gallery is fixed when it is built (--images applies to a "
                                 "checkpoint)")
        return _load_index_catalog(target, backbone_dirs, allow_download, limits, upload_dir, threads, say, t0)
    if not (target / "config.json").is_file():
        raise CirfusionError(f"{target}: neither an index directory (no {META_FILE}) nor a checkpoint directory "
                             "(no config.json)")
    if images is None:
        raise CirfusionError(f"{target} is a checkpoint: name the gallery to serve with --images DIR (or serve an "
                             "index built by `cirfusion index build`)")
    model = _load_model(target, backbone_dirs, allow_download)
    folder = Path(images)
    if not folder.is_dir():
        raise DataError(folder, None, "image folder not found" if not folder.exists() else "not a directory")
    found = _gallery_from_folder(folder)
    if len(found) == 0:
        raise DataError(folder, None, f"image folder is empty: no image files ({', '.join(IMAGE_SUFFIXES)}) found")
    ids, paths = list(found.ids), [Path(p).resolve() for p in found.paths]
    cache = FeatureCache(model.backbone, cache_dir or _default_cache_dir())
    table = cache.image_features(ids, paths, progress=progress)
    no_texts = SimpleNamespace(global_=np.zeros((0, model.backbone.text_dim), np.float16))
    with torch.no_grad():
        emb = encode_gallery(model.method, FeatureView(table, no_texts), ids)
    hashes: list[str | None] = list(table.hashes)
    source = {"source": "images", "root": str(folder.resolve())}
    if uses_default_similarity(model.method) and isinstance(emb, torch.Tensor):
        index = build_index(emb.float().numpy(), ids, "exact", "ip", threads=1)
        gallery = _gallery(ids, paths, hashes, index=index)
        how = "an exact in-memory index"
    else:
        gallery = _gallery(ids, paths, hashes, emb=emb)
        how = "exact scoring through the model (every query scores the whole gallery)"
    took = time.perf_counter() - t0
    say(f"loaded {model.config['method']} ({target}, backbone {model.backbone_id}) and {len(ids)} images from "
        f"{folder} in {took:.1f} s; searching by {how}")
    return Catalog(model, gallery, source, limits=limits, feature_table=table, upload_dir=upload_dir,
                   build_seconds=took)


def _load_index_catalog(target: Path, backbone_dirs: Sequence[Path], allow_download: bool, limits: Limits | None,
                        upload_dir: Path | None, threads: int, say: Callable[[str], None], t0: float) -> Catalog:
    index = load_index(target, threads=1)
    meta = index.meta
    rec = meta.get("checkpoint") if isinstance(meta.get("checkpoint"), dict) else {}
    if not rec or not rec.get("path"):
        raise CirfusionError(f"{target / META_FILE}: the index records no checkpoint (not built by `cirfusion index "
                             "build`)")
    ckpt = Path(rec["path"])
    if not ckpt.is_dir():
        raise CirfusionError(f"{ckpt}: the checkpoint recorded in {target / META_FILE} is not there")
    model = _load_model(ckpt, backbone_dirs, allow_download)
    paths_meta = meta.get("paths")
    if not isinstance(paths_meta, list) or len(paths_meta) != len(index):
        raise CirfusionError(f"{target / META_FILE}: the index records no image path per id, so images cannot be shown")
    paths = [Path(p) for p in paths_meta]
    hashes = _hashes(paths, threads=4)
    gallery = _gallery(list(index.ids), paths, hashes, index=index)
    took = time.perf_counter() - t0
    say(f"loaded index {target} ({index.kind}, {len(index)} images) with {model.config['method']} ({ckpt}, backbone "
        f"{model.backbone_id}) in {took:.1f} s")
    return Catalog(model, gallery, {"source": "index", "index": str(target.resolve()), "kind": index.kind},
                   limits=limits, upload_dir=upload_dir, build_seconds=took)


def _load_model(path: Path, backbone_dirs: Sequence[Path], allow_download: bool) -> CIRModel:
    model = load(path, backbone_dirs=backbone_dirs, allow_download=allow_download)
    model.backbone  # noqa: B018 -- built now, so a backbone it may not read fails at start-up, not on a request
    return model


def _default_cache_dir() -> Path:
    env = os.environ.get("CIRFUSION_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "cirfusion" / "features"


def restore_uploads(catalog: Catalog, upload_dir: Path, say: Callable[[str], None] = log.info) -> int:
    """Add back the images a previous run of the server added (the files it kept in ``upload_dir``, named by their
    sha256): a server restarted with the same ``--upload-dir`` keeps its additions, with the same ids. A file whose
    name is not the sha256 of its bytes (not written by the server) is skipped and named in the log; one that no
    longer passes the safe loader is skipped with the reason. Returns how many images were added."""
    files = sorted(p for p in Path(upload_dir).iterdir() if p.is_file() and not p.name.startswith("."))
    added = 0
    batch: list[tuple[bytes, str]] = []

    def flush() -> None:
        nonlocal added
        try:
            added += sum(a["added"] for a in catalog.add_images(batch))
        except ServeError:  # one bad file: add them one by one, naming the bad ones
            for data, name in batch:
                try:
                    added += sum(a["added"] for a in catalog.add_images([(data, name)]))
                except ServeError as exc:
                    say(f"not restored: {upload_dir / name}: {exc}")
        batch.clear()

    for path in files:
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != path.stem:
            say(f"not restored: {path}: not a file the server kept (its name is not the sha256 of its bytes)")
            continue
        batch.append((data, path.name))
        if len(batch) == catalog.limits.max_add_files:
            flush()
    if batch:
        flush()
    if added:
        say(f"restored {added} image(s) added by an earlier run from {upload_dir}; the gallery holds {catalog.size}")
    return added


__all__ = ["load_catalog", "restore_uploads"]
