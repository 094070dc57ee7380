"""Checkpoints: a directory with ``model.safetensors`` + ``config.json``. No pickle anywhere.

``config.json`` records the method name, its hyper-parameters, the feature dimensions, the backbone id and
weights hash (features from another backbone would be silently wrong), and the dataset key it was trained on.
Loading rebuilds the method from the config and requires the stored tensors to match the model's parameters
exactly (names and shapes): a mismatch is a :class:`CheckpointError`, never a partial load.

Directories are written atomically: into a temporary sibling, then swapped in with renames
(:func:`cirfusion.io.atomic_directory`). A crash between the two renames leaves the previous version as
``.NAME.old.*``, which :func:`cirfusion.io.recover_directory` (called by every loader) puts back.

The training state (optimizer moments, RNG states) uses the same convention: tensors in safetensors, scalars in
JSON (:func:`optimizer_state_to_safe` / :func:`optimizer_state_from_safe`, :func:`rng_state` / :func:`set_rng_state`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from . import __version__
from .errors import CirfusionError
from .io import atomic_directory, recover_directory

FORMAT = "cirfusion.checkpoint"
FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class CheckpointError(CirfusionError, ValueError):
    """A checkpoint that cannot be used as asked (missing files, wrong format, key or shape mismatch)."""


# ---- model checkpoints --------------------------------------------------------------------------------------------
def _state_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    # clone: safetensors refuses shared or non-contiguous storage
    return {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}


def checkpoint_config(method: Any, dataset: str | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    cfg = method.config()
    dims = cfg["dims"]
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": cfg["method"],
        "hparams": cfg["hparams"],
        "dims": dims,
        "backbone": {
            "id": dims.get("backbone_id", ""),
            "weights_hash": dims.get("weights_hash", ""),
            "preprocess_id": dims.get("preprocess_id", ""),
        },
        "dataset": dataset,
        "cirfusion_version": __version__,
        "num_parameters": int(sum(p.numel() for p in method.parameters())),
        "extra": dict(extra or {}),
    }


def write_checkpoint_files(method: Any, directory: Path, dataset: str | None = None, extra: dict[str, Any] | None = None) -> None:
    """Write the two checkpoint files into an existing (temporary) directory, non-atomically."""
    cfg = checkpoint_config(method, dataset, extra)
    json.dumps(cfg)  # fail before writing anything if a hyper-parameter is not JSON-serialisable
    save_file(_state_tensors(method), str(directory / MODEL_FILE), metadata={"format": FORMAT})
    (directory / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    # A composite method (DAFM score fusion) writes its components (the base checkpoints) into sub-directories.
    save_components = getattr(method, "save_components", None)
    if callable(save_components):
        save_components(directory)


def save_checkpoint(method: Any, directory: str | Path, dataset: str | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Save ``method`` (a :class:`~cirfusion.methods.CIRMethod`) to ``directory`` atomically; returns the path."""
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        write_checkpoint_files(method, tmp, dataset, extra)
    return directory


def read_config(directory: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a checkpoint, checked for format."""
    directory = Path(directory)
    recover_directory(directory)
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: not a cirfusion checkpoint (no {CONFIG_FILE})")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc})") from exc
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a cirfusion checkpoint config (format {cfg.get('format') if isinstance(cfg, dict) else None!r})")
    if int(cfg.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {cfg['format_version']} is newer than this cirfusion ({FORMAT_VERSION})")
    for key in ("method", "hparams", "dims"):
        if key not in cfg:
            raise CheckpointError(f"{path}: missing field {key!r}")
    return cfg


def load_state_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> None:
    """Load ``state`` into ``module``; any missing/unexpected key or shape mismatch raises before anything is
    copied."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:10]}{' ...' if len(missing) > 10 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
        if shapes:
            parts.append(
                "shape mismatch " + ", ".join(f"{k}: stored {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in shapes[:10])
            )
        raise CheckpointError(f"{source}: weights do not match the model: " + "; ".join(parts))
    module.load_state_dict(state, strict=True)


def load_checkpoint(directory: str | Path) -> Any:
    """Rebuild the method saved in ``directory`` (in eval mode)."""
    from .methods.base import MethodDims
    from .methods.registry import create_method

    directory = Path(directory)
    cfg = read_config(directory)
    weights = directory / MODEL_FILE
    if not weights.is_file():
        raise CheckpointError(f"{directory}: missing {MODEL_FILE}")
    try:
        dims = MethodDims.from_dict(cfg["dims"])
        method = create_method(cfg["method"], dims, **cfg["hparams"])
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{directory}: cannot rebuild method {cfg.get('method')!r}: {exc}") from exc
    load_components = getattr(method, "load_components", None)
    if callable(load_components):  # a composite method (DAFM) loads its base checkpoints from sub-directories
        load_components(directory)
    load_state_strict(method, load_file(str(weights)), weights)
    method.eval()
    return method


# ---- training state -----------------------------------------------------------------------------------------------
def optimizer_state_to_safe(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``opt.state_dict()`` into tensors (for safetensors) and JSON scalars."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{idx}.{k}"] = v.detach().cpu().contiguous().clone()
            else:
                scalars[f"{idx}.{k}"] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_state_from_safe(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = v
    for key, v in meta.get("scalars", {}).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """torch / numpy / python global RNG states as (tensors, JSON)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return (
        {"torch": torch.get_rng_state().clone()},
        {
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": [py_state[0], list(py_state[1]), py_state[2]],
        },
    )


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    n = meta["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = meta["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
