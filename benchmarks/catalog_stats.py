"""Build the catalog benchmark (embedded benchmark B) from ../shared/data/clothing-small and print its statistics.

    python benchmarks/catalog_stats.py                      # default build into a temp dir, timed
    python benchmarks/catalog_stats.py --out /tmp/catalog --rebuild   # also time a second, cache-hitting build
    python benchmarks/catalog_stats.py --out /tmp/catalog --sheet sheet.png   # contact sheet to eyeball colours

Prints the build wall time and CPU time (this process + workers), the statistics of `benchmark_stats`, and ends
with one JSON line of the headline figures.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

from cirfusion.data.catalog import CatalogConfig, benchmark_stats, build_catalog, contact_sheet, format_stats

REPO = Path(__file__).resolve().parents[1]


def _cpu() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def _timed_build(out: Path, photos: Path, cfg: CatalogConfig, workers: int) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), _cpu()
    build_catalog(out, photos=photos, config=cfg, workers=workers, progress=sys.stderr.isatty())
    return time.perf_counter() - t0, _cpu() - c0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=Path, default=REPO.parent / "shared" / "data" / "clothing-small")
    ap.add_argument("--out", type=Path, help="output directory (default: a fresh temporary directory)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--edit-fraction", type=float, default=CatalogConfig.edit_fraction)
    ap.add_argument("--max-per-category", type=int)
    ap.add_argument("--rebuild", action="store_true", help="build a second time to time the cached path")
    ap.add_argument("--sheet", type=Path, help="write a contact sheet PNG of train photos with their colour labels")
    args = ap.parse_args()
    if not args.photos.is_dir():
        print(f"catalog_stats: photo folder {args.photos} not found", file=sys.stderr)
        return 2
    cfg = CatalogConfig(seed=args.seed, edit_fraction=args.edit_fraction, max_per_category=args.max_per_category)
    tmp = None
    if args.out is None:
        tmp = tempfile.TemporaryDirectory(prefix="cirfusion-catalog-")
        out = Path(tmp.name)
    else:
        out = args.out
    wall, cpu = _timed_build(out, args.photos, cfg, args.workers)
    stats = benchmark_stats(out)
    print(format_stats(stats))
    n_img = sum(s["gallery"] for s in stats["splits"].values())
    print(f"\nbuild: {wall:.1f} s wall, {cpu:.1f} s CPU, {args.workers} worker(s); {stats['photos']} photos, {n_img} gallery images")
    figures = {
        "photos": stats["photos"],
        "gallery_images": n_img,
        "build_wall_s": round(wall, 1),
        "build_cpu_s": round(cpu, 1),
        "queries": {k: v["queries"]["total"] for k, v in stats["splits"].items()},
    }
    if args.rebuild:
        wall2, cpu2 = _timed_build(out, args.photos, cfg, args.workers)
        print(f"rebuild (cache hit): {wall2:.1f} s wall, {cpu2:.1f} s CPU")
        figures["rebuild_wall_s"] = round(wall2, 1)
    if args.sheet:
        print(f"contact sheet: {contact_sheet(out, args.sheet, split='train', n=40, seed=args.seed)}")
    print(json.dumps(figures))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
