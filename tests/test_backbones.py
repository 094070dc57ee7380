"""Backbones: every registered family forward at tiny size, ids round-trip, determinism, refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cirfusion.backbones import Backbone, create_backbone, list_backbones, parse_backbone_name
from cirfusion.backbones.hf_blip2 import save_tiny_blip2
from cirfusion.backbones.hf_clip import save_tiny_clip
from conftest import SHARED_DATA

SHARED = SHARED_DATA  # conftest: ../shared/data or $CIRFUSION_SHARED_DATA
TEXTS = ["make it red", "Same shirt but with long sleeves and a small green star on the left", ""]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {
        "clip": save_tiny_clip(root / "clip", "clip"),
        "siglip": save_tiny_clip(root / "siglip", "siglip"),
        "blip2": save_tiny_blip2(root / "blip2"),
    }


@pytest.fixture(scope="module")
def embedded() -> Backbone:
    return create_backbone("embedded")


def specs_for(family: str, hf_dirs: dict[str, Path]) -> list[str]:
    """Concrete names to build for a registered family (a new family must be added here)."""
    table = {
        "embedded": ["embedded"],
        "tiny": ["tiny", "tiny:aligned=true,seed=3"],
        "colour": ["colour", "colour:grid=4,resolution=64"],
        "multi": ["multi:tiny|tiny:max_text_tokens=8,resolution=48,seed=1"],
        "hf-clip": [f"hf-clip:{hf_dirs['clip']}", f"hf-clip:{hf_dirs['siglip']}", f"hf-clip:{hf_dirs['clip']}?tokens=projected"],
        "hf-blip2": [f"hf-blip2:{hf_dirs['blip2']}", f"hf-blip2:{hf_dirs['blip2']}?tokens=projected"],
    }
    assert family in table, f"registered backbone {family!r} has no test spec"
    return table[family]


def build(spec: str, embedded_fixture: Backbone | None) -> Backbone:
    return embedded_fixture if spec == "embedded" and embedded_fixture is not None else create_backbone(spec)


def images(n: int = 2, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [(96, 64), (50, 120), (40, 40)]
    return [Image.fromarray(rng.integers(0, 255, (sizes[i % 3][1], sizes[i % 3][0], 3), dtype=np.uint8)) for i in range(n)]


def test_registry_lists_the_families() -> None:
    assert {"embedded", "colour", "tiny", "hf-clip", "hf-blip2", "multi"} <= set(list_backbones())


def test_colour_backbone_sees_colour_and_layout() -> None:
    """CIELab is right on known colours; a red square on the left and one on the right differ only in their cells;
    a red and a blue version of the same layout are further apart than the two red layouts are in colour terms."""
    from cirfusion.backbones.colour import rgb_to_lab

    lab = rgb_to_lab(torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]).view(3, 3, 1, 1))  # red, white, black
    torch.testing.assert_close(lab.flatten(1), torch.tensor([[53.24, 80.09, 67.20], [100.0, 0.0, 0.0], [0.0, 0.0, 0.0]]),
                               atol=0.02, rtol=0)
    b = create_backbone("colour")
    assert (b.image_dim, b.num_image_tokens, b.image_token_dim, b.text_dim) == (112, 64, 48, 384)

    def scene(colour: tuple[int, int, int], left: bool) -> Image.Image:
        im = Image.new("RGB", (128, 128), (40, 40, 40))
        x0 = 0 if left else 96
        im.paste(Image.new("RGB", (32, 32), colour), (x0, 48))
        return im

    f = b.encode_image(torch.stack([b.preprocess(scene((220, 30, 30), True)), b.preprocess(scene((220, 30, 30), False)),
                                    b.preprocess(scene((30, 30, 220), True))]))
    moved = (f.tokens[0] - f.tokens[1]).abs().sum(-1).nonzero().flatten().tolist()
    assert moved == [24, 25, 30, 31, 32, 33, 38, 39]  # rows 3-4, columns 0-1 and 6-7 of the 8x8 grid
    recoloured = (f.tokens[0] - f.tokens[2]).abs().sum(-1).nonzero().flatten().tolist()
    assert recoloured == [24, 25, 32, 33]
    hist = slice(48, 112)  # the colour histogram: equal for the moved square, different for the recoloured one
    torch.testing.assert_close(f.global_[0, hist] / f.global_[0, hist].norm(), f.global_[1, hist] / f.global_[1, hist].norm())
    assert not torch.allclose(f.global_[0, hist], f.global_[2, hist])


@pytest.mark.parametrize("family", list_backbones())
def test_every_backbone_forward(family: str, hf_dirs: dict[str, Path], request: pytest.FixtureRequest) -> None:
    emb = request.getfixturevalue("embedded") if family == "embedded" else None
    for spec in specs_for(family, hf_dirs):
        b = build(spec, emb)
        assert not b.training and not any(p.requires_grad for p in b.parameters())
        pix = torch.stack([b.preprocess(im) for im in images(2)])
        parts = len(getattr(b, "parts", [])) or 1  # a multi: backbone: its parts' unit vectors side by side
        assert pix.dtype == torch.float32 and ((pix.dim() == 4 and pix.shape[1] == 3) or (parts > 1 and pix.dim() == 2))
        f = b.encode_image(pix)
        assert f.global_.shape == (2, b.image_dim)
        assert f.tokens.shape == (2, b.num_image_tokens, b.image_token_dim)
        assert torch.isfinite(f.global_).all() and torch.isfinite(f.tokens).all()
        torch.testing.assert_close(f.global_.norm(dim=-1), torch.full((2,), parts**0.5))
        assert not torch.allclose(f.global_[0], f.global_[1])  # different images, different vectors

        t = b.encode_text(TEXTS)
        L = t.tokens.shape[1]
        assert 1 <= L <= b.max_text_tokens
        assert t.global_.shape == (3, b.text_dim)
        assert t.tokens.shape == (3, L, b.text_token_dim) and t.mask.shape == (3, L) and t.mask.dtype == torch.bool
        assert t.mask[0].sum() >= 1 and t.mask[1].sum() > t.mask[0].sum()  # the long text has more real tokens
        torch.testing.assert_close(t.global_.norm(dim=-1), torch.full((3,), parts**0.5))
        if b.aligned:
            assert b.text_dim == b.image_dim

        # Deterministic: the same inputs give the same outputs.
        torch.testing.assert_close(b.encode_image(pix).tokens, f.tokens, rtol=0, atol=0)
        torch.testing.assert_close(b.encode_text(TEXTS).global_, t.global_, rtol=0, atol=0)

        d = b.to_dict()
        assert d["backbone_id"] == b.backbone_id and len(d["weights_hash"]) >= 16
        assert b.device == torch.device("cpu")


@pytest.mark.parametrize("family", [f for f in list_backbones() if f != "embedded"])
def test_backbone_id_round_trips_with_same_weights(family: str, hf_dirs: dict[str, Path]) -> None:
    for spec in specs_for(family, hf_dirs):
        a = create_backbone(spec)
        b = create_backbone(a.backbone_id)
        assert b.backbone_id == a.backbone_id
        assert b.weights_hash() == a.weights_hash() and b.preprocess_id() == a.preprocess_id()
        pix = torch.stack([a.preprocess(im) for im in images(2, seed=5)])
        torch.testing.assert_close(a.encode_image(pix).global_, b.encode_image(pix).global_, rtol=0, atol=0)


def test_embedded_dims_options_and_id(embedded: Backbone) -> None:
    from cirfusion.backbones.embedded import bf16_is_fast

    b = create_backbone("embedded:precision=fp32")
    assert b.backbone_id == "embedded:precision=fp32"
    # The default is precision=auto, and the id names what it resolved to on this machine.
    assert embedded.backbone_id == f"embedded:precision={'bf16' if bf16_is_fast() else 'fp32'}"
    assert (b.image_dim, b.num_image_tokens, b.image_token_dim) == (1280, 64, 112)  # 128 px, stride-16 map
    assert (b.text_dim, b.text_token_dim, b.max_text_tokens) == (384, 384, 48)
    assert b.preprocess(images(1)[0]).shape == (3, 128, 128)
    alt = create_backbone("embedded:tokens=stride32", resolution=160, precision="fp32")
    assert alt.backbone_id == "embedded:precision=fp32,resolution=160,tokens=stride32"
    assert (alt.num_image_tokens, alt.image_token_dim) == (25, 320)
    assert alt.weights_hash() == b.weights_hash() and alt.preprocess_id() != b.preprocess_id()
    half = create_backbone("embedded:precision=bf16")
    assert half.backbone_id == "embedded:precision=bf16"
    # The precision is the image encoder's: text is fp32 at both (one cached text table with the colour backbone).
    assert half.preprocess_id() != b.preprocess_id() and half.text_preprocess_id() == b.text_preprocess_id()
    # Folded BatchNorm + channels-last change nothing but speed: the pooled head equals the package's own forward.
    from efficientnet_lite_pytorch import EfficientNet

    from cirfusion.backbones.embedded import efficientnet_weights_path

    ref = EfficientNet.from_name("efficientnet-lite0", image_size=128)
    ref.load_state_dict(torch.load(efficientnet_weights_path(), map_location="cpu", weights_only=True))
    ref.eval()
    pix = torch.stack([b.preprocess(im) for im in images(2)])
    with torch.inference_mode():
        expect = torch.nn.functional.normalize(ref.extract_features(pix).mean((2, 3)), dim=-1)
    torch.testing.assert_close(b.encode_image(pix).global_, expect, atol=1e-4, rtol=1e-4)
    # bf16 autocast: close to fp32, not equal (hence its own cache key).
    cos = torch.nn.functional.cosine_similarity(half.encode_image(pix).global_, expect)
    assert (cos > 0.98).all() and half.encode_image(pix).global_.dtype == torch.float32


@pytest.mark.parametrize("native", [True, False])
def test_embedded_auto_precision_resolves_to_a_native_path(native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    import cirfusion.backbones.embedded as emb

    # auto is bf16 only where bf16 runs on native kernels (emulated bf16 is slower than fp32), and the id says which.
    monkeypatch.setattr(emb, "bf16_is_fast", lambda: native)
    want = "bf16" if native else "fp32"
    assert emb.resolve_precision("auto") == want
    b = create_backbone("embedded")
    assert b.precision == want and b.backbone_id == f"embedded:precision={want}"
    assert ("compute:bf16" in b.preprocess_id()) == native and "compute" not in b.text_preprocess_id()
    # An explicit precision wins over the machine's choice.
    for p in ("fp32", "bf16"):
        e = create_backbone(f"embedded:precision={p}")
        assert e.precision == p and e.backbone_id == f"embedded:precision={p}"
    with pytest.raises(ValueError, match="precision"):
        emb.resolve_precision("fp16")


def test_embedded_auto_on_this_machine_is_the_native_choice(embedded: Backbone) -> None:
    from cirfusion.backbones.embedded import bf16_is_fast

    assert embedded.precision == ("bf16" if bf16_is_fast() else "fp32")
    # bf16: the image model's weights are bf16 (not fp32 re-cast under autocast on every call); features stay fp32.
    weights = {p.dtype for p in embedded.image_model.parameters()}
    assert weights == {torch.bfloat16 if embedded.precision == "bf16" else torch.float32}
    f = embedded.encode_image(torch.stack([embedded.preprocess(im) for im in images(2)]))
    assert f.global_.dtype == f.tokens.dtype == torch.float32


def test_embedded_ids_round_trip_and_stored_ids_without_precision_are_fp32() -> None:
    from cirfusion.backbones import backbone_from_checkpoint

    for p in ("fp32", "bf16"):
        a = create_backbone(f"embedded:precision={p}")
        assert create_backbone(a.backbone_id).backbone_id == a.backbone_id
        assert backbone_from_checkpoint(a.backbone_id).precision == p
    # A checkpoint written before precision=auto stores "embedded" for fp32 features: it rebuilds the fp32 backbone
    # on every machine (also as a part of a multi: composite), while a name typed today means auto.
    old = backbone_from_checkpoint("embedded:resolution=160")
    assert old.precision == "fp32" and old.backbone_id == "embedded:precision=fp32,resolution=160"
    multi = backbone_from_checkpoint("multi:colour|embedded")
    assert [p.backbone_id for p in multi.parts] == ["colour", "embedded:precision=fp32"]


def test_feature_cache_keys_on_the_precision(tmp_path: Path) -> None:
    from cirfusion.features import FeatureCache

    fp32, bf16 = create_backbone("embedded:precision=fp32"), create_backbone("embedded:precision=bf16")
    c32, c16 = FeatureCache(fp32, tmp_path), FeatureCache(bf16, tmp_path)
    assert c32.image_dir != c16.image_dir
    # Real rows: the bf16 rows land in their own namespace and the fp32 cache computes its own.
    files = []
    for i, im in enumerate(images(2, seed=3)):
        files.append(tmp_path / f"{i}.png")
        im.save(files[-1])
    t16 = c16.image_features(["a", "b"], files, progress=False)
    t32 = FeatureCache(fp32, tmp_path).image_features(["a", "b"], files, progress=False)
    assert not np.array_equal(np.asarray(t16.tokens), np.asarray(t32.tokens))  # different precision, different rows
    again = FeatureCache(fp32, tmp_path).image_features(["a", "b"], files, progress=False)
    assert np.array_equal(np.asarray(again.tokens), np.asarray(t32.tokens))  # each precision reads back its own rows
    # Text is fp32 at every precision: one cached table, and a bf16 backbone's text equals an fp32 one's.
    assert c32.text_dir == c16.text_dir
    text16 = bf16.encode_text(["make it red"]).tokens
    torch.testing.assert_close(text16, fp32.encode_text(["make it red"]).tokens, rtol=0, atol=0)


def test_embedded_text_is_semantic(embedded: Backbone) -> None:
    g = embedded.encode_text(["a red dress", "a crimson dress", "a pair of black running shoes"]).global_
    sim = g @ g.T
    assert sim[0, 1] > sim[0, 2] + 0.1


def test_embedded_text_tokens_capped_but_global_uses_whole_text(embedded: Backbone) -> None:
    long = " ".join(["the small red circle on the left turns blue"] * 12)
    t = embedded.encode_text([long, long + " and add a green star"])
    assert t.tokens.shape[1] == embedded.max_text_tokens and t.mask.all()
    # Tokens past the cap still move the global vector.
    assert not torch.allclose(t.global_[0], t.global_[1])


def test_embedded_image_features_separate_real_photos(embedded: Backbone) -> None:
    root = SHARED / "clothing-small" / "test"
    if not root.is_dir():
        pytest.skip("shared clothing-small photos are not available")
    from cirfusion.data.images import load_image

    # Leave-one-out nearest neighbour over 3 categories x 5 photos: ImageNet features must group them (measured 15/15).
    photos = [(p, c) for c in ("shoes", "hat", "pants") for p in sorted((root / c).glob("*.jpg"))[:5]]
    g = embedded.encode_image(torch.stack([embedded.preprocess(load_image(p)) for p, _ in photos])).global_
    sim = g @ g.T
    sim.fill_diagonal_(-2.0)
    nearest = sim.argmax(1).tolist()
    correct = sum(photos[i][1] == photos[j][1] for i, j in enumerate(nearest))
    assert correct >= 13, f"only {correct}/15 nearest neighbours share the category"


def test_tiny_seeded_and_deterministic() -> None:
    a, b, c = create_backbone("tiny"), create_backbone("tiny"), create_backbone("tiny:seed=1")
    assert a.weights_hash() == b.weights_hash() != c.weights_hash()
    torch.manual_seed(123)  # the global RNG must not matter
    d = create_backbone("tiny")
    assert d.weights_hash() == a.weights_hash()
    t = a.encode_text(["Red CIRCLE", "red circle"])
    torch.testing.assert_close(t.tokens[0], t.tokens[1])  # case-insensitive words
    assert not a.aligned and create_backbone("tiny:aligned=true").aligned


def test_hf_clip_tokens_and_text_padding(hf_dirs: dict[str, Path]) -> None:
    clip = create_backbone(f"hf-clip:{hf_dirs['clip']}")
    proj = create_backbone(f"hf-clip:{hf_dirs['clip']}", tokens="projected")
    assert clip.num_image_tokens == 16 and clip.image_token_dim == 32  # (32 px / 8)^2 patches, hidden size
    assert proj.image_token_dim == proj.image_dim == 24  # patches in the joint space
    assert clip.weights_hash() == proj.weights_hash() and clip.backbone_id != proj.backbone_id
    siglip = create_backbone(f"hf-clip:{hf_dirs['siglip']}")
    t = siglip.encode_text(["red", "a small red star"])
    assert t.tokens.shape[1] == siglip.max_text_tokens == 16  # SigLIP pads to its fixed length
    assert t.mask.sum(1).tolist() == [3, 6]
    with pytest.raises(ValueError, match="SigLIP"):
        create_backbone(f"hf-clip:{hf_dirs['siglip']}?tokens=projected")
    capped = create_backbone(f"hf-clip:{hf_dirs['clip']}", max_text_tokens=4)
    tc, tf = capped.encode_text(TEXTS), clip.encode_text(TEXTS)
    assert tc.tokens.shape[1] == 4
    torch.testing.assert_close(tc.global_, tf.global_)  # the cap only trims token features


def test_hf_blip2_query_tokens(hf_dirs: dict[str, Path]) -> None:
    b = create_backbone(f"hf-blip2:{hf_dirs['blip2']}")
    assert (b.num_image_tokens, b.image_token_dim) == (4, 32)  # num_query_tokens x Q-Former hidden
    assert b.image_dim == b.text_dim == 16 and b.aligned
    v = create_backbone(f"hf-blip2:{hf_dirs['blip2']}?tokens=vision")
    assert v.num_image_tokens == 17  # 16 patches + CLS of the ViT
    p = create_backbone(f"hf-blip2:{hf_dirs['blip2']}?tokens=projected")
    f = p.encode_image(torch.stack([p.preprocess(im) for im in images(2)]))
    torch.testing.assert_close(f.tokens.norm(dim=-1), torch.ones(2, 4))
    torch.testing.assert_close(f.global_, torch.nn.functional.normalize(f.tokens.mean(1), dim=-1))


def test_hf_checkpoint_missing_weights_is_refused(hf_dirs: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "clip-broken"
    shutil.copytree(hf_dirs["clip"], broken)
    sd = load_file(broken / "model.safetensors")
    del sd["text_projection.weight"]
    save_file(sd, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="text_projection"):
        create_backbone(f"hf-clip:{broken}")


def test_hf_blip2_without_text_side_is_refused(tmp_path: Path) -> None:
    import json

    d = save_tiny_blip2(tmp_path / "b")
    cfg = json.loads((d / "config.json").read_text())
    cfg["qformer_config"]["use_qformer_text_input"] = False
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="text side"):
        create_backbone(f"hf-blip2:{d}")


def test_names_and_options_are_checked(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="unknown backbone"):
        create_backbone("resnet")
    with pytest.raises(ValueError, match="needs a location"):
        create_backbone("hf-clip")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        create_backbone(f"hf-clip:{tmp_path / 'missing'}")
    with pytest.raises(ValueError, match="unknown option"):
        create_backbone("tiny:colour=red")
    with pytest.raises(ValueError, match="multiple of 16"):
        create_backbone("embedded:resolution=100")
    with pytest.raises(ValueError, match="tokens"):
        create_backbone("embedded", tokens="stride4")
    with pytest.raises(ValueError, match=r"(?i)key=value"):
        create_backbone("tiny:seed")
    assert parse_backbone_name("hf-clip:org/model?tokens=projected") == ("hf-clip", "org/model", {"tokens": "projected"})
    assert parse_backbone_name("embedded:resolution=160,tokens=head") == (
        "embedded",
        None,
        {"resolution": 160, "tokens": "head"},
    )


def test_colour_and_embedded_share_cached_text_features(embedded: Backbone, tmp_path: Path) -> None:
    """Same text encoder (MiniLM), same text cache; different image descriptors, different image caches. A backbone
    of another text encoder keys its own text cache."""
    from cirfusion.features import FeatureCache

    colour = FeatureCache(create_backbone("colour"), tmp_path)
    emb = FeatureCache(embedded, tmp_path)
    assert colour.text_dir == emb.text_dir and colour.text_dir.name.startswith("text-all-MiniLM-L6-v2-")
    assert colour.image_dir != emb.image_dir
    assert FeatureCache(create_backbone("tiny"), tmp_path).text_dir != emb.text_dir
    t = colour.text_features(["make it red"], progress=False)
    assert np.array_equal(np.asarray(t.global_), np.asarray(emb.text_features(["make it red"], progress=False).global_))
