"""The one ``KEY=VALUE`` parser: ``--option`` (dataset loaders), ``--hparam`` (method hyper-parameters) and the
options inside a backbone name (``embedded:resolution=160,tokens=stride32``).

A value is JSON (``false``, ``3``, ``0.5``, ``"x"``, ``[1, 2]``); a bare word that is not JSON is taken as a string
(``text=fine``). Parsed options are then checked against what the receiver accepts (its signature, or a dataclass's
fields): an unknown key or a value of the wrong type is refused with the list of valid keys, so
``exclude_reference=flase`` or ``exclude_reference=0`` never silently means something else.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import sys
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union

from .errors import CirfusionError

_MISSING = object()


class OptionError(CirfusionError, ValueError):
    """A ``KEY=VALUE`` option that is malformed, unknown to its receiver or of the wrong type."""


def parse_value(text: str) -> Any:
    """JSON, or the text itself when it is not JSON (a bare word is a string)."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return text


def parse_pairs(items: Iterable[str], what: str = "--option") -> dict[str, Any]:
    """``["a=1", "b=x"]`` -> ``{"a": 1, "b": "x"}``. Keys must be Python identifiers; a key given twice is an error."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise OptionError(f"{what} expects KEY=VALUE with a Python identifier as KEY, got {item!r}")
        if key in out:
            raise OptionError(f"{what}: {key!r} is given twice")
        out[key] = parse_value(value.strip())
    return out


def split_option_string(text: str | None) -> list[str]:
    """``"a=1,b=2"`` (or ``&``-separated) -> ``["a=1", "b=2"]``: the option list inside a backbone name."""
    if not text:
        return []
    return [p.strip() for p in text.replace("&", ",").split(",") if p.strip()]


def format_options(opts: Mapping[str, Any]) -> str:
    """Inverse of ``parse_pairs(split_option_string(...))`` with sorted keys (canonical ids)."""
    return ",".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in sorted(opts.items()))


# ---- what a receiver accepts ----------------------------------------------------------------------------------------
def _resolve(annotation: Any, module: str | None) -> Any:
    """An annotation, evaluated when it is a string (``from __future__ import annotations``); ``Any`` if it cannot be."""
    if not isinstance(annotation, str):
        return annotation
    namespace = dict(vars(typing))
    namespace.update(vars(sys.modules[module]) if module in sys.modules else {})
    try:
        return eval(annotation, namespace)
    except Exception:  # a TYPE_CHECKING-only name: unknown, so unchecked
        return Any


def accepted_options(receiver: Callable[..., Any] | type, skip: Iterable[str] = ()) -> dict[str, tuple[Any, Any]]:
    """``name -> (type, default)`` of the keyword options ``receiver`` takes: a dataclass's fields, or a callable's
    parameters (minus ``skip``, minus ``*args``/``**kwargs``)."""
    skip = set(skip)
    out: dict[str, tuple[Any, Any]] = {}
    if dataclasses.is_dataclass(receiver) and isinstance(receiver, type):
        for f in dataclasses.fields(receiver):
            if f.name in skip or not f.init:
                continue
            default = f.default if f.default is not dataclasses.MISSING else _MISSING
            if f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            out[f.name] = (_resolve(f.type, receiver.__module__), default)
        return out
    sig = inspect.signature(receiver)
    module = getattr(receiver, "__module__", None)
    for p in sig.parameters.values():
        if p.name in skip or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
            continue
        default = _MISSING if p.default is inspect.Parameter.empty else p.default
        if p.annotation is inspect.Parameter.empty:  # unannotated: the default's type, if it says anything
            tp = type(default) if default is not _MISSING and default is not None else Any
        else:
            tp = _resolve(p.annotation, module)
        out[p.name] = (tp, default)
    return out


def _coerce(value: Any, tp: Any, default: Any) -> Any:
    """``value`` as type ``tp``, or raise ``TypeError``. Ints pass as floats; JSON lists as tuples."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for arm in typing.get_args(tp):
            try:
                return _coerce(value, arm, _MISSING)
            except TypeError:
                pass
        raise TypeError
    if tp is type(None):
        if value is None:
            return None
        raise TypeError
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise TypeError
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TypeError
    if tp is str or tp is Path:
        if isinstance(value, str):
            return value
        raise TypeError
    if origin in (list, tuple, Sequence, Iterable) or tp in (list, tuple):
        if not isinstance(value, list):
            raise TypeError
        args = typing.get_args(tp)
        item = args[0] if args and (origin is not tuple or (len(args) == 2 and args[1] is Ellipsis)) else Any
        items = [_coerce(v, item, _MISSING) for v in value]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin in (dict, Mapping) or tp is dict:
        if isinstance(value, dict):
            return value
        raise TypeError
    return value  # a type this parser does not model: the receiver checks it


def _type_name(tp: Any) -> str:
    """``str | Path``, ``Sequence[str] | None``: a type as a user reads it (no module prefixes)."""
    if tp is Any:
        return "any"
    if isinstance(tp, type) and typing.get_origin(tp) is None:
        return tp.__name__
    return re.sub(r"\b(?:[A-Za-z_]\w*\.)+(?=[A-Za-z_])", "", str(tp)).replace("NoneType", "None")


def describe_accepted(accepted: Mapping[str, tuple[Any, Any]]) -> str:
    """``"a (int), b (str)"``: the valid keys and their types, for error messages."""
    return ", ".join(f"{k} ({_type_name(t)})" for k, (t, _) in sorted(accepted.items())) or "none"


def check_options(opts: Mapping[str, Any], accepted: Mapping[str, tuple[Any, Any]], what: str) -> dict[str, Any]:
    """``opts`` checked against ``accepted`` (from :func:`accepted_options`): an unknown key or a wrong type raises
    :class:`OptionError` naming the valid keys."""
    valid = describe_accepted(accepted)
    out: dict[str, Any] = {}
    for key, value in opts.items():
        if key not in accepted:
            raise OptionError(f"{what}: unknown option {key!r}; valid options: {valid}")
        tp, default = accepted[key]
        try:
            out[key] = _coerce(value, tp, default)
        except TypeError:
            raise OptionError(f"{what}: option {key!r} must be {_type_name(tp)}, got {json.dumps(value)}; "
                              f"valid options: {valid}") from None
    return out


def parse_options(items: Iterable[str], receiver: Callable[..., Any] | type | None = None, what: str = "--option",
                  skip: Iterable[str] = ()) -> dict[str, Any]:
    """Parse ``KEY=VALUE`` items and, with a ``receiver``, check them against it (see :func:`check_options`)."""
    opts = parse_pairs(items, what)
    if receiver is None:
        return opts
    return check_options(opts, accepted_options(receiver, skip), what)
