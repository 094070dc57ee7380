"""The validation protocol in code (``docs/protocol.md``): which labelled queries each choosing step may read, and
the record of every choice a run makes (``selection.json``).

**The rule.** Every choice is made on the validation split, never on test; test is read once per reported table.
The validation split is cut in two *parts* by reference image:

- ``select``: the base models' choices -- the best epoch of each base model, its hyper-parameters, its backbone;
- ``fuse``: the fusion's labelled queries -- the fusion network is fitted on them, its epoch is picked on a seeded
  held-out share of them (:attr:`cirfusion.fusion.FusionConfig.holdout`), and the choices above the fusion (pool,
  fusion settings) are made on the figures the fusion scores on queries of this part it was not fitted on.

A query's part is a pure function of its *reference image id* (a salted SHA-1, compared with ``share``), so the two
parts share no query and no reference image, the cut does not depend on query order, on the split's size or on any
seed, and every tool (``cirfusion train``, ``cirfusion fuse``, the quickstart, the benchmarks) cuts the same way.
Why by reference image and not by query: several queries of one reference image carry correlated errors for every
base model; keeping them on one side means the fusion's queries are new images to the epoch selection too.

Why the fusion needs its own queries: a base model whose epoch was chosen on some queries scores them slightly better
than unseen ones (the choice is fitted to their noise), so a fusion fitted on them learns to trust it slightly too
much -- the same effect, smaller, as fitting the fusion on the bases' training split (see
:mod:`cirfusion.fusion.fit`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .data.parts import ALL, PARTS, SELECT_SHARE, ProtocolError, dataset_part, image_part, part_rows, split_part
from .io import atomic_write_json
from .views import SplitData

SELECTION_FILE = "selection.json"


def data_part(data: SplitData, part: str, share: float = SELECT_SHARE) -> SplitData:
    """:func:`dataset_part` of a split with its cached features (the feature tables are shared: they cover the whole
    split's gallery and texts, a superset of what the part reads)."""
    if part == ALL:
        return data
    return SplitData(dataset_part(data.dataset, part, share), data.images, data.texts)


def describe_split(split: str, part: str = ALL, holdout: float | None = None) -> str:
    """How a benchmark names where a figure came from: ``val/fuse``, ``val/fuse (held-out 20 %)``, ``test``."""
    if part not in (*PARTS, ALL):
        raise ProtocolError(f"unknown validation part {part!r}; expected one of {', '.join((*PARTS, ALL))}")
    s = split if part == ALL else f"{split}/{part}"
    return s + (f" (held-out {holdout:.0%})" if holdout else "")


# ---------------------------------------------------------------------------------------------------------------------
# selection.json
# ---------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Choice:
    """One choice: what was chosen (``value``) among ``candidates``, the split (part) it was chosen on, and the
    figure(s) behind it (``metric`` on that split for the chosen value and, when known, for each candidate)."""

    name: str
    value: Any
    split: str
    metric: str | None = None
    figure: float | None = None
    candidates: dict[str, float] | None = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v not in (None, "")}


class SelectionRecord:
    """Every choice a run makes, in order, with the validation figure behind it; written to ``selection.json``.

    A choice read from test is refused: the protocol reads test only to report (:meth:`report`)."""

    def __init__(self, protocol: Mapping[str, Any] | None = None) -> None:
        self.protocol = {"rule": "docs/protocol.md", "parts": list(PARTS), "select_share": SELECT_SHARE,
                         "cut_by": "reference image id (salted SHA-1)", **dict(protocol or {})}
        self.choices: list[Choice] = []
        self.reports: list[dict[str, Any]] = []

    def choose(self, name: str, value: Any, split: str, metric: str | None = None, figure: float | None = None,
               candidates: Mapping[str, float] | None = None, note: str = "") -> Choice:
        if not split:
            raise ProtocolError(f"choice {name!r}: name the split it was made on")
        if split.split("/")[0].split(" ")[0] == "test":
            raise ProtocolError(f"choice {name!r} made on {split!r}: every choice is made on validation, test only reports")
        c = Choice(name, value, split, metric, None if figure is None else float(figure),
                   None if candidates is None else {str(k): float(v) for k, v in candidates.items()}, note)
        self.choices.append(c)
        return c

    def report(self, table: str, split: str, note: str = "") -> None:
        """Record that ``table`` was read on ``split`` (test once per reported table)."""
        self.reports.append({"table": table, "split": split, **({"note": note} if note else {})})

    def get(self, name: str) -> Choice:
        for c in self.choices:
            if c.name == name:
                return c
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {"protocol": self.protocol, "choices": [c.to_dict() for c in self.choices], "reports": self.reports,
                "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    @classmethod
    def read(cls, path: str | Path) -> SelectionRecord:
        """A record written by :meth:`write` (``path``: the file or its directory)."""
        p = Path(path)
        p = p / SELECTION_FILE if p.is_dir() else p
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
            rec = cls(d.get("protocol"))
            rec.choices = [Choice(**c) for c in d.get("choices", [])]
            rec.reports = list(d.get("reports", []))
        except (OSError, ValueError, TypeError) as exc:
            raise ProtocolError(f"{p}: not a readable selection record ({exc})") from exc
        return rec

    def write(self, target: str | Path) -> Path:
        """Write to ``target/selection.json``, or to ``target`` itself when it names a ``.json`` file."""
        path = Path(target)
        path = path if path.suffix == ".json" else path / SELECTION_FILE
        atomic_write_json(path, self.to_dict())
        return path


def base_selection(config: Mapping[str, Any], manifest: Mapping[str, Any] | None) -> dict[str, Any]:
    """What a trained base checkpoint's epoch was chosen on: ``{"split", "part", "num_queries", "epoch", "metric",
    "figure"}`` from its ``config.json`` (``extra``: the kept epoch and its validation metrics) and its run's
    ``manifest.json`` (the validation dataset's split, ``"val:select"`` for a part). ``split`` None: the run does not
    say (no manifest, or trained without validation)."""
    extra = config.get("extra") or {}
    name = extra.get("val_metric")
    out: dict[str, Any] = {"split": None, "part": None, "num_queries": None, "epoch": extra.get("epoch"),
                           "metric": name, "figure": (extra.get("val") or {}).get(name) if name else None}
    val = ((manifest or {}).get("datasets") or {}).get("val")
    if isinstance(val, dict) and val.get("split"):
        out["split"], out["part"] = split_part(str(val["split"]))
        out["num_queries"] = val.get("num_queries")
    return out


def overlaps(a: tuple[str | None, str], b: tuple[str | None, str]) -> bool:
    """Whether two (split, part) pairs can share a query: the same split and either part the whole split or the
    same part."""
    return a[0] is not None and a[0] == b[0] and (ALL in (a[1], b[1]) or a[1] == b[1])


__all__ = [
    "ALL",
    "PARTS",
    "SELECTION_FILE",
    "SELECT_SHARE",
    "Choice",
    "ProtocolError",
    "SelectionRecord",
    "base_selection",
    "data_part",
    "dataset_part",
    "describe_split",
    "image_part",
    "overlaps",
    "part_rows",
    "split_part",
]
