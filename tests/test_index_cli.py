"""`cirfusion index build` and `cirfusion search` end to end with the tiny backbone on a folder of generated images:
exact index == brute force through `cirfusion.load` (encode_query / encode_gallery / similarity), IVF/HNSW builds,
checkpoint search == index search, a DAFM fusion refused by the index but searchable directly, and the errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import cirfusion
from cirfusion.backbones import create_backbone
from cirfusion.checkpoint import save_checkpoint
from cirfusion.cli import main
from cirfusion.index import brute_force_search
from cirfusion.methods import create_method
from cirfusion.methods.dafm import DAFM
from cirfusion.seeding import seed_everything

TEXT = "make it green and move it to the left"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread for the whole module: embeddings computed with other thread counts may differ in the last bit."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _draw(path: Path, rgb: tuple[int, int, int], xy: tuple[int, int]) -> Path:
    from PIL import Image, ImageDraw

    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", (32, 32), (20, 20, 30))
    ImageDraw.Draw(im).rectangle([xy[0], xy[1], xy[0] + 11, xy[1] + 11], fill=rgb)
    im.save(path, "JPEG" if path.suffix == ".jpg" else "PNG", **({"quality": 95} if path.suffix == ".jpg" else {}))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 24-image gallery (two sub-folders, png and jpg), an outside reference image, checkpoints, a feature cache."""
    root = tmp_path_factory.mktemp("index_cli")
    colours = [(220, 30, 30), (30, 200, 40), (40, 60, 230), (240, 220, 30), (245, 245, 245), (150, 60, 210)]
    positions = [(2, 10), (18, 10), (10, 2), (10, 18)]
    gallery = root / "gallery"
    for c, rgb in enumerate(colours):
        for p, xy in enumerate(positions):
            sub = "warm" if c % 2 == 0 else "cool"
            _draw(gallery / sub / f"c{c}_p{p}{'.jpg' if p == 3 else '.png'}", rgb, xy)
    (gallery / "notes.txt").write_text("not an image")
    ref = _draw(root / "query" / "ref.png", (200, 40, 40), (17, 9))

    bb = create_backbone("tiny")
    seed_everything(0)
    ckpts = {}
    ckpts["clip"] = save_checkpoint(create_method("clip4cir", bb, embed_dim=16, hidden_dim=32), root / "ck" / "clip")
    seed_everything(1)
    ckpts["clip_other"] = save_checkpoint(create_method("clip4cir", bb, embed_dim=16, hidden_dim=32), root / "ck" / "clip_other")
    seed_everything(2)
    ckpts["other_bb"] = save_checkpoint(create_method("image-only", create_backbone("tiny:seed=1")), root / "ck" / "other_bb")
    seed_everything(3)
    bases = [create_method("clip4cir", bb, embed_dim=16, hidden_dim=32), create_method("image-only", bb)]
    ckpts["dafm"] = save_checkpoint(DAFM.from_bases(bases, score_dtype="float32"), root / "ck" / "dafm")
    return {"root": root, "gallery": gallery, "ref": ref, "ckpt": ckpts, "cache": root / "cache"}


def cli(world, *argv: str) -> list[str]:
    return [*argv, "--cache-dir", str(world["cache"]), "--no-progress"]


