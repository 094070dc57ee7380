"""The shared primitives every module builds on: the KEY=VALUE parser (cirfusion.options), the registry, the
embedding-tree helpers, the atomic writers and the crash-recoverable directory swap, and the reference mask."""

from __future__ import annotations

import dataclasses
import os
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
import torch

import cirfusion.registry
from cirfusion import io as cio
from cirfusion.data.schema import CIRDataset, Gallery, Query, reference_columns, reference_mask
from cirfusion.embeddings import (
    cat_embeddings,
    embedding_len,
    first_leaf,
    rows_of,
    slice_embeddings,
    take_embeddings,
    tree_map,
)
from cirfusion.errors import CirfusionError, UnknownNameError
from cirfusion.options import (
    OptionError,
    accepted_options,
    check_options,
    format_options,
    parse_options,
    parse_pairs,
    parse_value,
    split_option_string,
)
from cirfusion.registry import Registry


# ---- options -------------------------------------------------------------------------------------------------------
def loader(root: Path, split: str, *, exclude_reference: bool = True, image_dir: str | Path = "images",
           limit: int | None = None, scale: float = 1.0, mode: Literal["a", "b"] = "a",
           kinds: Sequence[str] | None = None, **kwargs: Any) -> None:
    """A receiver with string annotations (this module uses ``from __future__ import annotations``)."""


@dataclasses.dataclass
class Hparams:
    hidden: int = 64
    dropout: float = 0.1
    names: tuple[str, ...] = ("a",)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    derived: int = dataclasses.field(default=0, init=False)


@pytest.mark.parametrize("text, value", [
    ("false", False), ("true", True), ("null", None), ("3", 3), ("0.5", 0.5), ("-2", -2), ('"x y"', "x y"),
    ("[1, 2]", [1, 2]), ('{"a": 1}', {"a": 1}), ("fine", "fine"), ("flase", "flase"), ("", ""),
    ("{relative_caption}", "{relative_caption}"), ("/data/cirr", "/data/cirr"), ("1e3", 1000.0),
])
def test_parse_value_is_json_or_the_bare_word(text, value):
    got = parse_value(text)
    assert got == value and type(got) is type(value)


def test_parse_value_survives_deeply_nested_json():
    assert parse_value("[" * 100_000) == "[" * 100_000  # not JSON (and too deep to recurse): a plain string


def test_parse_pairs_and_its_errors():
    assert parse_pairs([" a = 1", "b=x=y", "c="]) == {"a": 1, "b": "x=y", "c": ""}
    for bad, msg in ((["=1"], "KEY=VALUE"), (["no-equals"], "KEY=VALUE"), (["a-b=1"], "identifier"),
                     (["a=1", "a=2"], "'a' is given twice")):
        with pytest.raises(OptionError, match=msg):
            parse_pairs(bad, "--hparam")
    with pytest.raises(OptionError, match=r"^--hparam "):
        parse_pairs(["x"], "--hparam")
    assert issubclass(OptionError, CirfusionError) and issubclass(OptionError, ValueError)


def test_options_checked_against_a_signature():
    got = parse_options(["exclude_reference=false", "image_dir=imgs", "limit=5", "scale=2", "mode=b", 'kinds=["x"]'],
                        loader, skip=("root", "split"))
    assert got == {"exclude_reference": False, "image_dir": "imgs", "limit": 5, "scale": 2.0, "mode": "b",
                   "kinds": ["x"]}
    assert type(got["scale"]) is float  # an int is accepted where a float is expected
    assert parse_options(["limit=null"], loader, skip=("root", "split")) == {"limit": None}
    assert set(accepted_options(loader, skip=("root", "split"))) == {
        "exclude_reference", "image_dir", "limit", "scale", "mode", "kinds"}  # no root/split, no **kwargs


