"""Feature cache under interruption (issue 8): progress saved at least every ~30 s, SIGTERM treated like Ctrl-C,
orphan temporary files of dead writers removed, a damaged shard rebuilt with a warning."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cirfusion.feature_store as store_mod
from cirfusion.backbones import create_backbone
from cirfusion.features import FeatureCache, FeatureCacheWarning

SRC = str(Path(__file__).resolve().parents[1] / "src")

# A slow tiny backbone in a child process: prints one line per encoded batch, so the parent knows how far it got.
CHILD = r"""
import sys, time
from pathlib import Path
from cirfusion.backbones import create_backbone
from cirfusion.features import FeatureCache
bb = create_backbone("tiny")
enc = bb.encode_image
def slow(pixels):
    out = enc(pixels)
    print("encoded", len(pixels), flush=True)
    time.sleep(0.3)
    return out
bb.encode_image = slow
paths = sorted(Path(sys.argv[1]).glob("*.png"))
FeatureCache(bb, sys.argv[2], batch_size=2, flush_seconds=float(sys.argv[3])).image_features(
    [p.stem for p in paths], paths, progress=False)
print("done", flush=True)
"""


def write_pngs(d: Path, n: int) -> list[Path]:
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        p = d / f"im{i:03d}.png"
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(p)
        out.append(p)
    return out


def cached_rows(cache_dir: Path) -> int:
    store = FeatureCache(create_backbone("tiny"), cache_dir)._images()
    return len(store.lookup)


def run_child_until(tmp_path: Path, flush_seconds: float, batches: int, sig: int) -> subprocess.CompletedProcess[str]:
    write_pngs(tmp_path / "img", 40)
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "img"), str(tmp_path / "cache"), str(flush_seconds)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    seen = 0
    assert proc.stdout is not None
    for line in proc.stdout:
        seen += line.startswith("encoded")
        if seen >= batches:
            proc.send_signal(sig)
            break
    out, err = proc.communicate(timeout=60)
    assert "done" not in out, "the child finished before it was interrupted"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_sigterm_keeps_the_rows_computed(tmp_path: Path) -> None:
    """Before: a SIGTERM after 1,280 of 3,068 images kept 0 rows. Now the computed rows are committed."""
    res = run_child_until(tmp_path, flush_seconds=3600, batches=4, sig=signal.SIGTERM)
    assert res.returncode != 0 and "KeyboardInterrupt" in res.stderr and "SIGTERM" in res.stderr
    assert cached_rows(tmp_path / "cache") >= 6  # batches 1-3 done; the signal lands while batch 4 is encoding
    assert not any(p.name.startswith(".") for p in (tmp_path / "cache").rglob("*"))  # no temporary files left


def test_progress_is_flushed_periodically_even_if_killed(tmp_path: Path) -> None:
    """kill -9 runs no clean-up at all: only the periodic flush saves work (here every batch: flush_seconds=0)."""
    run_child_until(tmp_path, flush_seconds=0.0, batches=4, sig=signal.SIGKILL)
    assert cached_rows(tmp_path / "cache") >= 6  # batches 1-3 were committed before batch 4 was encoded


def test_flush_interval_bounds_lost_work_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = write_pngs(tmp_path / "img", 12)
    bb = create_backbone("tiny")
    enc = bb.encode_image
    calls = []

    def failing(pixels):  # type: ignore[no-untyped-def]
        calls.append(len(pixels))
        if len(calls) == 4:
            raise RuntimeError("boom")
        return enc(pixels)

    bb.encode_image = failing  # type: ignore[method-assign]
    commits: list[int] = []
    real_write = store_mod.ShardStore.write
    monkeypatch.setattr(store_mod.ShardStore, "write", lambda self, keys, arrays: (commits.append(len(keys)), real_write(self, keys, arrays)))
    with pytest.raises(RuntimeError, match="boom"):
        FeatureCache(bb, tmp_path / "cache", batch_size=2, flush_seconds=0).image_features(
            [p.stem for p in paths], paths, progress=False)
    assert commits == [2, 2, 2]  # one shard per batch (the interval elapsed), not one at the end
    # the default interval is ~30 s
    assert FeatureCache(bb, tmp_path / "c2").flush_seconds == 30.0


def test_signal_handlers_are_restored(tmp_path: Path) -> None:
    paths = write_pngs(tmp_path / "img", 3)
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    FeatureCache(create_backbone("tiny"), tmp_path / "cache").image_features([p.stem for p in paths], paths, progress=False)
    FeatureCache(create_backbone("tiny"), tmp_path / "cache").text_features(["a", "b"], progress=False)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_orphans_of_dead_writers_are_removed(tmp_path: Path) -> None:
    paths = write_pngs(tmp_path / "img", 4)
    cache = FeatureCache(create_backbone("tiny"), tmp_path / "cache")
    cache.image_features([p.stem for p in paths], paths, progress=False)
    shards = cache.image_dir / "shards"
    committed = sorted(p.name for p in shards.iterdir())
    host = store_mod._HOST
    dead = f"{time.time_ns():016x}-{host}-{dead_pid()}-abcdef"
    live = f"{time.time_ns():016x}-{host}-{os.getpid()}-abcdef"
    legacy = f"{time.time_ns():016x}-{dead_pid()}-abcdef"  # old name format: the writer cannot be checked
    orphans = [shards / f".{dead}.global.npy.x1y2.tmp", shards / f"{dead}.global.npy", shards / f"{dead}.tokens.npy"]
    keep = [shards / f".{live}.global.npy.x1y2.tmp", shards / f".{legacy}.tokens.npy.tmp-1-ab"]
    old_legacy = shards / f".{legacy}.global.npy.tmp-1-cd"
    for p in [*orphans, *keep, old_legacy]:
        p.write_bytes(b"partial")
    os.utime(old_legacy, (time.time() - 2 * store_mod.ORPHAN_AGE_S,) * 2)
    FeatureCache(create_backbone("tiny"), tmp_path / "cache").image_features([p.stem for p in paths], paths, progress=False)
    assert not any(p.exists() for p in [*orphans, old_legacy])
    assert all(p.exists() for p in keep)  # a live writer's file, and an unverifiable fresh one, are left alone
    assert sorted(p.name for p in shards.iterdir() if p not in keep) == committed


def test_torn_key_list_is_rebuilt_with_a_warning(tmp_path: Path) -> None:
    cache = FeatureCache(create_backbone("tiny"), tmp_path / "cache")
    ref = np.array(cache.text_features(["make it red", "add a hat"], progress=False).global_)
    keys = next((cache.text_dir / "shards").glob("*.keys.json"))
    keys.write_text(keys.read_text()[:20])
    with pytest.warns(FeatureCacheWarning, match=keys.name):
        got = FeatureCache(create_backbone("tiny"), tmp_path / "cache").text_features(["make it red", "add a hat"], progress=False)
    np.testing.assert_array_equal(np.asarray(got.global_), ref)
    assert json.loads(next((cache.text_dir / "shards").glob("*.keys.json")).read_text())
