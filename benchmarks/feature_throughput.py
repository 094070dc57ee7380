"""Feature-extraction throughput of the ``embedded`` backbone, and feature-cache read speed.

Prints: backbone load time (first, with imports; then warm), image/s per input resolution and precision (model
only, and decode+preprocess only) with bf16's speed-up over fp32 at each resolution timed in both, what
``precision=auto`` (the default) resolves to here, end-to-end FeatureCache image/s of the default backbone, MiniLM
texts/s (fp32 at every precision), and the time to read thousands of cached rows. Ends with one JSON line of the
figures. With ``--token-probe`` it also runs the linear probe behind the default token layer (which EfficientNet map keeps "what is where" on synthetic scenes).

    python benchmarks/feature_throughput.py                      # ~2-4 min on 2 cores
    python benchmarks/feature_throughput.py --resolutions 112,128,160,192,224 --token-probe

Timings on a shared machine are noisy: the best of ``--repeats`` runs is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PHOTOS = REPO.parent / "shared" / "data" / "clothing-small"


def _photos(root: Path, n: int, tmp: Path) -> list[Path]:
    files = sorted(root.glob("*/*/*.jpg")) if root.is_dir() else []
    if len(files) >= n:
        step = len(files) // n
        return files[::step][:n]
    # No photo folder: random-content JPEGs of a typical catalogue size.
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        p = tmp / f"gen{i:05d}.jpg"
        Image.fromarray(rng.integers(0, 255, (711, 400, 3), dtype=np.uint8)).save(p, quality=90)
        out.append(p)
    return out


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _texts(n: int) -> list[str]:
    import random

    rng = random.Random(0)
    colours = "red green blue yellow purple orange black white".split()
    shapes = "circle square triangle star cross".split()
    where = ["on the left", "on the right", "at the top", "at the bottom", "in the middle"]
    out = []
    for i in range(n):
        k = rng.randint(1, 3)
        edits = [
            f"change the {rng.choice(['small', 'large'])} {rng.choice(colours)} {rng.choice(shapes)} {rng.choice(where)} "
            f"to {rng.choice(colours)}"
            for _ in range(k)
        ]
        out.append(". ".join(edits) + f" ({i})")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--resolutions", default="112,128,160,192,224")
    ap.add_argument("--bf16-resolutions", default="128,192", help="also time precision=bf16 at these ('' to skip)")
    ap.add_argument("--n-images", type=int, default=128)
    ap.add_argument("--n-texts", type=int, default=512)
    ap.add_argument("--cached-rows", type=int, default=5000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS)
    ap.add_argument("--token-probe", action="store_true")
    args = ap.parse_args()

    t0 = time.perf_counter()
    # lazy: the imports below are timed (t_import), so they run here rather than at the top of the script
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from cirfusion.backbones import create_backbone
    from cirfusion.backbones.embedded import bf16_is_fast
    from cirfusion.data.images import load_image
    from cirfusion.features import FeatureCache

    t_import = time.perf_counter() - t0
    t = time.perf_counter()
    backbone = create_backbone("embedded")  # the default: precision=auto
    backbone.weights_hash()
    t_first = time.perf_counter() - t
    t = time.perf_counter()
    create_backbone("embedded").weights_hash()
    t_warm = time.perf_counter() - t
    results: dict = {
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "load_avg_at_start": os.getloadavg()[0],
        "import_s": round(t_import, 2),
        "load_first_s": round(t_first, 2),
        "load_warm_s": round(t_warm, 2),
        "auto_precision": backbone.precision,
        "bf16_native": bf16_is_fast(),
    }
    print(f"torch threads {args.threads}; load average {os.getloadavg()[0]:.1f} (shared machine: figures are noisy)")
    print(f"imports {t_import:.2f} s; embedded backbone load: first {t_first:.2f} s (includes hashing weights), warm {t_warm:.2f} s")
    print(f"precision=auto resolves to {backbone.precision} here (native bf16 kernels: {bf16_is_fast()}): {backbone.backbone_id}")

    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        photos = _photos(args.photos, args.n_images, tmp)
        decoded = [load_image(p) for p in photos]
        print(f"{len(photos)} images from {args.photos if args.photos.is_dir() else 'generated JPEGs'}")
        print(f"{'res':>5} {'precision':>9} {'tokens':>7} {'model img/s':>12} {'prep img/s':>11}")
        results["resolutions"] = {}
        runs = [(int(r), "fp32") for r in args.resolutions.split(",") if r]
        runs += [(int(r), "bf16") for r in args.bf16_resolutions.split(",") if r]
        for res, precision in runs:
            if res == backbone.resolution and precision == backbone.precision:
                b = backbone
            else:
                b = create_backbone("embedded", resolution=res, precision=precision)
            pix = torch.stack([b.preprocess(im) for im in decoded])
            b.encode_image(pix[: args.batch_size])  # warm-up (oneDNN kernel selection)

            def run_model() -> None:
                for s in range(0, len(pix), args.batch_size):
                    b.encode_image(pix[s : s + args.batch_size])

            dt = _best(run_model, args.repeats)
            dp = _best(lambda: [b.preprocess(load_image(p)) for p in photos], 1)
            results["resolutions"][f"{res}-{precision}"] = {
                "model_img_s": round(len(pix) / dt, 1),
                "decode_preprocess_img_s": round(len(photos) / dp, 1),
            }
            print(f"{res:>5} {precision:>9} {b.num_image_tokens:>7} {len(pix) / dt:>12.1f} {len(photos) / dp:>11.1f}")
        for key, r in results["resolutions"].items():
            res_s, precision = key.split("-")
            base = results["resolutions"].get(f"{res_s}-fp32")
            if precision == "bf16" and base:
                ratio = r["model_img_s"] / base["model_img_s"]
                results[f"bf16_speedup_{res_s}"] = round(ratio, 2)
                print(f"bf16 / fp32 model img/s at {res_s} px: {r['model_img_s']:.1f} / {base['model_img_s']:.1f} = {ratio:.2f}x")

        # End to end through the cache (read + hash + decode + preprocess + encode + fp16 write), default backbone
        # (precision=auto).
        for workers in (0, 2):
            cache = FeatureCache(backbone, tmp / f"cache{workers}", batch_size=args.batch_size, num_workers=workers)
            ids = [f"i{i}" for i in range(len(photos))]
            t = time.perf_counter()
            cache.image_features(ids, photos, progress=False)
            dt = time.perf_counter() - t
            results[f"cache_e2e_img_s_workers{workers}"] = round(len(photos) / dt, 1)
            print(f"FeatureCache end-to-end ({backbone.backbone_id}), num_workers={workers}: {len(photos) / dt:.1f} img/s")

        texts = _texts(args.n_texts)
        order = sorted(texts, key=len)  # what FeatureCache does: similar lengths per batch
        # Text is fp32 at every precision (the text cache is shared with the colour backbone): one figure.
        for precision, tb in [("fp32", backbone)]:
            tb.encode_text(texts[:8])

            def run_text() -> None:
                for s in range(0, len(order), args.batch_size):
                    tb.encode_text(order[s : s + args.batch_size])

            dt = _best(run_text, args.repeats)
            results[f"text_s_{precision}"] = round(len(texts) / dt, 1)
            print(f"MiniLM {precision}: {len(texts) / dt:.1f} texts/s ({len(texts)} synthetic edit instructions, batch {args.batch_size})")

        # Reading cached rows: many small distinct files, rows of the real embedded sizes written straight to the store.
        from PIL import Image

        rng = np.random.default_rng(0)
        small = tmp / "small"
        small.mkdir()
        paths = []
        for i in range(args.cached_rows):
            p = small / f"{i}.png"
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(p)
            paths.append(p)
        cache = FeatureCache(backbone, tmp / "readcache")
        store = cache._images()
        import hashlib

        keys = [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
        half = len(keys) // 2
        for lo, hi in ((0, half), (half, len(keys))):  # two shards, like two runs
            n = hi - lo
            store.write(keys[lo:hi], {
                "global": rng.standard_normal((n, backbone.image_dim)).astype(np.float16),
                "tokens": rng.standard_normal((n, backbone.num_image_tokens, backbone.image_token_dim)).astype(np.float16),
            })
        ids = [f"r{i}" for i in range(len(paths))]
        shuffled = rng.permutation(len(paths))
        fresh = FeatureCache(backbone, tmp / "readcache")
        t = time.perf_counter()
        table = fresh.image_features([ids[i] for i in shuffled], [paths[i] for i in shuffled], progress=False)
        dt_read = time.perf_counter() - t
        t = time.perf_counter()
        table.torch(np.arange(len(table)))
        dt_torch = time.perf_counter() - t
        mb = (table.global_.nbytes + table.tokens.nbytes) / 1e6
        results["cached_rows"] = len(paths)
        results["cached_read_s"] = round(dt_read, 3)
        results["cached_to_torch_s"] = round(dt_torch, 3)
        print(
            f"cache read: {len(paths)} rows ({mb:.0f} MB fp16, shuffled over 2 shards, files hashed) in {dt_read:.3f} s; "
            f"to float32 torch {dt_torch:.3f} s"
        )

    if args.token_probe:
        results["token_probe"] = token_probe(args.threads)
    print(json.dumps(results))
    return 0


def token_probe(threads: int, n_train: int = 1200, n_test: int = 400) -> dict:
    """Ridge probes from each EfficientNet map to per-cell colour/shape/size on random 3x3-grid scenes."""
    import numpy as np
    import torch
    from PIL import Image, ImageDraw

    from cirfusion.backbones import create_backbone

    colours = [(220, 30, 30), (30, 170, 60), (40, 70, 220), (235, 215, 40), (140, 50, 170), (245, 140, 20), (20, 20, 20), (250, 250, 250)]

    def shape(d: ImageDraw.ImageDraw, kind: int, cx: float, cy: float, r: float, col: tuple) -> None:
        if kind == 0:
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col)
        elif kind == 1:
            d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=col)
        elif kind == 2:
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=col)
        elif kind == 3:
            pts = [(cx + (r if k % 2 == 0 else r * 0.45) * np.cos(np.pi / 2 + k * np.pi / 5),
                    cy - (r if k % 2 == 0 else r * 0.45) * np.sin(np.pi / 2 + k * np.pi / 5)) for k in range(10)]
            d.polygon(pts, fill=col)
        else:
            w = r * 0.35
            d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=col)
            d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=col)

    rng = np.random.default_rng(0)
    S = 256
    ims, labels = [], []
    for _ in range(n_train + n_test):
        im = Image.new("RGB", (S, S), tuple(int(v) for v in rng.integers(90, 170, 3)))
        d = ImageDraw.Draw(im)
        lab = np.full((3, 9), -1)
        for c in rng.permutation(9)[: rng.integers(1, 5)]:
            i, j = divmod(int(c), 3)
            col, kind, size = int(rng.integers(8)), int(rng.integers(5)), int(rng.integers(2))
            shape(d, kind, (j + 0.5) * S / 3 + rng.normal(0, 4), (i + 0.5) * S / 3 + rng.normal(0, 4), (S / 3) * (0.18 if size == 0 else 0.38), colours[col])
            lab[:, c] = (col, kind, size)
        ims.append(im)
        labels.append(lab)
    labels = np.stack(labels)  # [N, 3, 9]
    b = create_backbone("embedded", precision="fp32")  # the maps as trained, on every machine
    net = b.image_model
    maps: dict[str, list] = {"stride16": [], "stride32": [], "head": [], "global": []}
    for s in range(0, len(ims), 64):
        x = torch.stack([b.preprocess(im) for im in ims[s : s + 64]]).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            x = net._swish(net._bn0(net._conv_stem(x)))
            for i, block in enumerate(net._blocks):
                x = block(x)
                if i == b._last_block_at_stride[16]:
                    maps["stride16"].append(x.flatten(1).numpy().copy())
            maps["stride32"].append(x.flatten(1).numpy().copy())
            x = net._swish(net._bn1(net._conv_head(x)))
            maps["head"].append(x.flatten(1).numpy().copy())
            maps["global"].append(x.mean((2, 3)).numpy())
    out = {}
    print("token probe (ridge, per grid cell, accuracy on occupied cells): layer  dim  colour  shape  size")
    for layer, chunks in maps.items():
        X = np.concatenate(chunks).astype(np.float64)
        mu, sd = X[:n_train].mean(0), X[:n_train].std(0) + 1e-4
        X = torch.from_numpy((X - mu) / sd)
        Xtr, Xte = X[:n_train], X[n_train:]
        K = Xtr @ Xtr.T
        best = None
        for lam in (0.1, 1.0, 10.0):
            A = torch.linalg.solve(K + lam * K.trace() / len(K) * torch.eye(len(K), dtype=K.dtype), torch.eye(len(K), dtype=K.dtype))
            P = Xte @ Xtr.T @ A  # test x train weights
            accs = []
            for a, k in enumerate((8, 5, 2)):
                y = labels[:n_train, a] + 1  # 0 = empty cell
                Y = torch.from_numpy(np.eye(k + 1)[y].reshape(n_train, -1))
                pred = (P @ Y).numpy().reshape(n_test, 9, k + 1).argmax(-1) - 1
                occ = labels[n_train:, a] >= 0
                accs.append(float((pred == labels[n_train:, a])[occ].mean()))
            if best is None or sum(accs) > sum(best):
                best = accs
        out[layer] = {"dim": int(X.shape[1]), "colour": round(best[0], 3), "shape": round(best[1], 3), "size": round(best[2], 3)}
        print(f"  {layer:9s} {X.shape[1]:6d}  {best[0]:.3f}  {best[1]:.3f}  {best[2]:.3f}")
    return out


if __name__ == "__main__":
    sys.exit(main())