@pytest.mark.parametrize("item, msg", [
    ("exclude_reference=0", "option 'exclude_reference' must be bool, got 0"),
    ("exclude_reference=flase", "option 'exclude_reference' must be bool, got \"flase\""),
    ('exclude_reference="false"', "option 'exclude_reference' must be bool"),
    ("limit=true", "option 'limit' must be int | None, got true"),
    ("limit=2.5", "option 'limit' must be int | None"),
    ("scale=fast", "option 'scale' must be float"),
    ("mode=c", "option 'mode' must be Literal"),
    ("image_dir=3", "option 'image_dir' must be str | Path"),
    ("kinds=3", "option 'kinds' must be Sequence[str] | None"),
    ("exclude_refrence=false", "unknown option 'exclude_refrence'"),
    ("root=/x", "unknown option 'root'"),
])
def test_wrong_key_or_type_is_refused_with_the_valid_keys(item, msg):
    with pytest.raises(OptionError) as ei:
        parse_options([item], loader, what="--option for dataset 'toy'", skip=("root", "split"))
    text = str(ei.value)
    assert text.startswith("--option for dataset 'toy': ") and msg in text
    assert text.endswith("valid options: exclude_reference (bool), image_dir (str | Path), kinds (Sequence[str] | "
                         "None), limit (int | None), mode (Literal['a', 'b']), scale (float)")


def test_dataclass_receivers():
    assert parse_options(["hidden=128", "dropout=0", 'names=["b", "c"]', 'extra={"k": 1}'], Hparams) == {
        "hidden": 128, "dropout": 0.0, "names": ("b", "c"), "extra": {"k": 1}}
    acc = accepted_options(Hparams)
    assert set(acc) == {"hidden", "dropout", "names", "extra"}  # init=False fields are not options
    assert acc["extra"][1] == {} and acc["hidden"][1] == 64
    with pytest.raises(OptionError, match=r"option 'hidden' must be int, got 1.5; valid options: dropout \(float\), "
                                          r"extra \(dict\[str, Any\]\), hidden \(int\), names \(tuple\[str, \.\.\.\]\)"):
        parse_options(["hidden=1.5"], Hparams, what="--hparam")
    with pytest.raises(OptionError, match="unknown option 'derived'"):
        parse_options(["derived=1"], Hparams)
    with pytest.raises(OptionError, match="option 'names' must be"):
        parse_options(["names=[1]"], Hparams)


def test_unannotated_parameters_take_their_default_type_and_any_takes_anything():
    def f(a=1, b=None, c="x", d: Any = 0):
        pass

    acc = accepted_options(f)
    assert check_options({"a": 2, "b": [1], "c": "y", "d": "z"}, acc, "f") == {"a": 2, "b": [1], "c": "y", "d": "z"}
    with pytest.raises(OptionError, match=r"option 'a' must be int, got \"2\"; valid options: a \(int\), b \(any\), "
                                          r"c \(str\), d \(any\)"):
        check_options({"a": "2"}, acc, "f")


def test_option_strings_round_trip():
    assert split_option_string("resolution=160,tokens=stride32") == ["resolution=160", "tokens=stride32"]
    assert split_option_string("a=1&b=2") == ["a=1", "b=2"]
    assert split_option_string(None) == split_option_string("") == []
    opts = {"tokens": "stride32", "resolution": 160, "flag": False}
    text = format_options(opts)
    assert text == "flag=false,resolution=160,tokens=stride32"
    assert parse_pairs(split_option_string(text)) == opts


# ---- registry -----------------------------------------------------------------------------------------------------
def test_registry_register_get_meta_and_listing():
    reg: Registry[type] = Registry("widget")

    @reg.register("b", located=True)
    class B:
        pass

    @reg.register("a")
    class A:
        pass

    assert reg.get("a") is A and reg.get("b") is B
    assert reg.names() == ["a", "b"] == list(reg) and len(reg) == 2
    assert "a" in reg and "c" not in reg
    assert reg.meta("b") == {"located": True} and reg.meta("a") == {}
    assert reg.register("a")(A) is A  # the same object again (a module reload) is fine


