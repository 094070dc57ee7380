"""DDP: the training loop under `torch.distributed.run` with 2 CPU processes (gloo) finishes, the ranks end with
identical weights, and only rank 0 writes the run directory."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file

TESTS = Path(__file__).resolve().parent

CHILD = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    import torch
    torch.set_num_threads(1)
    from safetensors.torch import save_file
    from test_train import make_toy, new_clip4cir, FAST
    from cirfusion.train import TrainConfig, train

    out = Path({out!r})
    rank = int(os.environ["RANK"])
    data_dir = out / f"data{{rank}}"
    data_dir.mkdir(parents=True, exist_ok=True)
    tr, va = make_toy(data_dir, files=False)
    m = new_clip4cir(0)
    res = train(m, tr, va, out / "run", TrainConfig(epochs=2, seed=0, **FAST))
    save_file({{k: v.contiguous() for k, v in m.state_dict().items()}}, str(out / f"rank{{rank}}.safetensors"))
    (out / f"rank{{rank}}.json").write_text(repr((res.completed, res.global_step)))
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_training(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(TESTS), out=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(script)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    w0, w1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0), "ranks diverged"
    # 384 training queries, 2 ranks x 32 per batch -> 6 steps per epoch, 2 epochs.
    assert (tmp_path / "rank0.json").read_text() == (tmp_path / "rank1.json").read_text() == "(True, 12)"
    run = tmp_path / "run"
    assert (run / "manifest.json").is_file() and (run / "best" / "model.safetensors").is_file()
    man = json.loads((run / "manifest.json").read_text())
    assert man["config"]["world_size"] == 2
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["type"] == "epoch"] == [0, 1]  # written once (rank 0), not twice
    assert sum(r["type"] == "step" for r in records) == 12
    last = load_file(str(run / "last" / "model.safetensors"))
    assert all(torch.equal(last[k], w0[k]) for k in w0)
    assert (run / "train.lock").is_file()  # taken by rank 0 alone (a second holder would have failed the run)
    # no temporary directories left by concurrent writers
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]
