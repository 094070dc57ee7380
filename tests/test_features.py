"""Feature cache: fp16 memory-mapped shards keyed by backbone id, weights, preprocessing and content hash."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cirfusion import features as features_mod
from cirfusion.backbones import create_backbone
from cirfusion.backbones.base import Backbone
from cirfusion.data.images import ImageLoadError
from cirfusion.data.schema import CIRDataset, Gallery, Query
from cirfusion.features import FeatureCache, FeatureCacheError, FeatureCacheWarning, dataset_features, dataset_texts


class Counting:
    """Wraps a backbone's encoders to count the rows it actually computes."""

    def __init__(self, backbone: Backbone) -> None:
        self.images = 0
        self.texts = 0
        enc_i, enc_t = backbone.encode_image, backbone.encode_text

        def encode_image(pixels: torch.Tensor):  # type: ignore[no-untyped-def]
            self.images += len(pixels)
            return enc_i(pixels)

        def encode_text(texts: list[str]):  # type: ignore[no-untyped-def]
            self.texts += len(texts)
            return enc_t(texts)

        backbone.encode_image = encode_image  # type: ignore[method-assign]
        backbone.encode_text = encode_text  # type: ignore[method-assign]


def write_images(d: Path, n: int, seed: int = 0) -> tuple[list[str], list[Path]]:
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ids, paths = [], []
    for i in range(n):
        arr = rng.integers(0, 255, (24 + i, 40, 3), dtype=np.uint8)
        p = d / f"img{i:03d}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(arr).save(p)
        ids.append(f"id{i:03d}")
        paths.append(p)
    return ids, paths


@pytest.fixture()
def tiny() -> Backbone:
    return create_backbone("tiny")


@pytest.fixture()
def imgs(tmp_path: Path) -> tuple[list[str], list[Path]]:
    return write_images(tmp_path / "images", 10)


