"""Untrusted checkpoints (issue 8): a truncated or foreign model.safetensors is an error naming the file; sizes in
config.json are checked against the weights file's header before any tensor is allocated; a checkpoint's backbone id
never reads outside the directories the user gave."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch

import cirfusion.checkpoint as ck
from cirfusion.api import load
from cirfusion.backbones import BackboneAccessError, backbone_from_checkpoint, create_backbone
from cirfusion.checkpoint import CheckpointError, load_checkpoint, read_safetensors_header
from cirfusion.methods.base import MethodDims
from cirfusion.methods.registry import create_method, list_methods


@pytest.fixture()
def saved(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    dims = MethodDims.from_backbone(create_backbone("tiny"))
    m = create_method("clip4cir", dims, hidden_dim=32, projection_dim=16)
    return ck.save_checkpoint(m, tmp_path / "ckpt")


def test_truncated_weights_name_the_file(saved: Path) -> None:
    w = saved / ck.MODEL_FILE
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        load_checkpoint(saved)
    with pytest.raises(CheckpointError, match=str(w)):
        load(saved)


@pytest.mark.parametrize("content", [b"", b"hello", b"PK\x03\x04 a zip, not safetensors" * 10,
                                     struct.pack("<Q", 1 << 62) + b"{}", struct.pack("<Q", 2) + b"[]",
                                     struct.pack("<Q", 5) + b"\xff\xfe{}x"])
def test_non_safetensors_weights_name_the_file(saved: Path, content: bytes) -> None:
    (saved / ck.MODEL_FILE).write_bytes(content)
    with pytest.raises(CheckpointError, match=r"model\.safetensors") as info:
        load_checkpoint(saved)
    assert str(saved / ck.MODEL_FILE) in str(info.value)


def test_header_entries_outside_the_data_are_refused(saved: Path) -> None:
    w = saved / ck.MODEL_FILE
    raw = w.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [10**9, 10**6]  # claims far more than the file holds
    body = json.dumps(header).encode()
    w.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n :])
    with pytest.raises(CheckpointError, match="corrupt"):
        read_safetensors_header(w)


def test_huge_config_sizes_are_refused_before_allocation(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg_path = saved / ck.CONFIG_FILE
    cfg = json.loads(cfg_path.read_text())
    cfg["hparams"]["hidden_dim"] = 3_000_000  # ~12 GB of float32 if it were built for real
    cfg_path.write_text(json.dumps(cfg))
    devices: list[str] = []
    real = ck.create_method

    def spy(*a: Any, **k: Any) -> Any:
        devices.append(torch.empty(0).device.type)  # the default device the method is built on
        return real(*a, **k)

    monkeypatch.setattr(ck, "create_method", spy)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: weights do not match.*shape mismatch"):
        load_checkpoint(saved)
    assert devices == ["meta"]  # only the shape-only build ran


def test_a_good_checkpoint_still_loads_exactly(saved: Path) -> None:
    m = load_checkpoint(saved)
    stored = read_safetensors_header(saved / ck.MODEL_FILE)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == {k: s for k, (_, s) in stored.items()}
    assert all(p.device.type == "cpu" for p in m.parameters())


@pytest.mark.parametrize("name", [n for n in list_methods() if n != "sum"])
def test_every_method_builds_on_the_meta_device(name: str) -> None:
    """The size check builds the method on the meta device; a method that cannot would lose the check."""
    dims = MethodDims.from_backbone(create_backbone("tiny"))
    with torch.device("meta"):
        m = create_method(name, dims)
    assert all(t.device.type == "meta" for t in m.state_dict().values())


def test_deeply_nested_config_is_a_clear_error(saved: Path) -> None:
    (saved / ck.CONFIG_FILE).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match=r"config\.json"):
        load_checkpoint(saved)


def test_checkpoint_backbone_outside_given_dirs_is_refused(saved: Path, tmp_path: Path) -> None:
    """The checkpoint names a backbone directory the user never gave: refused before it is read."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    with pytest.raises(BackboneAccessError, match="--backbone-dir"):
        backbone_from_checkpoint(f"hf-clip:{outside}", source=saved / ck.CONFIG_FILE)
    with pytest.raises(BackboneAccessError, match="--allow-download"):
        backbone_from_checkpoint("hf-clip:someone/some-model", source=saved / ck.CONFIG_FILE)
