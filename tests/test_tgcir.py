"""TG-CIR as the original (iLearn-Lab/MM23-TG-CIR, model.py / train.py) defines it: tokens from learned masks and a
TokenLearner, replace = 1 - remain, a teacher whose reference and text are detached, and one test per loss term that
the term changes exactly the gradients it should (its weight at 0 vs at the default)."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cirfusion.backbones.base import ImageFeatures, TextFeatures
from cirfusion.checkpoint import load_checkpoint, read_config, save_checkpoint
from cirfusion.errors import CirfusionError
from cirfusion.evaluation import evaluate
from cirfusion.methods import create_method
from cirfusion.methods.base import Batch, HyperParameterError
from cirfusion.methods.tgcir import LOSS_WEIGHTS, TGCIR, TgCirParams, TokenLearner, kl_to_target_similarities, orthogonality
from cirfusion.seeding import seed_everything
from cirfusion.train import TrainConfig, train
from test_train import make_toy, toy_dims

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(embed_dim=16, width=16, global_tokens=2, local_tokens=3)


def small(**hp: object) -> TGCIR:
    seed_everything(0)
    m = create_method("tg-cir", toy_dims(), **{**SMALL, **hp})
    assert isinstance(m, TGCIR)
    return m


def batch(n: int = 6, seed: int = 0, hard: int = 0) -> Batch:
    """Random features of toy shapes; text lengths vary (one text is all padding); ``hard`` mined negatives."""
    dims = toy_dims()
    g = torch.Generator().manual_seed(seed)

    def images(k: int) -> ImageFeatures:
        return ImageFeatures(global_=torch.randn(k, dims.image_dim, generator=g),
                             tokens=torch.randn(k, dims.num_image_tokens, dims.image_token_dim, generator=g))

    lens = torch.tensor([0, *torch.randint(1, dims.max_text_tokens + 1, (n - 1,), generator=g).tolist()])
    text = TextFeatures(global_=torch.randn(n, dims.text_dim, generator=g),
                        tokens=torch.randn(n, dims.max_text_tokens, dims.text_token_dim, generator=g),
                        mask=torch.arange(dims.max_text_tokens)[None] < lens[:, None])
    rows = torch.arange(100, 100 + n)
    b = Batch(ref=images(n), text=text, target=images(n), ref_rows=torch.arange(n), target_rows=rows,
              positives=[np.array([int(r)]) for r in rows], texts=[f"t{i}" for i in range(n)])
    if hard:
        b.negatives, b.negative_rows = images(hard), torch.arange(200, 200 + hard)
    return b


# parameter groups, by name prefix
GROUPS = {
    "image_in": ("image_global", "image_local", "image_pos"),
    "text_in": ("text_global", "text_local"),
    "shared_tokens": ("masks", "token_learner", "token_encoder"),
    "student_gate": ("remain",),
    "teacher_gates": ("teacher",),
    "token_weight": ("token_weight",),
    "scale": ("logit_scale",),
}


def group_grads(m: TGCIR, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    """The gradient of ``loss`` on each parameter group (zeros where it does not reach), flattened."""
    m.zero_grad(set_to_none=True)
    loss.backward()
    out = {}
    for g, prefixes in GROUPS.items():
        named = [(n, p) for n, p in m.named_parameters() if n.split(".")[0] in prefixes]
        assert named, g
        out[g] = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for _, p in named])
    return out


def test_every_parameter_is_in_a_group():
    m = small()
    assert {n.split(".")[0] for n, _ in m.named_parameters()} == {p for ps in GROUPS.values() for p in ps}


# ---- what each term trains ------------------------------------------------------------------------------------------
# term -> the parameter groups its gradient reaches (the rest get exactly nothing from it)
REACHES = {
    # the teacher sees sg(reference), sg(text) and the target's tokens: the text side never learns from it
    "teacher": {"image_in", "shared_tokens", "teacher_gates", "token_weight", "scale"},
    "mask_sum": {"image_in", "shared_tokens", "teacher_gates"},
    "ortho": {"image_in", "text_in", "shared_tokens"},
    # the teacher's masks are targets (stop-grad): only the student's gate and its inputs move
    "mask_distill": {"image_in", "text_in", "shared_tokens", "student_gate"},
    # the target-target distribution is detached and the temperature fixed: no token weights, no scale
    "kl": {"image_in", "text_in", "shared_tokens", "student_gate"},
}


@pytest.mark.parametrize("term", sorted(LOSS_WEIGHTS))
def test_each_weighted_term_changes_exactly_the_gradients_it_should(term):
    """Weight 0 against the default: the gradient changes on every group the term reaches and on no other."""
    weight = LOSS_WEIGHTS[term]
    default = getattr(TgCirParams(), weight)
    assert default > 0, (term, default)
    b = batch()
    m = small()
    with_term = group_grads(m, m.loss(b)[0])
    m0 = small(**{weight: 0.0})
    assert all(torch.equal(a, c) for a, c in zip(m.parameters(), m0.parameters(), strict=True))  # same init
    without = group_grads(m0, m0.loss(b)[0])
    changed = {g for g in GROUPS if not torch.allclose(with_term[g], without[g], rtol=0, atol=1e-9)}
    assert changed == REACHES[term], (term, changed)
    # and that difference is the term's own gradient times its weight (up to float32 rounding of the larger sums)
    own = group_grads(m, m.terms(b)[term])
    for g in REACHES[term]:
        err = (with_term[g] - without[g] - default * own[g]).norm() / (default * own[g]).norm()
        assert err < 1e-2, (term, g, float(err))


def test_student_nce_trains_the_student_and_the_scale_not_the_teacher():
    m = small()
    own = group_grads(m, m.terms(batch())["student"])
    reached = {g for g, x in own.items() if x.abs().sum() > 0}
    assert reached == {"image_in", "text_in", "shared_tokens", "student_gate", "scale"}


def test_teacher_terms_get_no_gradient_from_reference_or_text_inputs():
    """The teacher composes sg(reference tokens) and sg(text tokens) with the target's (not detached) tokens: its
    losses reach the target's features and never the reference's or the text's."""
    b = batch()
    inputs = {"ref": b.ref.tokens, "ref_global": b.ref.global_, "text": b.text.tokens, "text_global": b.text.global_,
              "target": b.target.tokens, "target_global": b.target.global_}
    for x in inputs.values():
        x.requires_grad_(True)
    m = small()
    terms = m.terms(b)
    for term in ("teacher", "mask_sum"):
        grads = dict(zip(inputs, torch.autograd.grad(terms[term], list(inputs.values()), retain_graph=True,
                                                     allow_unused=True), strict=True))
        for k in ("ref", "ref_global", "text", "text_global"):
            assert grads[k] is None or not grads[k].any(), (term, k)
        assert grads["target"] is not None and grads["target"].abs().sum() > 0, term
    # the student's NCE does reach the reference and the text
    grads = torch.autograd.grad(terms["student"], [b.ref.tokens, b.text.tokens, b.target.tokens])
    assert all(gr.abs().sum() > 0 for gr in grads)


