"""Method registry: every registered method at tiny size (forward, backward, loss goes down, save -> load gives
identical scores), the baselines, CLIP4CIR specifics, the token encoder, max-sim, and checkpoint strictness."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import cirfusion
from cirfusion.backbones.base import ImageFeatures, TextFeatures
from cirfusion.checkpoint import CheckpointError, load_checkpoint, read_config, save_checkpoint
from cirfusion.examples import Examples
from cirfusion.methods import (
    METHODS,
    CIRMethod,
    HardNegativesUnsupported,
    HyperParameterError,
    MethodDims,
    Stage,
    TokenEncoder,
    cosine_or_maxsim,
    create_method,
    list_methods,
    register_method,
    stage_parameters,
)
from cirfusion.methods.clip4cir import CLIP4CIR, Clip4CirParams
from cirfusion.seeding import seed_everything
from cirfusion.train import TrainConfig, train
from cirfusion.views import FeatureView
from test_train import FAST, make_toy, toy_dims

pytestmark = pytest.mark.usefixtures("one_thread")


def feats(dims: MethodDims, n: int, seed: int = 0) -> tuple[ImageFeatures, TextFeatures]:
    g = torch.Generator().manual_seed(seed)
    img = ImageFeatures(global_=torch.randn(n, dims.image_dim, generator=g),
                        tokens=torch.randn(n, dims.num_image_tokens, dims.image_token_dim, generator=g))
    mask = torch.ones(n, dims.max_text_tokens, dtype=torch.bool)
    mask[:, dims.max_text_tokens // 2 :] = False
    txt = TextFeatures(global_=torch.randn(n, dims.text_dim, generator=g),
                       tokens=torch.randn(n, dims.max_text_tokens, dims.text_token_dim, generator=g), mask=mask)
    return img, txt


def build(name: str, dims: MethodDims) -> CIRMethod | None:
    """The method, or None when it (correctly) refuses these dims with a clear error."""
    seed_everything(0)
    try:
        return create_method(name, dims)
    except ValueError as exc:
        assert not dims.aligned and "aligned" in str(exc), f"{name} refused aligned dims: {exc}"
        return None


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("name", list_methods())
def test_every_method_forward_backward_save_load(name, aligned, tmp_path):
    dims = toy_dims(aligned)
    m = build(name, dims)
    if m is None:
        return
    assert m.method_name == name and json.loads(json.dumps(m.config()))["method"] == name
    ref, text = feats(dims, 5, 1)
    gal, _ = feats(dims, 7, 2)
    m.eval()
    q, g = m.encode_query(ref, text), m.encode_gallery(gal)
    s = m.similarity(q, g)
    assert s.shape == (5, 7) and torch.isfinite(s).all()

    if m.trainable:
        tr, _ = make_toy(tmp_path, n_train=16, aligned=aligned, files=False)
        view = FeatureView(tr.images, tr.texts)
        ex = Examples(tr, view)
        order, targets, texts = ex.epoch_plan(0, 0, 0)
        batch = ex.batch(order[:8], targets, texts, m)
        m.train()
        for stage in m.stages():
            loss, logs = getattr(m, stage.loss)(batch)
            assert loss.dim() == 0 and torch.isfinite(loss) and all(np.isfinite(v) for v in logs.values())
            m.zero_grad()
            loss.backward()
            named = stage_parameters(m, stage)
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for _, p in named), f"{name}/{stage.name}: no gradient"
    else:
        assert m.num_parameters(trainable_only=False) == 0

    m.eval()
    save_checkpoint(m, tmp_path / "ck", dataset="toy/train")
    m2 = load_checkpoint(tmp_path / "ck")
    assert type(m2) is type(m) and not m2.training
    assert torch.equal(m2.similarity(m2.encode_query(ref, text), m2.encode_gallery(gal)), s)
    api = cirfusion.load(tmp_path / "ck")
    assert api.method.config() == m.config() and api.backbone_id == "toy"


@pytest.mark.parametrize("name", list_methods(trainable=True))
def test_every_trainable_method_loss_goes_down(name, tmp_path):
    tr, _ = make_toy(tmp_path, files=False)
    m = build(name, toy_dims())
    view = FeatureView(tr.images, tr.texts)
    ex = Examples(tr, view)
    order, targets, texts = ex.epoch_plan(0, 0, 0)
    batch = ex.batch(order[:64], targets, texts, m)
    for stage in m.stages():
        named = stage_parameters(m, stage)
        opt = torch.optim.AdamW([p for _, p in named], lr=3e-3)
        loss_fn = getattr(m, stage.loss)
        m.eval()  # no dropout: the check is about optimisation, not noise
        with torch.no_grad():
            first = float(loss_fn(batch)[0])
        for _ in range(20):
            loss, _ = loss_fn(batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            last = float(loss_fn(batch)[0])
        assert last < 0.7 * first, f"{name}/{stage.name}: loss {first:.3f} -> {last:.3f}"


@pytest.mark.parametrize("name", list_methods(trainable=True))
def test_every_trainable_method_uses_mined_hard_negatives(name, tmp_path):
    """--hard-negatives must change what a method trains on: each stage's loss differs with the mined negatives in
    the batch (the same batch without them gives the same loss twice, so the difference is theirs), or the method
    says it cannot use them and training refuses before it starts."""
    tr, va = make_toy(tmp_path, files=False)
    m = build(name, toy_dims())
    view = FeatureView(tr.images, tr.texts)
    ex = Examples(tr, view, hard_negatives=4, pool=8)
    order, targets, texts = ex.epoch_plan(0, 0, 0)
    neg = ex.epoch_negatives(0, 0, 0)
    plain = ex.batch(order[:16], targets, texts, m)
    hard = ex.batch(order[:16], targets, texts, m, neg)
    assert plain.negatives is None and hard.negative_rows is not None and len(hard.negative_rows) >= 4
    if not m.supports_hard_negatives:
        with pytest.raises(HardNegativesUnsupported, match=name):
            train(m, tr, va, tmp_path / "run", TrainConfig(epochs=1, hard_negatives=4, **FAST))
        assert not (tmp_path / "run").exists()
        return
    m.eval()  # no dropout: the same batch gives the same loss
    with torch.no_grad():
        for stage in m.stages():
            loss_fn = getattr(m, stage.loss)
            without = float(loss_fn(plain)[0])
            assert float(loss_fn(plain)[0]) == without
            with_negatives = float(loss_fn(hard)[0])
            assert abs(with_negatives - without) > 1e-4 * max(1.0, abs(without)), \
                f"{name}/{stage.name}: loss {without:.6f} unchanged by hard negatives ({with_negatives:.6f})"


@pytest.mark.parametrize("name", list_methods(trainable=True))
def test_every_trainable_method_trains_under_bf16_autocast(name, tmp_path):
    """TrainConfig(precision="bf16") runs each stage's loss under bfloat16 autocast: it must run, be finite and near
    the fp32 loss, and give fp32 gradients to the (fp32) parameters."""
    tr, _ = make_toy(tmp_path, files=False)
    m = build(name, toy_dims())
    ex = Examples(tr, FeatureView(tr.images, tr.texts))
    order, targets, texts = ex.epoch_plan(0, 0, 0)
    batch = ex.batch(order[:32], targets, texts, m)
    m.eval()  # no dropout: the two precisions see the same network
    for stage in m.stages():
        loss_fn = getattr(m, stage.loss)
        with torch.no_grad():
            full = float(loss_fn(batch)[0])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = loss_fn(batch)
        assert loss.dtype == torch.float32 and torch.isfinite(loss), f"{name}/{stage.name}: {loss}"
        assert abs(float(loss.detach()) - full) <= 0.05 * max(1.0, abs(full)), f"{name}/{stage.name}: bf16 {loss} fp32 {full}"
        m.zero_grad()
        loss.backward()
        grads = [p.grad for _, p in stage_parameters(m, stage) if p.grad is not None]
        assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads), f"{name}/{stage.name}"


def test_a_method_that_cannot_use_hard_negatives_is_refused(tmp_path):
    """A method declaring supports_hard_negatives=False is refused before anything is written; the registry-wide
    test above picks such a method up (it is in list_methods(trainable=True) while registered)."""

    class NoHard(CLIP4CIR):
        supports_hard_negatives = False

    register_method("test-no-hard-negatives")(NoHard)
    try:
        assert "test-no-hard-negatives" in list_methods(trainable=True)
        tr, va = make_toy(tmp_path, files=False)
        m = create_method("test-no-hard-negatives", toy_dims(), embed_dim=16, projection_dim=16, hidden_dim=16)
        with pytest.raises(HardNegativesUnsupported, match=r"test-no-hard-negatives.*--hard-negatives"):
            train(m, tr, va, tmp_path / "run", TrainConfig(epochs=1, hard_negatives=2, **FAST))
        assert not (tmp_path / "run").exists()
    finally:
        METHODS.unregister("test-no-hard-negatives")
    assert "test-no-hard-negatives" not in list_methods()


def test_typed_hyper_parameters():
    dims = toy_dims()
    m = create_method("clip4cir", dims, embed_dim=16, dropout=0, image_encoder="global")
    assert isinstance(m.params, Clip4CirParams) and m.params.embed_dim == 16 and m.image_proj.out_features == 16
    assert m.params.dropout == 0.0 and isinstance(m.params.dropout, float)  # an int is a valid float
    assert m.hparams == {**Clip4CirParams().__dict__, "embed_dim": 16, "dropout": 0.0, "image_encoder": "global"}
    m.hparams["embed_dim"] = 3  # a copy: the model's hyper-parameters are its params
    assert m.params.embed_dim == 16
    for bad, match in [({"embed_dim": "big"}, "'embed_dim' must be int"), ({"hidden_dim": 64.5}, "'hidden_dim' must be int"),
                       ({"dropout": "0.1"}, "'dropout' must be float"), ({"image_encoder": "pixels"}, "image_encoder")]:
        with pytest.raises(HyperParameterError, match=match) as err:
            create_method("clip4cir", dims, **bad)
        assert "valid options: dropout (float), embed_dim (int)" in str(err.value)
    with pytest.raises(HyperParameterError, match=r"unknown hyper-parameter\(s\) \['bogus'\]; accepted: .*embed_dim"):
        create_method("tg-cir", dims, bogus=1)
    with pytest.raises(HyperParameterError, match="accepted: none"):
        create_method("image-only", dims, embed_dim=3)  # a method without hyper-parameters takes none


# The hyper-parameters config.json files held before they were dataclasses (cirfusion 0.1.0's default_hparams):
# checkpoints written then must load unchanged.
OLD_DEFAULTS = {
    "clip4cir": {"embed_dim": 256, "projection_dim": 512, "hidden_dim": 1024, "dropout": 0.5, "image_encoder": "tokens",
                 "project": "auto", "token_width": 128, "token_layers": 0, "token_heads": 4, "token_queries": 1,
                 "token_dropout": 0.1, "logit_scale_init": 20.0},
    # tg-cir: not here. Its 0.1.0 architecture is gone (issue 9: TG-CIR as the original); such checkpoints are
    # refused, naming the unknown hyper-parameters (tests/test_tgcir.py).
    "sprc": {"embed_dim": 256, "width": 128, "layers": 2, "heads": 4, "num_queries": 6, "dropout": 0.1,
             "align_weight": 0.5, "logit_scale_init": 20.0},
    "image-only": {},
}
# blip4cir / blip4cir-bi are not here: their 0.1.0 checkpoints are of another architecture (text tokens
# cross-attending to the reference), replaced by the original two-stage design; loading one is a CheckpointError
# naming the missing and unexpected weights.


@pytest.mark.parametrize("name", sorted(OLD_DEFAULTS))
def test_old_checkpoint_hparams_still_load(name, tmp_path):
    dims = toy_dims()
    # Every old name is still accepted; defaults may have changed since (issue 9), so the model is built with the
    # old values and an old config (which lacks the newer names) must load to the same parameters.
    m = create_method(name, dims, **OLD_DEFAULTS[name])
    assert {k: m.hparams[k] for k in OLD_DEFAULTS[name]} == OLD_DEFAULTS[name]
    save_checkpoint(m, tmp_path / "ck")
    cfg_path = tmp_path / "ck" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    # as older writers produced it: whole floats written as ints by hand-edited or other JSON tools
    cfg["hparams"] = {k: (int(v) if isinstance(v, float) and v.is_integer() else v) for k, v in OLD_DEFAULTS[name].items()}
    cfg_path.write_text(json.dumps(cfg))
    loaded = load_checkpoint(tmp_path / "ck")
    assert loaded.params == m.params and loaded.hparams == m.hparams


def test_train_list_is_generated_from_the_dataclasses():
    """`cirfusion train --list`: every method, and every field of its Params dataclass with type, default and help."""
    from dataclasses import MISSING, fields

    from cirfusion.commands.train import list_methods_text
    from cirfusion.methods import get_method_class

    text = list_methods_text()
    lines = text.splitlines()
    heads = [i for i, line in enumerate(lines) if not line.startswith(" ")]
    blocks = {lines[i].split(":")[0].split(" ")[0]: lines[i + 1 : j] for i, j in zip(heads, [*heads[1:], len(lines)], strict=True)}
    assert sorted(blocks) == list_methods()
    for name, block in blocks.items():
        cls = get_method_class(name)
        params = fields(cls.Params)
        assert len(block) == len(params), name
        for f, line in zip(params, block, strict=True):
            assert f.metadata["help"], f"{name}.{f.name} has no help"
            default = f.default if f.default is not MISSING else f.default_factory()
            assert line == f"    {f.name} ({f.type}) = {json.dumps(default)}: {f.metadata['help']}"
    assert "    embed_dim (int) = 256: D when a learned projection is used" in text
    assert "    bi_weight (float) = 0.1:" in "\n".join(blocks["blip4cir-bi"])
    assert "image-only (no parameters): Rank the gallery by similarity to the reference image" in text
    assert "``" not in text and ":func:" not in text


def test_train_help_has_no_sphinx_markup():
    from cirfusion.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    sub.load("train")  # the top-level parser holds a placeholder until the command is chosen (a light --help)
    text = sub.choices["train"].format_help()
    assert "--overwrite" in text and "--hparam" in text
    assert "``" not in text and ":func:" not in text and ":class:" not in text


def test_registry_errors():
    with pytest.raises(KeyError, match="unknown method 'nope'"):
        create_method("nope", toy_dims())
    with pytest.raises(ValueError, match=r"unknown hyper-parameter.*embed_dimm"):
        create_method("clip4cir", toy_dims(), embed_dimm=3)
    with pytest.raises(ValueError, match="registered twice"):
        register_method("clip4cir")(type("Other", (CIRMethod,), {}))
    assert "clip4cir" in list_methods(trainable=True) and "image-only" in list_methods(trainable=False)
    assert cirfusion.list_methods() == list_methods() and cirfusion.create_method is create_method


def test_baselines():
    dims = toy_dims(aligned=True)
    ref, text = feats(dims, 3)
    gal, _ = feats(dims, 4, 5)
    io = create_method("image-only", dims)
    nrm = torch.nn.functional.normalize
    assert torch.allclose(io.similarity(io.encode_query(ref, text), io.encode_gallery(gal)), nrm(ref.global_) @ nrm(gal.global_).T)
    sm = create_method("sum", dims)
    expect = nrm(nrm(ref.global_) + nrm(text.global_)) @ nrm(gal.global_).T
    assert torch.allclose(sm.similarity(sm.encode_query(ref, text), sm.encode_gallery(gal)), expect, atol=1e-6)
    with pytest.raises(ValueError, match="aligned=False"):
        create_method("sum", toy_dims(aligned=False))


def test_clip4cir_structure():
    ref, text = feats(toy_dims(True), 4)
    # Aligned backbone + global features: the original Combiner (the gallery is the frozen image embedding).
    m = create_method("clip4cir", toy_dims(aligned=True), image_encoder="global").eval()
    assert isinstance(m.image_proj, torch.nn.Identity) and isinstance(m.text_proj, torch.nn.Identity)
    assert torch.allclose(m.encode_gallery(ref), torch.nn.functional.normalize(ref.global_))
    # Non-aligned: learned projections to a common D, the query's image path shares the gallery's.
    dims = toy_dims(aligned=False)
    ref, text = feats(dims, 4)
    m = create_method("clip4cir", dims, embed_dim=16, image_encoder="global").eval()
    assert isinstance(m.image_proj, torch.nn.Linear) and m.image_proj.out_features == 16
    i = m.encode_gallery(ref)
    q, lam = m.combine(i, torch.nn.functional.normalize(m.text_proj(text.global_)))
    assert torch.allclose(q, m.encode_query(ref, text)) and ((lam > 0) & (lam < 1)).all()
    assert torch.allclose(q.norm(dim=-1), torch.ones(4))
    # With the gate forced to 0 and the mixer to 0 the query is the reference's gallery embedding.
    with torch.no_grad():
        m.gate[-2].bias.fill_(-1e4)
        m.combiner[-1].weight.zero_()
        m.combiner[-1].bias.zero_()
    assert torch.allclose(m.encode_query(ref, text), i, atol=1e-6)
    # Token encoder (the default): the image vector depends on the tokens (and on their positions); aligned
    # backbones then get learned projections on both sides too.
    mt = create_method("clip4cir", dims, embed_dim=16, token_width=32, token_heads=2).eval()
    assert isinstance(create_method("clip4cir", toy_dims(aligned=True), image_encoder="tokens").text_proj, torch.nn.Linear)
    assert mt.uses_image_tokens and not m.uses_image_tokens
    a = mt.encode_gallery(ref)
    swapped = ImageFeatures(global_=ref.global_, tokens=ref.tokens.flip(1))
    assert not torch.allclose(a, mt.encode_gallery(swapped))
    with pytest.raises(ValueError, match="image_encoder"):
        create_method("clip4cir", dims, image_encoder="pixels")


def test_token_encoder():
    f, _ = feats(toy_dims(), 3)
    for layers, queries in ((0, 1), (2, 3)):
        enc = TokenEncoder(token_dim=24, num_tokens=4, out_dim=8, global_dim=32, width=32, layers=layers, heads=4,
                           queries=queries).eval()
        out, toks = enc(f, return_tokens=True)
        assert out.shape == (3, 8) and toks.shape == (3, 4, 32)
        # the pooled vector depends on which token sits where
        assert not torch.allclose(out, enc(ImageFeatures(global_=f.global_, tokens=f.tokens.flip(1))))
    with pytest.raises(ValueError, match="expects 4 image tokens"):
        enc(ImageFeatures(global_=f.global_, tokens=f.tokens[:, :2]))
    with pytest.raises(ValueError, match="divisible"):
        TokenEncoder(24, 4, 8, width=30, heads=4)


def test_maxsim_matches_brute_force():
    torch.manual_seed(0)
    nrm = torch.nn.functional.normalize
    q1, q3 = nrm(torch.randn(3, 8), dim=-1), nrm(torch.randn(3, 2, 8), dim=-1)
    g1, g3 = nrm(torch.randn(5, 8), dim=-1), nrm(torch.randn(5, 4, 8), dim=-1)
    assert torch.allclose(cosine_or_maxsim(q1, g1), q1 @ g1.T)
    brute = torch.tensor([[max(float(q1[b] @ g3[n, k]) for k in range(4)) for n in range(5)] for b in range(3)])
    assert torch.allclose(cosine_or_maxsim(q1, g3), brute, atol=1e-6)
    brute = torch.tensor([[max(float(q3[b, m] @ g3[n, k]) for m in range(2) for k in range(4)) for n in range(5)] for b in range(3)])
    assert torch.allclose(cosine_or_maxsim(q3, g3), brute, atol=1e-6)
    assert torch.allclose(cosine_or_maxsim(q3, g3, max_elems=8), cosine_or_maxsim(q3, g3), atol=1e-6)  # tiled == untiled
    brute = torch.tensor([[max(float(q3[b, m] @ g1[n]) for m in range(2)) for n in range(5)] for b in range(3)])
    assert torch.allclose(cosine_or_maxsim(q3, g1), brute, atol=1e-6)


def test_stage_parameters():
    m = create_method("clip4cir", toy_dims())
    names = [n for n, _ in stage_parameters(m, Stage(train=("text_proj", "gate")))]
    assert names and all(n.startswith(("text_proj.", "gate.")) for n in names)
    assert len(stage_parameters(m, Stage())) == len(list(m.parameters()))
    with pytest.raises(ValueError, match="no parameter matches prefix 'txt_proj'"):
        stage_parameters(m, Stage(train=("txt_proj",)))


def test_checkpoint_key_mismatch_is_an_error(tmp_path):
    m = create_method("clip4cir", toy_dims())
    save_checkpoint(m, tmp_path / "ck")
    weights = tmp_path / "ck" / "model.safetensors"
    good = load_file(str(weights))

    def expect(state, match):
        save_file(state, str(weights))
        with pytest.raises(CheckpointError, match=match):
            load_checkpoint(tmp_path / "ck")

    missing = dict(good)
    del missing["gate.0.weight"]
    expect(missing, r"missing keys \['gate.0.weight'\]")
    expect({**good, "extra.weight": torch.zeros(2)}, r"unexpected keys \['extra.weight'\]")
    expect({**good, "text_proj.weight": torch.zeros(3, 3)}, r"shape mismatch text_proj.weight")
    save_file(good, str(weights))
    cfg_path = tmp_path / "ck" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["hparams"]["embed_dim"] = 64  # the config says another architecture than the weights hold
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_checkpoint(tmp_path / "ck")
    cfg["hparams"] = {"bogus": 1}
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"cannot rebuild.*bogus"):
        load_checkpoint(tmp_path / "ck")
    with pytest.raises(CheckpointError, match="not a cirfusion checkpoint"):
        read_config(tmp_path)
    cfg_path.write_text('{"format": "something-else"}')
    with pytest.raises(CheckpointError, match="not a cirfusion checkpoint config"):
        load_checkpoint(tmp_path / "ck")


def test_checkpoint_config_contents(tmp_path):
    m = create_method("clip4cir", toy_dims(), embed_dim=16)
    save_checkpoint(m, tmp_path / "ck", dataset="toy/train", extra={"note": 1})
    cfg = read_config(tmp_path / "ck")
    assert cfg["method"] == "clip4cir" and cfg["hparams"]["embed_dim"] == 16
    assert cfg["dims"] == toy_dims().to_dict()
    assert cfg["backbone"] == {"id": "toy", "weights_hash": "toyhash", "preprocess_id": "none"}
    assert cfg["dataset"] == "toy/train" and cfg["extra"] == {"note": 1}
    assert cfg["num_parameters"] == sum(p.numel() for p in m.parameters())
    loaded = load_checkpoint(tmp_path / "ck")
    assert loaded.hparams == m.hparams and loaded.params == m.params and isinstance(loaded.params, Clip4CirParams)


def test_api_load_with_a_real_backbone(tmp_path):
    """cirfusion.load -> CIRModel on raw images: the backbone named in the checkpoint, fp16-rounded features."""
    pytest.importorskip("cirfusion.backbones.tiny")
    from PIL import Image

    from cirfusion.backbones import create_backbone

    bb = create_backbone("tiny")
    m = create_method("clip4cir", bb, embed_dim=16)
    save_checkpoint(m, tmp_path / "ck")
    model = cirfusion.load(tmp_path / "ck")
    assert model.backbone.backbone_id == "tiny"
    imgs = [Image.new("RGB", (20, 20), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    imgs[1].save(tmp_path / "g.png")
    g = model.encode_gallery([imgs[0], tmp_path / "g.png", imgs[2]])
    q = model.encode_query([imgs[0]], ["make it green"])
    s = model.similarity(q, g)
    ranked = model.rank(imgs[0], "make it green", [imgs[0], imgs[1], imgs[2]], k=2, keep_reference=True)
    assert [i for i, _ in ranked] == s[0].argsort(descending=True)[:2].tolist()
    assert ranked[0][1] == pytest.approx(float(s[0].max()), abs=1e-6)
    tf = model.text_features(["a", "a longer text here"])
    assert tf.tokens.shape[1] == bb.max_text_tokens and tf.mask.shape == (2, bb.max_text_tokens)
    with pytest.raises(CheckpointError, match="weights"):
        cirfusion.load(tmp_path / "ck", backbone=create_backbone("tiny:seed=1"))
