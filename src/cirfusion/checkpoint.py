"""Checkpoints: a directory with ``model.safetensors`` + ``config.json``. No pickle anywhere.

``config.json`` records the method name, its hyper-parameters, the feature dimensions, the backbone id and
weights hash (features from another backbone would be silently wrong), and the dataset key it was trained on.
Loading rebuilds the method from the config and requires the stored tensors to match the model's parameters
exactly (names and shapes): a mismatch is a :class:`CheckpointError`, never a partial load.

Directories are written atomically: into a temporary sibling, then swapped in with renames
(:func:`cirfusion.io.atomic_directory`). A crash between the two renames leaves the previous version as
``.NAME.old.*``, which :func:`cirfusion.io.recover_directory` (called by every loader) puts back.

Untrusted checkpoints. Nothing from a checkpoint is trusted before it is checked: the safetensors header of
``model.safetensors`` (8-byte little-endian length, capped at ``MAX_HEADER_BYTES``, then JSON) is read and checked
against the file size (a truncated or foreign file is a :class:`CheckpointError` naming it), and the method is first
built on the ``meta`` device - shapes only, no memory - so sizes in ``config.json`` that disagree with the stored
tensors (a ``hidden_dim`` of 3,000,000) are refused before any real tensor is allocated. A backbone id read from a
checkpoint is confined separately (:func:`cirfusion.backbones.check_backbone_access`).

The training state (optimizer moments, RNG states) uses the same convention: tensors in safetensors, scalars in
JSON (:func:`optimizer_state_to_safe` / :func:`optimizer_state_from_safe`, :func:`rng_state` / :func:`set_rng_state`).
"""

from __future__ import annotations

import json
import os
import random
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .errors import CirfusionError
from .io import atomic_directory, recover_directory
from .methods.base import MethodDims
from .methods.registry import create_method

FORMAT = "cirfusion.checkpoint"
FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


# safetensors' own limit on the JSON header; a larger length field is a foreign or hostile file.
MAX_HEADER_BYTES = 100 << 20
# Bytes per element of the safetensors dtypes cirfusion may meet.
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


class CheckpointError(CirfusionError, ValueError):
    """A checkpoint that cannot be used as asked (missing files, wrong format, key or shape mismatch)."""


# ---- safetensors files, checked before they are trusted -----------------------------------------------------------
def read_safetensors_header(path: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``name -> (dtype, shape)`` of the tensors in a safetensors file, from its header alone (nothing allocated).

    Checks that the file is a complete safetensors file: header length within ``MAX_HEADER_BYTES`` and the file,
    header a JSON object, every tensor's byte range inside the data section and matching its dtype and shape, the
    data section exactly covered. Anything else is a :class:`CheckpointError` naming the file."""
    path = Path(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, truncated or empty)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or n > size - 8:
                raise CheckpointError(f"{path}: not a safetensors file (header length {n} does not fit the "
                                      f"{size}-byte file or exceeds {MAX_HEADER_BYTES}); truncated or not safetensors")
            raw = f.read(n)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise CheckpointError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (its header is not a JSON object)")
    data = size - 8 - n
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    ranges = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            ok = (dtype in _DTYPE_BYTES and all(isinstance(d, int) and d >= 0 for d in shape)
                  and isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= data)
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise CheckpointError(f"{path}: bad safetensors entry for tensor {name!r} ({json.dumps(info)[:200]}); "
                                  f"the file is truncated or corrupt ({data} data bytes)")
        numel = 1
        for d in shape:
            numel *= d
        if numel * _DTYPE_BYTES[dtype] != end - start:
            raise CheckpointError(f"{path}: tensor {name!r} {dtype}{list(shape)} needs {numel * _DTYPE_BYTES[dtype]} "
                                  f"bytes but its entry spans {end - start}; the file is corrupt")
        out[name] = (dtype, shape)
        ranges.append((start, end))
    covered = sum(e - s for s, e in ranges)
    if ranges and (covered != data or max(e for _, e in ranges) != data):
        raise CheckpointError(f"{path}: its tensors span {covered} bytes but the file holds {data} data bytes; "
                              "truncated or corrupt")
    return out


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (header checked first, see :func:`read_safetensors_header`)."""
    read_safetensors_header(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: cannot read the weights ({str(exc).strip()[:200]})") from None


def check_shapes(module: torch.nn.Module, stored: dict[str, tuple[str, tuple[int, ...]]], source: str | Path) -> None:
    """Stored tensor names and shapes (from the header) against ``module``'s state dict; works for a module built on
    the ``meta`` device, so a config asking for huge layers is refused before anything is allocated."""
    own = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    _mismatch(own, {k: shape for k, (_, shape) in stored.items()}, source)


def _mismatch(own: dict[str, tuple[int, ...]], stored: dict[str, tuple[int, ...]], source: str | Path) -> None:
    missing = sorted(set(own) - set(stored))
    unexpected = sorted(set(stored) - set(own))
    shapes = sorted(k for k in set(own) & set(stored) if own[k] != stored[k])
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:10]}{' ...' if len(missing) > 10 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
        if shapes:
            parts.append("shape mismatch " + ", ".join(f"{k}: stored {stored[k]} vs model {own[k]}" for k in shapes[:10]))
        raise CheckpointError(f"{source}: weights do not match the model: " + "; ".join(parts))


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
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc})") from exc
    except RecursionError:
        raise CheckpointError(f"{path}: invalid JSON (nested too deeply)") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a cirfusion checkpoint config (format {cfg.get('format') if isinstance(cfg, dict) else None!r})")
    version = cfg.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{path}: format_version must be an integer, got {json.dumps(version)[:50]}")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {cfg['format_version']} is newer than this cirfusion ({FORMAT_VERSION})")
    for key in ("method", "hparams", "dims"):
        if key not in cfg:
            raise CheckpointError(f"{path}: missing field {key!r}")
    if not isinstance(cfg["hparams"], dict) or not isinstance(cfg["dims"], dict) or not isinstance(cfg["method"], str):
        raise CheckpointError(f"{path}: 'method' must be a string and 'hparams', 'dims' objects")
    return cfg