def run_json(capsys, argv: list[str]) -> list[dict]:
    capsys.readouterr()
    rc = main([*argv, "--json"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    return json.loads(cap.out)


def gallery_files(world) -> tuple[list[str], list[Path]]:
    files = sorted((p for p in world["gallery"].rglob("*") if p.suffix in (".png", ".jpg")),
                   key=lambda p: p.relative_to(world["gallery"]).as_posix())
    return [p.relative_to(world["gallery"]).with_suffix("").as_posix() for p in files], [p.resolve() for p in files]


@pytest.fixture(scope="module")
def exact_index(world):
    out = world["root"] / "idx-exact"
    assert main(cli(world, "index", "build", str(world["ckpt"]["clip"]), "--images", str(world["gallery"]),
                    "--out", str(out))) == 0
    return out


def test_exact_index_equals_brute_force_through_the_model(world, exact_index, capsys):
    meta = json.loads((exact_index / "meta.json").read_text())["meta"]
    ids, paths = gallery_files(world)
    assert json.loads((exact_index / "ids.json").read_text()) == ids
    assert meta["paths"] == [str(p) for p in paths] and meta["checkpoint"]["method"] == "clip4cir"
    assert meta["checkpoint"]["path"] == str(world["ckpt"]["clip"].resolve()) and len(meta["checkpoint"]["sha256"]) == 64
    assert meta["backbone"]["id"] == "tiny" and meta["backbone"]["weights_hash"] == create_backbone("tiny").weights_hash()

    k = 7
    got = run_json(capsys, cli(world, "search", str(exact_index), "--image", str(world["ref"]), "--text", TEXT, "-k", str(k)))
    assert [r["rank"] for r in got] == list(range(1, k + 1))

    # brute force with the Python API on raw images
    model = cirfusion.load(world["ckpt"]["clip"])
    q = model.encode_query([world["ref"]], [TEXT])
    g = model.encode_gallery(paths)
    s = model.similarity(q, g)[0].numpy()
    order = np.lexsort((np.arange(len(ids)), -s))[:k]
    assert [r["id"] for r in got] == [ids[i] for i in order]
    assert [r["path"] for r in got] == [str(paths[i]) for i in order]
    np.testing.assert_allclose([r["score"] for r in got], s[order], rtol=0, atol=1e-5)
    # ... and exactly the float64 reference brute force on the same embeddings
    bs, bids = brute_force_search(q.numpy(), g.numpy(), k, ids=ids)
    assert [r["id"] for r in got] == bids[0]
    np.testing.assert_allclose([r["score"] for r in got], bs[0], rtol=0, atol=1e-6)

    # text output: rank, score, id, path per line
    capsys.readouterr()
    assert main(cli(world, "search", str(exact_index), "--image", str(world["ref"]), "--text", TEXT, "-k", "3")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    rank, score, name, path = lines[0].split()
    assert (int(rank), name, path) == (1, got[0]["id"], got[0]["path"]) and float(score) == pytest.approx(got[0]["score"], abs=1e-6)


def test_reference_in_gallery_is_excluded_unless_kept(world, exact_index, capsys):
    ids, paths = gallery_files(world)
    ref = paths[5]
    base = cli(world, "search", str(exact_index), "--text", TEXT, "-k", str(len(ids)))
    got = run_json(capsys, [*base, "--image", str(ref)])
    assert len(got) == len(ids) - 1 and ids[5] not in [r["id"] for r in got]
    kept = run_json(capsys, [*base, "--image", str(ref), "--keep-reference"])
    assert len(kept) == len(ids) and ids[5] in [r["id"] for r in kept]
    # the reference given as a gallery id is the same query, excluded the same way
    assert run_json(capsys, [*base, "--image", ids[5]]) == got


def test_checkpoint_search_equals_index_search(world, exact_index, capsys):
    for image in (str(world["ref"]), str(gallery_files(world)[1][0])):
        common = ["--image", image, "--text", TEXT, "-k", "6"]
        via_index = run_json(capsys, cli(world, "search", str(exact_index), *common))
        direct = run_json(capsys, cli(world, "search", str(world["ckpt"]["clip"]), "--images", str(world["gallery"]), *common))
        assert direct == via_index


@pytest.mark.parametrize("kind,opts", [("hnsw", ["--hnsw-m", "8", "--ef-search", "64"]), ("ivf", ["--nlist", "2", "--nprobe", "2"])])
def test_approximate_kinds_build_and_search(world, exact_index, capsys, kind, opts):
    out = world["root"] / f"idx-{kind}"
    capsys.readouterr()
    assert main(cli(world, "index", "build", str(world["ckpt"]["clip"]), "--images", str(world["gallery"]),
                    "--out", str(out), "--kind", kind, *opts, "--json")) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["kind"] == kind and summary["num_items"] == 24
    meta = json.loads((out / "meta.json").read_text())
    assert meta["kind"] == kind and (meta["params"]["M"] == 8 if kind == "hnsw" else meta["params"]["nlist"] == 2)
    common = ["--image", str(world["ref"]), "--text", TEXT, "-k", "5"]
    approx = run_json(capsys, cli(world, "search", str(out), *common))
    exact = run_json(capsys, cli(world, "search", str(exact_index), *common))
    assert approx == exact  # 24 items, every list / the whole graph visited: the approximate search is exact here


def test_dafm_is_refused_by_the_index_but_searchable_directly(world, capsys):
    ck = world["ckpt"]["dafm"]
    capsys.readouterr()
    assert main(cli(world, "index", "build", str(ck), "--images", str(world["gallery"]), "--out",
                    str(world["root"] / "idx-dafm"))) == 2
    err = capsys.readouterr().err
    assert "dafm" in err and f"cirfusion search {ck} --images DIR" in err
    assert not (world["root"] / "idx-dafm").exists()

    k = 5
    got = run_json(capsys, cli(world, "search", str(ck), "--images", str(world["gallery"]), "--image", str(world["ref"]),
                               "--text", TEXT, "-k", str(k)))
    ids, paths = gallery_files(world)
    model = cirfusion.load(ck)
    s = model.similarity(model.encode_query([world["ref"]], [TEXT]), model.encode_gallery(paths))[0].numpy()
    order = np.lexsort((np.arange(len(ids)), -s))[:k]
    assert [r["id"] for r in got] == [ids[i] for i in order]
    np.testing.assert_allclose([r["score"] for r in got], s[order], rtol=0, atol=1e-4)


def test_errors_exit_2_and_name_the_file(world, exact_index, capsys):
    root, ck, gal = world["root"], world["ckpt"], str(world["gallery"])

    def fails(argv: list[str], *needles: str) -> None:
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        for n in needles:
            assert n in err, err

    search = ["--image", str(world["ref"]), "--text", TEXT]
    # missing checkpoint
    fails(cli(world, "index", "build", str(root / "nope"), "--images", gal, "--out", str(root / "i1")),
          str(root / "nope"), "checkpoint not found")
    fails(cli(world, "search", str(root / "nope"), *search), str(root / "nope"))
    moved = root / "idx-moved"
    shutil.copytree(exact_index, moved)
    meta_path = moved / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["meta"]["checkpoint"]["path"] = str(root / "gone")
    meta_path.write_text(json.dumps(meta))
    fails(cli(world, "search", str(moved), *search), str(root / "gone"), "checkpoint not found", "--checkpoint")
    # ... found again with --checkpoint (the same checkpoint, moved)
    assert run_json(capsys, cli(world, "search", str(moved), *search, "--checkpoint", str(ck["clip"]))) == \
        run_json(capsys, cli(world, "search", str(exact_index), *search))
    # another checkpoint (same backbone), another backbone
    fails(cli(world, "search", str(exact_index), *search, "--checkpoint", str(ck["clip_other"])),
          str(ck["clip_other"]), "not the checkpoint")
    fails(cli(world, "search", str(exact_index), *search, "--checkpoint", str(ck["other_bb"])),
          str(ck["other_bb"]), "backbone 'tiny:seed=1'")
    # empty / missing image folder
    (root / "empty" / "sub").mkdir(parents=True)
    (root / "empty" / "readme.txt").write_text("x")
    fails(cli(world, "index", "build", str(ck["clip"]), "--images", str(root / "empty"), "--out", str(root / "i2")),
          str(root / "empty"), "empty")
    fails(cli(world, "search", str(ck["clip"]), "--images", str(root / "empty"), *search), str(root / "empty"), "empty")
    # unreadable / missing reference image
    bad = root / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    fails(cli(world, "search", str(exact_index), "--image", str(bad), "--text", TEXT), str(bad), "reference image")
    fails(cli(world, "search", str(ck["clip"]), "--images", gal, "--image", str(root / "no.png"), "--text", TEXT),
          str(root / "no.png"), "does not exist")
    # argument combinations
    fails(cli(world, "index", "build", str(ck["clip"]), "--images", gal, "--out", str(root / "i3"), "--nlist", "4"),
          "--nlist applies to --kind ivf")
    fails(cli(world, "index", "build", str(ck["clip"]), "--images", gal, "--out", str(exact_index)), "--overwrite")
    fails(cli(world, "search", str(ck["clip"]), *search), "--images DIR")
    fails(cli(world, "search", str(exact_index), *search, "--images", gal), "gallery is fixed")
    # a tampered index is caught by index.py's checksums
    (moved / "ids.json").write_text(json.dumps(json.loads((moved / "ids.json").read_text())[::-1]))
    fails(cli(world, "search", str(moved), *search, "--checkpoint", str(ck["clip"])), str(moved / "ids.json"), "sha256")


def test_overwrite_crash_between_renames_keeps_the_index(world, exact_index, capsys, monkeypatch):
    """`index build --overwrite` swaps directories with two renames; a crash between them used to lose the index.
    Now the previous index is put back by the next build, search or load."""
    import cirfusion.io as cio

    out = world["root"] / "idx-crash"
    shutil.copytree(exact_index, out)
    before = (out / "ids.json").read_text()
    real_replace = cio.os.replace
    calls = []

    def crash_on_second(src, dst):
        if Path(dst).parent == out.parent and out.name in Path(dst).name:  # the index swap's renames only
            calls.append((src, dst))
            if len(calls) == 2:  # the old index is aside, the new one not yet in place
                raise KeyboardInterrupt("simulated crash between the two renames")
        return real_replace(src, dst)

    monkeypatch.setattr(cio.os, "replace", crash_on_second)
    assert main(cli(world, "index", "build", str(world["ckpt"]["clip_other"]), "--images", str(world["gallery"]),
                    "--out", str(out), "--overwrite")) == 130
    monkeypatch.setattr(cio.os, "replace", real_replace)
    assert not out.exists() and list(out.parent.glob(f".{out.name}.old.*"))  # the crash state
    # loading recovers it (load_index puts the old index back), and it answers as the original index does
    from cirfusion.index import load_index

    assert load_index(out).ids == load_index(exact_index).ids
    search = ["--image", str(world["ref"]), "--text", TEXT]
    assert run_json(capsys, cli(world, "search", str(out), *search)) == run_json(capsys, cli(world, "search", str(exact_index), *search))
    assert (out / "ids.json").read_text() == before and not list(out.parent.glob(f".{out.name}.old.*"))


def test_build_after_a_crash_recovers_before_checking_overwrite(world, exact_index, capsys):
    out = world["root"] / "idx-crash2"
    shutil.copytree(exact_index, out.parent / f".{out.name}.old.12345")  # what the crash left, no `out`
    capsys.readouterr()
    assert main(cli(world, "index", "build", str(world["ckpt"]["clip"]), "--images", str(world["gallery"]),
                    "--out", str(out))) == 2  # the recovered index is not silently replaced without --overwrite
    assert "already holds an index" in capsys.readouterr().err and (out / "meta.json").is_file()


def test_checkpoint_backbone_outside_allowed_dirs_is_refused(world, capsys, tmp_path):
    """A checkpoint whose config names an hf backbone directory the user did not give: exit 2, nothing read."""
    ck = tmp_path / "ck"
    shutil.copytree(world["ckpt"]["clip"], ck)
    cfg = json.loads((ck / "config.json").read_text())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cfg["backbone"]["id"] = f"hf-clip:{elsewhere}"
    (ck / "config.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    argv = cli(world, "index", "build", str(ck), "--images", str(world["gallery"]), "--out", str(tmp_path / "i"))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--backbone-dir" in err and str(elsewhere) in err and str(ck / "config.json") in err
    cfg["backbone"]["id"] = "hf-clip:someone/model"
    (ck / "config.json").write_text(json.dumps(cfg))
    assert main(argv) == 2 and "--allow-download" in capsys.readouterr().err
