"""cirfusion serve (CHECKPOINT --images DIR | INDEX): a JSON API and a web page for searching a catalog by a
reference image plus a modification text.

TARGET is an index directory (cirfusion index build; its recorded checkpoint encodes the queries) or a checkpoint
directory with --images DIR (every image file under DIR; id = relative path without suffix; backbone features come
from the feature cache). Every method can be served: one whose score is an inner product of embeddings through an
exact index, any other - a fused DAFM checkpoint included - by exact scoring of the whole gallery through the model.
The model and gallery are loaded once, at start-up.

Open http://HOST:PORT/ for the page, /docs for the API (POST /api/search, GET /api/images/ID, POST /api/images,
GET /api/info, GET /healthz). The server binds to 127.0.0.1 by default. Adding images (POST /api/images) needs a
bearer token whenever one is set ($CIRFUSION_SERVE_TOKEN, or --token); binding to any other address without one is
refused. Uploads are capped (--max-upload-mb, 413 above), images go through the safe loader (400 with the reason),
text and k are capped. Model work runs on one model thread with --threads torch threads (1 by default),
never on the event loop; searches that arrive together are answered as one batch (--max-batch). Added images are
kept in --upload-dir (a temporary folder, removed at exit, by default); a server started again with the same
--upload-dir adds them back, with the same ids.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import uvicorn

from ..errors import CirfusionError
from ..serve import Limits, check_binding, create_app, load_catalog
from ..serve.loading import restore_uploads
from ..serve.security import TOKEN_ENV, resolve_token
from ._features import add_backbone_access_args, default_cache_dir


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("serve", help="a JSON API and a web page for searching a catalog (checkpoint + folder, or index)",
                       description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", type=Path, help="checkpoint directory (with --images DIR) or index directory")
    p.add_argument("--images", type=Path, default=None, metavar="DIR", help="the gallery: every image file under DIR")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--token", default=None,
                   help=f"bearer token for POST /api/images (default ${TOKEN_ENV}; required off loopback; prefer the "
                        "environment variable, a command line is visible to other users)")
    cores = _cores()
    p.add_argument("--workers", type=int, default=min(4, cores),
                   help=f"threads that check requests (decode uploads) and draw thumbnails (default min(4, cores) = "
                        f"{min(4, cores)})")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of the one model thread that answers every search (default 1: a second "
                        "thread costs more than it gains on shared cores; see docs/serve.md)")
    p.add_argument("--base-threads", type=int, default=None,
                   help="a fused (DAFM) model's base models run side by side on this many threads within a search "
                        f"(default: every core, {cores}, at most K; 1: in turn)")
    p.add_argument("--max-batch", type=int, default=16,
                   help="most concurrent searches the model thread answers together, reading each gallery once "
                        "(default 16)")
    p.add_argument("--upload-dir", type=Path, default=None,
                   help="where added images are kept; a server started again with the same folder adds them back "
                        "(default: a temporary folder removed at exit)")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest uploaded file in MB (default 10)")
    p.add_argument("--max-k", type=int, default=100, help="most results per search (default 100)")
    p.add_argument("--max-text", type=int, default=500, help="longest modification text in characters (default 500)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="feature cache directory (default: $CIRFUSION_CACHE_DIR or ~/.cache/cirfusion/features)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar while the gallery is encoded")
    add_backbone_access_args(p)
    p.set_defaults(func=run)


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def limits_from_args(args: argparse.Namespace) -> Limits:
    for name, value in (("--max-upload-mb", args.max_upload_mb), ("--max-k", args.max_k), ("--max-text", args.max_text),
                        ("--workers", args.workers), ("--port", args.port), ("--max-batch", args.max_batch),
                        ("--base-threads", 1 if args.base_threads is None else args.base_threads)):
        if value is None or value <= 0:
            raise CirfusionError(f"{name} must be positive, got {value}")
    if args.threads is not None and args.threads < 1:
        raise CirfusionError(f"--threads must be positive, got {args.threads}")
    return Limits(max_upload_bytes=int(args.max_upload_mb * 2**20), max_k=args.max_k, max_text_chars=args.max_text)


def run(args: argparse.Namespace) -> int:
    limits = limits_from_args(args)
    token = resolve_token(args.token)
    check_binding(args.host, token)  # before anything is loaded: a refused start is instant
    threads = args.threads or 1
    own_tmp = args.upload_dir is None
    upload_dir = Path(tempfile.mkdtemp(prefix="cirfusion-serve-")) if own_tmp else Path(args.upload_dir)
    upload_dir.mkdir(parents=True, exist_ok=True)
    try:
        catalog = load_catalog(args.target, args.images, cache_dir=args.cache_dir or default_cache_dir(),
                               backbone_dirs=args.backbone_dir, allow_download=args.allow_download, limits=limits,
                               upload_dir=upload_dir, threads=threads, progress=not args.no_progress,
                               say=lambda m: print(f"[serve] {m}", flush=True))
        if not own_tmp:
            restore_uploads(catalog, upload_dir, say=lambda m: print(f"[serve] {m}", flush=True))
        app = create_app(catalog, token=token, workers=args.workers, torch_threads=threads, max_batch=args.max_batch,
                         base_threads=args.base_threads)
        print(f"[serve] one model thread ({threads} torch thread(s), batches of up to {args.max_batch} searches), "
              f"{args.workers} request thread(s); adding images "
              f"{'needs the bearer token' if token else 'is open (loopback, no token)'}; open http://"
              f"{'[' + args.host + ']' if ':' in args.host else args.host}:{args.port}/", flush=True)
        uvicorn.run(app, host=args.host, port=args.port, log_level="info", access_log=False)
    finally:
        if own_tmp:
            shutil.rmtree(upload_dir, ignore_errors=True)
    return 0
