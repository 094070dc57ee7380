"""Torch threads per workload: 1 against 2 (or --threads A,B) intra-op threads, each workload timed in fresh processes.

    python benchmarks/threads.py                    # every workload, 3 alternating pairs (about 3-6 minutes)
    python benchmarks/threads.py --workloads train:clip4cir --pairs 5

Workloads:
- ``train:METHOD``: training steps (forward, backward, AdamW) of a pool method's head at the `embedded` backbone's
  feature sizes (1280-d global, 64 x 112 image tokens, 384-d text, 48 text tokens), batch 64, random features: the
  cost of `cirfusion train` once features are cached. Median ms per step over --steps steps after 3 warm-up steps.
- ``features``: the `embedded` backbone (EfficientNet-Lite0 at 128 px + MiniLM) encoding a batch of 32 random images
  and texts: the cost of filling the feature cache. Median ms per batch.
- ``fused_query``: one query of a K = 4 fused model (float32 scoring) over a 20,000-image gallery: the cost of
  `cirfusion search` with a DAFM checkpoint. Median ms per query.

Each (workload, threads) runs in its own process with OMP_NUM_THREADS set before torch starts; the two thread counts
alternate A B A B ... so that drift in the machine's load hits both alike, and the ratio is taken pair by pair. The
machine's load average is printed: on 2 *shared* cores the answer depends on what else runs (the reason the library
sets threads per workload, see cirfusion.threads). Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

DEFAULT_WORKLOADS = ("train:clip4cir", "train:blip4cir-bi", "train:tg-cir", "train:sprc", "features", "fused_query")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", default=",".join(DEFAULT_WORKLOADS), help="comma-separated workloads")
    p.add_argument("--threads", default="1,2", help="the two thread counts to compare (A,B)")
    p.add_argument("--pairs", type=int, default=3, help="alternating A/B process pairs per workload")
    p.add_argument("--steps", type=int, default=20, help="timed steps per process")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args()


def child(workload: str, steps: int) -> float:
    """Median milliseconds of one unit of ``workload`` in this process (torch threads already fixed)."""
    import torch

    from cirfusion.backbones.base import ImageFeatures, TextFeatures
    from cirfusion.methods import MethodDims, create_method
    from cirfusion.methods.base import Batch

    torch.manual_seed(0)
    times: list[float] = []

    def timed(fn, n: int) -> None:
        for i in range(n + 3):
            t0 = time.perf_counter()
            fn()
            if i >= 3:
                times.append(time.perf_counter() - t0)

    if workload.startswith("train:"):
        dims = MethodDims(image_dim=1280, image_token_dim=112, num_image_tokens=64, text_dim=384, text_token_dim=384,
                          max_text_tokens=48, aligned=False, backbone_id="embedded", weights_hash="bench",
                          preprocess_id="bench")
        m = create_method(workload.split(":", 1)[1], dims)
        m.train()
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
        b = 64

        def img() -> ImageFeatures:
            return ImageFeatures(torch.randn(b, 1280), torch.randn(b, 64, 112))

        mask = torch.ones(b, 48, dtype=torch.bool)
        mask[:, 20:] = False
        rows = torch.arange(b)
        batch = Batch(img(), TextFeatures(torch.randn(b, 384), torch.randn(b, 48, 384), mask), img(), rows, rows + b,
                      [r.numpy()[None] + b for r in rows], ["text"] * b)

        def step() -> None:
            loss, _ = m.loss(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        timed(step, steps)
    elif workload == "features":
        from cirfusion.backbones import create_backbone

        bb = create_backbone("embedded")
        pixels = torch.randn(32, 3, 128, 128)
        texts = ["make it red with long sleeves and a round collar"] * 32

        def encode() -> None:
            with torch.no_grad():
                bb.encode_image(pixels)
                bb.encode_text(texts)

        timed(encode, max(3, steps // 4))
    elif workload == "fused_query":
        from cirfusion.methods.dafm import DAFM

        dims = MethodDims(image_dim=256, image_token_dim=32, num_image_tokens=4, text_dim=256, text_token_dim=32,
                          max_text_tokens=4, aligned=True, backbone_id="bench", weights_hash="bench", preprocess_id="bench")
        bases = [create_method("image-only", dims) for _ in range(4)]
        model = DAFM.from_bases(bases, score_dtype="float32").eval()
        n = 20_000
        g = model.encode_gallery(ImageFeatures(torch.randn(n, 256), torch.randn(n, 4, 32)))
        ref = ImageFeatures(torch.randn(1, 256), torch.randn(1, 4, 32))
        txt = TextFeatures(torch.randn(1, 256), torch.randn(1, 4, 32), torch.ones(1, 4, dtype=torch.bool))
        q = model.encode_query(ref, txt)

        def query() -> None:
            with torch.no_grad():
                model.similarity(q, g)

        timed(query, steps * 2)
    else:
        raise SystemExit(f"unknown workload {workload!r}; expected train:METHOD, features or fused_query")
    return statistics.median(times) * 1000.0


def run_child(workload: str, threads: int, steps: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, os.path.abspath(__file__), "--child", workload, "--steps", str(steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"{workload} with {threads} threads failed ({proc.returncode})")
    return float(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    args = parse_args()
    if args.child:
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        print(child(args.child, args.steps))
        return
    a, b = (int(x) for x in args.threads.split(","))
    load0 = os.getloadavg()[0]
    print(f"threads {a} vs {b}, {args.pairs} alternating process pairs per workload; load average {load0:.1f} on "
          f"{os.cpu_count()} CPUs")
    out: dict[str, dict[str, float]] = {}
    for w in args.workloads.split(","):
        ta, tb, ratio = [], [], []
        for _ in range(args.pairs):
            x = run_child(w, a, args.steps)
            y = run_child(w, b, args.steps)
            ta.append(x)
            tb.append(y)
            ratio.append(y / x)
        out[w] = {f"ms_{a}": statistics.median(ta), f"ms_{b}": statistics.median(tb), f"ratio_{b}_over_{a}": statistics.median(ratio),
                  "ratio_min": min(ratio), "ratio_max": max(ratio)}
        faster = a if statistics.median(ratio) > 1 else b
        print(f"  {w:18s} {a} thread(s) {out[w][f'ms_{a}']:8.2f} ms   {b} threads {out[w][f'ms_{b}']:8.2f} ms   "
              f"ratio {b}/{a} {out[w][f'ratio_{b}_over_{a}']:.2f} (pairs {min(ratio):.2f}-{max(ratio):.2f})  -> {faster} faster")
    print(json.dumps({"threads": [a, b], "load_average_start": load0, "load_average_end": os.getloadavg()[0],
                      "cpus": os.cpu_count(), "workloads": out}))


if __name__ == "__main__":
    main()
