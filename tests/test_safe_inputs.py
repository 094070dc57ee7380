"""Issue 8, "Inputs that cannot hurt it": images, annotation JSON, symlinks and the Python API. One test per probe row
(each names its row); every one would fail on the code before the fix."""

from __future__ import annotations

import io
import json
import os
import resource
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cirfusion.api import CIRInputError, CIRModel
from cirfusion.backbones.base import ImageFeatures
from cirfusion.commands.index import CommandError
from cirfusion.commands.search import resolve_reference
from cirfusion.data._jsonio import read_json, read_jsonl
from cirfusion.data.custom import load_custom
from cirfusion.data.images import MAX_ASPECT_RATIO, ImageLoadError, load_image, read_image_bytes
from cirfusion.data.schema import DataError


def _png(path: Path, size: tuple[int, int], mode: str = "L", color: object = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, "PNG")  # type: ignore[arg-type]
    return path


# ---- row: aspect-ratio bomb ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(1, 60_000), (1, 500_000), (70_000, 2)])
def test_row_aspect_ratio_bomb_is_refused_before_decoding(tmp_path, size):
    p = _png(tmp_path / "bomb.png", size)
    assert p.stat().st_size < 5_000  # the probe's files: a few hundred bytes
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    for source in (p, p.read_bytes()):
        with pytest.raises(ImageLoadError, match=r"aspect ratio .* above the limit of 100:1"):
            load_image(source)
    with pytest.raises(ImageLoadError, match="aspect ratio"):
        read_image_bytes(p)
    # before the fix: 15 s and +4.2 GB for 1x60000 (resize_center_crop to 128), 1x500000 needed over 25 GB
    assert time.perf_counter() - t0 < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 200_000  # KiB
    # the limit itself is accepted
    ok = load_image(_png(tmp_path / "wide.png", (MAX_ASPECT_RATIO * 2, 2)))
    assert ok.size == (200, 2) and ok.mode == "RGB"


# ---- row: a file is not read fully before its format is known --------------------------------------------------------


def test_row_huge_junk_file_is_refused_on_its_size_and_junk_on_its_header(tmp_path):
    big = tmp_path / "junk.jpg"
    with open(big, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0junk")
        f.truncate(64 * 2**20)  # sparse: 64 MiB on paper
    for call in (lambda: load_image(big, max_bytes=2**20), lambda: read_image_bytes(big, max_bytes=2**20)):
        with pytest.raises(ImageLoadError, match=r"67,108,864 bytes, above the limit of 1,048,576") as ei:
            call()
        assert str(big) in str(ei.value)
    with pytest.raises(ImageLoadError, match="above the limit"):
        load_image(b"\x89PNG" + bytes(2**20), max_bytes=2**20)
    small = tmp_path / "small.jpg"
    small.write_bytes(b"definitely not an image" * 100)
    with pytest.raises(ImageLoadError, match="not a recognised image format"):
        read_image_bytes(small)
    good = _png(tmp_path / "ok.png", (5, 4), "RGB", (1, 2, 3))
    assert read_image_bytes(good) == good.read_bytes()


# ---- row: 16-bit and float modes -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode,values,expected",
    [
        # I;16: the mode's own 0..65535 range (a dark 16-bit photo stays dark)
        ("I;16", np.array([[0, 257 * 100, 65535]], dtype=np.uint16), [0, 100, 255]),
        # I: the smallest standard range holding the values: 0..65535 here
        ("I", np.array([[0, 32896, 65535]], dtype=np.int32), [0, 128, 255]),
        # I outside every standard range: the image's own min..max
        ("I", np.array([[-1000, 0, 1000]], dtype=np.int32), [0, 128, 255]),
        # F in 0..1: the float convention
        ("F", np.array([[0.0, 0.5, 1.0]], dtype=np.float32), [0, 128, 255]),
        # F in 0..255 (an 8-bit picture as floats): kept as it is
        ("F", np.array([[0.0, 100.0, 255.0]], dtype=np.float32), [0, 100, 255]),
        # F with signed values (a disparity map): its own min..max
        ("F", np.array([[-3.0, 0.5, 4.0]], dtype=np.float32), [0, 128, 255]),
    ],
)
def test_row_16bit_and_float_modes_are_rescaled_not_clipped(tmp_path, mode, values, expected):
    im = Image.fromarray(values, mode) if mode != "I;16" else Image.frombytes("I;16", (3, 1), values.tobytes())
    assert im.mode == mode
    got = load_image(im)
    assert got.mode == "RGB"
    assert [got.getpixel((x, 0))[0] for x in range(3)] == expected
    if mode in ("I;16", "I"):  # also from a file (16-bit PNG, 32-bit TIFF)
        p = tmp_path / ("wide.png" if mode == "I;16" else "wide.tif")
        im.save(p)
        from_file = load_image(p)
        assert [from_file.getpixel((x, 0))[0] for x in range(3)] == expected
    nan = Image.fromarray(np.array([[0.0, np.nan]], dtype=np.float32), "F")
    with pytest.raises(ImageLoadError, match="NaN"):
        load_image(nan, name="depth.tif")


