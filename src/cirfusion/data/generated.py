"""What the two generated benchmarks (``synthetic`` and ``catalog``) share.

- Edit pairs: the ``EditPair`` record (source image, one-edit instruction, edited image) and the reader of
  ``edit_pairs.{split}.jsonl``, which checks every row the same way for both benchmarks.
- JSON and JSONL writing with the exact bytes each benchmark has always written (its files are pinned by hash),
  through ``cirfusion.io``'s atomic writer.
- The benchmark manifest: reading it with an error that names the file, and recognising a directory as a
  previous output of a given command, so that ``--overwrite`` replaces only that command's own output and never
  a folder that merely happens to be at ``--out``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from ..io import atomic_write_text
from ._jsonio import read_jsonl
from .schema import DataError

EDIT_PAIR_FIELDS = ("source", "instruction", "edited", "kind")


@dataclass(frozen=True)
class EditPair:
    """An image-editing example: the ``source`` image, a one-edit ``instruction``, the ``edited`` image.

    ``params`` (the edit's parameters) and ``instructions`` (every wording of it) are filled by the catalog,
    whose edits are parametric and worded several ways; the synthetic benchmark leaves them empty.
    """

    source: str
    instruction: str
    edited: str
    kind: str
    source_path: Path
    edited_path: Path
    params: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    instructions: tuple[str, ...] = ()


def read_edit_pairs(path: Path, kinds: Sequence[str], resolve: Callable[[dict[str, Any], str, str], Path],
                    rows: Iterable[tuple[int, dict[str, Any]]] | None = None) -> list[EditPair]:
    """The edit pairs of ``path`` (one JSON object per line).

    ``resolve(row, "source" | "edited", entry)`` gives the image file of one side of a pair (or raises a
    ``DataError``); ``kinds`` are the edit kinds the benchmark knows; ``rows`` are the already parsed
    ``(line number, object)`` pairs when the caller checked the file itself (the catalog checks its hash).
    """
    out = []
    for n, d in read_jsonl(path) if rows is None else rows:
        entry = f"line {n}"
        for k in EDIT_PAIR_FIELDS:
            if not isinstance(d.get(k), str):
                raise DataError(path, entry, f"missing or non-string field {k!r}")
        if d["kind"] not in kinds:
            raise DataError(path, entry, f"unknown edit kind {d['kind']!r}")
        params = d.get("params", {})
        if not isinstance(params, dict):
            raise DataError(path, entry, f"field 'params' must be an object, got {type(params).__name__}")
        out.append(EditPair(
            source=d["source"],
            instruction=d["instruction"],
            edited=d["edited"],
            kind=d["kind"],
            source_path=resolve(d, "source", entry),
            edited_path=resolve(d, "edited", entry),
            params=dict(params),
            instructions=tuple(str(x) for x in d.get("instructions", ())),
        ))  # fmt: skip
    return out


def write_json(path: Path, obj: Any, *, ensure_ascii: bool = False, final_newline: bool = True) -> None:
    """``obj`` as indented JSON (indent 1), written atomically."""
    atomic_write_text(path, json.dumps(obj, indent=1, ensure_ascii=ensure_ascii) + ("\n" if final_newline else ""))


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]], *, sort_keys: bool = False) -> None:
    """One JSON object per line (UTF-8, not ASCII-escaped), written atomically."""
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=sort_keys, ensure_ascii=False) + "\n" for r in rows))


def read_manifest(path: Path, missing: str) -> dict[str, Any]:
    """The JSON object in ``path``; ``missing`` is the problem reported when the file is not there."""
    if not path.is_file():
        raise DataError(path, None, missing)
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(path, None, f"invalid JSON: {exc}") from exc
    if not isinstance(m, dict):
        raise DataError(path, None, f"expected a JSON object, got {type(m).__name__}")
    return m


@dataclass(frozen=True)
class OutputKind:
    """How to recognise a directory written by one command: its ``manifest.json`` has ``key == value``, and
    every entry of the directory matches one of ``patterns`` (so nothing of the user's would be lost)."""

    command: str  # e.g. "make-synthetic", in messages
    key: str
    value: Any
    patterns: tuple[str, ...]

    def check_replaceable(self, directory: Path) -> None:
        """Refuse (``DataError`` naming ``directory``) unless it is absent, empty or a previous output of the
        command and nothing else."""
        if not directory.exists():
            return
        if not directory.is_dir():
            raise DataError(directory, None, f"refusing to replace it: it is a file, not a {self.command} output")
        entries = sorted(p.name for p in directory.iterdir())
        if not entries:
            return
        try:
            m = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            m = None
        if not isinstance(m, dict) or m.get(self.key) != self.value:
            raise DataError(directory, None, f"refusing to replace it: it does not look like a {self.command} output "
                                             f"(no manifest.json with {self.key} {self.value!r}); choose another "
                                             "output directory or remove it yourself")  # fmt: skip
        foreign = [n for n in entries if not any(fnmatch(n, pat) for pat in self.patterns)]
        if foreign:
            shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
            raise DataError(directory, None, f"refusing to replace it: besides a {self.command} output it holds "
                                             f"{shown}; move those away or choose another output directory")  # fmt: skip


__all__ = ["EDIT_PAIR_FIELDS", "EditPair", "OutputKind", "read_edit_pairs", "read_manifest", "write_json", "write_jsonl"]
