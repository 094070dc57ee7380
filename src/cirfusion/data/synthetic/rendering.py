"""Synthetic benchmark, rendering: an image spec (pixel geometry of every object, background) from a scene, Pillow
drawing of a spec to a PNG, and the renderer that does it inline or in worker processes while the texts are
written.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from .scenes import COLOURS, GRID, Scene, _Cluster

# Object radius as a fraction of the grid cell. Large objects fill most of a cell, small ones about a third of
# its area, so size is visible at 128 px.
_RADIUS = {"small": 0.21, "large": 0.36}
_JITTER_FRAC = 0.07  # centre jitter, fraction of a cell (about +-3 px at 128 px)
_ROT_JITTER = 8  # degrees, polygons only (a square never becomes a diamond)
_PNG_LEVEL = 6  # fixed, so files are byte-identical across runs
_SUPERSAMPLE = 2  # draw at 2x and box-downsample: anti-aliased edges, pure colour inside


def _polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    if shape == "square":
        pts = [(math.cos(a), math.sin(a)) for a in (math.pi / 4 + k * math.pi / 2 for k in range(4))]
        pts = [(1.2 * x, 1.2 * y) for x, y in pts]
    elif shape == "triangle":
        pts = [(1.25 * math.cos(a), 1.25 * math.sin(a)) for a in (-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))]
    elif shape == "diamond":
        pts = [(0.0, -1.25), (0.85, 0.0), (0.0, 1.25), (-0.85, 0.0)]
    elif shape == "star":
        pts = []
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5
            rr = 1.25 if k % 2 == 0 else 0.52
            pts.append((rr * math.cos(a), rr * math.sin(a)))
    elif shape == "cross":
        w, L = 0.38, 1.1
        pts = [(-w, -L), (w, -L), (w, -w), (L, -w), (L, w), (w, w), (w, L), (-w, L), (-w, w), (-L, w), (-L, -w), (-w, -w)]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    t = math.radians(rot)
    ct, st = math.cos(t), math.sin(t)
    return [(cx + r * (x * ct - y * st), cy + r * (x * st + y * ct)) for x, y in pts]


def shape_extent(shape: str) -> float:
    """Largest distance from the centre to the shape's outline, in units of its radius (any rotation)."""
    if shape == "circle":
        return 1.0
    return max(math.hypot(x, y) for x, y in _polygon(shape, 0.0, 0.0, 1.0, 0.0))