# ---- row: one loading path for PIL images ---------------------------------------------------------------------------


class _StubBackbone:
    """Records what preprocess receives (the API's images after the safe loader)."""

    def __init__(self) -> None:
        self.seen: list[Image.Image] = []

    def weights_hash(self) -> str:
        return ""

    def eval(self) -> _StubBackbone:
        return self

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        self.seen.append(image)
        return torch.zeros(3, 2, 2)

    def encode_image(self, pixels: torch.Tensor) -> ImageFeatures:
        return ImageFeatures(global_=torch.zeros(len(pixels), 4), tokens=torch.zeros(len(pixels), 1, 4))


class _StubMethod:
    class dims:
        backbone_id = "stub"
        weights_hash = ""

    def eval(self) -> _StubMethod:
        return self


def _stub_model() -> tuple[CIRModel, _StubBackbone]:
    bb = _StubBackbone()
    return CIRModel(_StubMethod(), {"method": "stub"}, None, bb), bb  # type: ignore[arg-type]


def test_row_pil_images_go_through_the_same_safe_path(tmp_path):
    rgba = Image.new("RGBA", (20, 10), (0, 0, 0, 0))  # transparent: must come out white, not black
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    rgba.info["exif"] = exif.tobytes()
    buf = io.BytesIO()
    rgba.save(buf, "PNG", exif=exif.tobytes())
    from_png = Image.open(io.BytesIO(buf.getvalue()))
    model, bb = _stub_model()
    model.image_features([from_png, buf.getvalue(), _png(tmp_path / "a.png", (3, 3))])
    assert [im.mode for im in bb.seen] == ["RGB"] * 3
    assert bb.seen[0].size == (10, 20) and bb.seen[0].getpixel((0, 0)) == (255, 255, 255)
    assert bb.seen[1].size == (10, 20)
    assert from_png.mode == "RGBA" and from_png.size == (20, 10)  # the caller's image is left alone
    with pytest.raises(ImageLoadError, match="aspect ratio"):
        model.image_features([Image.new("RGB", (1, 60_000))])
    with pytest.raises(ImageLoadError, match="above the limit"):
        load_image(Image.new("L", (1000, 1000)), max_pixels=10_000)


# ---- row: API edge cases -------------------------------------------------------------------------------------------


def test_row_api_k_le_0_empty_gallery_and_missing_text_are_clear_errors(tmp_path):
    model, _ = _stub_model()
    img = _png(tmp_path / "q.png", (4, 4))
    for k in (0, -3, 1.5, True):
        with pytest.raises(CIRInputError, match="k must be a positive integer"):
            model.rank(img, "red", [img], k=k)  # type: ignore[arg-type]
    with pytest.raises(CIRInputError, match="text must be a string"):
        model.rank(img, None, [img])  # type: ignore[arg-type]
    with pytest.raises(CIRInputError, match="gallery is empty"):
        model.rank(img, "red", [])
    with pytest.raises(CIRInputError, match="gallery is empty"):
        model.encode_gallery([])
    with pytest.raises(CIRInputError, match="no rows"):
        model.rank(img, "red", torch.zeros(0, 4))
    with pytest.raises(CIRInputError, match="text #1 is NoneType"):
        model.encode_query([img, img], ["red", None])  # type: ignore[list-item]
    with pytest.raises(CIRInputError, match="expected a list of strings"):
        model.text_features(None)  # type: ignore[arg-type]
    with pytest.raises(CIRInputError, match="2 reference images but 1 texts"):
        model.encode_query([img, img], ["red"])
    assert issubclass(CIRInputError, ValueError) and issubclass(CIRInputError, TypeError)


# ---- row: deeply nested JSON ---------------------------------------------------------------------------------------


def test_row_deeply_nested_json_is_a_data_error_naming_the_file(tmp_path):
    deep = "[" * 200_000 + "]" * 200_000
    p = tmp_path / "cap.json"
    p.write_text(deep)
    with pytest.raises(DataError, match="nested too deeply") as ei:
        read_json(p)
    assert str(p) in str(ei.value)
    q = tmp_path / "queries.val.jsonl"
    q.write_text('{"a": 1}\n{"b": ' + deep + "}\n")
    with pytest.raises(DataError, match=r"line 2.*nested too deeply"):
        read_jsonl(q)


