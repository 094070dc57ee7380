"""CLIP4CIR against ABaldrati/CLIP4Cir: the Combiner of combiner.py, the frozen image embedding as gallery on an
aligned backbone, the original fixed logit scale of 100, and stage 1 stated as missing where `train --list` shows it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cirfusion.backbones.base import ImageFeatures, TextFeatures
from cirfusion.checkpoint import load_checkpoint, save_checkpoint
from cirfusion.methods import MethodDims, create_method
from cirfusion.methods.base import Batch, HyperParameterError
from cirfusion.methods.clip4cir import CLIP4CIR, Combiner
from cirfusion.methods.encoders import TokenEncoder

pytestmark = pytest.mark.usefixtures("one_thread")

# What hf-clip gives for a ViT-B/32 CLIP (aligned 512-d globals, 7x7 patch tokens of width 768), and the embedded
# default (EfficientNet images, MiniLM text: not aligned).
HF_CLIP = MethodDims(image_dim=512, image_token_dim=768, num_image_tokens=49, text_dim=512, text_token_dim=512,
                     max_text_tokens=77, aligned=True, backbone_id="hf-clip:/models/clip-vit-base-patch32")
EMBEDDED = MethodDims(image_dim=1280, image_token_dim=112, num_image_tokens=64, text_dim=384, text_token_dim=384,
                      max_text_tokens=48, backbone_id="embedded")
SMALL = dict(embed_dim=16, projection_dim=32, hidden_dim=64, token_width=32, token_heads=2)


def feats(dims: MethodDims, n: int, seed: int = 0) -> tuple[ImageFeatures, TextFeatures]:
    g = torch.Generator().manual_seed(seed)
    img = ImageFeatures(global_=F.normalize(torch.randn(n, dims.image_dim, generator=g), dim=-1),
                        tokens=torch.randn(n, dims.num_image_tokens, dims.image_token_dim, generator=g))
    txt = TextFeatures(global_=F.normalize(torch.randn(n, dims.text_dim, generator=g), dim=-1),
                       tokens=torch.randn(n, 4, dims.text_token_dim, generator=g), mask=torch.ones(n, 4, dtype=torch.bool))
    return img, txt


def batch(dims: MethodDims, n: int = 5) -> Batch:
    ref, text = feats(dims, n, 1)
    tgt, _ = feats(dims, n, 2)
    rows = torch.arange(100, 100 + n)
    return Batch(ref=ref, text=text, target=tgt, ref_rows=torch.arange(n), target_rows=rows,
                 positives=[np.array([int(r)]) for r in rows], texts=[f"t{i}" for i in range(n)])


def test_aligned_backbone_defaults_to_the_frozen_image_embedding_as_gallery():
    m = create_method("clip4cir", HF_CLIP, projection_dim=32, hidden_dim=64).eval()
    assert m.image_encoder == "global" and not m.uses_image_tokens
    assert isinstance(m.image_proj, torch.nn.Identity) and isinstance(m.text_proj, torch.nn.Identity)
    gal, _ = feats(HF_CLIP, 6)
    assert torch.equal(m.encode_gallery(gal), F.normalize(gal.global_, dim=-1))  # nothing learned on the gallery side
    assert m.embed_dim == 512 and m.hparams["image_encoder"] == "auto"
    # the gallery side has no parameters at all: training moves only the query side
    loss, _ = m.train().loss(batch(HF_CLIP))
    loss.backward()
    assert not [n for n, _ in m.image_proj.named_parameters()] and m.combiner[0].weight.grad is not None


def test_non_aligned_or_forced_choices_keep_a_learned_gallery_side():
    m = create_method("clip4cir", EMBEDDED, **SMALL)
    assert m.image_encoder == "tokens" and isinstance(m.image_proj, TokenEncoder)
    assert isinstance(m.text_proj, torch.nn.Linear) and m.text_proj.out_features == 16
    # explicit choices win over auto (older checkpoints store image_encoder=tokens and load as before)
    t = create_method("clip4cir", HF_CLIP, image_encoder="tokens", **SMALL)
    assert isinstance(t.image_proj, TokenEncoder) and isinstance(t.text_proj, torch.nn.Linear)
    p = create_method("clip4cir", HF_CLIP, project="always", **SMALL)
    assert p.image_encoder == "global" and isinstance(p.image_proj, torch.nn.Linear)
    # aligned but of different sizes: no common space to use as is
    odd = MethodDims(**{**HF_CLIP.to_dict(), "text_dim": 256})
    assert create_method("clip4cir", odd, **SMALL).image_encoder == "tokens"


@torch.no_grad()
def test_fixed_logit_scale_of_100():
    dims = EMBEDDED
    fixed = create_method("clip4cir", dims, logit_scale="fixed", **SMALL).eval()
    assert "logit_scale" not in dict(fixed.named_parameters())
    assert float(fixed.scale()) == pytest.approx(100.0)
    b = batch(dims)
    loss, logs = fixed.loss(b)
    q = fixed.encode_query(b.ref, b.text)
    g = fixed.encode_gallery(b.target)
    assert float(loss) == pytest.approx(float(F.cross_entropy(100.0 * q @ g.T, torch.arange(len(b)))), rel=1e-5)
    assert logs["scale"] == pytest.approx(100.0)
    assert float(create_method("clip4cir", dims, logit_scale="fixed", fixed_scale=50.0, **SMALL).scale()) == pytest.approx(50.0)
    assert create_method("clip4cir", dims, **SMALL).params.logit_scale == "fixed"  # the default, chosen on val
    learned = create_method("clip4cir", dims, logit_scale="learned", **SMALL)
    assert isinstance(learned.logit_scale, torch.nn.Parameter)
    assert float(learned.scale()) == pytest.approx(20.0)
    with pytest.raises(HyperParameterError, match="fixed_scale"):
        create_method("clip4cir", dims, logit_scale="fixed", fixed_scale=0.0)
    with pytest.raises(HyperParameterError, match="logit_scale"):
        create_method("clip4cir", dims, logit_scale="constant")


def test_fixed_scale_checkpoint_round_trip(tmp_path):
    m = create_method("clip4cir", HF_CLIP, logit_scale="fixed", projection_dim=32, hidden_dim=64).eval()
    save_checkpoint(m, tmp_path / "ck")
    m2 = load_checkpoint(tmp_path / "ck")
    ref, text = feats(HF_CLIP, 3)
    assert float(m2.scale()) == pytest.approx(100.0) and torch.equal(m2.encode_query(ref, text), m.encode_query(ref, text))


def test_both_scale_modes_share_one_checkpoint_layout():
    fixed = create_method("clip4cir", EMBEDDED, logit_scale="fixed", **SMALL)
    learned = create_method("clip4cir", EMBEDDED, logit_scale="learned", **SMALL)
    assert set(fixed.state_dict()) == set(learned.state_dict())
    fixed.load_state_dict(learned.state_dict())  # e.g. a checkpoint trained with the learned scale
    assert float(fixed.scale()) == pytest.approx(20.0)  # its stored scale, now held constant
    batch_ = batch(EMBEDDED)
    fixed.train().loss(batch_)[0].backward()
    assert "logit_scale" not in {n for n, p in fixed.named_parameters() if p.grad is not None}


def test_combiner_module_is_the_methods_combiner():
    torch.manual_seed(0)
    comb = Combiner(512, 32, 64).eval()
    assert comb.text_projection[2].p == 0.5  # the original's dropouts
    m = create_method("clip4cir", HF_CLIP, projection_dim=32, hidden_dim=64).eval()
    own = {k: v for k, v in m.state_dict().items() if k.split(".")[0] in ("text_projection", "image_projection",
                                                                          "combiner", "gate")}
    assert set(own) == set(comb.state_dict())  # the same parameter names: CLIP4CIR checkpoints are unchanged
    m.load_state_dict({**m.state_dict(), **comb.state_dict()})
    ref, text = feats(HF_CLIP, 4)
    q, lam = comb(ref.global_, text.global_)
    assert torch.allclose(q, m.encode_query(ref, text), atol=1e-6) and ((lam > 0) & (lam < 1)).all()
    assert torch.allclose(comb.combine_features(ref.global_, text.global_), q)
    # the residual: with the mixer zeroed and the gate at 1 the query is the text vector
    with torch.no_grad():
        comb.combiner[-1].weight.zero_()
        comb.combiner[-1].bias.zero_()
        comb.gate[-2].bias.fill_(1e4)
    assert torch.allclose(comb.combine_features(ref.global_, text.global_), text.global_, atol=1e-5)
    with pytest.raises(HyperParameterError, match="dropout"):
        Combiner(8, 8, 8, dropout=1.0)


def test_train_list_states_the_missing_stage_1_and_the_fixed_scale():
    from cirfusion.commands.train import list_methods_text

    lines = list_methods_text().splitlines()
    head = next(line for line in lines if line.startswith("clip4cir:"))
    assert "stage 1, fine-tuning the encoders with an element-wise sum, is not implemented" in head
    block = lines[lines.index(head) + 1 :]
    block = block[: next(i for i, line in enumerate(block) if not line.startswith(" "))]
    assert any(line.startswith('    logit_scale (Literal') and "fixed" in line for line in block)
    assert '    fixed_scale (float) = 100.0: the logit scale when logit_scale=fixed (the original: 100)' in block
    assert any(line.startswith('    image_encoder (') and '= "auto"' in line and "aligned" in line for line in block)
    import cirfusion.methods.clip4cir as module

    assert "stage 1" in (CLIP4CIR.__doc__ or "") and "implements stage 2 only" in (module.__doc__ or "")
