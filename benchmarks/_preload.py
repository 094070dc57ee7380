"""Split data that a benchmark's main process loads once and its forked workers share (copy-on-write), instead of
each training run loading its own copy (~40 s and a few GB each on the synthetic benchmark).

Used by ``detailfusion_ablation.py`` and ``finecir_ablation.py`` (run as scripts, so this folder is on the path).
Load everything before the worker pool forks; a worker that finds no entry loads the split itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_PRELOADED: dict[tuple[str, str, str, str], Any] = {}


def _key(dataset: str, root: Path | str, split: str, options: dict[str, Any]) -> tuple[str, str, str, str]:
    return dataset, str(Path(root).resolve()), split, json.dumps(options, sort_keys=True)


def preload(dataset: str, root: Path | str, split: str, options: dict[str, Any], data: Any) -> Any:
    """Keep ``data`` (a split's ``SplitData``) for the workers; returns it."""
    _PRELOADED[_key(dataset, root, split, options)] = data
    return data


def preloaded(dataset: str, root: Path | str, split: str, options: dict[str, Any]) -> Any | None:
    """The split kept by :func:`preload` in this process (or the parent it forked from), or None."""
    return _PRELOADED.get(_key(dataset, root, split, options))
