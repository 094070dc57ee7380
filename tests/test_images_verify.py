"""Safe image loading and `cirfusion data verify`."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from cirfusion.cli import main
from cirfusion.data import CIRDataset, Gallery, Query, register_dataset
from cirfusion.data.images import ImageLoadError, load_image
from cirfusion.data.registry import DATASETS
from cirfusion.data.verify import verify_dataset


def _save(path: Path, size=(16, 12), color=(200, 10, 10), mode="RGB", fmt="PNG", **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, fmt, **kw)
    return path


def test_load_image_rgb_and_palette(tmp_path):
    im = load_image(_save(tmp_path / "a.png"))
    assert im.mode == "RGB" and im.size == (16, 12)
    gray = load_image(_save(tmp_path / "g.png", mode="L", color=128))
    assert gray.mode == "RGB" and gray.getpixel((0, 0)) == (128, 128, 128)


def test_load_image_transparent_composited_on_white(tmp_path):
    im = load_image(_save(tmp_path / "t.png", mode="RGBA", color=(0, 0, 0, 0)))
    assert im.getpixel((3, 3)) == (255, 255, 255)


def test_exif_orientation_applied(tmp_path):
    img = Image.new("RGB", (20, 10), (0, 255, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    p = tmp_path / "rot.jpg"
    img.save(p, "JPEG", exif=exif.tobytes())
    assert load_image(p).size == (10, 20)


@pytest.mark.parametrize(
    "maker,needle",
    [
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: p.write_bytes(b"this is not an image at all"), "not a recognised image"),
        (lambda p: None, "does not exist"),
    ],
)
def test_bad_files_named(tmp_path, maker, needle):
    p = tmp_path / "bad.jpg"
    maker(p)
    with pytest.raises(ImageLoadError) as ei:
        load_image(p)
    assert str(p) in str(ei.value) and needle in str(ei.value)


def test_truncated_jpeg(tmp_path):
    buf = io.BytesIO()
    Image.effect_noise((256, 256), 64).convert("RGB").save(buf, "JPEG", quality=95)
    p = tmp_path / "trunc.jpg"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageLoadError) as ei:
        load_image(p)
    assert "trunc.jpg" in str(ei.value)


def test_decompression_bomb_limit(tmp_path):
    p = _save(tmp_path / "big.png", size=(300, 300))
    with pytest.raises(ImageLoadError, match="above the limit"):
        load_image(p, max_pixels=10_000)


def _folder_dataset(root: Path) -> CIRDataset:
    ids = ["a", "b", "c", "d"]
    _save(root / "a.png")
    _save(root / "b.png", color=(0, 0, 255))
    (root / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage garbage")
    (root / "d.png").write_bytes(b"")
    gallery = Gallery(ids, [root / f"{i}.png" for i in ids])
    queries = [
        Query("q1", "a", "make it blue", targets=("b",)),
        Query("q2", "b", "something", targets=("zzz",)),
    ]
    return CIRDataset("folder-test", "val", queries, gallery, root=root)


def _load_folder(root: Path, split: str) -> CIRDataset:
    return _folder_dataset(root)


@pytest.fixture
def folder_loader():
    """The test folder registered as a dataset for the CLI, and unregistered after (no leak into other tests)."""
    register_dataset("_verify_test_folder")(_load_folder)
    yield
    DATASETS.unregister("_verify_test_folder")


def test_verify_collects_all_problems(tmp_path):
    rep = verify_dataset(_folder_dataset(tmp_path), progress=False)
    assert not rep.ok
    items = {(p.kind, p.item) for p in rep.problems}
    assert ("image", "c") in items and ("image", "d") in items and ("reference", "q2") in items
    assert rep.images_checked == 4 and rep.queries_checked == 2


def test_verify_cli_names_both_bad_files_and_fails(tmp_path, capsys, folder_loader):
    _folder_dataset(tmp_path)
    rc = main(["data", "verify", "_verify_test_folder", "--root", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "c.png" in out and "d.png" in out and "empty" in out
    assert "zzz" in out

    rc = main(["data", "verify", "_verify_test_folder", "--root", str(tmp_path), "--no-progress", "--json"])
    rep = json.loads(capsys.readouterr().out)
    assert rc == 1 and rep[0]["ok"] is False and rep[0]["images_checked"] == 4


def test_verify_clean_dataset_passes(tmp_path):
    _save(tmp_path / "x.png")
    _save(tmp_path / "y.png")
    ds = CIRDataset("clean", "val", [Query("q", "x", "t", targets=("y",))], Gallery(["x", "y"], [tmp_path / "x.png", tmp_path / "y.png"]))
    rep = verify_dataset(ds, progress=False)
    assert rep.ok and "OK" in rep.summary()
