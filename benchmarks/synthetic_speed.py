"""Generation speed of the synthetic benchmark (target: 10,000 images in < 60 s on 2 cores).

    python benchmarks/synthetic_speed.py [--n-images 10000] [--workers 2] [--keep DIR]

Prints wall time, images/s, the CPU time of this process and of the render workers, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from cirfusion.data.synthetic import generate


def _cpu() -> tuple[float, float]:
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime, b.ru_utime + b.ru_stime


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-images", type=int, default=10_000)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", default=None, help="write the benchmark here and keep it (default: a temp dir, deleted)")
    args = ap.parse_args(argv)

    tmp = None
    if args.keep:
        out = Path(args.keep)
    else:
        tmp = tempfile.mkdtemp(prefix="synthetic-speed-")
        out = Path(tmp) / "bench"
    try:
        c0 = _cpu()
        t0 = time.perf_counter()
        stats = generate(out, seed=args.seed, n_images=args.n_images, image_size=args.image_size, workers=args.workers,
                         overwrite=bool(args.keep))  # fmt: skip
        wall = time.perf_counter() - t0
        c1 = _cpu()
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    n = sum(s["images"] for s in stats["splits"].values())
    q = sum(s["queries"] for s in stats["splits"].values())
    main_cpu, child_cpu = c1[0] - c0[0], c1[1] - c0[1]
    print(f"synthetic benchmark: {n} images ({args.image_size} px), {q} queries, workers={args.workers}")
    print(f"wall {wall:.1f} s = {n / wall:.0f} images/s   (target: 10,000 images < 60 s on 2 cores)")
    print(f"cpu: main process {main_cpu:.1f} s (scenes, texts, files, stats), render workers {child_cpu:.1f} s "
          f"({1000 * child_cpu / n:.2f} ms/image)")  # fmt: skip
    print(json.dumps({"n_images": n, "queries": q, "image_size": args.image_size, "workers": args.workers,
                      "wall_s": round(wall, 2), "images_per_s": round(n / wall, 1), "cpu_main_s": round(main_cpu, 2),
                      "cpu_workers_s": round(child_cpu, 2)}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
