"""The shared training loop: run directory, validation/best checkpoint, resume equivalence, stages, atomicity.

Everything runs on a toy CIR problem built directly as feature tables (no backbone, no images): images are all
combinations of 3 attributes x 4 values, a query changes one attribute of its reference, and its text names the
change. Global image vectors are a fixed non-linear map of the attributes, tokens one vector per attribute.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from cirfusion import train as train_module
from cirfusion.checkpoint import CheckpointError, load_checkpoint, read_config, save_checkpoint
from cirfusion.data.schema import CIRDataset, Gallery, Query
from cirfusion.errors import CirfusionError
from cirfusion.evaluation import evaluate, score_blocks
from cirfusion.examples import Examples, reference_neighbours, shard_batches
from cirfusion.io import recover_directory
from cirfusion.methods import MethodDims, Stage, create_method
from cirfusion.methods.clip4cir import CLIP4CIR
from cirfusion.metrics import evaluate_scores
from cirfusion.optim import lr_at
from cirfusion.options import OptionError
from cirfusion.rundir import (
    LOCK_FILE,
    RunDirError,
    RunLock,
    check_fresh,
    check_unlocked,
    clear_run_dir,
    read_metrics,
    truncate_metrics,
)
from cirfusion.seeding import seed_everything
from cirfusion.train import NothingToResume, TrainConfig, train
from cirfusion.views import FeatureView, SplitData

N_ATTR, N_VAL = 3, 4


class ToyImages:
    """Minimal stand-in with the ImageFeatureTable interface the loop uses."""

    def __init__(self, ids: list[str], global_: np.ndarray, tokens: np.ndarray) -> None:
        self.ids, self.global_, self.tokens = ids, global_, tokens
        self._pos = {i: n for n, i in enumerate(ids)}

    def index(self, image_id: str) -> int:
        return self._pos[image_id]


class ToyTexts:
    def __init__(self, texts: list[str], global_: np.ndarray, tokens: np.ndarray, mask: np.ndarray) -> None:
        self.texts, self.global_, self.tokens, self.mask = texts, global_, tokens, mask
        self._pos = {t: n for n, t in enumerate(texts)}

    def index(self, text: str) -> int:
        return self._pos[text]


def toy_dims(aligned: bool = False) -> MethodDims:
    return MethodDims(image_dim=32, image_token_dim=24, num_image_tokens=N_ATTR + 1, text_dim=32 if aligned else 28,
                      text_token_dim=20, max_text_tokens=4, aligned=aligned, backbone_id="toy", weights_hash="toyhash",
                      preprocess_id="none")


def make_toy(tmp: Path, seed: int = 0, n_train: int = 384, n_val: int = 96, aligned: bool = False,
             files: bool = True) -> tuple[SplitData, SplitData]:
    """Train and val splits over one 64-image gallery (the val queries are disjoint (ref, edit) pairs)."""
    dims = toy_dims(aligned)
    rng = np.random.default_rng(1234)  # the "world" is fixed; ``seed`` only changes which queries are drawn
    combos = list(itertools.product(range(N_VAL), repeat=N_ATTR))
    ids = [f"img{i:03d}" for i in range(len(combos))]
    onehot = np.zeros((len(combos), N_ATTR * N_VAL), dtype=np.float32)
    for i, c in enumerate(combos):
        for a, v in enumerate(c):
            onehot[i, a * N_VAL + v] = 1
    w = rng.normal(size=(N_ATTR * N_VAL, dims.image_dim)).astype(np.float32)
    glob = np.tanh(onehot @ w) + 0.05 * rng.normal(size=(len(combos), dims.image_dim)).astype(np.float32)
    emb = rng.normal(size=(N_ATTR, N_VAL, dims.image_token_dim)).astype(np.float32)
    tokens = np.zeros((len(combos), N_ATTR + 1, dims.image_token_dim), dtype=np.float32)
    for i, c in enumerate(combos):
        for a, v in enumerate(c):
            tokens[i, a] = emb[a, v]
        tokens[i, N_ATTR] = 1.0
    images = ToyImages(ids, glob.astype(np.float16), tokens.astype(np.float16))

    texts = [f"set attribute {a} to {v}" for a in range(N_ATTR) for v in range(N_VAL)]
    tg = rng.normal(size=(len(texts), dims.text_dim)).astype(np.float32)
    tt = rng.normal(size=(len(texts), dims.max_text_tokens, dims.text_token_dim)).astype(np.float32)
    tmask = np.ones((len(texts), dims.max_text_tokens), dtype=bool)
    tmask[:, 3:] = False
    text_table = ToyTexts(texts, tg.astype(np.float16), tt.astype(np.float16), tmask)

    index = {c: i for i, c in enumerate(combos)}
    qrng = np.random.default_rng(seed)
    all_pairs = [(r, a, v) for r in range(len(combos)) for a in range(N_ATTR) for v in range(N_VAL) if combos[r][a] != v]
    order = qrng.permutation(len(all_pairs))
    gallery = Gallery(ids, [tmp / f"{i}.png" for i in ids])

    def build(split: str, picks: np.ndarray) -> CIRDataset:
        queries = []
        for n, k in enumerate(picks):
            r, a, v = all_pairs[k]
            tgt = list(combos[r])
            tgt[a] = v
            t = index[tuple(tgt)]
            near = []
            for a2 in range(N_ATTR):  # images one detail away from the target (not the reference)
                for v2 in range(N_VAL):
                    c = list(tgt)
                    c[a2] = v2
                    j = index[tuple(c)]
                    if j not in (t, r) and len(near) < 4:
                        near.append(j)
            queries.append(Query(qid=f"{split}{n}", reference=ids[r], text=f"set attribute {a} to {v}",
                                 targets=(ids[t],), subset=tuple(ids[x] for x in [r, t, *near])))
        fl = []
        if files:
            f = tmp / f"{split}.json"
            f.write_text(json.dumps([q.to_dict() for q in queries]))
            fl = [f]
        return CIRDataset(name="toy", split=split, queries=queries, gallery=gallery, files=fl)

    tr = build("train", order[:n_train])
    va = build("val", order[n_train : n_train + n_val])
    return SplitData(tr, images, text_table), SplitData(va, images, text_table)


FAST = dict(batch_size=32, lr=2e-3, progress=False, log_every=1)


pytestmark = pytest.mark.usefixtures("one_thread")


def weights(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def new_clip4cir(seed: int = 0, **hp):
    seed_everything(seed)
    return create_method("clip4cir", toy_dims(), **{"embed_dim": 32, "projection_dim": 64, "hidden_dim": 64, **hp})


# ---------------------------------------------------------------------------------------------------------------------
def test_train_writes_run_dir_and_beats_image_only(tmp_path):
    tr, va = make_toy(tmp_path)
    run = tmp_path / "run"
    res = train(new_clip4cir(), tr, va, run, TrainConfig(epochs=6, seed=0, **FAST))
    assert res.completed and res.val_metric == "Rmean"
    for p in ("manifest.json", "metrics.jsonl", "best/config.json", "best/model.safetensors", "last/state.json",
              "last/optimizer.safetensors", "last/rng.safetensors", "last/model.safetensors"):
        assert (run / p).is_file(), p
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["type"] == "epoch"]
    assert len(epochs) == 6 and all("val" in r for r in epochs)
    steps = [r for r in records if r["type"] == "step"]
    assert steps[0]["loss"] > steps[-1]["loss"]
    best = max(epochs, key=lambda r: r["val"]["Rmean"])
    assert res.best_metric == pytest.approx(best["val"]["Rmean"]) and res.best_epoch == best["epoch"]

    loaded = load_checkpoint(run / "best")
    assert evaluate(loaded, va)["Rmean"] == pytest.approx(res.best_metric)
    cfg = read_config(run / "best")
    assert cfg["method"] == "clip4cir" and cfg["backbone"] == {"id": "toy", "weights_hash": "toyhash", "preprocess_id": "none"}
    assert cfg["dataset"] == "toy/train" and cfg["extra"]["val_metric"] == "Rmean"

    base = evaluate(create_method("image-only", toy_dims()), va)
    assert res.best_metric > base["Rmean"] + 20, (res.best_metric, base)


def test_evaluate_matches_full_score_matrix(tmp_path):
    _, va = make_toy(tmp_path)
    m = new_clip4cir().eval()
    view = FeatureView(va.images, va.texts)
    full = torch.cat([b for _, b in score_blocks(m, view, va.dataset, chunk=7)]).numpy()
    assert full.shape == (len(va.dataset), len(va.dataset.gallery))
    assert evaluate(m, va, chunk=13) == evaluate_scores(full, va.dataset)


def test_manifest_content(tmp_path):
    tr, va = make_toy(tmp_path)
    run = tmp_path / "run"
    train(new_clip4cir(), tr, va, run, TrainConfig(epochs=1, seed=7, **FAST))
    man = json.loads((run / "manifest.json").read_text())
    assert man["seed"] == 7 and man["config"]["epochs"] == 1 and man["config"]["seed"] == 7
    assert man["method"]["name"] == "clip4cir" and man["method"]["hparams"]["embed_dim"] == 32
    assert man["backbone"]["id"] == "toy" and man["backbone"]["weights_hash"] == "toyhash"
    import hashlib

    f = tr.dataset.files[0]
    assert man["datasets"]["train"]["files"] == {str(f): hashlib.sha256(f.read_bytes()).hexdigest()}
    assert man["datasets"]["val"]["key"] == "toy/val" and man["datasets"]["val"]["num_queries"] == 96
    import cirfusion

    assert man["code"]["cirfusion"] == cirfusion.__version__
    assert "git_commit" in man["code"]  # a sha in a checkout, None otherwise
    if man["code"]["git_commit"] is not None:
        assert len(man["code"]["git_commit"]) == 40
    assert man["environment"]["torch"] == torch.__version__ and man["environment"]["python"].count(".") == 2
    assert man["config"]["stages"] == [Stage().to_dict()]


# 12 = an epoch boundary (12 steps/epoch), 17 = mid-epoch, where the interrupted process also tore its last log line
@pytest.mark.parametrize("stop,hard,torn", [(12, 0, False), (17, 2, True)])
def test_resume_gives_the_same_result(tmp_path, stop, hard, torn):
    tr, va = make_toy(tmp_path)
    cfg = TrainConfig(epochs=3, seed=3, hard_negatives=hard, **FAST)
    m1 = new_clip4cir(3)
    r1 = train(m1, tr, va, tmp_path / "straight", cfg)

    m2 = new_clip4cir(3)
    part = train(m2, tr, va, tmp_path / "resumed", replace(cfg, stop_after_steps=stop))
    assert not part.completed and part.global_step == stop
    if torn:  # killed while writing a record: half a line, no newline
        with open(tmp_path / "resumed" / "metrics.jsonl", "a") as f:
            f.write('{"epoch": 1, "global_step": 18, "grad_n')
    # A fresh process: a new model object with other initial weights; everything comes from last/.
    m3 = new_clip4cir(99)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r3 = train(m3, tr, va, tmp_path / "resumed", cfg, resume=True)
    torn_warnings = [w for w in caught if "torn last line" in str(w.message)]
    assert len(torn_warnings) == (1 if torn else 0)
    assert r3.completed and r3.global_step == r1.global_step

    w1, w3 = weights(m1), weights(m3)
    assert all(torch.equal(w1[k], w3[k]) for k in w1), "resumed weights differ from the uninterrupted run"
    b1, b3 = load_checkpoint(tmp_path / "straight" / "best"), load_checkpoint(tmp_path / "resumed" / "best")
    assert b1.state_dict().keys() == b3.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(b1.state_dict().values(), b3.state_dict().values(), strict=True))
    assert r1.best_metric == r3.best_metric and r1.best_epoch == r3.best_epoch
    log1 = (tmp_path / "straight" / "metrics.jsonl").read_text()
    log3 = (tmp_path / "resumed" / "metrics.jsonl").read_text()
    assert log1 == log3


class Killed(BaseException):
    """Stands for kill -9: nothing after it runs in the process (not even `except Exception` handlers)."""


def test_killed_before_the_first_save(tmp_path, monkeypatch):
    """A run killed before it saved any state: --resume says there is nothing to resume, a plain restart is refused
    (the directory holds the dead run's manifest and log), --overwrite starts clean (no stale log records)."""
    tr, va = make_toy(tmp_path)
    cfg = TrainConfig(epochs=2, seed=0, **FAST)
    run = tmp_path / "run"

    def killed(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(train_module, "save_state", killed)
    with pytest.raises(Killed):
        train(new_clip4cir(), tr, va, run, cfg)
    monkeypatch.undo()
    assert not (run / "last").exists() and len(read_metrics(run / "metrics.jsonl")) == 12 + 1  # 12 steps + epoch 0

    with pytest.raises(NothingToResume, match=r"nothing to resume.*--overwrite") as err:
        train(new_clip4cir(), tr, va, run, cfg, resume=True)
    assert isinstance(err.value, CirfusionError) and "\n" not in str(err.value)
    with pytest.raises(RunDirError, match=r"already holds a run \(best, manifest.json, metrics.jsonl\).*--overwrite"):
        train(new_clip4cir(), tr, va, run, cfg)
    res = train(new_clip4cir(), tr, va, run, cfg, overwrite=True)
    assert res.completed
    records = read_metrics(run / "metrics.jsonl")
    assert [r["epoch"] for r in records if r["type"] == "epoch"] == [0, 1]
    assert [r["global_step"] for r in records if r["type"] == "step"] == list(range(1, 25))


KILLED_CHILD = """
import sys, time
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(1)
import cirfusion.train as T
from test_train import FAST, make_toy, new_clip4cir

def stall(*args, **kwargs):  # the first save never finishes: the parent kills us here
    print("saving", flush=True)
    time.sleep(120)

T.save_state = stall
tr, va = make_toy(T.Path(sys.argv[2]) / "data", files=False)
T.train(new_clip4cir(), tr, va, T.Path(sys.argv[2]) / "run", T.TrainConfig(epochs=2, **FAST))
"""


def test_kill_9_before_the_first_save_then_resume(tmp_path):
    """The real thing: a training process killed with SIGKILL before its first save. Its lock dies with it, and
    --resume says there is nothing to resume (no traceback, no half-state)."""
    child = subprocess.Popen([sys.executable, "-c", KILLED_CHILD, str(Path(__file__).parent), str(tmp_path)],
                             stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "saving"
    finally:
        child.kill()  # SIGKILL
        child.wait()
    run = tmp_path / "run"
    assert (run / "manifest.json").is_file() and not (run / "last").exists()
    check_unlocked(run)  # the kernel released the dead process's lock
    tr, va = make_toy(tmp_path / "data", files=False)
    with pytest.raises(NothingToResume, match="nothing to resume"):
        train(new_clip4cir(), tr, va, run, TrainConfig(epochs=2, **FAST), resume=True)


def test_overwrite_removes_only_a_runs_own_files(tmp_path):
    run = tmp_path / "run"
    (run / "best").mkdir(parents=True)
    (run / ".last.abc.tmp").mkdir()  # a dead writer's temporary directory
    (run / "metrics.jsonl").write_text("{}\n")
    (run / "thesis.txt").write_text("years of work")
    with pytest.raises(RunDirError, match=r"--overwrite removes only.*thesis\.txt"):
        check_fresh(run, overwrite=True)
    with pytest.raises(RunDirError, match=r"thesis\.txt"):
        train(new_clip4cir(), *make_toy(tmp_path), run, TrainConfig(epochs=1, **FAST), overwrite=True)
    assert (run / "thesis.txt").read_text() == "years of work" and (run / "best").is_dir()
    (run / "thesis.txt").unlink()
    assert {p.name for p in check_fresh(run, overwrite=True)} == {"best", ".last.abc.tmp", "metrics.jsonl"}
    clear_run_dir(run)
    assert [p.name for p in run.iterdir()] == []
    assert check_fresh(tmp_path / "missing", overwrite=False) == []


def test_a_locked_run_directory_is_refused_at_once(tmp_path):
    """Another process holds the run directory (as a concurrent `cirfusion train` does): a second run fails before
    writing anything; once the holder is gone, the directory is usable."""
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); "
         "print('locked', flush=True); time.sleep(60)", str(run / LOCK_FILE)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        tr, va = make_toy(tmp_path)
        with pytest.raises(RunDirError, match="in use by another training run"):
            train(new_clip4cir(), tr, va, run, TrainConfig(epochs=1, **FAST))
        with pytest.raises(RunDirError, match="in use"):
            check_unlocked(run)
        assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    check_unlocked(run)
    with RunLock(run):  # held: a second holder fails; released on exit
        with pytest.raises(RunDirError, match=f"locked by process {os.getpid()}"):
            subprocess_free_lock_attempt(run)
    check_unlocked(run)


def subprocess_free_lock_attempt(run: Path) -> None:
    """A second lock on ``run`` from this process through a new open file (flock locks belong to the open file, so
    this conflicts like another process would)."""
    with RunLock(run):
        pass


def test_metrics_log_drops_only_a_torn_last_line(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"global_step": 1}\n{"global_step": 2}\n')
    assert read_metrics(log) == [{"global_step": 1}, {"global_step": 2}]
    log.write_text('{"global_step": 1}\n{"global_step": 2}\n{"global_st')
    with pytest.warns(UserWarning, match="torn last line 3"):
        assert read_metrics(log) == [{"global_step": 1}, {"global_step": 2}]
    log.write_text('{"global_step": 1}\n{"global_step": 2}')  # a whole record, but its newline never came
    with pytest.warns(UserWarning, match="torn last line 2"):
        assert read_metrics(log) == [{"global_step": 1}]
    log.write_text('{"global_step": 1}\n{"glo\n{"global_step": 3}\n')  # damage inside the log is not a crash
    with pytest.raises(RunDirError, match=r"metrics.jsonl:2: not a metrics record"):
        read_metrics(log)
    log.write_text('{"global_step": 1}\n{"global_step": 5}\n{"global_st')
    with pytest.warns(UserWarning, match="torn"):
        truncate_metrics(log, 3)
    assert log.read_text() == '{"global_step": 1}\n'


def test_resume_refuses_a_changed_config(tmp_path):
    tr, va = make_toy(tmp_path)
    cfg = TrainConfig(epochs=2, seed=0, **FAST)
    train(new_clip4cir(), tr, va, tmp_path / "r", replace(cfg, stop_after_steps=5))
    with pytest.raises(ValueError, match="lr"):
        train(new_clip4cir(), tr, va, tmp_path / "r", replace(cfg, lr=0.1), resume=True)
    with pytest.raises(ValueError, match="hyper-parameters"):
        train(new_clip4cir(dropout=0.1), tr, va, tmp_path / "r", cfg, resume=True)
    with pytest.raises(CheckpointError, match="no training state"):
        train(new_clip4cir(), tr, va, tmp_path / "nothing", cfg, resume=True)


def test_bf16_precision_is_deterministic_resumable_and_part_of_the_config(tmp_path):
    """precision="bf16" runs the steps under bfloat16 autocast: other weights than fp32 (so it is applied), fp32
    weights all the same, the same weights twice, bit-exact resume, and no resume under another precision."""
    tr, va = make_toy(tmp_path)
    cfg = TrainConfig(epochs=2, seed=1, precision="bf16", **FAST)
    m_fp32, m_a, m_b = new_clip4cir(1), new_clip4cir(1), new_clip4cir(1)
    train(m_fp32, tr, va, tmp_path / "fp32", replace(cfg, precision="fp32"))
    r_a = train(m_a, tr, va, tmp_path / "a", cfg)
    train(m_b, tr, va, tmp_path / "b", replace(cfg, stop_after_steps=7))
    with pytest.raises(ValueError, match="precision"):
        train(new_clip4cir(1), tr, va, tmp_path / "b", replace(cfg, precision="fp32"), resume=True)
    m_b = new_clip4cir(5)
    train(m_b, tr, va, tmp_path / "b", cfg, resume=True)
    wf, wa, wb = weights(m_fp32), weights(m_a), weights(m_b)
    assert all(v.dtype == torch.float32 for v in wa.values())
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "bf16 run not reproduced by its resumed twin"
    assert not all(torch.equal(wa[k], wf[k]) for k in wa), "bf16 gave the fp32 weights: autocast was not applied"
    assert r_a.best_metric is not None and r_a.best_metric > 0
    assert json.loads((tmp_path / "a" / "last" / "state.json").read_text())["config"]["precision"] == "bf16"
    with pytest.raises(OptionError, match="precision must be one of"):
        train(new_clip4cir(1), tr, va, tmp_path / "bad", replace(cfg, precision="fp16"))


def test_best_checkpoint_is_written_atomically(tmp_path, monkeypatch):
    tr, va = make_toy(tmp_path)
    run = tmp_path / "run"
    train(new_clip4cir(), tr, va, run, TrainConfig(epochs=1, seed=0, **FAST))
    before = (run / "best" / "model.safetensors").read_bytes()

    import cirfusion.checkpoint as ck

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        ck.save_checkpoint(new_clip4cir(5), run / "best")
    monkeypatch.undo()
    assert (run / "best" / "model.safetensors").read_bytes() == before
    assert load_checkpoint(run / "best") is not None
    assert not [p for p in run.iterdir() if p.name.startswith(".")], "temporary directories left behind"

    # A crash between the two renames of a swap leaves the old version aside: loaders put it back.
    (run / "best").rename(run / ".best.old.12345")
    recover_directory(run / "best")
    assert (run / "best" / "model.safetensors").read_bytes() == before


def test_parameter_free_method_still_writes_a_checkpoint(tmp_path):
    tr, va = make_toy(tmp_path)
    run = tmp_path / "io"
    res = train(create_method("image-only", toy_dims()), tr, va, run, TrainConfig(epochs=3, **FAST))
    assert res.completed and res.global_step == 0
    m = load_checkpoint(run / "best")
    assert m.method_name == "image-only"
    assert res.final_metrics == evaluate(m, va) and res.best_metric == res.final_metrics["Rmean"]
    assert (run / "manifest.json").is_file()


class TwoStage(CLIP4CIR):
    """Stage "text": only the text projection trains (1 epoch); stage "all": everything, with a hard negative."""

    method_name = "clip4cir"  # checkpoints of this test class reload as plain clip4cir (same weights)

    def stages(self):
        return [Stage("text", train=("text_proj",), epochs=1, validate=False), Stage("all", loss="loss_hard")]

    def loss_hard(self, batch):
        q = self.encode_query(batch.ref, batch.text)
        loss = self.info_nce(q, self.encode_gallery(batch.target), batch, self.encode_gallery(batch.ref), batch.ref_rows)
        return loss, {"loss": float(loss.detach())}


def test_stages_freeze_and_resume_across_a_stage_boundary(tmp_path):
    tr, va = make_toy(tmp_path)
    seed_everything(0)
    m = TwoStage(toy_dims(), embed_dim=32, projection_dim=64, hidden_dim=64)
    w0 = weights(m)
    cfg = TrainConfig(epochs=2, seed=0, **FAST)
    part = train(m, tr, va, tmp_path / "a", replace(cfg, stop_after_steps=12))  # exactly the end of stage "text"
    w1 = weights(m)
    changed = {k for k in w0 if not torch.equal(w0[k], w1[k])}
    assert changed == {"text_proj.weight", "text_proj.bias"}
    assert not part.completed
    state = json.loads((tmp_path / "a" / "last" / "state.json").read_text())
    assert state["stage"] == 1 and state["epoch"] == 0

    seed_everything(1)
    m_res = TwoStage(toy_dims(), embed_dim=32, projection_dim=64, hidden_dim=64)
    train(m_res, tr, va, tmp_path / "a", cfg, resume=True)
    seed_everything(0)
    m_straight = TwoStage(toy_dims(), embed_dim=32, projection_dim=64, hidden_dim=64)
    res = train(m_straight, tr, va, tmp_path / "b", cfg)
    assert all(torch.equal(a, b) for a, b in zip(weights(m_res).values(), weights(m_straight).values(), strict=True))
    epochs = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in epochs if r["type"] == "epoch"]
    assert [r["stage"] for r in epochs] == ["text", "all", "all"]
    assert "val" not in epochs[0] and res.best_epoch in (0, 1)


def test_stage_on_another_split_and_missing_split(tmp_path):
    tr, va = make_toy(tmp_path)
    pairs, _ = make_toy(tmp_path, seed=5, n_train=64, files=False)

    class PairsFirst(CLIP4CIR):
        def stages(self):
            return [Stage("pairs", split="edit_pairs", epochs=1, validate=False), Stage("main")]

    seed_everything(0)
    m = PairsFirst(toy_dims(), embed_dim=32, projection_dim=64, hidden_dim=64)
    with pytest.raises(ValueError, match="edit_pairs"):
        train(m, tr, va, tmp_path / "x", TrainConfig(epochs=1, **FAST))
    res = train(m, tr, va, tmp_path / "y", TrainConfig(epochs=1, **FAST), extra_splits={"edit_pairs": pairs})
    assert res.completed and res.global_step == 2 + 12


def test_duplicate_targets_in_a_batch_are_not_negatives():
    from cirfusion.backbones.base import ImageFeatures, TextFeatures
    from cirfusion.methods.base import Batch

    torch.manual_seed(0)
    m = create_method("image-only", toy_dims())
    g = torch.nn.functional.normalize(torch.randn(4, 32), dim=-1)
    feats = ImageFeatures(global_=g, tokens=torch.zeros(4, 0, 24))
    # queries 0 and 1 share the target image (row 7); query 2's target is also a positive of query 3
    batch = Batch(ref=feats, text=TextFeatures(torch.zeros(4, 28), torch.zeros(4, 0, 20), torch.zeros(4, 0, dtype=torch.bool)),
                  target=ImageFeatures(global_=torch.stack([g[1], g[1], g[2], g[3]]), tokens=torch.zeros(4, 0, 24)),
                  ref_rows=torch.tensor([0, 1, 2, 3]), target_rows=torch.tensor([7, 7, 8, 9]),
                  positives=[np.array([7]), np.array([7]), np.array([8]), np.array([8, 9])], texts=[""] * 4)
    q = g
    tg = batch.target.global_
    loss = m.info_nce(q, tg, batch)
    logits = (q @ tg.T) * m.scale()
    mask = torch.tensor([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0]], dtype=torch.bool)
    manual = torch.nn.functional.cross_entropy(logits.masked_fill(mask, float("-inf")), torch.arange(4))
    assert torch.allclose(loss, manual)
    # hard negatives (the references): row 0's reference is not its positive; make row 3's hard negative positive
    hard_rows = torch.tensor([0, 1, 2, 9])
    loss_h = m.info_nce(q, tg, batch, g, hard_rows)
    hl = (q @ g.T) * m.scale()
    hmask = torch.zeros(4, 4, dtype=torch.bool)
    hmask[3, 3] = True
    manual_h = torch.nn.functional.cross_entropy(
        torch.cat([logits.masked_fill(mask, float("-inf")), hl.masked_fill(hmask, float("-inf"))], 1), torch.arange(4))
    assert torch.allclose(loss_h, manual_h)


