"""BLIP4CIR+Bi's text encoder on the embedded backbone: which "fine-tune the text encoder" to keep, on VAL.

The original fine-tunes BLIP's text encoder. Here MiniLM is frozen and its last layer's outputs are cached, so three
forms are compared, each trained with the shared loop (both stages, same seed and epochs) and read on the val split:

- ``head``            a trainable transformer over the cached (frozen) MiniLM tokens (the default);
- ``minilm-layer``    a BERT layer initialised from MiniLM's last layer, applied over the cached tokens (what the
                      cache allows: a copy of the last layer on top of the frozen network);
- ``minilm-unfrozen`` MiniLM with its last layer unfrozen: the same layer, fed MiniLM's fifth-layer states (the last
                      layer's input), which this script extracts for every text, since the feature cache does not
                      hold them. This is exactly fine-tuning MiniLM's last layer (with the markers inserted before it).

    PYTHONPATH=src python benchmarks/blip4cir_text_encoder.py --root DATA/synthetic --cache-dir CACHE [--epochs 4]
        [--variants head,minilm-layer,minilm-unfrozen] [--hparam combiner=false --hparam combiner_bi_weight=0]

Prints one line per variant and ends with one JSON line (split: val).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cirfusion.backbones import create_backbone
from cirfusion.backbones.embedded import GLOBAL_TEXT_TOKENS
from cirfusion.data import load_dataset
from cirfusion.features import FeatureCache, TextFeatureTable
from cirfusion.methods import create_method
from cirfusion.seeding import seed_everything
from cirfusion.train import TrainConfig, train
from cirfusion.views import SplitData, load_split_data

VARIANTS: dict[str, tuple[dict[str, Any], str]] = {  # name -> (hyper-parameters, text tokens)
    "head": ({"text_encoder": "head"}, "cache"),
    "minilm-layer": ({"text_encoder": "minilm-layer"}, "cache"),
    "minilm-unfrozen": ({"text_encoder": "minilm-layer"}, "fifth-layer"),
}
REPORTED = ("Rmean", "R@1", "R@10", "Rsubset@1")


@torch.inference_mode()
def fifth_layer_tokens(backbone: Any, table: TextFeatureTable, batch: int = 64) -> TextFeatureTable:
    """The same table with MiniLM's fifth-layer states (the last layer's input) as tokens; the mask and the global
    vector are unchanged. Checks that the sixth-layer states equal the cached tokens."""
    text = backbone.text
    length = table.tokens.shape[1]
    out = np.zeros(table.tokens.shape, dtype=np.float16)
    worst = 0.0
    for s in range(0, len(table.texts), batch):
        enc = text.tokenizer(table.texts[s : s + batch], padding=True, truncation=True, max_length=GLOBAL_TEXT_TOKENS,
                             return_tensors="pt")
        hidden = text.model(**enc, output_hidden_states=True).hidden_states
        n = min(length, hidden[5].shape[1])
        out[s : s + batch, :n] = hidden[5][:, :n].numpy().astype(np.float16)
        cached = torch.from_numpy(np.asarray(table.tokens[s : s + batch, :n], dtype=np.float32))
        mask = torch.from_numpy(np.asarray(table.mask[s : s + batch, :n]))
        worst = max(worst, float((hidden[6][:, :n] - cached).abs()[mask].max()))
    if worst > 0.05:
        raise RuntimeError(f"MiniLM's sixth-layer states differ from the cached tokens by {worst:.3f}")
    return TextFeatureTable(list(table.texts), table.global_, out, table.mask, list(table.hashes))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, required=True, help="the synthetic benchmark's directory")
    ap.add_argument("--cache-dir", type=Path, required=True, help="feature cache (the embedded backbone's)")
    ap.add_argument("--out", type=Path, default=Path("runs/blip4cir_text_encoder"))
    ap.add_argument("--method", default="blip4cir-bi")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--epochs", type=int, default=4, help="per stage (the quickstart's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hparam", action="append", default=[], metavar="KEY=JSON",
                    help="a hyper-parameter for every variant, e.g. combiner=false to compare stage I alone")
    args = ap.parse_args()
    torch.set_num_threads(1)

    backbone = create_backbone("embedded")
    cache = FeatureCache(backbone, args.cache_dir)
    data = {s: load_split_data(cache, load_dataset("synthetic", args.root, s), training=s == "train")
            for s in ("train", "val")}
    common = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.hparam)}
    fifth: dict[str, SplitData] = {}
    results: dict[str, dict[str, Any]] = {}
    for name in args.variants.split(","):
        hp, source = VARIANTS[name]
        splits = data
        if source == "fifth-layer":
            if not fifth:
                t0 = time.perf_counter()
                fifth = {s: SplitData(d.dataset, d.images, fifth_layer_tokens(backbone, d.texts)) for s, d in data.items()}
                print(f"fifth-layer MiniLM states extracted ({time.perf_counter() - t0:.0f} s)", flush=True)
            splits = fifth
        seed_everything(args.seed)
        method = create_method(args.method, backbone, **{**common, **hp})
        t0 = time.perf_counter()
        res = train(method, splits["train"], splits["val"], args.out / name,
                    TrainConfig(epochs=args.epochs, seed=args.seed, progress=False), overwrite=True)
        val = json.loads((res.best_dir / "config.json").read_text())["extra"]["val"]  # the best epoch's val metrics
        results[name] = {"val": {k: round(float(val[k]), 2) for k in REPORTED if k in val}, "best_epoch": res.best_epoch,
                         "trainable_parameters": method.num_parameters(), "train_s": round(time.perf_counter() - t0, 1)}
        print(f"{name:16s} val " + "  ".join(f"{k} {v:.2f}" for k, v in results[name]["val"].items())
              + f"  (best epoch {res.best_epoch}, {results[name]['train_s']:.0f} s)", flush=True)
    print(json.dumps({"benchmark": "blip4cir_text_encoder", "split": "val", "method": args.method, "hparams": common,
                      "epochs": args.epochs,
                      "seed": args.seed, "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