def render_scene(spec: dict[str, Any]) -> Image.Image:
    """Render one image from its spec (as stored in ``scenes.{split}.jsonl``: ``size``, ``background``,
    ``gradient`` [angle degrees, amplitude], ``objects`` with ``shape``, ``colour``, ``center``, ``radius``,
    ``rotation``)."""
    size = int(spec["size"])
    s = _SUPERSAMPLE
    S = size * s
    angle, amp = spec["gradient"]
    t = math.radians(angle)
    # A linear gradient survives bilinear upsampling, so build it at 9x9 and let Pillow scale it (4x faster).
    ramp = (np.arange(9, dtype=np.float32) / 8.0 - 0.5) * 2.0
    field = math.cos(t) * ramp[None, :] + math.sin(t) * ramp[:, None]  # in [-2, 2]
    bg = np.asarray(spec["background"], dtype=np.float32)
    small = np.clip(np.rint(bg[None, None, :] + (amp / 2.0) * field[:, :, None]), 0, 255).astype(np.uint8)
    im = Image.fromarray(small, "RGB").resize((S, S), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(im)
    for o in spec["objects"]:
        cx, cy = o["center"]
        cx, cy, r = (cx + 0.5) * s, (cy + 0.5) * s, o["radius"] * s  # pixel centres
        fill = COLOURS[o["colour"]]
        if o["shape"] == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon(_polygon(o["shape"], cx, cy, r, o["rotation"]), fill=fill)
    return im.reduce(s)


def _image_spec(scene: Scene, cluster: _Cluster, size: int, rng: random.Random) -> dict[str, Any]:
    cell = size / GRID
    jit = max(1, round(_JITTER_FRAC * cell))
    objects = []
    for o in sorted(scene.values(), key=lambda o: (o.row, o.col)):
        radius = round(min(_RADIUS[o.size] * cell * rng.uniform(0.95, 1.05), (cell / 2 - 1) / shape_extent(o.shape)), 2)
        # Jitter never pushes a shape out of its cell, so objects never touch and the grid cell is the truth.
        j = max(0, min(jit, int(cell / 2 - shape_extent(o.shape) * radius - 1)))
        cx = int((o.col + 0.5) * cell) + rng.randint(-j, j)
        cy = int((o.row + 0.5) * cell) + rng.randint(-j, j)
        rot = 0 if o.shape == "circle" else rng.randint(-_ROT_JITTER, _ROT_JITTER)
        objects.append({"shape": o.shape, "colour": o.colour, "size": o.size, "cell": [o.row, o.col],
                        "center": [cx, cy], "radius": radius, "rotation": rot})  # fmt: skip
    bg = [min(255, max(0, c + rng.randint(-6, 6))) for c in cluster.background]
    return {"size": size, "background": bg, "gradient": [rng.randint(0, 359), rng.randint(0, 14)], "objects": objects}


def _render_task(task: tuple[str, dict[str, Any]]) -> None:
    path, spec = task
    render_scene(spec).save(path, format="PNG", compress_level=_PNG_LEVEL)


class _Renderer:
    """Renders image specs to PNG files: inline (``workers == 1``) or in ``workers`` fresh interpreters
    (``python -m cirfusion.data.synthetic --render FILE``) running while the caller does other work.

    Plain subprocesses rather than multiprocessing: fork can deadlock a parent holding threads (torch,
    tokenizers), and spawn re-imports the caller's ``__main__``, which fails for stdin scripts and notebooks.
    """

    def __init__(self, tasks: list[tuple[str, dict[str, Any]]], workers: int, progress: bool) -> None:
        self.tasks = tasks
        self.workers = 1 if len(tasks) < 200 else workers
        self.bar = None
        if progress:
            self.bar = tqdm(total=len(tasks), desc="rendering", unit="img")
        self.procs: list[Any] = []
        self.threads: list[Any] = []
        self.errfiles: list[Any] = []
        self.tmpdir: Any = None

    def start(self) -> None:
        if self.workers == 1:
            return
        # The worker must import this very package, even when the caller put it on sys.path by hand.
        env = dict(os.environ)
        src = str(Path(__file__).resolve().parents[3])
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        lock = threading.Lock()

        def pump(stream: Any) -> None:
            for _ in stream:  # one line per rendered image: a progress tick
                if self.bar is not None:
                    with lock:
                        self.bar.update()

        self.tmpdir = tempfile.TemporaryDirectory(prefix="cirfusion-render-")
        td = Path(self.tmpdir.name)
        for k in range(self.workers):
            job = td / f"tasks-{k}.json"
            job.write_text(json.dumps(self.tasks[k :: self.workers]), encoding="utf-8")
            errf = open(td / f"stderr-{k}.txt", "w+", encoding="utf-8")
            self.errfiles.append(errf)
            p = subprocess.Popen([sys.executable, "-m", "cirfusion.data.synthetic", "--render", str(job)],
                                 stdout=subprocess.PIPE, stderr=errf, text=True, env=env)  # fmt: skip
            self.procs.append(p)
            th = threading.Thread(target=pump, args=(p.stdout,), daemon=True)
            th.start()
            self.threads.append(th)

    def finish(self) -> None:
        try:
            if self.workers == 1:
                for t in self.tasks:
                    _render_task(t)
                    if self.bar is not None:
                        self.bar.update()
                return
            errors = []
            for k, (p, th) in enumerate(zip(self.procs, self.threads, strict=False)):
                rc = p.wait()
                th.join()
                if rc != 0:
                    self.errfiles[k].seek(0)
                    errors.append(f"render worker {k} failed (exit {rc}): {self.errfiles[k].read().strip()[-2000:]}")
            if errors:
                raise RuntimeError("; ".join(errors))
        finally:
            self._close()

    def kill(self) -> None:
        """Interrupted: never leave orphan renderers behind."""
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        self._close()

    def _close(self) -> None:
        for f in self.errfiles:
            f.close()
        self.errfiles = []
        if self.tmpdir is not None:
            self.tmpdir.cleanup()
            self.tmpdir = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _render_main(job: str) -> int:
    tasks = json.loads(Path(job).read_text(encoding="utf-8"))
    for path, spec in tasks:
        try:
            _render_task((path, spec))
        except Exception as exc:  # report the image, not a traceback into runpy
            print(f"{path}: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        print(1, flush=True)
    return 0