def test_loss_is_the_weighted_sum_of_the_terms():
    hp = dict(teacher_weight=0.7, mask_sum_weight=2.0, ortho_weight=0.3, mask_distill_weight=4.0, kl_weight=0.2, kl_tau=0.5)
    m = small(**hp)
    loss, logs = m.loss(batch())
    expect = logs["loss_student"] + sum(hp[w] * logs[f"loss_{t}"] for t, w in LOSS_WEIGHTS.items())
    assert float(loss.detach()) == pytest.approx(expect, rel=1e-5) and logs["loss"] == pytest.approx(expect, rel=1e-5)
    assert TgCirParams() == TgCirParams(teacher_weight=1.0, mask_sum_weight=1.0, ortho_weight=0.1,
                                        mask_distill_weight=10.0, kl_weight=0.5, kl_tau=0.1, logit_scale_init=10.0,
                                        global_tokens=4, local_tokens=8, embed_dim=256, width=256)


# ---- the pieces -----------------------------------------------------------------------------------------------------
def test_replace_is_one_minus_remain_and_the_student_has_one_gate():
    m = small()
    b = batch()
    r, t = m.image_tokens(b.ref), m.text_tokens(b.text)
    q, remain, replace = m.student(r, t)
    assert remain.shape == (6, 5, 1) and torch.equal(replace, 1.0 - remain)
    assert ((remain > 0) & (remain < 1)).all()
    assert torch.allclose(q, F.normalize((remain * r + replace * t).mean(1), dim=-1))
    assert torch.allclose(m.encode_query(b.ref, b.text), q)
    # one student MLP (remain); the teacher has two (remain, replace), each reading [sg(r or t); target]
    assert {n.split(".")[1] for n, _ in m.named_parameters() if n.startswith("teacher.")} == {"remain", "replace"}
    v = m.image_tokens(b.target)
    _, remain_t, replace_t = m.teacher_branch(r, t, v)
    assert torch.allclose(remain_t, m.teacher["remain"](torch.cat([r, v], -1)))
    assert torch.allclose(replace_t, m.teacher["replace"](torch.cat([t, v], -1)))
    assert not torch.allclose(remain_t + replace_t, 1.0 - remain_t)  # the teacher's two masks are free


