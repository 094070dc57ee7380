"""Modification-parser accuracy and speed (issue 10 targets: entity, attribute and edit F1 >= 0.98 on the synthetic
texts; on real captions entity F1 >= 0.90, attribute F1 >= 0.75, edit-op accuracy >= 0.75, relation F1 >= 0.5;
>= 500 texts/s on 2 cores).

    OMP_NUM_THREADS=1 python benchmarks/parser_accuracy.py [--synthetic DIR] [--split val] [--limit 500]
        [--dev tests/data/parser_dev.jsonl] [--speed-file CAPTIONS.json] [--backend rules]

--synthetic: a benchmark written by `cirfusion data make-synthetic` (default: generate a small one, 300 images,
in a temporary directory). --speed-file: CIRR captions (cap.rc2.*.json) to time the parser on (default: the dev
set's texts, repeated). Prints the scores, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from cirfusion.data.synthetic import generate
from cirfusion.data.synthetic.loader import load_synthetic
from cirfusion.parsing import get_parser
from cirfusion.parsing.evaluation import IMPLICIT_BY_SOURCE, load_annotated, score_annotated, score_synthetic, throughput

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--synthetic", default=None, help="synthetic benchmark root (default: generate 300 images)")
    ap.add_argument("--split", default="val")
    ap.add_argument("--limit", type=int, default=500, help="synthetic queries scored (0: all)")
    ap.add_argument("--dev", default=str(ROOT / "tests/data/parser_dev.jsonl"))
    ap.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"),
                    help="the real-data folder the dev set's captions are read from (they are not stored here)")
    ap.add_argument("--speed-file", default=None, help="a CIRR captions file to time the parser on")
    ap.add_argument("--backend", default="rules")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="parser-bench-") as tmp:
        root = Path(args.synthetic) if args.synthetic else Path(tmp) / "synthetic"
        if not args.synthetic:
            generate(root, seed=0, n_images=300, image_size=48, workers=1)
        queries = load_synthetic(root, args.split).queries
        queries = queries[: args.limit] if args.limit else queries
        syn = score_synthetic(queries, get_parser(args.backend, implicit_name=IMPLICIT_BY_SOURCE["synthetic"]))
    for part in ("fine", "coarse", "all"):
        print(f"synthetic {args.split} {part:6s} ({syn['n_queries']} queries): " +
              ", ".join(f"{k} {v:.4f}" for k, v in syn[part].items()))
    dev = score_annotated(args.dev, args.backend, data_root=args.data_root)
    print(f"dev set ({dev['n_texts']} texts): " + ", ".join(f"{k} {dev[k]:.4f}" for k in syn["all"]))
    for src, s in dev["by_source"].items():
        print(f"  {src:10s} ({s['n_texts']:3d}): " + ", ".join(f"{k} {v:.4f}" for k, v in s.items() if k != "n_texts"))
    if args.speed_file:
        texts = [x["caption"] for x in json.loads(Path(args.speed_file).read_text())]
    else:
        texts = [g.text for _, g in load_annotated(args.dev, args.data_root)] * 20
    speed = throughput(texts, get_parser(args.backend))
    print(f"speed: {speed['texts_per_s']} texts/s wall, {speed['texts_per_cpu_s']} texts per CPU-second "
          f"({speed['n_texts']} texts, one process)")
    print(json.dumps({"synthetic": syn, "dev": dev, "speed": speed, "backend": args.backend}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