def test_shard_batches_and_schedule():
    order = np.random.default_rng(0).permutation(103)
    b0 = shard_batches(order, 10, 0, 2)
    b1 = shard_batches(order, 10, 1, 2)
    assert len(b0) == len(b1) == 5 and all(len(b) == 10 for b in b0 + b1)
    flat = np.concatenate(b0 + b1)
    assert len(set(flat.tolist())) == len(flat)  # disjoint shards
    assert [len(b) for b in shard_batches(order[:7], 10, 0, 1)] == [7]  # smaller than a batch: one batch
    lrs = [lr_at(s, 100, 1.0, 0.1, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:])) and lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_missing_features_and_targetless_split_are_clear_errors(tmp_path):
    from cirfusion.data.schema import DataError

    tr, _ = make_toy(tmp_path)
    bad_q = replace(tr.dataset.queries[0], text="an unseen text")
    ds = replace(tr.dataset, queries=[bad_q, *tr.dataset.queries[1:]])
    with pytest.raises(DataError, match="an unseen text"):
        train(new_clip4cir(), SplitData(ds, tr.images, tr.texts), None, tmp_path / "r", TrainConfig(epochs=1, **FAST))
    empty = replace(tr.dataset, queries=[replace(q, targets=()) for q in tr.dataset.queries])
    with pytest.raises(DataError, match="no query with a target"):
        train(new_clip4cir(), SplitData(empty, tr.images, tr.texts), None, tmp_path / "r2", TrainConfig(epochs=1, **FAST))