# ---- row: symlink loop / dangling symlink ---------------------------------------------------------------------------


def test_row_symlink_loop_and_dangling_symlink_are_named(tmp_path):
    loop = tmp_path / "loop.png"
    os.symlink(loop, loop)
    dangling = tmp_path / "gone.png"
    os.symlink(tmp_path / "nowhere.png", dangling)
    with pytest.raises(ImageLoadError, match="symlink loop") as ei:
        load_image(loop)
    assert str(loop) in str(ei.value)
    with pytest.raises(ImageLoadError, match=r"dangling symlink: it points to .*nowhere.png, which does not exist"):
        load_image(dangling)
    with pytest.raises(ImageLoadError, match="dangling symlink"):
        read_image_bytes(dangling)
    with pytest.raises(ImageLoadError, match="file does not exist"):
        load_image(tmp_path / "plain-missing.png")
    # a dataset folder with a dangling link: the image stays in the gallery, so opening it says what is wrong
    root = tmp_path / "ds"
    _png(root / "images" / "a.png", (4, 4))
    os.symlink(root / "images" / "missing.png", root / "images" / "b.png")
    (root / "queries.val.jsonl").write_text(json.dumps({"qid": "1", "reference": "a", "text": "t", "targets": ["b"]}))
    ds = load_custom(root, "val")
    assert ds.gallery.ids == ["a", "b"]
    with pytest.raises(ImageLoadError, match="dangling symlink"):
        load_image(ds.gallery.paths[1])


# ---- row: a symlink that leaves the dataset folder -------------------------------------------------------------------


def test_row_symlink_leaving_the_dataset_folder_is_refused_like_dotdot(tmp_path):
    outside = _png(tmp_path / "secret" / "x.png", (4, 4))
    root = tmp_path / "ds"
    _png(root / "a.png", (4, 4))
    (root / "queries.val.jsonl").write_text(json.dumps({"qid": "1", "reference": "a", "text": "t"}))
    os.symlink(outside, root / "evil.png")
    (root / "gallery.json").write_text(json.dumps({"a": "a.png", "e": "evil.png"}))
    with pytest.raises(DataError, match=r"'evil.png' is a symlink to .*secret/x.png, outside the dataset folder"):
        load_custom(root, "val")
    (root / "gallery.json").write_text(json.dumps({"a": "a.png", "e": "../secret/x.png"}))
    with pytest.raises(DataError, match="must be relative and stay inside the dataset folder"):
        load_custom(root, "val")
    # a linked folder inside the dataset that leads out is refused too
    os.unlink(root / "evil.png")
    os.symlink(tmp_path / "secret", root / "sub")
    (root / "gallery.json").write_text(json.dumps({"a": "a.png", "e": "sub/x.png"}))
    with pytest.raises(DataError, match="outside the dataset folder"):
        load_custom(root, "val")
    # ...and so is a link found by scanning an image folder
    (root / "gallery.json").unlink()
    imgs = root / "images"
    _png(imgs / "a.png", (4, 4))
    os.symlink(outside, imgs / "evil.png")
    with pytest.raises(DataError, match="outside the dataset folder"):
        load_custom(root, "val")
    # links inside the folder, and a dataset folder that is itself a link, are fine
    os.unlink(imgs / "evil.png")
    os.symlink(imgs / "a.png", imgs / "b.png")
    os.symlink(root, tmp_path / "ds-link")
    assert load_custom(tmp_path / "ds-link", "val").gallery.ids == ["a", "b"]


# ---- row: `cirfusion search` reference image -------------------------------------------------------------------------


def test_row_search_reference_uses_the_safe_loader(tmp_path):
    bomb = _png(tmp_path / "ref.png", (1, 60_000))
    with pytest.raises(CommandError, match=r"reference image .*ref.png: image is 1x60000: its aspect ratio"):
        resolve_reference(str(bomb), [], [])
    dangling = tmp_path / "link.png"
    os.symlink(tmp_path / "nowhere.png", dangling)
    with pytest.raises(CommandError, match="dangling symlink"):
        resolve_reference(str(dangling), ["x"], [None])
    good = _png(tmp_path / "g.png", (4, 4))
    image, ref_id = resolve_reference(str(good), ["g"], [good])
    assert image.mode == "RGB" and ref_id == "g"
