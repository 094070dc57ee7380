"""Backbone names: options through cirfusion.options (checked, canonical ids unchanged), downloads off by default, and
backbone ids from checkpoints confined to the directories the user gave (issue 8: untrusted checkpoints)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

import cirfusion.backbones as backbones
from cirfusion.backbones import (
    BackboneAccessError,
    backbone_from_checkpoint,
    check_backbone_access,
    create_backbone,
    parse_backbone_name,
)
from cirfusion.backbones.hf_clip import save_tiny_clip
from cirfusion.options import OptionError


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("hf") / "clip", "clip")


# ids are stored in checkpoints and derive feature-cache keys: they must not change (embedded ids name their
# precision since it defaults to auto; the older ids without it still build their fp32 backbone from a checkpoint:
# test_backbones.py)
@pytest.mark.parametrize("name, options", [
    ("embedded:precision=fp32", {"precision": "fp32"}),
    ("embedded:precision=bf16,resolution=192", {"precision": "bf16", "resolution": 192}),
    ("embedded:precision=fp32,resolution=160,tokens=stride32", {"precision": "fp32", "resolution": 160, "tokens": "stride32"}),
    ("tiny", {}),
    ("tiny:seed=1", {"seed": 1}),
    ("tiny:aligned=true,seed=3", {"aligned": True, "seed": 3}),
])
def test_existing_ids_parse_and_round_trip_exactly(name: str, options: dict[str, Any]) -> None:
    family, location, opts = parse_backbone_name(name)
    assert (family, location, opts) == (name.split(":")[0], None, options)
    assert create_backbone(name).backbone_id == name  # the canonical id is the name itself, as before


def test_option_order_and_defaults_are_canonicalised() -> None:
    assert create_backbone("tiny:seed=2&aligned=true").backbone_id == "tiny:aligned=true,seed=2"
    assert create_backbone("tiny:seed=0").backbone_id == "tiny"
    assert create_backbone("tiny", seed=1).backbone_id == "tiny:seed=1"


@pytest.mark.parametrize("name, problem", [
    ("tiny:sed=1", "unknown option 'sed'"),
    ("tiny:aligned=flase", "option 'aligned' must be bool"),
    ("tiny:aligned=True", "option 'aligned' must be bool"),  # JSON: only true/false are booleans
    ("tiny:seed=1.5", "option 'seed' must be int"),
    ("embedded:resolution=x", "option 'resolution' must be int"),
])
def test_bad_options_are_refused_with_the_valid_keys(name: str, problem: str) -> None:
    with pytest.raises(OptionError, match=problem) as info:
        create_backbone(name)
    assert "valid options:" in str(info.value) and "resolution (int)" in str(info.value)


def test_keyword_overrides_are_checked_too() -> None:
    with pytest.raises(OptionError, match="unknown option 'colour'"):
        create_backbone("tiny", colour="red")


def test_hf_loads_are_local_only_unless_downloads_are_allowed(clip_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    seen: list[Any] = []
    real = transformers.AutoConfig.from_pretrained

    def spy(*args: Any, **kw: Any) -> Any:
        seen.append(kw.get("local_files_only"))
        return real(*args, **kw)

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", spy)
    create_backbone(f"hf-clip:{clip_dir}")
    assert seen and all(v is True for v in seen)
    seen.clear()
    create_backbone(f"hf-clip:{clip_dir}", allow_download=True)
    assert seen and all(v is False for v in seen)
    assert not backbones.downloads_allowed()  # the setting does not leak out of create_backbone


def test_uncached_hub_id_without_downloads_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # belt and braces: the test must never reach the network
    with pytest.raises(BackboneAccessError, match="--allow-download"):
        create_backbone("hf-clip:cirfusion-tests/no-such-model")


def test_checkpoint_backbone_must_be_under_a_given_directory(clip_dir: Path, tmp_path: Path) -> None:
    bid = create_backbone(f"hf-clip:{clip_dir}").backbone_id
    with pytest.raises(BackboneAccessError, match="--backbone-dir") as info:
        check_backbone_access(bid, source="ckpt/config.json")
    assert "ckpt/config.json" in str(info.value)
    with pytest.raises(BackboneAccessError, match="not under"):
        check_backbone_access(bid, backbone_dirs=[tmp_path])
    check_backbone_access(bid, backbone_dirs=[clip_dir])
    check_backbone_access(bid, backbone_dirs=[clip_dir.parent])
    assert backbone_from_checkpoint(bid, backbone_dirs=[clip_dir]).backbone_id == bid
    # a symlink inside a given directory that points outside it is followed before the check
    (tmp_path / "link").symlink_to(clip_dir, target_is_directory=True)
    with pytest.raises(BackboneAccessError, match="not under"):
        check_backbone_access(f"hf-clip:{tmp_path / 'link'}", backbone_dirs=[tmp_path / "sub"])
    check_backbone_access(f"hf-clip:{tmp_path / 'link'}", backbone_dirs=[clip_dir])


def test_checkpoint_hub_id_needs_allow_download() -> None:
    with pytest.raises(BackboneAccessError, match=r"hub id 'org/model'.*--allow-download"):
        check_backbone_access("hf-clip:org/model?tokens=projected")
    check_backbone_access("hf-clip:org/model", allow_download=True)  # checked only: nothing is fetched here


def test_checkpoint_backbone_checks_multi_parts_and_options(clip_dir: Path) -> None:
    check_backbone_access("tiny:seed=1")  # shipped with cirfusion: nothing outside is read
    check_backbone_access(f"multi:tiny|hf-clip:{clip_dir}", backbone_dirs=[clip_dir])
    with pytest.raises(BackboneAccessError):
        check_backbone_access(f"multi:tiny|hf-clip:{clip_dir}")
    with pytest.raises(OptionError, match="unknown option"):
        check_backbone_access("tiny:evil=1")
    with pytest.raises(KeyError, match="unknown backbone"):
        check_backbone_access("pickle:x")


def test_relative_location_that_exists_counts_as_a_directory(clip_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(clip_dir.parent)
    name = os.path.basename(clip_dir)  # "clip": no slash, yet a directory transformers would read
    with pytest.raises(BackboneAccessError, match="not under"):
        check_backbone_access(f"hf-clip:{name}")