def test_registry_unknown_name_and_duplicates():
    reg: Registry[Any] = Registry("widget")
    reg.register("a")(1)
    reg.register("b")(2)
    with pytest.raises(UnknownNameError, match=r"^unknown widget 'c'; known: a, b$") as ei:
        reg.get("c")
    assert isinstance(ei.value, KeyError) and isinstance(ei.value, CirfusionError)
    assert str(ei.value) == "unknown widget 'c'; known: a, b"  # not quoted like a bare KeyError
    with pytest.raises(UnknownNameError):
        reg.meta("c")
    with pytest.raises(ValueError, match="widget 'a' is registered twice"):
        reg.register("a")(3)
    assert reg.get("a") == 1  # the refused entry did not replace it
    reg.unregister("a")
    assert reg.names() == ["b"]
    reg.unregister("a")  # unregistering an absent name is a no-op
    reg.register("a")(3)
    assert reg.get("a") == 3


def test_registry_imports_its_modules_once_on_first_lookup(monkeypatch):
    reg: Registry[Any] = Registry("plugin", modules=["cirfusion_test_plugin"])
    imported = []

    mod = types.ModuleType("cirfusion_test_plugin")

    def fake_import(name):
        imported.append(name)
        reg.register("from-module")(42)  # what importing a plug-in module does
        return mod

    # Only the registry module's view of importlib is replaced (restored after the test).
    monkeypatch.setattr(cirfusion.registry, "importlib", types.SimpleNamespace(import_module=fake_import))
    assert imported == []  # nothing imported at construction
    assert reg.get("from-module") == 42
    assert reg.names() == ["from-module"] and "from-module" in reg
    assert imported == ["cirfusion_test_plugin"]


# ---- embeddings ---------------------------------------------------------------------------------------------------
def _emb(n, offset=0):
    g = torch.arange(offset, offset + n, dtype=torch.float32)[:, None].repeat(1, 3)
    return (g, {"tokens": g[:, :2] * 10, "mask": [g[:, :1] > offset]})


def test_tree_map_keeps_the_structure():
    e = _emb(4)
    doubled = tree_map(lambda x: x * 2, e)
    assert isinstance(doubled, tuple) and isinstance(doubled[1], dict) and isinstance(doubled[1]["mask"], list)
    assert torch.equal(doubled[1]["tokens"], e[1]["tokens"] * 2)
    summed = tree_map(lambda x, y: x + y, e, e)
    assert torch.equal(summed[0], e[0] * 2)
    with pytest.raises(TypeError, match="not an embedding"):
        tree_map(lambda x: x, (torch.zeros(1), "text"))
    with pytest.raises(ValueError):
        tree_map(lambda x, y: x, (torch.zeros(1),), (torch.zeros(1), torch.zeros(1)))  # structures differ


def test_batch_helpers():
    a, b = _emb(3), _emb(2, offset=3)
    cat = cat_embeddings([a, b])
    assert embedding_len(cat) == 5 and torch.equal(cat[0][:, 0], torch.arange(5.0))
    assert torch.equal(cat[1]["mask"][0][:, 0], torch.tensor([False, True, True, False, True]))
    sl = slice_embeddings(cat, 1, 4)
    assert embedding_len(sl) == 3 and torch.equal(sl[1]["tokens"][:, 0], torch.tensor([10.0, 20.0, 30.0]))
    assert embedding_len(slice_embeddings(cat, 3, None)) == 2
    idx = torch.tensor([4, 0])
    taken = take_embeddings(cat, idx)
    assert torch.equal(taken[0][:, 0], torch.tensor([4.0, 0.0]))
    assert torch.equal(rows_of(cat, idx)[1]["tokens"], taken[1]["tokens"])
    assert torch.equal(rows_of(cat, slice(1, 4))[0], sl[0])
    assert torch.equal(rows_of(cat, slice(None, 2))[0], cat[0][:2])
    assert first_leaf(cat) is cat[0] and embedding_len(torch.zeros(7, 2)) == 7
    with pytest.raises(TypeError):
        first_leaf(())


