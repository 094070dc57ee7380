"""Shared pytest fixtures. Keep this generic: several test modules use it."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# The read-only real annotation files: ../shared/data next to the repository, or $CIRFUSION_SHARED_DATA (a checkout
# elsewhere, e.g. a git worktree).
SHARED_DATA = Path(os.environ.get("CIRFUSION_SHARED_DATA") or REPO_ROOT.parent / "shared" / "data")


@pytest.fixture(scope="session", autouse=True)
def _score_paths_file(tmp_path_factory: pytest.TempPathFactory) -> Iterable[None]:
    """The fused models' measured scoring-path ranking (cirfusion.fusion.score_paths) goes to a temporary file, not
    the user's cache."""
    old = os.environ.get("CIRFUSION_SCORE_PATHS")
    os.environ["CIRFUSION_SCORE_PATHS"] = str(tmp_path_factory.mktemp("score_paths") / "score_paths.json")
    yield
    if old is None:
        os.environ.pop("CIRFUSION_SCORE_PATHS", None)
    else:
        os.environ["CIRFUSION_SCORE_PATHS"] = old


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real annotation files (see ``SHARED_DATA``); skips when absent."""
    p = SHARED_DATA
    if not p.is_dir():
        pytest.skip(f"real data folder {p} is not available")
    return p


def write_placeholder_image(path: Path, size: tuple[int, int] = (8, 8), color: tuple[int, int, int] = (120, 60, 30)) -> Path:
    """A tiny valid image at ``path`` (format from the suffix: .png, .jpg/.jpeg, anything else PNG)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    Image.new("RGB", size, color).save(path, fmt)
    return path


@pytest.fixture
def placeholder_images() -> Callable[[Iterable[Path]], list[Path]]:
    """``placeholder_images(paths)`` writes a tiny distinct image at each path (benchmark images are not
    available offline; tests generate stand-ins for the ids the annotation files name)."""

    def make(paths: Iterable[Path]) -> list[Path]:
        out = []
        for i, p in enumerate(paths):
            out.append(write_placeholder_image(Path(p), color=(i * 37 % 256, i * 91 % 256, i * 13 % 256)))
        return out

    return make


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: tiny matrices run faster, and results do not depend on other processes
    competing for the cores. Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
