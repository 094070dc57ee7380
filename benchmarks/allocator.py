"""glibc's allocator thresholds (cirfusion.allocator): training steps with ``keep_freed_memory`` off against on.

    python benchmarks/allocator.py                      # 3 alternating process pairs per workload (about 3 minutes)
    python benchmarks/allocator.py --workloads clip4cir --pairs 5

A workload is ``METHOD[:LOSS]``: training steps (forward, backward, AdamW) of that method's loss at the `embedded`
backbone's feature sizes (1280-d global, 64 x 112 image tokens, 384-d text, 48 text tokens, 20 of them real), batch
128, with 4 mined negatives per query (512 distinct negative images, as `--hard-negatives 4` gives), random features,
1 torch thread. Median ms per step over --steps steps after 3 warm-up steps.

Each (workload, setting) runs in its own process (``CIRFUSION_MALLOPT=0`` or ``1`` set before it starts: the
thresholds are process-wide and cannot be undone); the two settings alternate off on off on ... so that drift in the
machine's load hits both alike, and the ratio is taken pair by pair. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

DEFAULT_WORKLOADS = ("clip4cir", "detailfusion:loss_di", "detailfusion:loss_joint")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", default=",".join(DEFAULT_WORKLOADS), help="comma-separated METHOD[:LOSS]")
    p.add_argument("--pairs", type=int, default=3, help="alternating off/on process pairs per workload")
    p.add_argument("--steps", type=int, default=12, help="timed steps per process")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args()


def child(workload: str, steps: int) -> tuple[float, bool]:
    """(median ms per training step of ``workload``, whether the thresholds were set) in this process."""
    import torch

    from cirfusion.allocator import keep_freed_memory
    from cirfusion.backbones.base import ImageFeatures, TextFeatures
    from cirfusion.methods import MethodDims, create_method
    from cirfusion.methods.base import Batch

    on = keep_freed_memory()  # what cirfusion.train.train does first
    torch.manual_seed(0)
    method, _, loss_name = workload.partition(":")
    dims = MethodDims(image_dim=1280, image_token_dim=112, num_image_tokens=64, text_dim=384, text_token_dim=384,
                      max_text_tokens=48, aligned=False, backbone_id="embedded", weights_hash="bench",
                      preprocess_id="bench")
    m = create_method(method, dims)
    m.train()
    loss_fn = getattr(m, loss_name or "loss")
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
    b, n_neg = 128, 512

    def img(n: int) -> ImageFeatures:
        return ImageFeatures(torch.randn(n, 1280), torch.randn(n, 64, 112))

    mask = torch.ones(b, 48, dtype=torch.bool)
    mask[:, 20:] = False
    rows = torch.arange(b)
    batch = Batch(img(b), TextFeatures(torch.randn(b, 384), torch.randn(b, 48, 384), mask), img(b), rows, rows + b,
                  [r.numpy()[None] + b for r in rows], ["text"] * b, negatives=img(n_neg),
                  negative_rows=torch.arange(n_neg) + 2 * b)
    times: list[float] = []
    for i in range(steps + 3):
        t0 = time.perf_counter()
        loss, _ = loss_fn(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000.0, on


def run_child(workload: str, on: bool, steps: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CIRFUSION_MALLOPT": "1" if on else "0"}
    cmd = [sys.executable, os.path.abspath(__file__), "--child", workload, "--steps", str(steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"{workload} (CIRFUSION_MALLOPT={int(on)}) failed ({proc.returncode})")
    ms, got = proc.stdout.strip().splitlines()[-1].split()
    if (got == "True") != on:
        raise SystemExit(f"{workload}: keep_freed_memory() returned {got} with CIRFUSION_MALLOPT={int(on)}")
    return float(ms)


def main() -> None:
    args = parse_args()
    if args.child:
        import torch

        torch.set_num_threads(1)
        ms, on = child(args.child, args.steps)
        print(ms, on)
        return
    load0 = os.getloadavg()[0]
    print(f"keep_freed_memory off vs on, {args.pairs} alternating process pairs per workload, 1 thread; load average "
          f"{load0:.1f} on {os.cpu_count()} CPUs")
    out: dict[str, dict[str, float]] = {}
    for w in args.workloads.split(","):
        off, on, speedup = [], [], []
        for _ in range(args.pairs):
            x, y = run_child(w, False, args.steps), run_child(w, True, args.steps)
            off.append(x)
            on.append(y)
            speedup.append(x / y)
        out[w] = {"ms_off": round(statistics.median(off), 1), "ms_on": round(statistics.median(on), 1),
                  "speedup": round(statistics.median(speedup), 3), "speedup_min": round(min(speedup), 3),
                  "speedup_max": round(max(speedup), 3)}
        print(f"  {w:26s} off {out[w]['ms_off']:8.1f} ms   on {out[w]['ms_on']:8.1f} ms   speedup "
              f"{out[w]['speedup']:.2f}x (pairs {min(speedup):.2f}-{max(speedup):.2f})")
    print(json.dumps({"load_average_start": load0, "load_average_end": os.getloadavg()[0], "cpus": os.cpu_count(),
                      "workloads": out}))


if __name__ == "__main__":
    main()