# ---- atomic writes and the directory swap -------------------------------------------------------------------------
def test_atomic_file_writes(tmp_path, monkeypatch):
    p = tmp_path / "sub" / "f.json"
    cio.atomic_write_json(p, {"a": [1, 2]})
    assert p.read_text() == '{\n  "a": [\n    1,\n    2\n  ]\n}\n'
    cio.atomic_write_text(p, "é")
    assert p.read_bytes() == "é".encode()
    cio.atomic_write_bytes(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"

    def crash(*a):
        raise OSError("disk full")

    monkeypatch.setattr(cio.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        cio.atomic_write_bytes(p, b"new")
    assert p.read_bytes() == b"\x00\x01"  # the old content survives
    assert sorted(x.name for x in p.parent.iterdir()) == ["f.json"]  # no temporary file left


def _write_dir(path: Path, text: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "content.txt").write_text(text)


def test_atomic_directory_replaces_or_keeps(tmp_path):
    target = tmp_path / "index"
    with cio.atomic_directory(target) as d:
        _write_dir(d, "v1")
    assert (target / "content.txt").read_text() == "v1"
    with cio.atomic_directory(target) as d:
        _write_dir(d, "v2")
    assert (target / "content.txt").read_text() == "v2"
    with pytest.raises(RuntimeError), cio.atomic_directory(target) as d:
        _write_dir(d, "v3")
        raise RuntimeError("failed half way")
    assert (target / "content.txt").read_text() == "v2"
    with pytest.raises(FileExistsError), cio.atomic_directory(target, overwrite=False):
        pass
    assert sorted(x.name for x in tmp_path.iterdir()) == ["index"]  # no temporary or old directory left


def test_a_crash_between_the_two_renames_is_recovered(tmp_path, monkeypatch):
    target = tmp_path / "index"
    with cio.atomic_directory(target) as d:
        _write_dir(d, "old")
    real_replace = os.replace
    calls = []

    def crash_on_second(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies after moving the old version aside
        real_replace(src, dst)

    monkeypatch.setattr(cio.os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt), cio.atomic_directory(target) as d:
        _write_dir(d, "new")
    monkeypatch.setattr(cio.os, "replace", real_replace)
    assert calls[0] == ("index", f".index.old.{os.getpid()}") and calls[1][1] == "index"
    assert not target.exists()  # the state a crash leaves: old moved aside, new not in
    assert (tmp_path / f".index.old.{os.getpid()}" / "content.txt").read_text() == "old"

    cio.recover_directory(target)
    assert (target / "content.txt").read_text() == "old"
    assert not (tmp_path / f".index.old.{os.getpid()}").exists()


def test_recover_directory_cases(tmp_path):
    target = tmp_path / "ckpt"
    # Several old versions and no target: the newest comes back, the others go.
    for i, name in enumerate((".ckpt.old.11", ".ckpt.old.22")):
        _write_dir(tmp_path / name, name)
        os.utime(tmp_path / name, (1000 + i, 1000 + i))
    cio.recover_directory(target)
    assert (target / "content.txt").read_text() == ".ckpt.old.22"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["ckpt"]
    # A crash after both renames, before the clean-up: the complete target stays, the old copy is removed.
    _write_dir(tmp_path / ".ckpt.old.33", "stale")
    cio.recover_directory(target)
    assert (target / "content.txt").read_text() == ".ckpt.old.22"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["ckpt"]
    # Nothing to do: nothing changes.
    cio.recover_directory(target)
    cio.recover_directory(tmp_path / "absent")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["ckpt"]


def test_atomic_directory_recovers_an_interrupted_swap_before_checking_overwrite(tmp_path):
    # The next swap recovers first, so an interrupted swap is never lost.
    real = tmp_path / "real"
    _write_dir(tmp_path / ".real.old.44", "kept")
    with pytest.raises(FileExistsError), cio.atomic_directory(real, overwrite=False):
        pass
    assert (real / "content.txt").read_text() == "kept"


# ---- the reference mask ---------------------------------------------------------------------------------------------
def _dataset(exclude: bool) -> CIRDataset:
    ids = ["a", "b", "c", "d"]
    qs = [Query("0", "c", "t", ("a",)), Query("1", "zz", "t", ("b",)), Query("2", "a", "t", ("d",))]
    return CIRDataset("toy", "val", qs, Gallery(ids, [f"{i}.png" for i in ids]), exclude_reference=exclude)


def test_reference_columns_and_mask():
    ds = _dataset(exclude=True)
    cols = reference_columns(ds)
    assert cols.dtype == np.int64 and cols.tolist() == [2, -1, 0]  # "zz" is not in the gallery: nothing to drop
    assert reference_columns(ds, rows=[2, 0]).tolist() == [0, 2]
    assert reference_columns(ds, exclude=False).tolist() == [-1, -1, -1]
    assert reference_columns(_dataset(exclude=False)).tolist() == [-1, -1, -1]
    assert reference_columns(_dataset(exclude=False), exclude=True).tolist() == [2, -1, 0]
    mask = reference_mask(cols, 4)
    assert mask.dtype == bool and mask.tolist() == [[False, False, True, False], [False] * 4,
                                                    [True, False, False, False]]
    assert reference_mask(np.array([], dtype=np.int64), 4).shape == (0, 4)


def test_recover_directory_removes_only_dead_writers_temporary_directories(tmp_path):
    import subprocess
    import sys

    from cirfusion.io import atomic_directory, recover_directory

    target = tmp_path / "best"
    with atomic_directory(target) as tmp:
        (tmp / "a").write_text("1")
        assert tmp.name.startswith(f".best.{os.getpid()}.") and tmp.name.endswith(".tmp")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    orphan = tmp_path / f".best.{int(dead.stdout)}.abcd.tmp"  # a writer killed mid-write left this
    live = tmp_path / f".best.{os.getpid()}.efgh.tmp"  # a writer still working (this process)
    other = tmp_path / f".best2.{int(dead.stdout)}.ijkl.tmp"  # another target's: not ours to touch
    for d in (orphan, live, other):
        d.mkdir()
    recover_directory(target)
    assert not orphan.exists() and live.exists() and other.exists()
    assert (target / "a").read_text() == "1"


def test_positive_mask_equals_isin_per_query():
    """Batch.positive_mask (vectorised) against np.isin row by row: duplicated columns, several or no positives."""
    from cirfusion.backbones.base import ImageFeatures, TextFeatures
    from cirfusion.methods.base import Batch

    rng = np.random.default_rng(0)
    for trial in range(20):
        b, n = int(rng.integers(1, 9)), int(rng.integers(0, 30))
        cols = torch.from_numpy(rng.integers(0, 12, size=n))  # duplicates of a row among the columns
        positives = [np.sort(rng.choice(12, size=int(rng.integers(0, 4)), replace=False)) for _ in range(b)]
        img = ImageFeatures(torch.zeros(b, 1), torch.zeros(b, 1, 1))
        rows = torch.arange(b)
        batch = Batch(img, TextFeatures(torch.zeros(b, 1), torch.zeros(b, 0, 1), torch.zeros(b, 0, dtype=torch.bool)),
                      img, rows, rows, positives, [""] * b)
        want = np.stack([np.isin(cols.numpy(), p) for p in positives]) if n else np.zeros((b, 0), dtype=bool)
        got = batch.positive_mask(cols)
        assert got.dtype == torch.bool and got.shape == (b, n)
        assert np.array_equal(got.numpy(), want), trial


def test_keep_freed_memory_sets_glibc_thresholds_once_or_says_it_did_not(monkeypatch):
    import platform

    from cirfusion import allocator

    monkeypatch.setattr(allocator, "_done", None)
    monkeypatch.setenv(allocator.ENV, "0")
    assert allocator.keep_freed_memory() is False  # turned off: nothing set, and it stays off in this process
    assert allocator.keep_freed_memory() is False
    monkeypatch.setattr(allocator, "_done", None)
    monkeypatch.delenv(allocator.ENV)
    got = allocator.keep_freed_memory()
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert got is True
    assert allocator.keep_freed_memory() is got