def test_no_validation_split_keeps_final_weights(tmp_path):
    tr, _ = make_toy(tmp_path)
    m = new_clip4cir()
    res = train(m, tr, None, tmp_path / "r", TrainConfig(epochs=2, **FAST))
    assert res.best_metric is None and res.best_epoch == 1
    best = load_checkpoint(tmp_path / "r" / "best")
    assert best.state_dict().keys() == m.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(best.state_dict().values(), m.state_dict().values(), strict=True))


# ---------------------------------------------------------------------------------------------------------------------
# CLI: `cirfusion train` and `cirfusion eval` on a small custom dataset with the tiny backbone
# ---------------------------------------------------------------------------------------------------------------------
def make_custom_dataset(root: Path) -> None:
    """Solid-colour squares at 4 positions x 6 colours; a query asks for another colour at the same position."""
    from PIL import Image, ImageDraw

    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 60, 230), "yellow": (240, 220, 30),
               "white": (245, 245, 245), "purple": (150, 60, 210)}
    positions = {"left": (2, 10), "right": (18, 10), "top": (10, 2), "bottom": (10, 18)}
    (root / "images").mkdir(parents=True)
    gallery = {}
    for c, rgb in colours.items():
        for pname, (x, y) in positions.items():
            im = Image.new("RGB", (32, 32), (20, 20, 30))
            ImageDraw.Draw(im).rectangle([x, y, x + 11, y + 11], fill=rgb)
            im.save(root / "images" / f"{c}_{pname}.png")
            gallery[f"{c}_{pname}"] = f"images/{c}_{pname}.png"
    (root / "gallery.json").write_text(json.dumps(gallery))
    rng = np.random.default_rng(0)
    names = list(colours)
    for split, n in (("train", 96), ("val", 24)):
        lines = []
        for i in range(n):
            c1, c2 = rng.choice(len(names), 2, replace=False)
            pos = list(positions)[i % 4]
            lines.append(json.dumps({"qid": f"{split}{i}", "reference": f"{names[c1]}_{pos}",
                                     "text": f"make it {names[c2]}", "targets": [f"{names[c2]}_{pos}"]}))
        (root / f"queries.{split}.jsonl").write_text("\n".join(lines) + "\n")
    test = [json.dumps({"qid": "t0", "reference": "red_left", "text": "make it blue"})]
    (root / "queries.test.jsonl").write_text("\n".join(test) + "\n")


