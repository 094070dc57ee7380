"""BLIP4CIR (+Bi) as Bi-Blip4CIR defines it: two stages (text encoder with query = norm(image + text), then
CLIP4Cir's Combiner on the frozen stage-I features), learned forward/backward markers (the forward one at
inference), the reversed query's loss in both stages. Each loss term changes the gradient; stage II freezes stage I;
training through the shared loop works and resumes across the stage boundary; checkpoints round-trip."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from cirfusion.backbones.base import TextFeatures
from cirfusion.checkpoint import load_checkpoint, read_config, save_checkpoint
from cirfusion.evaluation import evaluate
from cirfusion.methods import MethodDims, create_method, stage_parameters
from cirfusion.methods.blip4cir import BACKWARD, BLIP4CIR, FORWARD, load_minilm_layer
from cirfusion.methods.clip4cir import CLIP4CIR
from cirfusion.seeding import seed_everything
from cirfusion.train import TrainConfig, train
from test_pool_methods import feats, random_batch
from test_train import FAST, make_toy, toy_dims, weights

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(embed_dim=32, width=32, layers=1, projection_dim=64, hidden_dim=64, dropout=0.0, combiner_dropout=0.0)


def small(name: str = "blip4cir-bi", dims: MethodDims | None = None, seed: int = 0, **hp) -> BLIP4CIR:
    seed_everything(seed)
    m = create_method(name, dims or toy_dims(), **{**SMALL, **hp})
    assert isinstance(m, BLIP4CIR)
    return m


def grads(m: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    m.zero_grad()
    loss.backward()
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in m.named_parameters()}


def differs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], prefix: str) -> bool:
    return any(not torch.allclose(a[n], b[n], atol=1e-7) for n in a if n.startswith(prefix))


# ---------------------------------------------------------------------------------------------------------------------
def test_registered_defaults_and_stages():
    plain, bi = small("blip4cir"), small("blip4cir-bi")
    assert plain.params.bi_weight == 0 and plain.params.combiner_bi_weight == 0 and plain.markers is None
    assert bi.params.bi_weight > 0 and bi.params.combiner_bi_weight > 0
    assert bi.markers is not None and bi.markers.shape == (2, 1, 32)  # forward and backward, one vector each
    assert isinstance(bi.combiner, CLIP4CIR)  # CLIP4Cir's Combiner, reused (identity projections)
    assert isinstance(bi.combiner.text_proj, torch.nn.Identity) and isinstance(bi.combiner.image_proj, torch.nn.Identity)
    s1, s2 = bi.stages()
    assert (s1.name, s1.loss, s1.validate) == ("text-encoder", "loss", False)
    assert (s2.name, s2.train, s2.loss) == ("combiner", ("combiner",), "loss_combiner")
    names1 = {n for n, _ in stage_parameters(bi, s1)}
    names2 = {n for n, _ in stage_parameters(bi, s2)}
    assert not names1 & names2 and names1 | names2 == {n for n, _ in bi.named_parameters()}
    assert "markers" in names1 and "logit_scale" in names1 and all(n.startswith("combiner.") for n in names2)
    only = small("blip4cir-bi", combiner=False, combiner_bi_weight=0.0)
    assert only.combiner is None and [s.name for s in only.stages()] == ["text-encoder"] and only.stages()[0].validate


def test_bad_hparams_are_refused():
    for hp, match in [({"bi_weight": -1}, "bi_weight"), ({"combiner_bi_weight": -0.1}, "combiner_bi_weight"),
                      ({"marker_tokens": 0}, "marker_tokens"), ({"combiner": False}, "combiner_bi_weight"),
                      ({"width": 30, "heads": 4}, "divisible"), ({"fixed_logit_scale": 101.0}, "fixed_logit_scale"), ({"text_encoder": "minilm-layer"}, "384")]:
        with pytest.raises(ValueError, match=match):
            small("blip4cir-bi", **hp)
    with pytest.raises(ValueError, match="no image tokens"):
        small("blip4cir", MethodDims(8, 8, 0, 8, 8, 4))
    assert small("blip4cir", MethodDims(8, 8, 0, 8, 8, 4), image_encoder="global").image_proj is not None


# ---- each loss term changes the gradient ----------------------------------------------------------------------------
def test_stage1_forward_and_reverse_terms():
    batch = random_batch(toy_dims())
    with_bi, without = small(bi_weight=0.4), small(bi_weight=0.0)  # same seed: same initial weights
    assert all(torch.equal(a, b) for a, b in zip(with_bi.state_dict().values(), without.state_dict().values(), strict=True))
    loss, logs = with_bi.loss(batch)
    assert logs["loss"] == pytest.approx(logs["loss_forward"] + 0.4 * logs["loss_reverse"], rel=1e-5)
    g_bi = grads(with_bi, loss)
    loss0, logs0 = without.loss(batch)
    assert "loss_reverse" not in logs0 and logs0["loss"] == pytest.approx(logs["loss_forward"], rel=1e-6)
    g0 = grads(without, loss0)
    # the reversed term moves the text encoder, the image projection and the backward marker
    for prefix in ("text_encoder.", "text_proj.", "image_proj."):
        assert differs(g_bi, g0, prefix), prefix
    assert g_bi["markers"][BACKWARD].abs().sum() > 0 and g0["markers"][BACKWARD].abs().sum() == 0
    assert g0["markers"][FORWARD].abs().sum() > 0  # the forward term trains the forward marker
    # stage I never touches the Combiner
    assert all(g.abs().sum() == 0 for n, g in g_bi.items() if n.startswith("combiner."))


def test_stage1_reversed_query_reads_target_and_backward_marker():
    m = small().eval()
    batch = random_batch(toy_dims())
    i_ref, i_tgt = m.image(batch.ref), m.image(batch.target)
    fwd, back = m.text(batch.text, FORWARD), m.text(batch.text, BACKWARD)
    assert not torch.allclose(fwd, back)
    # the reversed NCE is computed on norm(target + backward text) against the references
    # the original sums the normalised target (and the raw reference in the forward query)
    expect = BLIP4CIR.reverse_info_nce(m.sum_query(F.normalize(i_tgt, dim=-1), back), F.normalize(i_ref, dim=-1), batch,
                                       m.scale())
    _, logs = m.loss(batch)
    assert logs["loss_reverse"] == pytest.approx(float(expect.detach()), rel=1e-5)
    assert logs["loss_forward"] == pytest.approx(float(m.info_nce(m.sum_query(i_ref, fwd), F.normalize(i_tgt, dim=-1), batch).detach()), rel=1e-5)


def test_stage2_forward_and_reverse_terms_and_frozen_stage1():
    batch = random_batch(toy_dims())
    with_bi, without = small(combiner_bi_weight=0.5), small(combiner_bi_weight=0.0, bi_weight=0.4)
    assert with_bi.markers is not None and without.markers is not None
    loss, logs = with_bi.loss_combiner(batch)
    assert logs["loss"] == pytest.approx(logs["loss_forward"] + 0.5 * logs["loss_reverse"], rel=1e-5)
    g_bi = grads(with_bi, loss)
    loss0, logs0 = without.loss_combiner(batch)
    assert "loss_reverse" not in logs0 and logs0["loss_forward"] == pytest.approx(logs["loss_forward"], rel=1e-6)
    g0 = grads(without, loss0)
    assert differs(g_bi, g0, "combiner.")
    assert any(g.abs().sum() > 0 for n, g in g0.items() if n.startswith("combiner."))  # the forward term trains it
    # stage II freezes stage I: no gradient reaches the encoders, the markers or stage I's scale
    assert all(g.abs().sum() == 0 for n, g in g_bi.items() if not n.startswith("combiner."))


def test_stage2_runs_stage1_in_eval_mode():
    """With dropout in the stage-I encoders, stage II still sees deterministic features (the original runs the
    fine-tuned BLIP text encoder in eval mode under no_grad); the modes are restored afterwards."""
    m = small(dropout=0.5, combiner_dropout=0.0).train()
    batch = random_batch(toy_dims())
    a, b = float(m.loss_combiner(batch)[0].detach()), float(m.loss_combiner(batch)[0].detach())
    assert a == b
    assert m.text_encoder.training and m.image_proj.training
    assert m.loss(batch)[1]["loss"] != m.loss(batch)[1]["loss"]  # stage I does train with dropout


# ---- the markers at inference ---------------------------------------------------------------------------------------
def test_forward_marker_is_used_at_inference_and_backward_is_not():
    m = small().eval()
    ref, text = feats(toy_dims(), 4, 1)
    q = m.encode_query(ref, text)
    g = grads(m, q.sum())
    assert g["markers"][FORWARD].abs().sum() > 0 and g["markers"][BACKWARD].abs().sum() == 0
    with torch.no_grad():  # random moves (a constant shift is invisible through the pre-norm LayerNorm)
        m.markers[BACKWARD].add_(torch.randn(m.markers[BACKWARD].shape))
    assert torch.allclose(m.encode_query(ref, text), q)
    with torch.no_grad():
        m.markers[FORWARD].add_(torch.randn(m.markers[FORWARD].shape))
    assert not torch.allclose(m.encode_query(ref, text), q)
    # the query is the Combiner of the forward-marked text (stage I alone: the normalised sum)
    i, t = m.image(ref), m.text(text, FORWARD)
    assert torch.allclose(m.encode_query(ref, text), m.combiner.combine(F.normalize(i, dim=-1), F.normalize(t, dim=-1))[0])
    only = small(combiner=False, combiner_bi_weight=0.0).eval()
    assert torch.allclose(only.encode_query(ref, text), F.normalize(only.image(ref) + only.text(text, FORWARD), dim=-1))
    assert torch.allclose(m.encode_gallery(ref), F.normalize(i, dim=-1))


def test_reverse_loss_masks_duplicate_references():
    m = small().eval().requires_grad_(False)
    batch = random_batch(toy_dims(), 4, 0, ref_rows=[5, 5, 6, 7])  # queries 0 and 1 share their reference
    q, refs = m.sum_query(m.image(batch.target), m.text(batch.text, BACKWARD)), F.normalize(m.image(batch.ref), dim=-1)
    logits = (q @ refs.T) * m.scale()
    logits[0, 1] = logits[1, 0] = float("-inf")
    expect = F.cross_entropy(logits, torch.arange(4))
    assert float(m.reverse_info_nce(q, refs, batch, m.scale())) == pytest.approx(float(expect), rel=1e-5)


def test_extra_text_padding_changes_nothing():
    dims = toy_dims()
    ref, text = feats(dims, 4, 3, text_len=2)
    longer = TextFeatures(global_=text.global_, tokens=torch.cat([text.tokens, torch.randn(4, 2, dims.text_token_dim)], 1),
                          mask=torch.cat([text.mask, torch.zeros(4, 2, dtype=torch.bool)], 1))
    m = small().eval()
    assert torch.allclose(m.encode_query(ref, text), m.encode_query(ref, longer), atol=1e-6)


# ---- the MiniLM-layer text encoder ----------------------------------------------------------------------------------
MINILM_DIMS = MethodDims(image_dim=32, image_token_dim=24, num_image_tokens=5, text_dim=384, text_token_dim=384,
                         max_text_tokens=12, backbone_id="toy-minilm")


def test_minilm_layer_is_minilms_last_layer():
    """Fed MiniLM's fifth-layer states, the copied layer gives MiniLM's output (so on those inputs training it is
    fine-tuning MiniLM's last layer)."""
    transformers = pytest.importorskip("transformers")
    from cirfusion.backbones.embedded import minilm_path

    path = minilm_path()
    tok = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    bert = transformers.AutoModel.from_pretrained(str(path), local_files_only=True).eval()
    enc = tok(["make the circle red", "add a small blue square on the left"], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = bert(**enc, output_hidden_states=True).hidden_states
    layer = torch.nn.TransformerEncoderLayer(384, 12, 1536, dropout=0.0, activation="gelu", batch_first=True,
                                             layer_norm_eps=1e-12)
    load_minilm_layer(layer, 5)
    layer.eval()
    mask = enc["attention_mask"].bool()
    with torch.no_grad():
        out = layer(hidden[5], src_key_padding_mask=~mask)
    assert torch.allclose(out[mask], hidden[6][mask], atol=1e-4)


def test_minilm_layer_encoder_trains_and_round_trips(tmp_path):
    m = small(dims=MINILM_DIMS, text_encoder="minilm-layer")
    assert m.markers is not None and m.markers.shape == (2, 1, 384)
    batch = random_batch(MINILM_DIMS, 6)
    g = grads(m, m.loss(batch)[0])
    assert g["text_encoder.layer.linear1.weight"].abs().sum() > 0 and g["markers"][BACKWARD].abs().sum() > 0
    m.eval()
    ref, text = feats(MINILM_DIMS, 3, 1)
    s = m.similarity(m.encode_query(ref, text), m.encode_gallery(ref))
    save_checkpoint(m, tmp_path / "ck")
    m2 = load_checkpoint(tmp_path / "ck")
    assert torch.equal(m2.similarity(m2.encode_query(ref, text), m2.encode_gallery(ref)), s)


# ---- training through the shared loop -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy(tmp_path_factory.mktemp("toy"))


def test_tiny_training_runs_both_stages_and_beats_image_only(toy, tmp_path):
    tr, va = toy
    m = small()
    w0 = weights(m)
    res = train(m, tr, va, tmp_path / "run", TrainConfig(epochs=3, seed=0, stage_epochs={"text-encoder": 4}, **FAST))
    assert res.completed
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["type"] == "epoch"]
    assert [r["stage"] for r in epochs] == ["text-encoder"] * 4 + ["combiner"] * 3
    assert all("val" not in r for r in epochs[:4]) and all("val" in r for r in epochs[4:])
    assert {"loss_forward", "loss_reverse"} <= set(next(r for r in records if r["type"] == "step"))
    w1 = weights(m)
    assert all(not torch.equal(w0[k], w1[k]) for k in ("markers", "text_proj.weight", "combiner.combiner.0.weight"))
    base = evaluate(create_method("image-only", toy_dims()), va)["Rmean"]
    best = load_checkpoint(res.best_dir)
    assert res.best_metric > base + 10, (res.best_metric, base)
    assert evaluate(best, va)["Rmean"] == pytest.approx(res.best_metric)


def test_stage2_leaves_stage1_weights_unchanged(toy, tmp_path):
    tr, va = toy
    m = small()
    cfg = TrainConfig(epochs=1, seed=0, **FAST)
    steps = len(tr.dataset.queries) // FAST["batch_size"]
    train(m, tr, va, tmp_path / "a", replace(cfg, stop_after_steps=steps))  # the end of stage I exactly
    after1 = weights(m)
    train(m, tr, va, tmp_path / "a", cfg, resume=True)
    after2 = weights(m)
    changed = {k for k in after1 if not torch.equal(after1[k], after2[k])}
    assert changed and all(k.startswith("combiner.") for k in changed)


def test_resume_across_the_stage_boundary_equals_a_straight_run(toy, tmp_path):
    tr, va = toy
    cfg = TrainConfig(epochs=2, seed=0, **FAST)
    steps = len(tr.dataset.queries) // FAST["batch_size"]
    part = train(small(), tr, va, tmp_path / "a", replace(cfg, stop_after_steps=2 * steps + 3))  # inside stage II
    assert not part.completed
    state = json.loads((tmp_path / "a" / "last" / "state.json").read_text())
    assert state["stage"] == 1
    resumed = small(seed=5)  # different initial weights: everything must come from the run directory
    train(resumed, tr, va, tmp_path / "a", cfg, resume=True)
    straight = small()
    train(straight, tr, va, tmp_path / "b", cfg)
    assert all(torch.equal(a, b) for a, b in zip(weights(resumed).values(), weights(straight).values(), strict=True))


def test_checkpoint_round_trip_with_custom_hparams(tmp_path):
    dims = toy_dims(aligned=True)
    hp = dict(bi_weight=0.1, combiner_bi_weight=0.1, marker_tokens=2, layers=2, heads=2, image_encoder="global",
              fixed_logit_scale=100.0)
    m = small(dims=dims, **hp)
    # the original's fixed scale of 100 in both stages: a constant, not a parameter
    assert float(m.scale()) == pytest.approx(100) and float(m.combiner.scale()) == pytest.approx(100)
    assert not any(n.endswith("logit_scale") for n, _ in m.named_parameters())
    assert isinstance(m.image_proj, torch.nn.Identity) and m.embed_dim == dims.image_dim  # the original's frozen image side
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for s in range(2):  # move away from the initialisation so a silent re-init would show
        for fn in (m.loss, m.loss_combiner):
            loss, _ = fn(random_batch(dims, 6, s))
            opt.zero_grad()
            loss.backward()
            opt.step()
    m.eval()
    ref, text = feats(dims, 3, 7)
    gal, _ = feats(dims, 4, 8)
    s = m.similarity(m.encode_query(ref, text), m.encode_gallery(gal))
    save_checkpoint(m, tmp_path / "ck")
    assert all(read_config(tmp_path / "ck")["hparams"][k] == v for k, v in hp.items())
    m2 = load_checkpoint(tmp_path / "ck")
    assert type(m2) is type(m) and m2.hparams == m.hparams
    assert torch.equal(m2.similarity(m2.encode_query(ref, text), m2.encode_gallery(gal)), s)
    assert torch.isfinite(s).all() and float(m2.scale()) == pytest.approx(100)
