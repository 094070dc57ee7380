"""DetailFusion: the fused score is the alpha-mix of the branch logits (one indexable vector), the reference hard
negative changes L_DI, the AFC's alpha lies in the simplex and varies across queries, the three stages run through
the shared loop and resume across stage boundaries, the ablation switches."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from cirfusion.checkpoint import load_checkpoint
from cirfusion.examples import Examples
from cirfusion.methods import HyperParameterError, create_method
from cirfusion.methods.detailfusion import DetailFusion, describe_alpha
from cirfusion.seeding import seed_everything
from cirfusion.train import TrainConfig, train
from cirfusion.views import FeatureView
from test_train import FAST, make_toy, toy_dims

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = dict(di_width=32, di_cell_dim=8, gm_embed_dim=32, gm_projection_dim=32, gm_hidden_dim=32, afc_width=16,
             afc_hidden=16, gm_dropout=0.1)


def new(seed: int = 0, **hp) -> DetailFusion:
    seed_everything(seed)
    m = create_method("detailfusion", toy_dims(), **{**SMALL, **hp})
    assert isinstance(m, DetailFusion)
    return m


def toy_batch(tmp_path, m, n=32, hard_negatives=0):
    tr, va = make_toy(tmp_path, files=False)
    view = FeatureView(tr.images, tr.texts)
    ex = Examples(tr, view, hard_negatives=hard_negatives, pool=8)
    order, targets, texts = ex.epoch_plan(0, 0, 0)
    neg = ex.epoch_negatives(0, 0, 0) if hard_negatives else None
    return ex.batch(order[:n], targets, texts, m, neg), tr, va


def test_stages_follow_the_switches():
    names = lambda m: [(s.name, s.train, s.split) for s in m.stages()]
    assert names(new()) == [("di-pretrain", ("di",), "edit_pairs"), ("joint", ("di", "gm"), None),
                            ("compositor", ("afc",), None)]
    assert names(new(pretrain_split="none")) == [("joint", ("di", "gm"), None), ("compositor", ("afc",), None)]
    assert names(new(fusion="static")) == [("di-pretrain", ("di",), "edit_pairs"), ("joint", ("di", "gm"), None)]
    assert names(new(branches="di", pretrain_split="pairs")) == [("di-pretrain", ("di",), "pairs"), ("di", ("di",), None)]
    assert names(new(branches="gm")) == [("gm", ("gm",), None)]
    m = new()
    assert m.output == "fused" and new(fusion="static").output == "static" and new(branches="di").output == "di"


def test_bad_hyper_parameters():
    for bad, match in [({"gamma": -1.0}, "gamma"), ({"di_width": 30, "di_heads": 4}, "di_width"),
                       ({"afc_width": 10, "afc_heads": 4}, "afc_width"), ({"pretrain_split": ""}, "pretrain_split"),
                       ({"branches": "three"}, "branches")]:
        with pytest.raises(HyperParameterError, match=match):
            new(**bad)
    with pytest.raises(HyperParameterError, match="output"):
        new().use_output("both")
    no_tokens = replace(toy_dims(), num_image_tokens=0)
    with pytest.raises(HyperParameterError, match="image tokens"):
        create_method("detailfusion", no_tokens)


def test_fused_score_is_the_alpha_mix_of_branch_logits(tmp_path):
    m = new()
    torch.nn.init.normal_(m.afc.mlp[-1].weight, std=0.5)  # an AFC that is not static yet
    m.eval()
    batch, _, _ = toy_batch(tmp_path, m)
    with torch.no_grad():
        q, g = m.encode_query(batch.ref, batch.text), m.encode_gallery(batch.target)
        assert q.dim() == 2 and g.dim() == 2 and q.shape[1] == g.shape[1]  # one vector each: faiss-indexable
        q_gm, di_map = m.branch_queries(batch.ref, batch.text)
        alpha, _ = m.afc(q_gm, di_map, batch.text)
        s_gm = m.gm.encode_query(batch.ref, batch.text) @ m.gm.encode_gallery(batch.target).T
        s_di = m.di.encode_query(batch.ref, batch.text) @ m.di.encode_gallery(batch.target).T
        want = alpha[:, :1] * m.gm.scale() * s_gm + alpha[:, 1:] * m.di.scale() * s_di
        assert torch.allclose(m.similarity(q, g), want, atol=1e-4)
        # explain() reads alpha back from the query embedding
        assert torch.allclose(m.explain(q, g), alpha, atol=1e-5)
        assert torch.allclose(alpha.sum(1), torch.ones(len(alpha))) and (alpha >= 0).all()
        assert alpha[:, 0].std() > 1e-3  # it varies across queries
        # the analysis switches score through one branch or with alpha = 0.5
        assert torch.allclose(m.use_output("gm").similarity(m.encode_query(batch.ref, batch.text),
                                                            m.encode_gallery(batch.target)), s_gm, atol=1e-5)
        assert torch.allclose(m.use_output("di").similarity(m.encode_query(batch.ref, batch.text),
                                                            m.encode_gallery(batch.target)), s_di, atol=1e-5)
        static = m.use_output("static").similarity(m.encode_query(batch.ref, batch.text), m.encode_gallery(batch.target))
        assert torch.allclose(static, 0.5 * (m.gm.scale() * s_gm + m.di.scale() * s_di), atol=1e-4)
        assert torch.allclose(m.explain(m.encode_query(batch.ref, batch.text)), torch.full((len(alpha), 2), 0.5))


def test_reference_hard_negative_changes_the_loss(tmp_path):
    with_ref, without = new(), new(ref_negative=False)
    without.load_state_dict(with_ref.state_dict())
    with_ref.eval()
    without.eval()
    batch, _, _ = toy_batch(tmp_path, with_ref)
    with torch.no_grad():
        a, b = float(with_ref.loss_di(batch)[0]), float(without.loss_di(batch)[0])
        # one more softmax column per query (its own reference) can only raise the cross-entropy
        assert a > b + 1e-4
        # an untrained DI predicts the reference itself: the reference column beats the target's
        assert float(with_ref.loss_compositor(batch)[0]) > float(without.loss_compositor(batch)[0])
    mined, _, _ = toy_batch(tmp_path, without, hard_negatives=4)
    with torch.no_grad():  # mined negatives (the "mined" option) are further columns
        assert float(without.loss_di(mined)[0]) > b + 1e-4


def test_without_the_reference_negative_a_mined_reference_is_no_negative(tmp_path):
    """Negatives mined from a subset include the query's own reference; ``ref_negative=False`` masks it there too,
    so that the ablation removes the reference negative and nothing else (other queries' references stay)."""
    m = new(ref_negative=False)
    m.eval()
    batch, _, _ = toy_batch(tmp_path, m)
    own = replace(batch, negatives=batch.ref, negative_rows=batch.ref_rows)  # each query's own reference, mined
    with torch.no_grad():
        di = m.di
        q, g, h = di.encode_query(batch.ref, batch.text), di.encode_gallery(batch.target), di.encode_gallery(batch.ref)
        logits = di.batch_logits(q, g, own, h, batch.ref_rows)
        n = len(batch.target_rows)
        unmasked = torch.nn.functional.cross_entropy(logits, torch.arange(n))
        same = batch.ref_rows[None, :] == batch.ref_rows[:, None]  # queries may share a reference
        logits[:, n:] = logits[:, n:].masked_fill(same, float("-inf"))
        is_ref = (batch.target_rows[None, :] == batch.ref_rows[:, None]) & ~torch.eye(n, dtype=torch.bool)
        logits[:, :n] = logits[:, :n].masked_fill(is_ref, float("-inf"))  # another query's target = this reference
        masked = torch.nn.functional.cross_entropy(logits, torch.arange(n))
        assert float(m.loss_di(own)[0]) == pytest.approx(float(masked), abs=1e-5)
        assert float(masked) < float(unmasked) - 1e-4
        with_ref = new(ref_negative=True)
        with_ref.load_state_dict(m.state_dict())
        with_ref.eval()
        assert float(with_ref.loss_di(own)[0]) > float(m.loss_di(own)[0]) + 1e-4


def test_three_stages_train_and_resume_across_stages(tmp_path):
    tr, va = make_toy(tmp_path, files=False, n_train=128)
    extra = {"edit_pairs": tr}  # any split of (reference, one edit, target) examples serves as stage-1 data
    cfg = TrainConfig(epochs=2, seed=0, **FAST, stage_epochs={"di-pretrain": 1})
    straight = train(new(), tr, va, tmp_path / "straight", cfg, extra_splits=extra)
    assert straight.completed and straight.val_metric == "Rmean"
    # 4 steps per epoch: stage 1 is steps 1-4, joint 5-12, compositor 13-20. Stop inside stage 1, then at the
    # boundary of joint and compositor, resuming each time in a fresh model with other weights.
    r1 = train(new(), tr, va, tmp_path / "resumed", replace(cfg, stop_after_steps=2), extra_splits=extra)
    assert not r1.completed and r1.global_step == 2
    r2 = train(new(5), tr, va, tmp_path / "resumed", replace(cfg, stop_after_steps=12), resume=True, extra_splits=extra)
    assert not r2.completed and r2.global_step == 12
    r3 = train(new(7), tr, va, tmp_path / "resumed", cfg, resume=True, extra_splits=extra)
    assert r3.completed and r3.global_step == straight.global_step == 20
    a, b = load_checkpoint(straight.best_dir), load_checkpoint(r3.best_dir)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    # The compositor trained with the branches frozen: their weights are those at the end of stage 2.
    last = load_checkpoint(tmp_path / "straight" / "last")
    assert isinstance(last, DetailFusion)
    last.eval()
    view = FeatureView(va.images, va.texts)
    ex = Examples(va, view)
    order, targets, texts = ex.epoch_plan(0, 0, 0)
    batch = ex.batch(order[:64], targets, texts, last)
    with torch.no_grad():
        alpha = last.explain(last.encode_query(batch.ref, batch.text))
    assert torch.allclose(alpha.sum(1), torch.ones(len(alpha)), atol=1e-5) and (alpha >= 0).all()
    summary = describe_alpha(alpha)
    assert summary["alpha_gm_std"] > 0 and 0 < summary["alpha_gm_min"] <= summary["alpha_gm_max"] < 1


def test_stage_one_needs_its_split(tmp_path):
    from cirfusion.options import OptionError

    tr, va = make_toy(tmp_path, files=False, n_train=64)
    with pytest.raises(OptionError, match="edit_pairs"):
        train(new(), tr, va, tmp_path / "run", TrainConfig(epochs=1, **FAST))


def test_quickstart_detailfusion_on_a_small_synthetic_benchmark(tmp_path):
    """The one call the quickstart makes: stage-1 pairs found for the benchmark, every output scored on val and test,
    alpha per test query."""
    from cirfusion.backbones import create_backbone
    from cirfusion.data.synthetic import generate
    from cirfusion.features import FeatureCache
    from cirfusion.methods.detailfusion_run import outputs_of, quickstart_detailfusion

    root = tmp_path / "syn"
    generate(root, seed=1, n_images=160, image_size=48, workers=1)
    cache = FeatureCache(create_backbone("tiny"), tmp_path / "cache")
    run = quickstart_detailfusion("synthetic", root, cache, tmp_path / "run", stage_epochs={"di-pretrain": 1, "joint": 1,
                                                                                          "compositor": 1})
    assert set(run.test) == set(run.val) == set(outputs_of(run.model)) == {"fused", "static", "gm", "di"}
    assert "Rsubset@1" in run.test["fused"] and run.checkpoint.is_dir()
    assert 0 < run.alpha["alpha_gm_mean"] < 1
    rows = run.alpha_of([0, 1, 2])
    assert len(rows) == 3 and all(abs(r["gm"] + r["di"] - 1) < 1e-5 for r in rows)
    # DAFM accepts DetailFusion in its pool (issue 12): fused with a CLIP4CIR on the same benchmark and backbone
    import json

    import cirfusion
    from cirfusion.cli import main

    common = ["--dataset", "synthetic", "--root", str(root), "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    assert main(["train", "clip4cir", *common, "--backbone", "tiny", "--out", str(tmp_path / "c"), "--epochs", "1",
                 "--batch-size", "32", "--hparam", "embed_dim=16", "--hparam", "hidden_dim=32"]) == 0
    out = tmp_path / "fused"
    assert main(["fuse", str(run.checkpoint), str(tmp_path / "c" / "best"), *common, "--out", str(out), "--epochs", "1",
                 "--min-steps", "10", "--split-test", "val"]) == 0
    rep = json.loads((out / "metrics.json").read_text())
    assert "fused" in json.dumps(rep)
    fused = cirfusion.load(out / "best")
    assert [b.method_name for b in fused.method.bases] == ["detailfusion", "clip4cir"]


