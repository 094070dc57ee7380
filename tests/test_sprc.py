"""SPRC's losses as in chunmeifeng/SPRC (blip2_qformer_cir_align_prompt.py): loss_itc + 0.4·loss_rtc + 0.4·loss_align.

Each term is checked against a hand computation, and each changes the gradient: loss_rtc is the only term that
trains the auxiliary prompt and it never sees the reference image; loss_align moves the image-side prompt path but,
behind its stop-gradient, not the auxiliary prompt.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cirfusion.methods import create_method
from cirfusion.methods.base import HyperParameterError
from cirfusion.methods.sprc import SprcParams
from cirfusion.seeding import seed_everything
from test_pool_methods import random_batch
from test_train import toy_dims

SMALL = dict(embed_dim=32, width=32, layers=1, num_queries=3, dropout=0.0)
pytestmark = pytest.mark.usefixtures("one_thread")


def sprc(**hp):
    seed_everything(0)
    return create_method("sprc", toy_dims(), **{**SMALL, **hp})


def grads(m, batch) -> dict[str, torch.Tensor]:
    m.zero_grad()
    loss, _ = m.loss(batch)
    loss.backward()
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def differ(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], prefix: str) -> bool:
    names = [n for n in set(a) | set(b) if n.startswith(prefix)]
    assert names, prefix
    zero = torch.zeros(())
    return any(not torch.allclose(a.get(n, zero), b.get(n, zero), atol=1e-7) for n in names)


def test_defaults_are_the_originals():
    p = SprcParams()
    assert (p.rtc_weight, p.align_weight, p.target_align_weight) == (0.4, 0.4, 0.0)
    for name in ("rtc_weight", "align_weight", "target_align_weight"):
        with pytest.raises(HyperParameterError, match=name):
            create_method("sprc", toy_dims(), **{name: -0.1})


@torch.no_grad()
def test_loss_is_itc_plus_weighted_rtc_and_align_computed_by_hand():
    m = sprc(rtc_weight=0.3, align_weight=0.7)
    batch = random_batch(toy_dims())
    loss, logs = m.loss(batch)
    prompt, t, pad = m.prompt(batch.ref, batch.text)
    g = m.encode_gallery(batch.target)
    labels = torch.arange(len(batch))
    scale = m.scale()
    itc = F.cross_entropy(m.similarity(m.compose(prompt, t, pad), g) * scale, labels)
    # loss_rtc: [CLS; P_aux; caption] with no image, read at the first auxiliary-prompt position
    aux = m.aux_prompt.expand(len(batch), -1, -1)
    x = torch.cat([m.cls.expand(len(batch), -1, -1), aux, t], dim=1)
    key_pad = torch.cat([torch.zeros(len(batch), 1 + 3, dtype=torch.bool), pad], dim=1)
    a = F.normalize(m.text_head(m.norm_text(m._run(x, key_pad, None, 0)[:, 1])), dim=-1)
    sims = torch.einsum("bd,nmd->bnm", a, g).amax(dim=2)
    rtc = F.cross_entropy(sims * scale, labels)
    align = ((prompt.mean(1) - m.aux_prompt.mean(1)) ** 2).mean()
    assert logs["loss_itc"] == pytest.approx(float(itc), rel=1e-5)
    assert logs["loss_rtc"] == pytest.approx(float(rtc), rel=1e-5)
    assert logs["loss_align"] == pytest.approx(float(align), rel=1e-5)
    assert float(loss) == pytest.approx(float(itc + 0.3 * rtc + 0.7 * align), rel=1e-5)
    assert "loss_target_align" not in logs  # cirfusion's own term is off by default


def test_rtc_changes_the_gradient_and_alone_trains_the_auxiliary_prompt():
    batch = random_batch(toy_dims())
    with_rtc = grads(sprc(rtc_weight=0.4, align_weight=0.0), batch)
    without = grads(sprc(rtc_weight=0.0, align_weight=0.0), batch)
    assert "aux_prompt" in with_rtc and float(with_rtc["aux_prompt"].abs().sum()) > 0
    assert "aux_prompt" not in without
    assert differ(with_rtc, without, "text_head") and differ(with_rtc, without, "image_head")  # both sides learn
    # the auxiliary path is text only: the reference image does not reach loss_rtc
    m = sprc()
    _, t, pad = m.prompt(batch.ref, batch.text)
    a = m.auxiliary_query(t, pad)
    other = random_batch(toy_dims(), seed=5)
    _, t2, pad2 = m.prompt(other.ref, batch.text)
    assert torch.allclose(a, m.auxiliary_query(t2, pad2)) and torch.equal(pad, pad2)


def test_align_changes_the_gradient_of_the_prompt_path_only():
    batch = random_batch(toy_dims())
    with_align = grads(sprc(rtc_weight=0.4, align_weight=0.4), batch)
    without = grads(sprc(rtc_weight=0.4, align_weight=0.0), batch)
    for prefix in ("queries", "prompt_gen", "image_in", "text_global_in"):  # what produces the fused prompt
        assert differ(with_align, without, prefix), prefix
    # stop-gradient: the auxiliary prompt learns from loss_rtc only, the gallery head not from loss_align
    assert torch.allclose(with_align["aux_prompt"], without["aux_prompt"], atol=1e-7)
    assert torch.allclose(with_align["image_head.weight"], without["image_head.weight"], atol=1e-7)


def test_target_alignment_is_opt_in_and_changes_the_gradient():
    batch = random_batch(toy_dims())
    on = grads(sprc(target_align_weight=0.5), batch)
    off = grads(sprc(), batch)
    assert "prompt_head.weight" in on and "prompt_head.weight" not in off
    _, logs = sprc(target_align_weight=0.5).loss(batch)
    assert "loss_target_align" in logs


def test_inference_does_not_use_the_auxiliary_prompt():
    m = sprc().eval()
    batch = random_batch(toy_dims())
    q = m.encode_query(batch.ref, batch.text)
    with torch.no_grad():
        m.aux_prompt.add_(1.0)
    assert torch.equal(q, m.encode_query(batch.ref, batch.text))
