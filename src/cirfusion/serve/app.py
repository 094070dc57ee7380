"""The FastAPI application of ``cirfusion serve``: a JSON API and a web page over one :class:`Catalog`.

Endpoints (FastAPI documents them at ``/docs`` and ``/openapi.json``):

- ``POST /api/search``: multipart form fields ``image`` (a file) or ``reference`` (a gallery id), ``text``, ``k``,
  ``keep_reference``; or the same as a JSON body without the file. Answers ``{"results": [{"id", "score", "url",
  "thumbnail"}], "explanation": {...}, "took_ms", "reference": {"id", "excluded"}}``.
- ``GET /api/images/{id}``: the original image bytes; ``?size=thumb`` a JPEG thumbnail (at most 256 px).
- ``POST /api/images``: multipart field ``images`` (one or more files) added to the gallery without a rebuild. Needs
  ``Authorization: Bearer TOKEN`` whenever the server has a token (it must have one off loopback).
- ``GET /api/gallery?offset=&limit=&q=``: a page of gallery ids (for browsing), ``GET /api/info``, ``GET /healthz``.
- ``GET /``: the page (``static/``: plain HTML, CSS and one small script; no framework, no CDN).

Errors are ``{"detail": "<one sentence>"}`` with 400 (bad image or parameters), 401 (missing or wrong token), 404
(unknown id), 413 (too large). No path a client sends is ever joined onto the filesystem: images are found by id in
the catalog's own table.

Nothing heavy runs on the event loop. Checking a request (decoding an upload through the safe loader; at most
``max(2, workers)`` uploads are decoded and waiting at once) and drawing thumbnails go to a fixed-size pool of
``workers`` threads; all model work (encoding, scoring, explanations, the model side of adding images) goes to ONE
model thread (:class:`~cirfusion.serve.batcher.Batcher`) with ``torch_threads`` intra-op threads (default 1: on
shared cores a second torch thread waits for a core another process holds, and a lone query's small operators gain
little from it; measured 4-5x more CPU per request at 2 threads on a busy 2-core machine). Searches that arrive while
it is busy are answered together as one batch (at most ``max_batch``): the query encoders run once for the batch and
an exactly scored gallery is read once per tile of queries. A fused model's base models run side by side on
``base_threads`` threads (each with ``torch_threads`` torch threads). An answer does not depend on its batch beyond
float rounding.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import python_multipart  # noqa: F401 -- Starlette's form parser: imported here so a missing install fails at start-up
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..data.images import ImageLoadError, load_image
from ..threads import usable_cores
from .batcher import Batcher
from .catalog import LRU, Catalog, CheckedQuery, SearchResult, ServeError
from .explain import is_fused

log = logging.getLogger("cirfusion.serve")

STATIC_DIR = Path(__file__).resolve().parent / "static"
THUMB_SIZE = 256
_FORM_SLACK = 256 * 1024  # multipart headers and the small fields around the file(s)
_MEDIA = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp", ".gif": "image/gif",
          ".bmp": "image/bmp", ".tif": "image/tiff", ".tiff": "image/tiff"}
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}
_SEARCH_FIELDS = {"reference", "text", "k", "keep_reference", "image"}
T = TypeVar("T")


class _TooLarge(Exception):
    pass


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


class BodyLimit:
    """Refuse a request body over the limit of its path with 413: at once from ``Content-Length``, and while it
    streams (a chunked body without a length), before the form parser buffers it."""

    def __init__(self, app: ASGIApp, limits: dict[str, int]) -> None:
        self.app, self.limits = app, limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.limits.get(scope.get("path", "")) if scope["type"] == "http" else None
        if limit is None:
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        too_large = _error(413, f"the request body is over the limit of {limit:,} bytes for {scope['path']}")
        if length is not None and length.isdigit() and int(length) > limit:
            await too_large(scope, receive, send)
            return
        seen, started = 0, False

        async def counted() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    raise _TooLarge
            return msg

        async def sending(msg: Message) -> None:
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, counted, sending)
        except _TooLarge:
            if not started:
                await too_large(scope, receive, send)


def image_url(image_id: str, thumb: bool = False) -> str:
    return f"/api/images/{quote(image_id, safe='/')}" + ("?size=thumb" if thumb else "")


def _flag(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ServeError(f"{name} must be true or false, got {value!r}")


_SEARCH_DOC: dict[str, Any] = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "image": {"type": "string", "format": "binary", "description": "the reference photo (or give reference)"},
        "reference": {"type": "string", "description": "the id of a gallery image to use as the reference"},
        "text": {"type": "string", "description": "the modification, e.g. \"same but in red\""},
        "k": {"type": "integer", "default": 10}, "keep_reference": {"type": "boolean", "default": False}},
        "required": ["text"]}},
    "application/json": {"schema": {"type": "object", "properties": {
        "reference": {"type": "string"}, "text": {"type": "string"}, "k": {"type": "integer", "default": 10},
        "keep_reference": {"type": "boolean", "default": False}}, "required": ["reference", "text"]}}}}}
_ADD_DOC: dict[str, Any] = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "properties": {"images": {"type": "array", "items": {"type": "string", "format": "binary"}}},
    "required": ["images"]}}}}}


def create_app(catalog: Catalog, *, token: str | None = None, workers: int = 2, torch_threads: int | None = None,
               max_batch: int = 16, base_threads: int | None = None) -> FastAPI:
    """The service over ``catalog``. ``token``: the bearer token ``POST /api/images`` requires (None: open, which
    ``cirfusion serve`` allows on loopback only). ``workers``: threads that check requests and draw thumbnails;
    ``torch_threads``: the model thread's torch intra-op threads (default 1); ``max_batch``: the most
    searches the model thread answers together; ``base_threads``: for a fused model, the threads its K base models
    run on side by side within one batch (default: every core, at most K; 1 = in turn on the model thread)."""
    threads = max(1, torch_threads or 1)
    base_pool: ThreadPoolExecutor | None = None
    fused: Any = catalog.method if is_fused(catalog.method) else None  # a DAFM (duck-typed: see explain.is_fused)
    if fused is not None:
        n_base = min(len(fused.base_names), base_threads or usable_cores())
        if n_base > 1:
            # Python threads, each with its own torch threads: no per-operator barrier between them (what makes two
            # torch threads collapse on shared cores), one join per query; each base computes exactly as alone.
            base_pool = ThreadPoolExecutor(n_base, thread_name_prefix="cirfusion-base",
                                           initializer=lambda: torch.set_num_threads(threads))
            fused.base_map = base_pool.map
    lim = catalog.limits
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="cirfusion-serve")
    model_thread: Batcher[CheckedQuery, SearchResult] = Batcher(catalog.search_batch, max_batch=max_batch,
                                                                setup=lambda: torch.set_num_threads(threads))
    thumbs = LRU(4096)
    uploads_in_flight = asyncio.Semaphore(max(2, workers))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        pool.shutdown(wait=False, cancel_futures=True)
        model_thread.close()
        if base_pool is not None:
            fused.base_map = map
            base_pool.shutdown(wait=False)

    app = FastAPI(lifespan=lifespan, title="cirfusion", version="1", summary="Composed image retrieval: a reference image plus a text",
                  description="Search a catalog by example and words. See docs/serve.md.")
    app.state.catalog, app.state.pool, app.state.model_thread = catalog, pool, model_thread
    app.add_middleware(BodyLimit, limits={"/api/search": lim.max_upload_bytes + _FORM_SLACK,
                                          "/api/images": lim.max_upload_bytes * lim.max_add_files + _FORM_SLACK})

    async def work(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(pool, partial(fn, *args, **kwargs))

    @app.exception_handler(ServeError)
    async def _serve_error(_: Request, exc: ServeError) -> JSONResponse:
        return _error(exc.status, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "path", "body")) or "request"
        return _error(400, f"{where}: {first.get('msg', 'invalid value')}")

    # ---- the page ------------------------------------------------------------------------------------------------
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get("/healthz", summary="200 while the service is up")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "gallery_size": catalog.size}

    @app.get("/api/info", summary="model, backbone, gallery size, build time, limits")
    async def info() -> dict[str, Any]:
        mean = model_thread.answered / model_thread.batches if model_thread.batches else 0.0
        return {**catalog.info(), "model_thread": {"torch_threads": threads, "max_batch": max_batch,
                                                   "base_threads": base_pool._max_workers if base_pool else 1,
                                                   "batches": model_thread.batches,
                                                   "searches": model_thread.answered, "mean_batch": round(mean, 2)}}

    @app.get("/api/gallery", summary="a page of gallery ids, optionally those containing q")
    async def gallery(offset: int = 0, limit: int = 60, q: str = "") -> dict[str, Any]:
        if offset < 0 or not 1 <= limit <= 500 or len(q) > 200:
            raise ServeError("offset must be >= 0, limit from 1 to 500 and q at most 200 characters")
        total, ids = catalog.ids(offset, limit, q)
        return {"total": total, "offset": offset,
                "items": [{"id": i, "url": image_url(i), "thumbnail": image_url(i, True)} for i in ids]}

    @app.get("/api/images/{image_id:path}", summary="the original image, or a thumbnail with ?size=thumb",
             response_class=Response, responses={200: {"content": {"image/*": {}}}})
    async def get_image(image_id: str, size: str = "original") -> Response:
        if size not in ("original", "thumb"):
            raise ServeError(f"size must be 'original' or 'thumb', got {size!r}")
        path = catalog.path_of(image_id)  # 404 for an unknown id; the path is the catalog's, never the client's
        if size == "original":
            if not path.is_file():
                raise ServeError(f"gallery image {image_id!r} is no longer on the server's disk", 404)
            return FileResponse(path, media_type=_MEDIA.get(path.suffix.lower(), "application/octet-stream"))
        data = thumbs.get(image_id)
        if data is None:
            data = await work(_thumbnail, path, image_id)
            thumbs.put(image_id, data)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.post("/api/search", summary="top-k gallery images for a reference image + a modification text",
              openapi_extra=_SEARCH_DOC, response_class=JSONResponse)
    async def search(request: Request) -> JSONResponse:
        t0 = time.perf_counter()
        fields, upload = await _search_fields(request, lim.max_upload_bytes)
        keep = _flag(fields.get("keep_reference", False), "keep_reference")
        ref = fields.get("reference")
        if ref is not None and not isinstance(ref, str):
            raise ServeError("reference must be the id of a gallery image (a string)")
        if ref is not None and upload is not None:
            raise ServeError("give either an uploaded image or a gallery reference id, not both")
        args = (fields.get("text"), fields.get("k", min(10, lim.max_k)))
        if upload is None:  # a gallery id: checking it is a few dict look-ups, no hop to a worker thread
            checked = catalog.check(*args, reference=ref or None, keep_reference=keep)
            res = await asyncio.wrap_future(model_thread.submit(checked))
        else:
            # Decoding an upload is real work: off the event loop. A decoded photo waits for the model thread at full
            # resolution (up to max_pixels x 3 bytes), so only so many uploads are in flight at once; the others wait
            # here as bytes.
            async with uploads_in_flight:
                checked = await work(catalog.check, *args, upload=upload, keep_reference=keep)
                res = await asyncio.wrap_future(model_thread.submit(checked))
        # Plain JSON values already: JSONResponse directly skips FastAPI's recursive jsonable_encoder pass.
        return JSONResponse({
            "results": [{"id": h.id, "score": h.score, "url": image_url(h.id), "thumbnail": image_url(h.id, True)}
                        for h in res.hits],
            "explanation": res.explanation,
            "reference": {"id": res.reference_id, "excluded": res.excluded,
                          "url": None if res.reference_id is None else image_url(res.reference_id)},
            "took_ms": round((time.perf_counter() - t0) * 1000, 2)})

    @app.post("/api/images", summary="add images to the gallery without a rebuild (bearer token when set)",
              openapi_extra=_ADD_DOC)
    async def add_images(request: Request) -> dict[str, Any]:
        _check_token(request, token)
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise ServeError("send the images as multipart/form-data in the field 'images'")
        form = await _form(request, max_files=lim.max_add_files)
        files = [f for f in form.getlist("images") if isinstance(f, UploadFile)]
        extra = sorted(set(form.keys()) - {"images"})
        if extra:
            raise ServeError(f"unknown form field(s) {extra}; send the files in 'images'")
        blobs = [(await _read_capped(f, lim.max_upload_bytes), f.filename or "") for f in files]
        decoded = await work(catalog.decode_additions, blobs)  # decoding off the model thread
        added = await asyncio.wrap_future(model_thread.call(catalog.commit_additions, decoded))
        return {"added": [{**a, "url": image_url(a["id"]), "thumbnail": image_url(a["id"], True)} for a in added],
                "gallery_size": catalog.size}

    return app


def _check_token(request: Request, token: str | None) -> None:
    if token is None:
        return
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
        raise StarletteHTTPException(401, "adding images needs the server's bearer token in an Authorization header",
                                     headers={"WWW-Authenticate": "Bearer"})


async def _form(request: Request, max_files: int) -> Any:
    try:
        return await request.form(max_files=max_files, max_fields=16)
    except _TooLarge:
        raise
    except Exception as exc:  # the multipart parser's own errors (malformed body, too many parts)
        raise ServeError(f"the form cannot be read: {getattr(exc, 'detail', None) or exc}") from None


async def _read_capped(f: UploadFile, cap: int) -> bytes:
    data = await f.read(cap + 1)
    if len(data) > cap:
        raise ServeError(f"{f.filename or 'the uploaded file'} is over the limit of {cap:,} bytes", 413)
    return data


async def _search_fields(request: Request, cap: int) -> tuple[dict[str, Any], bytes | None]:
    """The search request's fields (JSON body, or a form) and the uploaded image's bytes, if any."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        try:
            body = json.loads(await request.body())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ServeError(f"the JSON body cannot be parsed ({exc})") from None
        if not isinstance(body, dict):
            raise ServeError("the JSON body must be an object with reference, text and k")
        unknown = sorted(set(body) - (_SEARCH_FIELDS - {"image"}))
        if unknown:
            raise ServeError(f"unknown field(s) {unknown}; a JSON search takes reference, text, k and keep_reference "
                             "(upload an image as multipart/form-data)")
        return body, None
    if ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        form = await _form(request, max_files=1)
        unknown = sorted(set(form.keys()) - _SEARCH_FIELDS)
        if unknown:
            raise ServeError(f"unknown form field(s) {unknown}; a search takes image or reference, text, k and "
                             "keep_reference")
        fields: dict[str, Any] = {k: v for k, v in form.items() if isinstance(v, str)}
        image = form.get("image")
        upload = None
        if isinstance(image, UploadFile) and (image.filename or image.size):
            upload = await _read_capped(image, cap)
            if not upload:
                raise ServeError("the uploaded image is empty (0 bytes)")
        return fields, upload
    raise ServeError("send the search as multipart/form-data (with an image) or as a JSON object")


def _thumbnail(path: Path, image_id: str) -> bytes:
    try:
        im = load_image(path)
    except ImageLoadError as exc:
        raise ServeError(f"gallery image {image_id!r} cannot be read: {exc.problem}", 404) from None
    im.thumbnail((THUMB_SIZE, THUMB_SIZE), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=85)
    return buf.getvalue()

