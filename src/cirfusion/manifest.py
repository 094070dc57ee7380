"""Run manifests: everything needed to know what produced a run directory.

``manifest.json`` holds the training configuration, the seed, the method and its hyper-parameters, the backbone
id and weights hash, the sha256 of every annotation file read, the code version (package version plus the git
commit when cirfusion runs from a checkout) and the Python / torch / numpy versions.
"""

from __future__ import annotations

import platform
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy
import torch

from . import __version__
from .io import atomic_write_json

MANIFEST_FILE = "manifest.json"


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "--no-optional-locks", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def code_version() -> dict[str, Any]:
    """``{"cirfusion": version, "git_commit": sha or None, "git_dirty": bool or None}``.

    The commit is reported only when the package itself lives in a cirfusion checkout (not when an installed copy
    happens to sit inside some other repository)."""
    pkg = Path(__file__).resolve().parent
    info: dict[str, Any] = {"cirfusion": __version__, "git_commit": None, "git_dirty": None}
    top = _git(["rev-parse", "--show-toplevel"], pkg)
    if not top:
        return info
    pyproject = Path(top) / "pyproject.toml"
    try:
        is_ours = pyproject.is_file() and 'name = "cirfusion"' in pyproject.read_text(encoding="utf-8")
    except OSError:
        is_ours = False
    if not is_ours:
        return info
    info["git_commit"] = _git(["rev-parse", "HEAD"], pkg)
    status = _git(["status", "--porcelain", "--untracked-files=no"], pkg)
    info["git_dirty"] = None if status is None else bool(status)
    return info


def environment() -> dict[str, Any]:
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "num_threads": torch.get_num_threads(),
    }


def dataset_record(dataset: Any) -> dict[str, Any]:
    """Key, sizes and annotation-file hashes of a :class:`~cirfusion.data.schema.CIRDataset`."""
    return {
        "key": dataset.key,
        "name": dataset.name,
        "split": dataset.split,
        "category": dataset.category,
        "root": None if dataset.root is None else str(dataset.root),
        "num_queries": len(dataset.queries),
        "num_gallery": len(dataset.gallery),
        "files": dataset.files_digest(),
    }


def build_manifest(
    config: Mapping[str, Any],
    seed: int,
    method: Mapping[str, Any],
    backbone: Mapping[str, Any],
    datasets: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the manifest. ``method`` is ``CIRMethod.config()``; ``backbone`` holds at least ``id`` and
    ``weights_hash``; ``datasets`` maps a role ("train", "val", ...) to a ``CIRDataset``."""
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": list(sys.argv),
        "seed": int(seed),
        "config": dict(config),
        "method": {"name": method["method"], "hparams": dict(method["hparams"])},
        "dims": dict(method.get("dims", {})),
        "backbone": dict(backbone),
        "datasets": {role: dataset_record(ds) for role, ds in datasets.items()},
        "code": code_version(),
        "environment": environment(),
        **({"extra": dict(extra)} if extra else {}),
    }


def write_manifest(run_dir: str | Path, manifest: Mapping[str, Any]) -> Path:
    path = Path(run_dir) / MANIFEST_FILE
    atomic_write_json(path, dict(manifest))
    return path