def test_compute_then_hit_fp16_memmap(tiny: Backbone, imgs: tuple[list[str], list[Path]], tmp_path: Path) -> None:
    ids, paths = imgs
    count = Counting(tiny)
    cache = FeatureCache(tiny, tmp_path / "cache", batch_size=4)
    table = cache.image_features(ids, paths, progress=False)
    assert count.images == 10
    assert table.global_.dtype == np.float16 and table.tokens.dtype == np.float16
    assert table.global_.shape == (10, tiny.image_dim)
    assert table.tokens.shape == (10, tiny.num_image_tokens, tiny.image_token_dim)
    assert isinstance(table.global_, np.memmap)  # one whole shard in request order: read straight from disk
    # Stored values are the backbone's own outputs, rounded to fp16.
    from cirfusion.data.images import load_image

    direct = tiny.encode_image(torch.stack([tiny.preprocess(load_image(p)) for p in paths]))
    torch.testing.assert_close(table.torch().global_, direct.global_, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(table.torch().tokens, direct.tokens, atol=5e-3, rtol=2e-3)
    count.images = 0

    again = FeatureCache(tiny, tmp_path / "cache").image_features(ids[::-1], paths[::-1], progress=False)
    assert count.images == 0  # all hits
    np.testing.assert_array_equal(again.global_[::-1], table.global_)
    assert again.index("id003") == 6 and again.ids[6] == "id003"
    f = again.torch([6, 0])
    assert f.global_.dtype == torch.float32 and f.tokens.shape == (2, tiny.num_image_tokens, tiny.image_token_dim)
    torch.testing.assert_close(f.global_[0], table.torch([3]).global_[0])

    shards = sorted((cache.image_dir / "shards").glob("*.global.npy"))
    assert len(shards) == 1 and np.load(shards[0], mmap_mode="r").dtype == np.float16
    meta = json.loads((cache.image_dir / "meta.json").read_text())
    assert meta["backbone_id"] == "tiny" and meta["weights_hash"] == tiny.weights_hash()


def test_content_hash_keys_rows(tiny: Backbone, imgs: tuple[list[str], list[Path]], tmp_path: Path) -> None:
    ids, paths = imgs
    count = Counting(tiny)
    cache = FeatureCache(tiny, tmp_path / "cache", batch_size=3)
    cache.image_features(ids, paths, progress=False)
    count.images = 0
    # A copy under another name and id is a hit; an edited file is a miss (and only it is computed).
    copy = tmp_path / "copy.png"
    shutil.copy(paths[1], copy)
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(paths[4])
    t = cache.image_features([*ids, "copy"], [*paths, copy], progress=False)
    assert count.images == 1
    np.testing.assert_array_equal(t.global_[t.index("copy")], t.global_[1])
    assert t.hashes[t.index("copy")] == t.hashes[1]


@pytest.mark.parametrize("key", ["backbone_id", "weights_hash", "preprocess_id"])
def test_changing_any_key_recomputes(key: str, imgs: tuple[list[str], list[Path]], tmp_path: Path) -> None:
    ids, paths = imgs
    b = create_backbone("tiny")
    FeatureCache(b, tmp_path / "cache").image_features(ids, paths, progress=False)
    b2 = create_backbone("tiny")
    count = Counting(b2)
    same = FeatureCache(b2, tmp_path / "cache")
    same.image_features(ids, paths, progress=False)
    assert count.images == 0
    before = same.image_dir
    if key == "backbone_id":
        b2.backbone_id = "tiny:renamed=1"
    elif key == "weights_hash":
        b2.weights_hash = lambda: "0" * 32  # type: ignore[method-assign]
    else:
        b2.preprocess_id = lambda: "another-resize"  # type: ignore[method-assign]
    changed = FeatureCache(b2, tmp_path / "cache")
    assert changed.image_dir != before
    changed.image_features(ids, paths, progress=False)
    assert count.images == len(ids)


def test_text_features_cache_mask_and_keys(tmp_path: Path) -> None:
    b = create_backbone("tiny")
    count = Counting(b)
    cache = FeatureCache(b, tmp_path / "cache", batch_size=2)
    texts = ["make it red", "", "same but a much longer text with many words in it", "make it red"]
    t = cache.text_features(texts, progress=False)
    assert t.texts == texts[:3] and count.texts == 3  # distinct texts, first-seen order
    L = b.max_text_tokens
    assert t.tokens.shape == (3, L, b.text_token_dim) and t.mask.shape == (3, L) and t.mask.dtype == np.bool_
    assert t.mask.sum(1).tolist() == [3, 0, 11]
    assert not t.tokens[0, 3:].any()  # padding is zero
    direct = b.encode_text(["make it red"])
    torch.testing.assert_close(t.torch([t.index("make it red")]).global_, direct.global_, atol=2e-3, rtol=2e-3)
    tt = t.torch([2])
    assert tt.mask.dtype == torch.bool and tt.tokens.dtype == torch.float32
    count.texts = 0
    again = FeatureCache(b, tmp_path / "cache").text_features(["same but a much longer text with many words in it", "new"], progress=False)
    assert count.texts == 1
    np.testing.assert_array_equal(again.global_[0], t.global_[2])
    b.text_preprocess_id = lambda: "other-tokenizer"  # type: ignore[method-assign]
    FeatureCache(b, tmp_path / "cache").text_features(texts, progress=False)
    assert count.texts == 1 + 3
    with pytest.raises(TypeError):
        cache.text_features([None])  # type: ignore[list-item]


def test_bad_image_named_and_good_work_kept(tiny: Backbone, imgs: tuple[list[str], list[Path]], tmp_path: Path) -> None:
    ids, paths = imgs
    bad = tmp_path / "images" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    empty = tmp_path / "images" / "empty.png"
    empty.write_bytes(b"")
    count = Counting(tiny)
    cache = FeatureCache(tiny, tmp_path / "cache", batch_size=4)
    with pytest.raises(ImageLoadError) as err:
        cache.image_features([*ids[:5], "bad", *ids[5:], "empty"], [*paths[:5], bad, *paths[5:], empty], progress=False)
    assert err.value.path == str(bad) and "1 more" in str(err.value) and "empty.png" in str(err.value)
    assert count.images == 10  # every good image was still computed ...
    count.images = 0
    cache.image_features(ids, paths, progress=False)
    assert count.images == 0  # ... and committed
    with pytest.raises(ImageLoadError, match="does not exist"):
        cache.image_features(["gone"], [tmp_path / "nope.jpg"], progress=False)


def test_workers_and_many_shards_give_same_table(
    tiny: Backbone, imgs: tuple[list[str], list[Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids, paths = imgs
    ref = FeatureCache(tiny, tmp_path / "a", batch_size=4, num_workers=0).image_features(ids, paths, progress=False)
    monkeypatch.setattr(features_mod, "SHARD_MAX_ROWS", 3)
    cache = FeatureCache(tiny, tmp_path / "b", batch_size=2, num_workers=2)
    got = cache.image_features(ids, paths, progress=False)
    assert len(list((cache.image_dir / "shards").glob("*.keys.json"))) == 3  # 4 + 4 + 2 rows
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(ref.tokens))
    order = [7, 2, 9, 0, 5]
    sub = FeatureCache(tiny, tmp_path / "b").image_features([ids[i] for i in order], [paths[i] for i in order], progress=False)
    np.testing.assert_array_equal(np.asarray(sub.global_), np.asarray(ref.global_)[order])


def test_two_caches_share_a_directory(tiny: Backbone, imgs: tuple[list[str], list[Path]], tmp_path: Path) -> None:
    ids, paths = imgs
    a = FeatureCache(tiny, tmp_path / "c")
    b_backbone = create_backbone("tiny")
    count = Counting(b_backbone)
    b = FeatureCache(b_backbone, tmp_path / "c")
    b.image_features(ids[:2], paths[:2], progress=False)  # b opened the store first ...
    a.image_features(ids, paths, progress=False)  # ... a fills the rest
    count.images = 0
    b.image_features(ids, paths, progress=False)  # b sees a's shard without reopening
    assert count.images == 0


def test_truncated_shard_is_rebuilt_and_shape_mismatch_is_an_error(
    tiny: Backbone, imgs: tuple[list[str], list[Path]], tmp_path: Path
) -> None:
    ids, paths = imgs
    cache = FeatureCache(tiny, tmp_path / "cache")
    ref = np.array(cache.image_features(ids, paths, progress=False).tokens)
    tok = next((cache.image_dir / "shards").glob("*.tokens.npy"))
    for cut in (100, tok.stat().st_size - 7):  # inside the .npy header, then inside the data
        tok = next((cache.image_dir / "shards").glob("*.tokens.npy"))
        tok.write_bytes(tok.read_bytes()[:cut])
        count = Counting(tiny)
        with pytest.warns(FeatureCacheWarning, match=f"{tok.name}: truncated.*recomputed"):
            got = FeatureCache(tiny, tmp_path / "cache").image_features(ids, paths, progress=False)
        assert count.images == len(ids)  # the damaged shard's rows were computed again ...
        np.testing.assert_array_equal(np.asarray(got.tokens), ref)  # ... to the same values
        assert not tok.exists() and len(list((cache.image_dir / "shards").glob("*.keys.json"))) == 1
        tiny = create_backbone("tiny")
    # Same key, different declared shapes: refuse rather than mix.
    other = create_backbone("tiny")
    other.image_token_dim = 7
    with pytest.raises(FeatureCacheError, match="delete"):
        FeatureCache(other, tmp_path / "cache").image_features(ids, paths, progress=False)


def test_dataset_features(tiny: Backbone, imgs: tuple[list[str], list[Path]], tmp_path: Path) -> None:
    ids, paths = imgs
    queries = [
        Query("q0", ids[0], "make it red", targets=(ids[1],), captions=("is red", "has red")),
        Query("q1", ids[2], "make it red", targets=(ids[3],), finemt=("change colour to red",)),
    ]
    ds = CIRDataset("toy", "val", queries, Gallery(ids, paths))
    assert dataset_texts(ds) == ["make it red", "is red", "has red", "change colour to red"]
    images, texts = dataset_features(FeatureCache(tiny, tmp_path / "cache"), ds, progress=False)
    assert images.ids == ids and len(texts) == 4
    assert texts.index("change colour to red") == 3


def test_hf_blip2_through_the_cache(tmp_path: Path, imgs: tuple[list[str], list[Path]]) -> None:
    from cirfusion.backbones.hf_blip2 import save_tiny_blip2

    ids, paths = imgs
    b = create_backbone(f"hf-blip2:{save_tiny_blip2(tmp_path / 'blip2')}")
    cache = FeatureCache(b, tmp_path / "cache", batch_size=4)
    t = cache.image_features(ids, paths, progress=False)
    assert t.tokens.shape == (10, b.num_image_tokens, b.image_token_dim)
    tx = cache.text_features(["a red star", "make it blue"], progress=False)
    assert tx.tokens.shape == (2, b.max_text_tokens, b.text_token_dim)
