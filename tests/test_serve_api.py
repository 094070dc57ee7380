"""`cirfusion serve`'s JSON API with FastAPI's test client, on tiny-backbone checkpoints and a folder of drawn
images: every endpoint, every limit (413 upload, 400 bad image / text / k / fields, 404 unknown id), the token rule
(401, refusing to start off loopback without one), adding images then finding them, the reference left out of its
own results (the service, CIRModel.rank), exact agreement with the model's own scores, DAFM's Shapley explanation
adding up to the fused score, and model work kept off the event loop."""

from __future__ import annotations

import io
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw

import cirfusion
from cirfusion.backbones import create_backbone
from cirfusion.checkpoint import save_checkpoint
from cirfusion.cli import main
from cirfusion.errors import CirfusionError
from cirfusion.methods import create_method
from cirfusion.methods.dafm import DAFM
from cirfusion.seeding import seed_everything
from cirfusion.serve import Limits, check_binding, create_app, is_loopback, load_catalog
from cirfusion.serve.batcher import Batcher
from cirfusion.serve.catalog import ServeError
from cirfusion.serve.loading import restore_uploads
from cirfusion.serve.security import TOKEN_ENV, resolve_token

TEXT = "make it green and move it to the left"
TOKEN = "t0ken-for-the-tests-only"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def draw(rgb: tuple[int, int, int], xy: tuple[int, int], size: tuple[int, int] = (32, 32), fmt: str = "PNG") -> bytes:
    im = Image.new("RGB", size, (20, 20, 30))
    ImageDraw.Draw(im).rectangle([xy[0], xy[1], xy[0] + size[0] // 3, xy[1] + size[1] // 3], fill=rgb)
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """An 18-image gallery in two sub-folders, checkpoints (clip4cir: indexable; image-only; a K=3 DAFM fusion), an
    index of the gallery, and a feature cache."""
    root = tmp_path_factory.mktemp("serve")
    gallery = root / "gallery"
    colours = [(220, 30, 30), (30, 200, 40), (40, 60, 230), (240, 220, 30), (245, 245, 245), (150, 60, 210)]
    for c, rgb in enumerate(colours):
        for p, xy in enumerate([(2, 10), (18, 10), (10, 2)]):
            path = gallery / ("warm" if c % 2 == 0 else "cool") / f"c{c}_p{p}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(draw(rgb, xy))
    bb = create_backbone("tiny")
    seed_everything(0)
    ck = {"clip": save_checkpoint(create_method("clip4cir", bb, embed_dim=16, hidden_dim=32), root / "ck" / "clip"),
          "image": save_checkpoint(create_method("image-only", bb), root / "ck" / "image")}
    seed_everything(1)
    bases = [create_method("clip4cir", bb, embed_dim=16, hidden_dim=32), create_method("image-only", bb),
             create_method("tg-cir", bb)]
    ck["dafm"] = save_checkpoint(DAFM.from_bases(bases, score_dtype="float32"), root / "ck" / "dafm")
    cache = root / "cache"
    index = root / "index"
    assert main(["index", "build", str(ck["clip"]), "--images", str(gallery), "--out", str(index), "--cache-dir",
                 str(cache), "--no-progress"]) == 0
    return {"root": root, "gallery": gallery, "ck": ck, "cache": cache, "index": index}


def client(world, name: str, *, limits: Limits | None = None, token: str | None = None, images: bool = True) -> TestClient:
    up = world["root"] / "uploads" / f"{name}-{time.monotonic_ns()}"
    up.mkdir(parents=True)
    target = world["index"] if name == "index" else world["ck"][name]
    cat = load_catalog(target, world["gallery"] if images and name != "index" else None, cache_dir=world["cache"],
                       limits=limits, upload_dir=up, say=lambda m: None)
    return TestClient(create_app(cat, token=token, workers=2))


@pytest.fixture(scope="module")
def clip(world):
    return client(world, "clip")


@pytest.fixture(scope="module")
def fused(world):
    return client(world, "dafm")


def gallery_ids(world) -> list[str]:
    return sorted(p.relative_to(world["gallery"]).with_suffix("").as_posix() for p in world["gallery"].rglob("*.png"))


# ---- read endpoints ---------------------------------------------------------------------------------------------------
def test_health_info_gallery_and_openapi(clip, world):
    assert clip.get("/healthz").status_code == 200
    info = clip.get("/api/info").json()
    assert info["gallery_size"] == 18 and info["model"] == "clip4cir" and info["backbone"] == "tiny"
    assert info["mode"] == "index" and info["build_seconds"] >= 0 and info["explanation"] == "similarity"
    assert info["built"].endswith("Z") and info["started"] >= info["built"]
    page = clip.get("/api/gallery", params={"limit": 5}).json()
    assert page["total"] == 18 and [i["id"] for i in page["items"]] == gallery_ids(world)[:5]
    assert clip.get("/api/gallery", params={"q": "warm/c2"}).json()["total"] == 3
    spec = clip.get("/openapi.json").json()
    for path in ("/api/search", "/api/images/{image_id}", "/api/images", "/api/info", "/healthz"):
        assert path in spec["paths"], path
    body = spec["paths"]["/api/search"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(body)
    html = clip.get("/").text
    assert "<form id=\"search-form\"" in html and "/static/app.js" in html and "http" not in html.split("<body>")[1]
    assert clip.get("/static/app.js").status_code == 200


def test_images_original_thumbnail_and_unknown_ids(clip, world):
    r = clip.get("/api/images/warm/c0_p0")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content == (world["gallery"] / "warm" / "c0_p0.png").read_bytes()
    t = clip.get("/api/images/warm/c0_p0", params={"size": "thumb"})
    assert t.headers["content-type"] == "image/jpeg" and max(Image.open(io.BytesIO(t.content)).size) <= 256
    for bad in ("nope", "warm/c0_p0.png", "../gallery/warm/c0_p0", "%2e%2e/%2e%2e/etc/passwd", str(world["gallery"] / "warm/c0_p0")):
        r = clip.get(f"/api/images/{bad}")
        assert r.status_code == 404 and set(r.json()) == {"detail"}, bad
    r = clip.get("/api/images/warm/c0_p0", params={"size": "huge"})
    assert r.status_code == 400 and "size" in r.json()["detail"]


# ---- search -------------------------------------------------------------------------------------------------------------
def test_search_by_gallery_id_leaves_the_reference_out_and_equals_the_model(clip, world):
    ids = gallery_ids(world)
    r = clip.post("/api/search", json={"reference": "warm/c0_p0", "text": TEXT, "k": 17})
    assert r.status_code == 200, r.text
    res = r.json()
    got = [x["id"] for x in res["results"]]
    assert "warm/c0_p0" not in got and len(got) == 17 and res["reference"] == {
        "id": "warm/c0_p0", "excluded": True, "url": "/api/images/warm/c0_p0"}
    assert res["results"][0]["url"] == f"/api/images/{got[0]}" and res["took_ms"] > 0
    # the same ranking and scores as the model's own similarity (the index rescoring is exact)
    model = cirfusion.load(world["ck"]["clip"])
    paths = [world["gallery"] / f"{i}.png" for i in ids]
    q = model.encode_query([paths[ids.index("warm/c0_p0")]], [TEXT])
    s = model.similarity(q, model.encode_gallery(paths))[0].double().numpy()
    want = [ids[i] for i in np.lexsort((np.arange(len(ids)), -s)) if ids[i] != "warm/c0_p0"]
    assert got == want
    assert [x["score"] for x in res["results"]] == pytest.approx([s[ids.index(i)] for i in got], abs=1e-5)
    kept = clip.post("/api/search", json={"reference": "warm/c0_p0", "text": TEXT, "k": 18, "keep_reference": True}).json()
    assert [x["id"] for x in kept["results"]] == [ids[i] for i in np.lexsort((np.arange(len(ids)), -s))]
    assert kept["reference"]["excluded"] is False


def test_an_upload_equal_to_a_gallery_image_is_that_image(world):
    c = client(world, "image")  # image-only: the reference itself would score 1, first
    data = (world["gallery"] / "cool" / "c1_p2.png").read_bytes()
    res = c.post("/api/search", files={"image": ("mine.png", data, "image/png")}, data={"text": "x", "k": "3"}).json()
    assert res["reference"]["id"] == "cool/c1_p2" and res["reference"]["excluded"] is True
    assert "cool/c1_p2" not in [x["id"] for x in res["results"]]
    kept = c.post("/api/search", files={"image": ("mine.png", data, "image/png")},
                  data={"text": "x", "k": "3", "keep_reference": "true"}).json()
    assert kept["results"][0]["id"] == "cool/c1_p2" and kept["results"][0]["score"] == pytest.approx(1.0, abs=1e-3)
    # a new picture is no gallery image: nothing left out
    new = c.post("/api/search", files={"image": ("new.jpg", draw((10, 250, 250), (5, 5), (64, 48), "JPEG"), "image/jpeg")},
                 data={"text": "x", "k": "18"}).json()
    assert new["reference"] == {"id": None, "excluded": False, "url": None} and len(new["results"]) == 18


def test_index_target_serves_the_same_results_as_the_checkpoint(world, clip):
    c = client(world, "index")
    assert c.get("/api/info").json()["source"]["source"] == "index"
    q = {"reference": "cool/c3_p1", "text": TEXT, "k": 6}
    got, want = c.post("/api/search", json=q).json()["results"], clip.post("/api/search", json=q).json()["results"]
    assert [x["id"] for x in got] == [x["id"] for x in want]
    # the index catalog encodes the reference file anew, the checkpoint one reads its cached features: float rounding
    assert [x["score"] for x in got] == pytest.approx([x["score"] for x in want], abs=1e-5)


def test_dafm_is_served_by_exact_fused_scoring_with_shapley_explanations(fused, world):
    ids = gallery_ids(world)
    info = fused.get("/api/info").json()
    assert info["model"] == "dafm" and info["mode"] == "model" and info["explanation"] == "shapley"
    res = fused.post("/api/search", json={"reference": "warm/c2_p1", "text": TEXT, "k": 12}).json()
    got = [x["id"] for x in res["results"]]
    assert "warm/c2_p1" not in got
    model = cirfusion.load(world["ck"]["dafm"])
    paths = [world["gallery"] / f"{i}.png" for i in ids]
    s = model.similarity(model.encode_query([paths[ids.index("warm/c2_p1")]], [TEXT]), model.encode_gallery(paths))[0]
    assert [x["score"] for x in res["results"]] == pytest.approx([float(s[ids.index(i)]) for i in got], abs=1e-5)
    ex = res["explanation"]
    assert ex["kind"] == "shapley" and ex["models"] == ["clip4cir", "image-only", "tg-cir"] and "Shapley" in ex["label"]
    assert sum(ex["gate_weights"].values()) == pytest.approx(1.0, abs=1e-5)
    assert [e["id"] for e in ex["results"]] == got[:10]  # the top results (explain_top = 10) are explained
    for e, r in zip(ex["results"], res["results"], strict=False):
        assert e["score"] == pytest.approx(r["score"], abs=1e-5)  # v(all) is the ranked fused score
        assert ex["baseline"] + sum(e["contributions"].values()) == pytest.approx(e["score"], abs=1e-4)


def test_a_method_explanation_hook_is_shown_as_it_is(world):
    c = client(world, "clip")
    ex = c.post("/api/search", json={"reference": "warm/c0_p0", "text": "red", "k": 2}).json()["explanation"]
    assert ex["kind"] == "similarity" and "no per-part breakdown" in ex["label"]
    method = c.app.state.catalog.method  # type: ignore[attr-defined]
    # what a branch-fusing method (DetailFusion, FineCIR) reports: its branch weights and the parsed modification
    method.explain_query = lambda q, text: {"branch_weights": {"global": 0.7, "detail": 0.3}, "parsed": text.split()}
    ex = c.post("/api/search", json={"reference": "warm/c0_p0", "text": "red sleeves", "k": 2}).json()["explanation"]
    assert ex == {"branch_weights": {"global": 0.7, "detail": 0.3}, "parsed": ["red", "sleeves"], "kind": "branches",
                  "method": "clip4cir"}


# ---- limits and errors -------------------------------------------------------------------------------------------------
def test_limits_answer_400_404_413_with_one_sentence(world):
    c = client(world, "clip", limits=Limits(max_upload_bytes=20_000, max_text_chars=40, max_k=5, max_pixels=200_000))
    ok = {"text": "red", "k": "3"}

    def check(r, status: int, *words: str) -> None:
        assert r.status_code == status, r.text
        body = r.json()
        assert set(body) == {"detail"} and isinstance(body["detail"], str) and "\n" not in body["detail"]
        for w in words:
            assert w in body["detail"], (w, body["detail"])

    big = np.random.default_rng(0).integers(0, 255, (120, 120, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, "PNG")  # ~43 kB of noise: over the 20 kB cap
    check(c.post("/api/search", files={"image": ("big.png", buf.getvalue(), "image/png")}, data=ok), 413, "limit")
    check(c.post("/api/search", content=b"x" * 400_000, headers={"content-type": "application/json"}), 413, "limit")
    chunked = (b"x" * 100_000 for _ in range(5))  # no Content-Length: counted while it streams
    check(c.post("/api/search", content=chunked, headers={"content-type": "application/json"}), 413, "limit")
    check(c.post("/api/search", files={"image": ("bad.png", b"not an image at all", "image/png")}, data=ok), 400,
          "upload", "image")
    check(c.post("/api/search", files={"image": ("t.png", draw((1, 2, 3), (0, 0), (600, 600)), "image/png")}, data=ok),
          400, "pixels")
    check(c.post("/api/search", files={"image": ("t.png", draw((1, 2, 3), (0, 0), (2, 250)), "image/png")}, data=ok),
          400, "aspect ratio")
    check(c.post("/api/search", json={"reference": "warm/c0_p0", "text": "x" * 41, "k": 3}), 400, "41 characters")
    check(c.post("/api/search", json={"reference": "warm/c0_p0", "text": "  ", "k": 3}), 400, "empty")
    for k in (0, 6, -1, "many", 2.5, True):
        check(c.post("/api/search", json={"reference": "warm/c0_p0", "text": "red", "k": k}), 400, "k must")
    check(c.post("/api/search", json={"reference": "nope", "text": "red"}), 404, "nope")
    check(c.post("/api/search", json={"text": "red"}), 400, "reference")
    check(c.post("/api/search", json={"reference": "warm/c0_p0", "text": "red", "colour": 1}), 400, "colour")
    check(c.post("/api/search", json=["warm/c0_p0"]), 400, "object")
    check(c.post("/api/search", content=b"{", headers={"content-type": "application/json"}), 400, "JSON")
    check(c.post("/api/search", content=b"hi", headers={"content-type": "text/plain"}), 400, "multipart")
    check(c.post("/api/search", files={"image": ("a.png", draw((1, 2, 3), (0, 0)), "image/png")},
                 data={**ok, "reference": "warm/c0_p0"}), 400, "not both")
    check(c.post("/api/search", json={"reference": "warm/c0_p0", "text": "red", "keep_reference": "maybe"}), 400,
          "keep_reference")
    check(c.get("/api/gallery", params={"limit": 0}), 400, "limit")
    check(c.get("/api/gallery", params={"offset": "x"}), 400, "offset")


# ---- adding images and the token ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["clip", "dafm"])
def test_added_images_are_found_without_a_rebuild(world, name):
    c = client(world, name)
    new = [draw((250, 120, 0), (4, 4)), draw((0, 120, 250), (16, 16), (40, 40), "JPEG")]
    r = c.post("/api/images", files=[("images", ("a.png", new[0], "image/png")), ("images", ("b.jpg", new[1], "image/jpeg"))])
    assert r.status_code == 200, r.text
    added = r.json()["added"]
    assert r.json()["gallery_size"] == 20 and all(a["added"] and a["id"].startswith("added/") for a in added)
    assert c.get("/api/info").json()["gallery_size"] == 20
    assert c.get(added[1]["url"]).content == new[1] and c.get(added[0]["thumbnail"]).status_code == 200
    # found: the reference itself when kept (its score is the best), left out by default, by id and by content
    for ref in ({"json": {"reference": added[0]["id"], "text": TEXT, "k": 20, "keep_reference": True}},):
        ids = [x["id"] for x in c.post("/api/search", **ref).json()["results"]]
        assert set(ids) >= {a["id"] for a in added}
    res = c.post("/api/search", files={"image": ("again.png", new[0], "image/png")}, data={"text": TEXT, "k": "19"}).json()
    assert res["reference"] == {"id": added[0]["id"], "excluded": True, "url": added[0]["url"]}
    assert added[0]["id"] not in [x["id"] for x in res["results"]] and added[1]["id"] in [x["id"] for x in res["results"]]
    # the same bytes again, or a gallery file, are not added twice
    again = c.post("/api/images", files=[("images", ("x.png", new[0], "image/png")),
                                         ("images", ("g.png", (world["gallery"] / "warm/c0_p0.png").read_bytes(), "image/png"))])
    assert [(a["id"], a["added"]) for a in again.json()["added"]] == [(added[0]["id"], False), ("warm/c0_p0", False)]
    assert again.json()["gallery_size"] == 20
    bad = c.post("/api/images", files=[("images", ("x.png", b"junk", "image/png"))])
    assert bad.status_code == 400 and "image 1 (x.png)" in bad.json()["detail"]
    assert c.post("/api/images", data={"nothing": "1"}).status_code == 400


def test_a_restarted_server_adds_back_what_it_kept(world):
    up = world["root"] / "kept-uploads"
    up.mkdir()
    first = load_catalog(world["ck"]["clip"], world["gallery"], cache_dir=world["cache"], upload_dir=up, say=lambda m: None)
    new = [draw((250, 20, 200), (5, 9)), draw((20, 250, 200), (12, 3), (40, 40), "JPEG")]
    ids = [a["id"] for a in first.add_images([(new[0], "a.png"), (new[1], "b.jpg")])]
    (up / "stray.png").write_bytes(new[0])  # not named by its hash: not the server's
    said: list[str] = []
    again = load_catalog(world["ck"]["clip"], world["gallery"], cache_dir=world["cache"], upload_dir=up, say=said.append)
    assert restore_uploads(again, up, say=said.append) == 2
    assert again.size == 20 and all(again.has(i) for i in ids)
    assert any("stray.png" in m and "not a file the server kept" in m for m in said)
    want = first.search(TEXT, 5, reference=ids[0])
    got = again.search(TEXT, 5, reference=ids[0])
    assert [h.id for h in got.hits] == [h.id for h in want.hits]


def test_the_token_rule(world, monkeypatch):
    c = client(world, "clip", token=TOKEN)
    files = [("images", ("a.png", draw((90, 90, 90), (3, 3)), "image/png"))]
    for headers in ({}, {"Authorization": "Bearer wrong-token-wrong-token"}, {"Authorization": TOKEN},
                    {"Authorization": f"Basic {TOKEN}"}):
        r = c.post("/api/images", files=files, headers=headers)
        assert r.status_code == 401 and set(r.json()) == {"detail"} and r.headers["www-authenticate"] == "Bearer"
    assert c.get("/api/info").json()["gallery_size"] == 18
    r = c.post("/api/images", files=files, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and r.json()["gallery_size"] == 19
    # searching needs no token
    assert c.post("/api/search", json={"reference": "warm/c0_p0", "text": "red"}).status_code == 200
    # binding off loopback needs a token; loopback does not
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and is_loopback("127.8.0.1")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("192.168.1.4")
    assert not is_loopback("example.org")
    check_binding("127.0.0.1", None)
    check_binding("0.0.0.0", TOKEN)
    with pytest.raises(CirfusionError, match="not loopback"):
        check_binding("0.0.0.0", None)
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert resolve_token(None) is None
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    assert resolve_token(None) == TOKEN
    with pytest.raises(CirfusionError, match="at least 16"):
        resolve_token("short")


def test_serve_refuses_to_start_off_loopback_without_a_token(world, monkeypatch, capsys):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    rc = main(["serve", str(world["ck"]["clip"]), "--images", str(world["gallery"]), "--host", "0.0.0.0"])
    err = capsys.readouterr().err
    assert rc == 2 and "not loopback" in err and err.count("\n") == 1
    assert main(["serve", str(world["ck"]["clip"]), "--host", "127.0.0.1", "--no-progress"]) == 2
    assert "--images DIR" in capsys.readouterr().err
    assert main(["serve", str(world["index"]), "--images", str(world["gallery"])]) == 2
    assert "is an index" in capsys.readouterr().err


# ---- concurrency ---------------------------------------------------------------------------------------------------------
def test_model_work_never_blocks_the_event_loop(world):
    c = client(world, "clip")
    model_thread = c.app.state.model_thread  # type: ignore[attr-defined]
    release, entered = threading.Event(), threading.Event()
    real = model_thread._run

    def slow(*args, **kwargs):
        entered.set()
        release.wait(10)
        return real(*args, **kwargs)

    model_thread._run = slow
    out: dict[str, int] = {}
    t = threading.Thread(target=lambda: out.setdefault("status", c.post(
        "/api/search", json={"reference": "warm/c0_p0", "text": "red"}).status_code))
    t.start()
    try:
        assert entered.wait(10)
        t0 = time.perf_counter()
        assert c.get("/healthz").status_code == 200 and c.get("/api/info").status_code == 200  # served meanwhile
        assert time.perf_counter() - t0 < 5
        assert "status" not in out
    finally:
        release.set()
        t.join(10)
    assert out["status"] == 200


# ---- the reference is not its own answer in the Python API ------------------------------------------------------------
def test_rank_leaves_the_reference_out(world):
    model = cirfusion.load(world["ck"]["image"])
    ids = gallery_ids(world)
    paths = [world["gallery"] / f"{i}.png" for i in ids]
    ref = paths[4]
    ranked = model.rank(ref, "anything", paths, k=18)
    assert 4 not in [i for i, _ in ranked] and len(ranked) == 17
    kept = model.rank(ref, "anything", paths, k=3, keep_reference=True)
    assert kept[0][0] == 4 and kept[0][1] == pytest.approx(1.0, abs=1e-3)
    g = model.encode_gallery(paths)  # an embedding: the reference found by its own gallery embedding
    assert model.rank(ref, "anything", g, k=18) == ranked
    assert model.rank(ref, "anything", g, k=3, keep_reference=True)[0][0] == 4
    fused = cirfusion.load(world["ck"]["dafm"])  # a bundled (dict) embedding with fingerprints
    gf = fused.encode_gallery(paths)
    assert 4 not in [i for i, _ in fused.rank(ref, TEXT, gf, k=18)]
    assert 4 in [i for i, _ in fused.rank(ref, TEXT, gf, k=18, keep_reference=True)]
    other = Path(world["root"]) / "other.png"
    other.write_bytes(draw((1, 250, 1), (1, 1)))
    assert len(model.rank(other, "x", paths, k=18)) == 18
    assert model.rank(ref, "x", [ref], k=1) == []


# ---- batching: the model thread answers concurrent searches together ------------------------------------------------------
@pytest.mark.parametrize("name", ["dafm", "dafm16", "clip", "image"])
def test_a_batch_of_searches_answers_each_as_if_asked_alone(world, name):
    if name == "dafm16" and "dafm16" not in world["ck"]:
        seed_everything(1)
        bb = create_backbone("tiny")
        bases = [create_method("clip4cir", bb, embed_dim=16, hidden_dim=32), create_method("sprc", bb)]
        world["ck"]["dafm16"] = save_checkpoint(DAFM.from_bases(bases, score_dtype="float16"),
                                                world["root"] / "ck" / "dafm16")
    cat = client(world, name).app.state.catalog  # type: ignore[attr-defined]
    asked = [("warm/c0_p0", TEXT), ("cool/c1_p1", "red"), ("warm/c2_p2", "bigger"), ("cool/c3_p0", TEXT),
             ("warm/c4_p1", "same but blue")]
    qs = [cat.check(t, 6, reference=r) for r, t in asked]
    alone = [cat.search_batch([q])[0] for q in qs]
    together = cat.search_batch(qs)
    for a, b in zip(alone, together, strict=True):
        # the same answer; float32 query encoders of a batch may round differently from a lone query's in the last bit
        # (~1e-7), which a fused model's per-query standardisation magnifies on this tiny, barely spread gallery
        assert [h.id for h in a.hits] == [h.id for h in b.hits] and a.reference_id == b.reference_id
        assert [h.score for h in a.hits] == pytest.approx([h.score for h in b.hits], abs=1e-6 if name != "dafm" else 3e-4)
        assert a.explanation.keys() == b.explanation.keys()
        for ea, eb in zip(a.explanation.get("results", []), b.explanation.get("results", []), strict=True):
            assert ea["id"] == eb["id"]
            assert list(ea["contributions"].values()) == pytest.approx(list(eb["contributions"].values()), abs=3e-4)
    # a query that fails (an upload the server no longer holds) fails alone; the others are answered as before
    lost = replace(qs[0], row=None, upload_key="0" * 64, image=None)
    mixed = cat.search_batch([qs[1], lost, qs[2]])
    assert isinstance(mixed[1], ServeError) and "send it again" in str(mixed[1])
    assert [h.id for h in mixed[0].hits] == [h.id for h in alone[1].hits]
    assert [h.id for h in mixed[2].hits] == [h.id for h in alone[2].hits]


def test_the_model_thread_batches_what_waits_and_runs_calls_alone():
    gate, sizes, order = threading.Event(), [], []

    def run(items):
        gate.wait(10)
        sizes.append(len(items))
        order.extend(items)
        return [ValueError(f"bad {i}") if i == 3 else i * 10 for i in items]

    b = Batcher(run, max_batch=4)
    try:
        futs = [b.submit(i) for i in range(6)]
        call = b.call(lambda: order.append("call") or "done")
        more = b.submit(6)
        gate.set()
        assert [f.result(10) for f in futs[:3]] == [0, 10, 20]
        with pytest.raises(ValueError, match="bad 3"):
            futs[3].result(10)
        assert futs[4].result(10) == 40 and futs[5].result(10) == 50 and call.result(10) == "done"
        assert more.result(10) == 60
        # the first item was taken alone (nothing else waited yet), then at most max_batch; the call ran alone, in order
        assert max(sizes) <= 4 and sum(sizes) == 7 and order.index("call") == 6 and order[-1] == 6
        assert b.batches == len(sizes) and b.answered == 7
    finally:
        b.close()
    with pytest.raises(ValueError, match="max_batch"):
        Batcher(run, max_batch=0)


def test_a_fused_models_bases_side_by_side_score_exactly_as_in_turn(world):
    c = client(world, "dafm")
    cat = c.app.state.catalog  # type: ignore[attr-defined]
    assert cat.method.base_map is not map and c.get("/api/info").json()["model_thread"]["base_threads"] == 2
    qs = [cat.check(t, 8, reference=r) for r, t in [("warm/c0_p0", TEXT), ("cool/c3_p2", "red"), ("warm/c4_p1", "x")]]
    side_by_side = [cat.search_batch([q])[0] for q in qs] + cat.search_batch(qs)
    cat.method.base_map = map
    in_turn = [cat.search_batch([q])[0] for q in qs] + cat.search_batch(qs)
    for a, b in zip(side_by_side, in_turn, strict=True):
        assert [(h.id, h.score) for h in a.hits] == [(h.id, h.score) for h in b.hits]  # bitwise: the same computation
        assert a.explanation == b.explanation


def test_one_failing_query_fails_alone_in_its_batch(world):
    cat = client(world, "dafm").app.state.catalog  # type: ignore[attr-defined]
    qs = [cat.check(t, 4, reference=r) for r, t in [("warm/c0_p0", "red"), ("cool/c1_p1", "boom"), ("warm/c2_p2", TEXT)]]
    want = [cat.search_batch([q])[0] for q in (qs[0], qs[2])]
    real = cat._answer

    def answer(g, batch, feats, tf):
        if any(c.text == "boom" for c in batch):
            raise RuntimeError("boom")
        return real(g, batch, feats, tf)

    cat._answer = answer
    got = cat.search_batch(qs)
    assert isinstance(got[1], RuntimeError)
    assert [h.id for h in got[0].hits] == [h.id for h in want[0].hits]
    assert [h.id for h in got[2].hits] == [h.id for h in want[1].hits]


def test_the_model_thread_refuses_work_once_stopped():
    b = Batcher(lambda items: list(items))
    assert b.submit(1).result(5) == 1
    b.close()
    with pytest.raises(RuntimeError, match="stopped"):
        b.submit(2).result(5)
    with pytest.raises(RuntimeError, match="stopped"):
        b.call(lambda: 3).result(5)

    def broken_setup():
        raise OSError("no threads here")

    bad = Batcher(lambda items: list(items), setup=broken_setup)
    with pytest.raises(RuntimeError, match="set-up failed"):
        bad.submit(1).result(5)
