"""Shared helpers for the annotation loaders: read JSON/JSONL/text-list files and typed fields, raising
:class:`DataError` that names the file, the entry and the problem.

Nothing here opens an image: loaders only read annotation files, so ``data stats`` works without images.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .schema import DataError

# ---------------------------------------------------------------------------------------------- files


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.load keeps the last of two equal keys without a word; in an id -> path map that hides a duplicate id.
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def require_file(path: Path, what: str = "annotation file") -> Path:
    if not path.is_file():
        raise DataError(path, None, f"{what} not found")
    return path


def read_json(path: Path, what: str = "annotation file") -> Any:
    """Parse a whole JSON file. Invalid JSON and duplicate object keys are :class:`DataError`."""
    require_file(path, what)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(path, f"byte {exc.start}", f"not UTF-8 text ({exc.reason})") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as exc:
        raise DataError(path, f"line {exc.lineno}", f"invalid JSON: {exc.msg} (column {exc.colno})") from exc
    except _DuplicateKey as exc:
        raise DataError(path, exc.key, "duplicate key in a JSON object (duplicate id?)") from None
    except RecursionError:
        raise DataError(path, None, "JSON nested too deeply to read (arrays or objects inside each other "
                        "thousands of levels deep)") from None


def read_jsonl(path: Path, what: str = "annotation file") -> list[tuple[int, dict[str, Any]]]:
    """Parse a JSON-lines file into ``(line number, object)`` pairs; blank lines are allowed and skipped.

    Every non-blank line must be one JSON object; the error names the 1-based line number.
    """
    require_file(path, what)
    out: list[tuple[int, dict[str, Any]]] = []
    for lineno, line in _text_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line, object_pairs_hook=_no_duplicate_keys)
        except json.JSONDecodeError as exc:
            raise DataError(path, f"line {lineno}", f"invalid JSON: {exc.msg} (column {exc.colno})") from exc
        except _DuplicateKey as exc:
            raise DataError(path, f"line {lineno}", f"duplicate key {exc.key!r} in the JSON object") from None
        except RecursionError:
            raise DataError(path, f"line {lineno}", "JSON nested too deeply to read") from None
        if not isinstance(obj, dict):
            raise DataError(path, f"line {lineno}", f"expected a JSON object, got {type(obj).__name__}")
        out.append((lineno, obj))
    return out


def _text_lines(path: Path) -> Iterable[tuple[int, str]]:
    """``(1-based line number, text)``; bytes that are not UTF-8 are an error naming the line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                yield lineno, raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(path, f"line {lineno}", f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def read_name_list(path: Path, what: str = "image list") -> list[str]:
    """One name per line (surrounding whitespace and blank lines ignored); a repeated name is an error."""
    require_file(path, what)
    names: list[str] = []
    seen: dict[str, int] = {}
    for lineno, line in _text_lines(path):
        name = line.strip()
        if not name:
            continue
        if name in seen:
            raise DataError(path, f"line {lineno}", f"duplicate name {name!r} (first on line {seen[name]})")
        seen[name] = lineno
        names.append(name)
    return names


def expect_list(data: Any, path: Path) -> list[Any]:
    if not isinstance(data, list):
        raise DataError(path, None, f"expected a JSON list at the top level, got {type(data).__name__}")
    return data


def expect_object(data: Any, path: Path, entry: Any = None, what: str = "value") -> dict[str, Any]:
    if not isinstance(data, dict):
        raise DataError(path, entry, f"expected {what} to be a JSON object, got {type(data).__name__}")
    return data


def find_file(candidates: Iterable[Path], what: str) -> Path:
    """The first existing file among ``candidates``; the error lists every place looked at."""
    cands = list(candidates)
    for c in cands:
        if c.is_file():
            return c
    raise DataError(cands[0] if cands else None, None, f"{what} not found (looked at: {', '.join(str(c) for c in cands)})")


# ---------------------------------------------------------------------------------------------- fields


def entry_name(index: int, **ids: Any) -> str:
    """How an error names a list entry: ``#12 (pairid 12060)``."""
    extra = ", ".join(f"{k} {v}" for k, v in ids.items() if v is not None)
    return f"#{index}" + (f" ({extra})" if extra else "")


def get_field(obj: dict[str, Any], key: str, path: Path, entry: Any, *, optional: bool = False) -> Any:
    if key not in obj:
        if optional:
            return None
        raise DataError(path, entry, f"missing field {key!r}")
    return obj[key]


def str_field(obj: dict[str, Any], key: str, path: Path, entry: Any, *, optional: bool = False) -> str | None:
    v = get_field(obj, key, path, entry, optional=optional)
    if v is None and optional:
        return None
    if not isinstance(v, str):
        raise DataError(path, entry, f"field {key!r} must be a string, got {type(v).__name__}")
    return v


def id_value(v: Any, key: str, path: Path, entry: Any) -> str:
    """An image or query id: a non-empty string, or an integer (kept as its decimal string)."""
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise DataError(path, entry, f"field {key!r} must be a string or integer id, got {type(v).__name__}")
    s = str(v)
    if not s.strip():
        raise DataError(path, entry, f"field {key!r} is an empty id")
    return s


def id_field(obj: dict[str, Any], key: str, path: Path, entry: Any, *, optional: bool = False) -> str | None:
    v = get_field(obj, key, path, entry, optional=optional)
    if v is None and optional:
        return None
    return id_value(v, key, path, entry)


def int_field(obj: dict[str, Any], key: str, path: Path, entry: Any, *, optional: bool = False) -> int | None:
    v = get_field(obj, key, path, entry, optional=optional)
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise DataError(path, entry, f"field {key!r} must be an integer, got {type(v).__name__}")
    return v


def id_list_field(obj: dict[str, Any], key: str, path: Path, entry: Any, *, optional: bool = False,
                  allow_empty: bool = False) -> list[str] | None:
    """A list of ids without repeats."""
    v = get_field(obj, key, path, entry, optional=optional)
    if v is None and optional:
        return None
    if not isinstance(v, list):
        raise DataError(path, entry, f"field {key!r} must be a list, got {type(v).__name__}")
    if not v and not allow_empty:
        raise DataError(path, entry, f"field {key!r} is an empty list")
    ids = [id_value(x, key, path, entry) for x in v]
    seen: set[str] = set()
    for i in ids:
        if i in seen:
            raise DataError(path, entry, f"field {key!r} repeats id {i!r}")
        seen.add(i)
    return ids


def str_list_field(obj: dict[str, Any], key: str, path: Path, entry: Any, *, optional: bool = False) -> list[str] | None:
    v = get_field(obj, key, path, entry, optional=optional)
    if v is None and optional:
        return None
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise DataError(path, entry, f"field {key!r} must be a list of strings")
    return list(v)


# ---------------------------------------------------------------------------------------------- paths


def resolve_dir(root: Path, d: str | Path) -> Path:
    """``d`` as given when absolute, else relative to ``root``."""
    p = Path(d)
    return p if p.is_absolute() else root / p


def safe_relpath(base: Path, rel: str, path: Path, entry: Any) -> Path:
    """One image path checked and joined; see :class:`ImagePaths` (use one of those for a whole gallery)."""
    return ImagePaths(base, path).join(rel, entry)


class ImagePaths:
    """Joins the relative image paths of one annotation file (``source``) onto ``base``, the dataset's image
    folder: the one place where image paths are checked.

    Absolute paths and ``..`` are refused, and so is a symlink inside ``base`` whose target lies outside it, so an
    annotation file cannot point outside its dataset folder. Links at or above ``base`` itself are the user's own
    layout and are followed. A missing file is fine here, as loaders do not need images; a dangling link or a
    loop is reported by data.images.load_image when the image is opened.

    Cost: one ``lstat`` per image; each folder is checked once per object (one loader call), so CIRCO's 123k
    paths stay cheap and a link changed between two loads is seen by the next one.
    """

    def __init__(self, base: Path, source: Path | None) -> None:
        self.base = Path(base)
        self.source = source
        self._base = str(base)
        self._real_base: str | None = None
        self._dirs: dict[str, str | None] = {}  # folder below base -> where it leads when that is outside

    def join(self, rel: str, entry: Any) -> Path:
        if not isinstance(rel, str) or not rel.strip():
            raise DataError(self.source, entry, f"image path must be a non-empty string, got {rel!r}")
        r = rel.replace("\\", "/")
        parts = [p for p in r.split("/") if p not in ("", ".")]
        if r.startswith("/") or _DRIVE.match(r) or ".." in parts:
            raise DataError(self.source, entry, f"image path {rel!r} must be relative and stay inside the dataset folder")
        # one string join and one Path parse: galleries reach 10^5 images (CIRCO) and pathlib is slow per call
        joined = os.path.join(self._base, *parts)
        outside = self._leaves(joined, parts)
        if outside is not None:
            raise DataError(self.source, entry, f"image path {rel!r} is a symlink to {outside}, outside the dataset "
                            f"folder {self.base}; links may not leave it (point the image folder itself at the real "
                            "location instead)")
        return Path(joined)

    def _leaves(self, joined: str, parts: list[str]) -> str | None:
        """Where ``joined`` really leads when a symlink below ``base`` takes it outside ``base``, else None."""
        for i in range(1, len(parts)):
            d = "/".join(parts[:i])
            if d not in self._dirs:
                self._dirs[d] = self._outside(os.path.join(self._base, d))
            if self._dirs[d] is not None:
                return self._dirs[d]
        return self._outside(joined)

    def _outside(self, p: str) -> str | None:
        try:
            if not stat.S_ISLNK(os.lstat(p).st_mode):
                return None  # a plain entry; its folders are checked on their own
        except OSError:
            return None
        if self._real_base is None:
            self._real_base = os.path.realpath(self._base)
        real = os.path.realpath(p)
        inside = real == self._real_base or real.startswith(self._real_base.rstrip(os.sep) + os.sep)
        return None if inside else real


_DRIVE = re.compile(r"^[A-Za-z]:")


def is_test_split(split: str) -> bool:
    """Test splits (``test``, ``test1``...) carry no targets; every other split must have them."""
    return split.startswith("test")
