"""Load test of ``cirfusion serve`` (issue 13): a K = 4 DAFM checkpoint over a synthetic 20,000-image gallery, 1, 8
and 32 concurrent clients over loopback for a bounded time each.

    python benchmarks/serve_load.py                        # the full run (first run: ~1-3 min to draw and encode)
    python benchmarks/serve_load.py --n 2000 --seconds 5   # a quick look

What it builds (cached under ``--work``, default /tmp/cirfusion-serve-load, so a re-run starts the server at once):

- the gallery: ``--n`` small JPEGs (48 x 48 px, a coloured shape on a coloured ground, drawn from a seed);
- the checkpoint: DAFM over four base models - clip4cir, blip4cir, tg-cir, sprc, each at its default sizes (256-d
  embeddings; SPRC 6 x 256 gallery vectors) - on the ``tiny`` backbone, weights from a seed, the fusion network
  untrained. Loading and scoring cost do not depend on training, and a random tiny backbone makes the 20,000 real
  image files encodable in about a minute on 2 cores (the ``embedded`` backbone takes ~15 min for 20k images here).
  What this leaves out: the reference-image backbone pass of an upload is a 32 px tiny convolution, not
  EfficientNet-Lite0 at 128 px (~10-20 ms more per upload on one core); gallery-id references never run the backbone
  (their cached features are reused), so that figure is the same for every backbone.

What it measures: the server (``cirfusion serve``, a separate process, its defaults: one model thread with 1 torch
thread, concurrent searches answered in batches of up to ``--max-batch``, the fused model's 4 base models side by side
on 2 base threads; ``--workers`` request threads)
answers ``POST /api/search`` with a gallery-id reference, a text drawn from 24 modifications and k = 10, explanation
included (exact Shapley contributions of the 4 models for the top 10 results) - what the page asks for. Each level
runs ``--seconds`` with that many client threads, each on its own keep-alive connection, one request after another.
Per level: p50 / p95 / p99 latency (client side, loopback), throughput, errors (any non-200 or failure). Then
``--uploads`` searches with distinct uploaded 1024 x 768 JPEGs (a fresh file each time: no cache helps), one at a
time. The server's RSS is sampled every 0.2 s from /proc: peak (VmHWM) and growth (RSS at the end minus RSS after
the warm-up, which runs at the largest concurrency so the model thread's largest batches are allocated once, and
sends three uploads). The client threads share the machine's cores with the server: the figures are for both on one box.

Targets on 2 cores: 0 errors; p50 <= 30 ms at 1 client; upload p50 <= 100 ms; rps(32) >= 0.8 x rps(1) x cores; no
RSS growth. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["make it red", "same but blue", "turn it green", "in yellow", "make the shape larger", "smaller please",
         "move it to the left", "move it to the right", "put it at the top", "at the bottom", "a darker background",
         "a lighter background", "same shape but purple", "make it a circle", "make it a square", "orange instead",
         "more saturated", "less saturated", "same colour, other shape", "a white background", "in black",
         "two of them", "centred", "rotated a bit"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=20_000, help="gallery images")
    p.add_argument("--seconds", type=float, default=20.0, help="duration of each concurrency level")
    p.add_argument("--levels", default="1,8,32", help="concurrent clients per level")
    p.add_argument("--warmup", type=float, default=8.0,
                   help="seconds of warm-up at the largest concurrency (the allocator's pools of the model thread and "
                        "the base threads reach their steady size: 3 s left 40 MB of growth for the levels to show, "
                        "8 s leaves ~2 MB over a minute more)")
    p.add_argument("--uploads", type=int, default=30, help="uploaded 1024 px JPEG searches")
    p.add_argument("--workers", type=int, default=2, help="the server's request threads (uploads, thumbnails)")
    p.add_argument("--max-batch", type=int, default=16, help="the server's largest batch of concurrent searches")
    p.add_argument("--work", type=Path, default=Path("/tmp/cirfusion-serve-load"))
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def build(work: Path, n: int, seed: int) -> tuple[Path, Path]:
    """The gallery folder and the K = 4 DAFM checkpoint (both reused when already there)."""
    from PIL import Image, ImageDraw

    gallery, ckpt = work / f"gallery-{n}", work / "dafm-k4"
    if not (gallery / ".complete").is_file():
        t0 = time.perf_counter()
        rng = random.Random(seed)
        for i in range(n):
            sub = gallery / f"{i // 1000:02d}"
            sub.mkdir(parents=True, exist_ok=True)
            im = Image.new("RGB", (48, 48), tuple(rng.randrange(256) for _ in range(3)))
            x, y, s = rng.randrange(0, 30), rng.randrange(0, 30), rng.randrange(8, 18)
            shape = ImageDraw.Draw(im).ellipse if rng.random() < 0.5 else ImageDraw.Draw(im).rectangle
            shape([x, y, x + s, y + s], fill=tuple(rng.randrange(256) for _ in range(3)))
            im.save(sub / f"img{i:05d}.jpg", quality=90)
        (gallery / ".complete").touch()
        print(f"[serve_load] drew {n} gallery images in {time.perf_counter() - t0:.1f} s", flush=True)
    if not (ckpt / "config.json").is_file():
        import torch

        from cirfusion.backbones import create_backbone
        from cirfusion.checkpoint import save_checkpoint
        from cirfusion.methods import create_method
        from cirfusion.methods.dafm import DAFM
        from cirfusion.seeding import seed_everything

        torch.set_num_threads(1)
        seed_everything(seed)
        bb = create_backbone("tiny")
        bases = [create_method(m, bb) for m in ("clip4cir", "blip4cir", "tg-cir", "sprc")]
        save_checkpoint(DAFM.from_bases(bases), ckpt)
    return gallery, ckpt


def upload_jpegs(count: int, seed: int) -> list[bytes]:
    """Distinct 1024 x 768 JPEGs (a smooth gradient, shapes, noise: photo-like sizes, ~150-300 kB)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    xx = np.mgrid[0:768, 0:1024][1]
    out = []
    for _ in range(count):
        c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        t = (xx / 1023.0)[..., None]
        img = (c0 * (1 - t) + c1 * t + rng.normal(0, 12, (768, 1024, 3))).clip(0, 255).astype(np.uint8)
        im = Image.fromarray(img)
        d = ImageDraw.Draw(im)
        for _ in range(3):
            x, y, s = int(rng.integers(0, 800)), int(rng.integers(0, 600)), int(rng.integers(60, 220))
            d.ellipse([x, y, x + s, y + s], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


class RSS:
    """Samples the server's resident set (VmRSS) every 0.2 s; peak is the kernel's VmHWM."""

    def __init__(self, pid: int) -> None:
        self.pid, self.samples, self._stop = pid, [], threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _read(self, key: str) -> float:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
        return float("nan")

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            try:
                self.samples.append((time.monotonic(), self._read("VmRSS")))
            except OSError:
                return

    def now(self) -> float:
        return self._read("VmRSS")

    def cpu_seconds(self) -> float:
        """The server's user + system CPU time so far (/proc/PID/stat fields 14 and 15)."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def peak(self) -> float:
        return self._read("VmHWM")

    def stop(self) -> None:
        self._stop.set()
        self._t.join()


def search_json(port: int, conn: http.client.HTTPConnection, body: bytes) -> int:
    conn.request("POST", "/api/search", body=body, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    r.read()
    return r.status


def level(port: int, clients: int, seconds: float, ids: list[str], seed: int) -> dict[str, float]:
    lat: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    start = threading.Barrier(clients + 1)
    deadline = [0.0]

    def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        start.wait()
        while time.perf_counter() < deadline[0]:
            body = json.dumps({"reference": rng.choice(ids), "text": rng.choice(TEXTS), "k": 10}).encode()
            t0 = time.perf_counter()
            try:
                status = search_json(port, conn, body)
            except (OSError, http.client.HTTPException):
                status = -1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            dt = time.perf_counter() - t0
            if status == 200:
                lat[i].append(dt)
            else:
                errors[i] += 1
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    deadline[0] = time.perf_counter() + seconds
    t_start = time.perf_counter()
    start.wait()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t_start
    all_lat = np.array([x for per in lat for x in per]) * 1000
    pct = (lambda q: round(float(np.percentile(all_lat, q)), 2)) if all_lat.size else (lambda q: float("nan"))
    return {"p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99), "rps": round(all_lat.size / wall, 2),
            "errors": int(sum(errors)), "requests": int(all_lat.size)}


def multipart(fields: dict[str, str], file: bytes, name: str) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f"--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n".encode() for k, v in fields.items()]
    parts.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
                 "Content-Type: image/jpeg\r\n\r\n".encode() + file + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def upload_search(conn: http.client.HTTPConnection, data: bytes, text: str, name: str) -> tuple[int, float]:
    """One search with an uploaded image (k = 10): the status, and milliseconds from sending to the whole answer."""
    body, ctype = multipart({"text": text, "k": "10"}, data, name)
    t0 = time.perf_counter()
    conn.request("POST", "/api/search", body=body, headers={"Content-Type": ctype})
    r = conn.getresponse()
    r.read()
    return r.status, (time.perf_counter() - t0) * 1000


def main() -> None:
    args = parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    gallery, ckpt = build(args.work, args.n, args.seed)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("CIRFUSION_SERVE_TOKEN", None)
    log_path = args.work / "server.log"
    cmd = [sys.executable, "-m", "cirfusion.cli", "serve", str(ckpt), "--images", str(gallery), "--port", str(port),
           "--cache-dir", str(args.work / "cache"), "--workers", str(args.workers), "--max-batch", str(args.max_batch), "--no-progress"]
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                c.request("GET", "/api/info")
                r = c.getresponse()
                info = json.loads(r.read())
                if r.status == 200:
                    break
            except OSError:
                pass
            if server.poll() is not None:
                raise SystemExit("the server stopped:\n" + log_path.read_text())
            time.sleep(0.5)
        print(f"[serve_load] server up in {time.perf_counter() - t0:.1f} s: {info['model']} on {info['backbone']}, "
              f"{info['gallery_size']} images, mode {info['mode']}, explanations {info['explanation']}", flush=True)
        rss = RSS(server.pid)
        ids = [p.relative_to(gallery).with_suffix("").as_posix() for p in sorted(gallery.rglob("*.jpg"))]
        # First touches of the gallery, caches, thread pools, and the allocator's pools at the largest batch the model
        # thread will see (the most clients): RSS growth is then measured from a steady state, so it shows a leak.
        warm = level(port, max(int(x) for x in args.levels.split(",")), args.warmup, ids, args.seed + 99)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for i, data in enumerate(upload_jpegs(3, args.seed + 99)):  # and an upload's decoding buffers
            upload_search(conn, data, TEXTS[i], f"warm{i}.jpg")
        conn.close()
        rss_after_warmup = rss.now()
        print(f"[serve_load] warm-up: {warm['requests']} requests, RSS {rss_after_warmup:.0f} MB", flush=True)
        out: dict[str, object] = {}
        rss_by_phase = {"warm-up": round(rss_after_warmup, 1)}
        for c in (int(x) for x in args.levels.split(",")):
            cpu0 = rss.cpu_seconds()
            res = level(port, c, args.seconds, ids, args.seed + c)
            # the server's CPU time per answered request: what a request costs whatever else runs on the machine
            res["server_cpu_ms_per_request"] = round((rss.cpu_seconds() - cpu0) * 1000 / max(1, res["requests"]), 2)
            out[f"c{c}"] = res
            rss_by_phase[f"c{c}"] = round(rss.now(), 1)
            print(f"[serve_load] {c:>3} clients: p50 {res['p50_ms']:.1f} ms, p95 {res['p95_ms']:.1f} ms, p99 "
                  f"{res['p99_ms']:.1f} ms, {res['rps']:.1f} req/s, {res['errors']} errors ({res['requests']} ok), "
                  f"server CPU {res['server_cpu_ms_per_request']:.1f} ms/request, RSS {rss.now():.0f} MB", flush=True)
        jpegs = upload_jpegs(args.uploads, args.seed)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        up_lat, up_err = [], 0
        cpu0 = rss.cpu_seconds()
        for i, data in enumerate(jpegs):
            status, ms = upload_search(conn, data, TEXTS[i % len(TEXTS)], f"upload{i}.jpg")
            if status == 200:
                up_lat.append(ms)
            else:
                up_err += 1
        conn.close()
        upload_cpu = round((rss.cpu_seconds() - cpu0) * 1000 / max(1, len(up_lat)), 2)
        rss_by_phase["uploads"] = round(rss.now(), 1)
        upload_p50 = round(float(np.median(up_lat)), 2) if up_lat else float("nan")
        print(f"[serve_load] uploads (1024 x 768 JPEG, {np.mean([len(j) for j in jpegs]) / 1024:.0f} kB avg): p50 "
              f"{upload_p50:.1f} ms over {len(up_lat)} ({up_err} errors), server CPU {upload_cpu:.1f} ms/request",
              flush=True)
        rss_end, peak = rss.now(), rss.peak()
        rss.stop()
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        c.request("GET", "/api/info")
        model_thread = json.loads(c.getresponse().read()).get("model_thread", {})
        c.close()
        n_cores = cores()
        c1, c_last = out.get("c1"), out.get(f"c{args.levels.split(',')[-1]}")
        summary = {**out, "upload_p50_ms": upload_p50, "upload_errors": up_err,
                   "upload_server_cpu_ms_per_request": upload_cpu, "peak_rss_mb": round(peak, 1),
                   "rss_growth_mb": round(rss_end - rss_after_warmup, 1), "rss_mb_by_phase": rss_by_phase, "gallery_size": int(info["gallery_size"]),
                   "cores": n_cores, "workers": args.workers, "model_thread": model_thread, "backbone": info["backbone"],
                   "seconds": args.seconds,
                   "loadavg_1m": round(os.getloadavg()[0], 2)}
        if isinstance(c1, dict) and isinstance(c_last, dict) and c1["rps"]:
            summary["scaling"] = round(c_last["rps"] / (c1["rps"] * n_cores), 3)
        print(f"[serve_load] peak RSS {peak:.0f} MB, growth {rss_end - rss_after_warmup:+.1f} MB after warm-up; "
              f"load average {summary['loadavg_1m']} on {n_cores} cores", flush=True)
        print(json.dumps(summary))
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    main()