def test_tokens_are_masked_globals_then_tokenlearner_locals():
    m = small()
    b = batch()
    tok = m.image_tokens(b.ref)
    assert tok.shape == (6, 2 + 3, 16)
    g = m.image_global(b.ref.global_)
    assert torch.allclose(tok[:, :2], F.relu(m.masks)[None] * g[:, None])
    x = m.token_encoder(m.image_local(b.ref.tokens) + m.image_pos)  # projection, positions, the shared encoder
    w = torch.sigmoid(m.token_learner.score(x))  # [B, L, Q]
    assert torch.allclose(tok[:, 2:], torch.stack([(w[..., s:s + 1] * x).mean(1) for s in range(3)], 1), atol=1e-6)
    # the original's initialisation: 0.1 everywhere, 1 on each mask's own block of D / P dimensions
    init = torch.full((2, 16), 0.1)
    init[0, :8] = init[1, 8:] = 1.0
    assert torch.equal(m.masks.detach(), init)
    # gallery vector = normalised mean of the tokens
    assert torch.allclose(m.encode_gallery(b.ref), F.normalize(tok.mean(1), dim=-1))


def test_text_tokens_average_real_tokens_only():
    """Padding never changes a text's tokens (the original averages all 77 CLIP positions; cached padding is not
    text), an all-padding text gets zero local tokens, and the same masks and TokenLearner serve image and text."""
    m = small().eval()
    b = batch()
    t = m.text_tokens(b.text)
    longer = TextFeatures(global_=b.text.global_, tokens=b.text.tokens + 5.0 * (~b.text.mask)[..., None],
                          mask=b.text.mask)
    assert torch.allclose(m.text_tokens(longer), t, atol=1e-6)
    assert torch.equal(t[0, 2:], torch.zeros(3, 16))  # text 0 has no real token
    mask = b.text.mask[1]
    x = m.token_encoder(m.text_local(b.text.tokens[1:2, mask]))  # the same encoder, over the real tokens alone
    manual = (torch.sigmoid(m.token_learner.score(x))[..., 0:1] * x).mean(1)
    assert torch.allclose(t[1, 2], manual[0], atol=1e-6)
    assert isinstance(m.token_learner, TokenLearner) and not any("text_masks" in n for n, _ in m.named_parameters())


def test_orthogonality_and_kl_match_the_original_formulas():
    eye = torch.eye(4)[None].repeat(2, 1, 1) * 3.0
    assert float(orthogonality(eye)) == pytest.approx(0.0, abs=1e-7)
    same = torch.ones(1, 3, 5)
    assert float(orthogonality(same)) == pytest.approx(6 / 9)  # off-diagonal cosines 1 against 0
    # kl_div(x1, y1, x2, y2, t) of model.py, written out
    g = torch.Generator().manual_seed(0)
    q, v, y = (torch.randn(5, 7, generator=g) for _ in range(3))
    q.requires_grad_(True)
    y.requires_grad_(True)
    x1y1 = F.normalize(q, dim=-1) @ F.normalize(v, dim=-1).T / 0.1
    x2y2 = F.normalize(y, dim=-1) @ F.normalize(y, dim=-1).T / 0.1
    p = F.softmax(x2y2, dim=1)
    expect = (p * (p.log() - F.log_softmax(x1y1, dim=1))).sum() / 5
    kl = kl_to_target_similarities(q, v, y, 0.1)
    assert float(kl.detach()) == pytest.approx(float(expect.detach()), rel=1e-5)
    kl.backward()
    assert y.grad is None and q.grad.abs().sum() > 0  # the target-target distribution is a fixed target