def load_state_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> None:
    """Load ``state`` into ``module``; any missing/unexpected key or shape mismatch raises before anything is
    copied."""
    _mismatch({k: tuple(v.shape) for k, v in module.state_dict().items()},
              {k: tuple(v.shape) for k, v in state.items()}, source)
    module.load_state_dict(state, strict=True)


def _build(directory: Path, cfg: dict[str, Any]) -> Any:
    try:
        dims = MethodDims.from_dict(cfg["dims"])
        return create_method(cfg["method"], dims, **cfg["hparams"])
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{directory}: cannot rebuild method {cfg.get('method')!r}: {exc}") from exc


def _components(method: Any) -> list[tuple[str, torch.nn.Module]]:
    """A composite method's (DAFM's) base models with their sub-directories (it saves them there)."""
    dirs, bases = getattr(method, "component_dirs", None), getattr(method, "bases", None)
    if not callable(dirs) or bases is None:
        return []
    return list(zip(dirs(), bases, strict=False))


def check_sizes(directory: str | Path, cfg: dict[str, Any] | None = None) -> None:
    """Build the method ``config.json`` describes on the ``meta`` device (no memory) and check its tensors' names and
    shapes - and those of a composite's base models - against the safetensors headers of the stored weights."""
    directory = Path(directory)
    cfg = read_config(directory) if cfg is None else cfg
    weights = directory / MODEL_FILE
    if not weights.is_file():
        raise CheckpointError(f"{directory}: missing {MODEL_FILE}")
    stored = read_safetensors_header(weights)
    with torch.device("meta"):  # why: sizes come from an untrusted config; shapes are all we need
        meta_method = _build(directory, cfg)
    check_shapes(meta_method, stored, weights)
    for sub, base in _components(meta_method):
        sub_weights = directory / sub / MODEL_FILE
        if sub_weights.is_file():  # a missing one is reported by the method's own load_components
            check_shapes(base, read_safetensors_header(sub_weights), sub_weights)


def load_checkpoint(directory: str | Path) -> Any:
    """Rebuild the method saved in ``directory`` (in eval mode). Sizes are checked against the weights files before
    anything is allocated (:func:`check_sizes`)."""
    directory = Path(directory)
    cfg = read_config(directory)
    check_sizes(directory, cfg)
    weights = directory / MODEL_FILE
    method = _build(directory, cfg)
    load_components = getattr(method, "load_components", None)
    if callable(load_components):  # a composite method (DAFM) loads its base checkpoints from sub-directories
        load_components(directory)
    load_state_strict(method, load_weights(weights), weights)
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
    np_state: Any = np.random.get_state()  # the legacy tuple (numpy's stubs also allow a dict)
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
