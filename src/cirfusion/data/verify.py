"""Check every image a split needs and every cross-reference, collecting all problems instead of stopping."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from .images import ImageLoadError, load_image
from .schema import CIRDataset, query_problems


@dataclass
class Problem:
    kind: str  # "image" or "reference"
    item: str  # image id or query id
    detail: str

    def __str__(self) -> str:
        return f"[{self.kind}] {self.item}: {self.detail}"


@dataclass
class VerifyReport:
    dataset: str
    images_checked: int = 0
    queries_checked: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        n_img = sum(p.kind == "image" for p in self.problems)
        n_ref = sum(p.kind == "reference" for p in self.problems)
        status = "OK" if self.ok else "FAILED"
        return (
            f"{self.dataset}: {status} — {self.images_checked} images checked ({n_img} bad), "
            f"{self.queries_checked} queries checked ({n_ref} cross-reference problems)"
        )

    def to_dict(self) -> dict:
        return {
            "dataset": self.dataset,
            "ok": self.ok,
            "images_checked": self.images_checked,
            "queries_checked": self.queries_checked,
            "problems": [{"kind": p.kind, "item": p.item, "detail": p.detail} for p in self.problems],
        }


def needed_image_ids(ds: CIRDataset) -> list[str]:
    """Gallery images plus any query image outside the gallery (reported separately as a cross-reference problem)."""
    return list(ds.gallery.ids)


def verify_images(items: Iterable[tuple[str, Path]], progress: bool = True, total: int | None = None) -> tuple[int, list[Problem]]:
    """Decode every image fully; return (count, problems). Never stops at the first bad file."""
    problems: list[Problem] = []
    n = 0
    for image_id, path in tqdm(items, total=total, desc="verify images", unit="img", disable=not progress):
        n += 1
        try:
            load_image(path)
        except ImageLoadError as exc:
            problems.append(Problem("image", image_id, f"{exc.path}: {exc.problem}"))
    return n, problems


def verify_dataset(ds: CIRDataset, check_images: bool = True, progress: bool = True) -> VerifyReport:
    report = VerifyReport(dataset=ds.key)
    seen: set[str] = set()
    for q in ds.queries:
        report.queries_checked += 1
        if q.qid in seen:
            report.problems.append(Problem("reference", q.qid, "duplicate query id"))
        seen.add(q.qid)
        for detail in query_problems(q, ds.gallery):
            report.problems.append(Problem("reference", q.qid, detail))
    if check_images:
        n, probs = verify_images(ds.gallery.items(), progress=progress, total=len(ds.gallery))
        report.images_checked = n
        report.problems.extend(probs)
    return report