def test_the_service_explanation_gives_the_branch_weights(tmp_path):
    import json

    m = new().eval()
    batch, _, _ = toy_batch(tmp_path, m, n=4)
    with torch.no_grad():
        q = m.encode_query(batch.ref, batch.text)
    ex = m.explain_query(q[:1], "same but red")
    w = ex["branch_weights"]
    assert ex["kind"] == "branches" and set(w) == {"global (GM)", "detail (DI)"}
    assert abs(sum(w.values()) - 1) < 1e-3 and all(0 <= v <= 1 for v in w.values())
    assert abs(w["global (GM)"] - float(m.explain(q[:1])[0, 0])) < 1e-4
    json.dumps(ex)  # what the service sends


def test_train_detailfusion_is_seeded_by_its_config_not_by_the_process(tmp_path):
    """The benchmark's workers run several jobs per process: the initial weights must come from the config's seed,
    whatever the process's RNG held before the call."""
    from cirfusion.backbones import create_backbone
    from cirfusion.data.synthetic import generate
    from cirfusion.features import FeatureCache
    from cirfusion.methods.detailfusion_run import train_detailfusion

    root = tmp_path / "syn"
    generate(root, seed=1, n_images=120, image_size=48, workers=1)
    cache = FeatureCache(create_backbone("tiny"), tmp_path / "cache")
    cfg = TrainConfig(**{**FAST, "epochs": 1, "seed": 3, "progress": False})
    weights = []
    for i, before in enumerate((0, 12345)):
        torch.manual_seed(before)  # a different process state before each call
        torch.rand(7)
        run = train_detailfusion("synthetic", root, cache, tmp_path / f"run{i}", config=cfg, test=False,
                                 hparams={**SMALL, "branches": "di", "pretrain_split": "none"})
        weights.append({k: v.clone() for k, v in run.model.state_dict().items()})
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
