"""Index build time, single-query search latency (p50/p95) and recall@10 vs exact, for the exact, IVF and HNSW
kinds of :mod:`cirfusion.index`, on clustered random unit vectors (N=20,000 by default, D=256 and 512, single- and
multi-vector M=4 galleries), with 2 threads. Prints a table and ends with one JSON line of all figures.

    python benchmarks/index_speed.py                 # the default grid
    python benchmarks/index_speed.py --n 5000 --queries 100 --dims 128 --m 1

Queries are searched one at a time (k=10, excluding one id per query as CIRR does), the way the `search` verb and
the HTTP service use an index: p50/p95 of those. "batch ms" is the time per query when all queries go in one call,
as evaluation does. "brute" is the numpy float64 reference (:func:`brute_force_search`), timed on the first
--brute-queries queries; R@10 is the overlap of each kind's top 10 with it (the exact kind must be 1.000).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=20_000, help="gallery items")
    p.add_argument("--dims", type=int, nargs="+", default=[256, 512])
    p.add_argument("--m", type=int, nargs="+", default=[1, 4], help="vectors per gallery item (1 = single-vector)")
    p.add_argument("--queries", type=int, default=300, help="timed single-query searches per configuration")
    p.add_argument("--brute-queries", type=int, default=30, help="timed queries for the (slow) numpy reference")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kinds", nargs="+", default=["exact", "ivf", "hnsw"])
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


args = parse_args()
# BLAS threads (numpy rescoring, faiss's sgemm) must be fixed before numpy loads.
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(args.threads)

import numpy as np  # noqa: E402

from cirfusion.index import brute_force_search, build_index, set_threads  # noqa: E402


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def clustered(rng: np.random.Generator, n: int, d: int, centers: np.ndarray, m: int) -> np.ndarray:
    """Unit vectors scattered around cluster centres; multi-vector items share a centre across their tokens."""
    c = centers[rng.integers(0, len(centers), size=n)]
    shape = (n, d) if m == 1 else (n, m, d)
    if m > 1:
        c = c[:, None, :]
    return unit(c + rng.normal(size=shape).astype(np.float32) / np.sqrt(d))


def percentiles_ms(times: list[float]) -> tuple[float, float]:
    a = np.asarray(times) * 1e3
    return float(np.percentile(a, 50)), float(np.percentile(a, 95))


def main() -> int:
    threads = set_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    results = []
    print(f"cirfusion index speed: N={args.n}, k={args.k}, {args.queries} single queries, faiss threads={threads}, "
          f"load average {os.getloadavg()[0]:.2f}")
    header = f"{'D':>4} {'M':>2} {'kind':>6} {'params':<40} {'build s':>8} {'p50 ms':>8} {'p95 ms':>8} {'batch ms':>8} {'R@10':>6}"
    print(header)
    print("-" * len(header))
    for d in args.dims:
        centers = unit(rng.normal(size=(200, d)))
        for m in args.m:
            g = clustered(rng, args.n, d, centers, m)
            ids = [f"img{i:06d}" for i in range(args.n)]
            q = clustered(rng, args.queries, d, centers, 1)
            excl = [[ids[int(i)]] for i in rng.integers(0, args.n, size=args.queries)]
            _, truth = brute_force_search(q, g, args.k, exclude=excl, ids=ids)

            times = []
            for b in range(min(args.queries, args.brute_queries)):
                t0 = time.perf_counter()
                brute_force_search(q[b : b + 1], g, args.k, exclude=excl[b : b + 1], ids=ids)
                times.append(time.perf_counter() - t0)
            p50, p95 = percentiles_ms(times)
            results.append(dict(dim=d, m=m, kind="brute", params={}, build_s=0.0, p50_ms=round(p50, 3),
                                p95_ms=round(p95, 3), batch_ms_per_query=None, recall10=1.0))
            print(f"{d:>4} {m:>2} {'brute':>6} {'numpy float64 reference':<40} {'-':>8} {p50:>8.2f} {p95:>8.2f} {'-':>8} "
                  f"{1.0:>6.3f}")

            for kind in args.kinds:
                t0 = time.perf_counter()
                index = build_index(g, ids, kind)
                build_s = time.perf_counter() - t0
                index.search(q[:5], args.k, exclude=excl[:5])  # warm-up
                times, got = [], []
                for b in range(args.queries):
                    t0 = time.perf_counter()
                    _, found = index.search(q[b : b + 1], args.k, exclude=excl[b : b + 1])
                    times.append(time.perf_counter() - t0)
                    got.append(found[0])
                p50, p95 = percentiles_ms(times)
                t0 = time.perf_counter()
                index.search(q, args.k, exclude=excl)  # one batch: what evaluation does
                batch_ms = (time.perf_counter() - t0) * 1e3 / args.queries
                recall = float(np.mean([len(set(a) & set(t)) / args.k for a, t in zip(got, truth)]))
                if kind == "exact" and got != truth:
                    print(f"ERROR: exact index disagrees with brute force at D={d}, M={m}", file=sys.stderr)
                    return 1
                params = ", ".join(f"{k}={v}" for k, v in index.params.items())
                results.append(dict(dim=d, m=m, kind=kind, params=index.params, build_s=round(build_s, 3),
                                    p50_ms=round(p50, 3), p95_ms=round(p95, 3), batch_ms_per_query=round(batch_ms, 3),
                                    recall10=round(recall, 4)))
                print(f"{d:>4} {m:>2} {kind:>6} {params:<40} {build_s:>8.2f} {p50:>8.2f} {p95:>8.2f} {batch_ms:>8.2f} "
                      f"{recall:>6.3f}")
                del index
    print(f"load average at the end: {os.getloadavg()[0]:.2f} (latencies on a shared machine move with it)")
    print(json.dumps({"benchmark": "index_speed", "n": args.n, "k": args.k, "threads": threads,
                      "queries": args.queries, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