def test_cli_train_eval_resume(tmp_path, capsys):
    from cirfusion.cli import main

    data, run, cache = tmp_path / "data", tmp_path / "run", tmp_path / "cache"
    make_custom_dataset(data)
    common = ["--dataset", "custom", "--root", str(data), "--cache-dir", str(cache), "--no-progress"]
    rc = main(["train", "clip4cir", *common, "--backbone", "tiny", "--out", str(run), "--epochs", "3",
               "--batch-size", "16", "--hparam", "embed_dim=32", "--hparam", "hidden_dim=64", "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["completed"] and summary["global_step"] == 18 and summary["val_metric"] == "R@10"
    cfg = read_config(run / "best")
    assert cfg["backbone"]["id"] == "tiny" and cfg["hparams"]["embed_dim"] == 32 and cfg["dataset"] == "custom/train"
    man = json.loads((run / "manifest.json").read_text())
    assert man["backbone"]["id"] == "tiny" and man["backbone"]["cache_dir"] == str(cache)
    assert set(man["datasets"]["train"]["files"]) == {str(data / "queries.train.jsonl"), str(data / "gallery.json")}

    # the best epoch was chosen on val/select (the default; docs/protocol.md): eval there gives the same figure
    assert main(["eval", str(run / "best"), *common, "--split", "val/select", "--json", "--save", str(tmp_path / "r.json")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["results"][0]["metrics"]["R@10"] == pytest.approx(summary["best"])
    assert json.loads((tmp_path / "r.json").read_text()) == out
    assert main(["eval", str(run / "best"), *common, "--split", "val"]) == 0
    table = capsys.readouterr().out
    assert "R@10" in table and "custom/val" in table

    # A second run into the same directory is refused; --resume of a finished run changes nothing.
    assert main(["train", "clip4cir", *common, "--backbone", "tiny", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--overwrite" in err and err.count("\n") == 1
    # --resume where no state was ever saved: one line, exit 2, nothing created.
    assert main(["train", "clip4cir", *common, "--backbone", "tiny", "--out", str(tmp_path / "never"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "nothing to resume" in err and err.count("\n") == 1 and not (tmp_path / "never").exists()
    # --hparam is checked against the method's dataclass: unknown names and wrong types list the valid ones.
    for bad, match in (("embed_dimm=3", "unknown option 'embed_dimm'"), ("embed_dim=big", "'embed_dim' must be int")):
        assert main(["train", "clip4cir", *common, "--backbone", "tiny", "--out", str(tmp_path / "x"), "--hparam", bad]) == 2
        err = capsys.readouterr().err
        assert match in err and "valid options: dropout (float), embed_dim (int)" in err and err.count("\n") == 1
    before = (run / "best" / "model.safetensors").read_bytes()
    assert main(["train", "clip4cir", *common, "--backbone", "tiny", "--out", str(run), "--resume", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["completed"]
    assert (run / "best" / "model.safetensors").read_bytes() == before
    assert main(["train", "clip4cir", *common, "--backbone", "tiny", "--out", str(run), "--resume", "--lr", "0.5"]) == 2
    assert "different configuration" in capsys.readouterr().err
    # --overwrite starts again: the old run's records are gone, not appended to.
    assert main(["train", "clip4cir", *common, "--backbone", "tiny", "--out", str(run), "--overwrite", "--epochs", "2",
                 "--batch-size", "16", "--hparam", "embed_dim=32", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["global_step"] == 12
    assert [r["epoch"] for r in read_metrics(run / "metrics.jsonl") if r["type"] == "epoch"] == [0, 1]

    # Baselines: `sum` refuses the non-aligned backbone; image-only writes a checkpoint without training.
    assert main(["train", "sum", *common, "--backbone", "tiny", "--out", str(tmp_path / "s")]) == 2
    assert "aligned" in capsys.readouterr().err
    assert main(["train", "image-only", *common, "--backbone", "tiny", "--out", str(tmp_path / "io"), "--json"]) == 0
    io = json.loads(capsys.readouterr().out)
    assert io["global_step"] == 0 and (tmp_path / "io" / "best" / "config.json").is_file()
    assert summary["best"] > io["best"]  # the colour change needs the text

    # A test split of a dataset without a submission format: a clear error.
    assert main(["eval", str(run / "best"), *common, "--split", "test"]) == 2
    assert "no targets" in capsys.readouterr().err


def test_mined_hard_negatives(tmp_path):
    tr, va = make_toy(tmp_path)
    view = FeatureView(tr.images, tr.texts)
    ex = Examples(tr, view, hard_negatives=3, pool=6)
    nb = reference_neighbours(view.img_global, ex.ref_rows, 6)
    g = torch.nn.functional.normalize(view.img_global, dim=-1)
    for i in range(20):  # the pool is the 6 most similar other images, best first
        sims = g[ex.ref_rows[i]] @ g.T
        sims[ex.ref_rows[i]] = -2
        assert nb[i].tolist() == sims.topk(6).indices.tolist()
    neg = ex.epoch_negatives(0, 0, 0)
    assert neg.shape == (len(ex), 3)
    assert np.array_equal(neg, ex.epoch_negatives(0, 0, 0)) and not np.array_equal(neg, ex.epoch_negatives(0, 0, 1))
    for i in range(len(ex)):
        got = neg[i][neg[i] >= 0]
        assert set(got) <= set(nb[i]) and not set(got) & set(ex.positives[i]) and ex.ref_rows[i] not in got
    order, targets, texts = ex.epoch_plan(0, 0, 0)
    m = new_clip4cir()
    batch = ex.batch(order[:8], targets, texts, m, neg)
    want = np.unique(neg[order[:8]])
    assert batch.negative_rows.tolist() == want[want >= 0].tolist()
    assert batch.negatives.global_.shape == (len(batch.negative_rows), 32)
    hn = m.hard_negatives(batch)
    assert hn is not None and torch.equal(hn[1], batch.negative_rows)
    m.eval()
    with torch.no_grad():
        plain = float(m.loss(ex.batch(order[:8], targets, texts, m))[0])
        harder = float(m.loss(batch)[0])
    assert harder > plain  # more negatives in the denominator
    # Training with them works end to end.
    res = train(new_clip4cir(), tr, va, tmp_path / "r", TrainConfig(epochs=2, hard_negatives=2, **FAST))
    assert res.completed


def test_subset_hard_negatives(tmp_path):
    """source="subset": a query's hard negatives come from its annotated subset (positives excluded); a query without
    a subset falls back to its reference's neighbours; an unknown source is refused."""
    tr, va = make_toy(tmp_path)
    qs = list(tr.dataset.queries)
    ids = tr.images.ids
    for i in range(0, len(qs), 2):  # every other query gets a subset: its reference, its target and 3 others
        q = qs[i]
        others = [x for x in ids if x not in (q.reference, *q.targets)][i % 50 : i % 50 + 3]
        qs[i] = replace(q, subset=(q.reference, *q.targets, *others))
    data = replace(tr, dataset=replace(tr.dataset, queries=qs))
    view = FeatureView(data.images, data.texts)
    ex = Examples(data, view, hard_negatives=2, pool=6, source="subset")
    nb = reference_neighbours(view.img_global, ex.ref_rows, 6)
    for e in range(3):
        neg = ex.epoch_negatives(0, 0, e)
        assert neg.shape == (len(ex), 2)
        for i, q in enumerate(ex.queries):
            got = set(neg[i][neg[i] >= 0].tolist())
            assert got and not got & set(ex.positives[i].tolist())
            if q.subset:
                assert got <= {view.image_row(m) for m in q.subset} - set(ex.positives[i].tolist())
            else:
                assert got <= set(nb[i].tolist())
    with pytest.raises(ValueError, match="hard_negative_source"):
        Examples(data, view, hard_negatives=2, source="random")
    res = train(new_clip4cir(), data, va, tmp_path / "r",
                TrainConfig(epochs=1, hard_negatives=2, hard_negative_source="subset", **FAST))
    assert res.completed


def test_cli_eval_writes_a_cirr_test_submission(tmp_path, capsys):
    """A CIRR-format test split (no targets): `cirfusion eval` writes the two validated submission files."""
    from PIL import Image

    from cirfusion.backbones import create_backbone
    from cirfusion.cli import main

    root = tmp_path / "cirr"
    (root / "captions").mkdir(parents=True)
    (root / "image_splits").mkdir()
    (root / "test1").mkdir()
    ids = [f"test1-{i}-0-img0" for i in range(60)]
    for i, iid in enumerate(ids):
        Image.new("RGB", (16, 16), (i * 4, 255 - i * 4, (i * 37) % 256)).save(root / "test1" / f"{iid}.png")
    (root / "image_splits" / "split.rc2.test1.json").write_text(json.dumps({i: f"./test1/{i}.png" for i in ids}))
    caps = [{"pairid": 100 + q, "reference": ids[q], "caption": f"make it brighter {q}",
             "img_set": {"id": q, "members": [ids[(q + k) % 60] for k in range(6)], "reference_rank": 0}}
            for q in range(8)]
    (root / "captions" / "cap.rc2.test1.json").write_text(json.dumps(caps))
    ck = tmp_path / "ck"
    save_checkpoint(create_method("image-only", create_backbone("tiny")), ck)
    out = tmp_path / "subs"
    rc = main(["eval", str(ck), "--dataset", "cirr", "--root", str(root), "--split", "test1", "--cache-dir",
               str(tmp_path / "cache"), "--submission-dir", str(out), "--no-progress", "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)["results"][0]
    assert sorted(Path(p).name for p in res["submission"]) == ["recall_submission_image-only-test1.json",
                                                              "recall_subset_submission_image-only-test1.json"]
    rec = json.loads((out / "recall_submission_image-only-test1.json").read_text())
    sub = json.loads((out / "recall_subset_submission_image-only-test1.json").read_text())
    assert rec["version"] == "rc2" and rec["metric"] == "recall" and sub["metric"] == "recall_subset"
    assert len(rec["100"]) == 50 and ids[0] not in rec["100"] and len(sub["100"]) == 3
    assert set(sub["103"]) <= {ids[(3 + k) % 60] for k in range(1, 6)}