def test_hard_negatives_widen_both_nce_terms_only():
    m = small()
    plain, hard = batch(), batch(hard=3)
    a, b_ = m.terms(plain), m.terms(hard)
    for k in ("student", "teacher"):
        assert float(b_[k].detach()) > float(a[k].detach())
    for k in ("mask_sum", "ortho", "mask_distill", "kl"):
        assert float(b_[k].detach()) == pytest.approx(float(a[k].detach()), rel=1e-6)


def test_inference_never_touches_teacher_token_weights_or_target():
    m = small()
    assert list(inspect.signature(m.encode_query).parameters) == ["ref", "text"]
    b = batch()
    m.encode_query(b.ref, b.text).sum().backward()
    for n, p in m.named_parameters():
        if n.startswith(("teacher.", "token_weight", "logit_scale")):
            assert p.grad is None, n
        else:
            assert p.grad is not None, n
    r, t = m.image_tokens(b.ref), m.text_tokens(b.text)
    f1 = m.teacher_branch(r, t, m.image_tokens(b.target))[0]
    f2 = m.teacher_branch(r, t, m.image_tokens(b.ref))[0]
    assert f1.shape == (6, 5 * 16) and not torch.allclose(f1, f2)  # the teacher reads the target


def test_bad_hyperparameters_are_refused():
    for hp, match in [({"kl_tau": 0.0}, "kl_tau"), ({"ortho_weight": -0.1}, "ortho_weight"),
                      ({"mask_distill_weight": -1.0}, "mask_distill_weight"), ({"global_tokens": 0, "local_tokens": 0}, "one token"),
                      ({"global_tokens": 17}, "global_tokens 17 > embed_dim 16"), ({"kd_weight": 1.0}, "kd_weight")]:
        with pytest.raises(HyperParameterError, match=match):
            small(**hp)
    dims = toy_dims()
    no_text = type(dims)(**{**dims.to_dict(), "max_text_tokens": 0})
    with pytest.raises(HyperParameterError, match="needs image and text tokens"):
        create_method("tg-cir", no_text)
    # one kind of token is enough (ablations without global or without local tokens)
    for hp in ({"global_tokens": 0}, {"local_tokens": 0}):
        loss, _ = small(**hp).loss(batch())
        assert torch.isfinite(loss)


# ---- training and checkpoints ---------------------------------------------------------------------------------------
def test_tiny_training_works_with_and_without_hard_negatives(tmp_path):
    tr, va = make_toy(tmp_path, files=False)
    base = evaluate(create_method("image-only", toy_dims()), va)["Rmean"]
    for hard in (0, 4):
        m = small()
        res = train(m, tr, va, tmp_path / f"run{hard}", TrainConfig(epochs=4, batch_size=32, lr=3e-3, progress=False,
                                                                    seed=0, hard_negatives=hard))
        assert res.best_metric > base + 10, (hard, res.best_metric, base)
        logs = [json.loads(line) for line in (tmp_path / f"run{hard}" / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in logs if "loss_teacher" in r]
        assert steps and all(np.isfinite(r[f"loss_{k}"]) for r in steps for k in (*LOSS_WEIGHTS, "student"))


def test_checkpoint_round_trip_and_old_checkpoints_are_refused(tmp_path):
    hp = dict(kl_weight=0.3, kl_tau=0.2, local_tokens=4, ortho_weight=0.05)
    m = small(**hp)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for s in range(2):  # move away from the initialisation so a silent re-init would show
        loss, _ = m.loss(batch(seed=s))
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    b = batch(seed=9)
    s = m.similarity(m.encode_query(b.ref, b.text), m.encode_gallery(b.target))
    save_checkpoint(m, tmp_path / "ck")
    assert all(read_config(tmp_path / "ck")["hparams"][k] == v for k, v in hp.items())
    m2 = load_checkpoint(tmp_path / "ck")
    assert isinstance(m2, TGCIR) and m2.hparams == m.hparams
    assert torch.equal(m2.similarity(m2.encode_query(b.ref, b.text), m2.encode_gallery(b.target)), s)
    # a checkpoint of the earlier, different TG-CIR architecture is refused with its unknown hyper-parameters named
    cfg_path = tmp_path / "ck" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["hparams"] = {"embed_dim": 16, "kd_weight": 1.0, "kd_temperature": 2.0, "gate_weight": 1.0}
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CirfusionError, match="kd_temperature"):
        load_checkpoint(tmp_path / "ck")
