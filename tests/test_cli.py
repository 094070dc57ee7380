"""The `cirfusion` entry point: exit codes and one-line errors, a --help that imports no command module (and no
torch), the command table, `cirfusion list`, and the loader options every dataset command shares."""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from cirfusion import cli
from cirfusion.commands import _common
from cirfusion.commands._lazy import Command, LazySubcommands, add_lazy_subcommands
from cirfusion.commands.data import DATA_COMMANDS
from cirfusion.data.registry import dataset_loader, list_datasets
from cirfusion.data.schema import DataError
from cirfusion.errors import CirfusionError, UnknownNameError
from cirfusion.methods.registry import list_methods
from cirfusion.options import OptionError, accepted_options

SRC = Path(cli.__file__).resolve().parents[1]


@pytest.fixture
def fake_command(monkeypatch):
    """A `cirfusion boom` command whose handler raises what the test puts in ``raise_[0]``, added to the table
    (restored after the test) as a module importable by name."""
    raise_: list[BaseException] = []
    mod = types.ModuleType("cirfusion_fake_command")

    def run(args: argparse.Namespace) -> int:
        if raise_:
            raise raise_[0]
        return 3

    def register(sub):
        p = sub.add_parser("boom", help="raises on demand")
        p.add_argument("--flag", action="store_true")
        p.set_defaults(func=run)

    mod.register = register  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setattr(cli, "COMMANDS", (*cli.COMMANDS, Command("boom", mod.__name__, "raises on demand")))
    return raise_


def test_handler_exit_code_is_returned(fake_command):
    assert cli.main(["boom"]) == 3


@pytest.mark.parametrize("exc, text", [
    (DataError(Path("ann/cap.json"), "q7", "reference 'x' is not in the gallery"), "ann/cap.json [entry q7]: reference 'x'"),
    (OptionError("--option: unknown option 'a'"), "--option: unknown option 'a'"),
    (UnknownNameError("unknown method 'nope'; known: a, b"), "unknown method 'nope'; known: a, b"),
    (CirfusionError("first line\n  second line\n"), "first line; second line"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/x/ckpt"), "/x/ckpt: No such file or directory"),
    (PermissionError(errno.EACCES, "Permission denied", "/root/a"), "/root/a: Permission denied"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "runs/best"), "runs/best: Is a directory"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "f.txt"), "f.txt: Not a directory"),
    (OSError(errno.ELOOP, "Too many levels of symbolic links", "loop"), "loop: Too many levels of symbolic links"),
    (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
    (FileNotFoundError("scores.npy: score file does not exist"), "scores.npy: score file does not exist"),
])
def test_expected_errors_are_one_line_exit_2(fake_command, capsys, exc, text):
    fake_command.append(exc)
    assert cli.main(["boom"]) == 2
    cap = capsys.readouterr()
    assert cap.out == ""
    assert cap.err.count("\n") == 1 and cap.err.startswith("cirfusion: error: ")
    assert text in cap.err and "Traceback" not in cap.err


@pytest.mark.parametrize("exc", [ValueError("bad"), KeyError("k"), RuntimeError("x"), ZeroDivisionError(),
                                 OSError("an OSError about no path")])
def test_unexpected_errors_are_bugs_with_a_traceback_exit_1(fake_command, capsys, exc):
    fake_command.append(exc)
    assert cli.main(["boom"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and type(exc).__name__ in err
    assert "this is a bug" in err


def test_keyboard_interrupt_exits_130(fake_command, capsys):
    fake_command.append(KeyboardInterrupt())
    assert cli.main(["boom"]) == 130
    assert capsys.readouterr().err == "cirfusion: interrupted\n"


def test_usage_errors_and_help_exit_through_argparse(fake_command, capsys):
    with pytest.raises(SystemExit) as ei:
        cli.main(["no-such-command"])
    assert ei.value.code == 2 and "invalid choice: 'no-such-command'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as ei:
        cli.main(["boom", "--nope"])
    assert ei.value.code == 2
    with pytest.raises(SystemExit) as ei:
        cli.main([])
    assert ei.value.code == 2
    with pytest.raises(SystemExit) as ei:
        cli.main(["--version"])
    assert ei.value.code == 0 and capsys.readouterr().out.startswith("cirfusion ")


def _python(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout


HELP_WITHOUT_TORCH = """
import contextlib, io, sys
from cirfusion import cli
for argv in (["--help"], ["data", "--help"]):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            cli.main(argv)
        except SystemExit as e:
            assert e.code == 0, e.code
    print(out.getvalue())
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "numpy", "transformers", "faiss", "PIL"))
    commands = sorted(m for m in sys.modules if m.startswith("cirfusion.commands.") and m != "cirfusion.commands._lazy")
    print(argv[0], "HEAVY", heavy, "COMMAND MODULES", commands)
"""


def test_help_imports_no_command_module_and_no_torch():
    out = _python(HELP_WITHOUT_TORCH)
    assert "--help HEAVY [] COMMAND MODULES []" in out
    assert "data HEAVY [] COMMAND MODULES ['cirfusion.commands.data']" in out  # not its sub-verbs' modules
    for cmd in (*cli.COMMANDS, *DATA_COMMANDS):
        assert f"    {cmd.name}" in out and " ".join(cmd.help.split()[:3]) in " ".join(out.split())


def test_a_command_help_shows_its_own_options(capsys):
    with pytest.raises(SystemExit) as ei:
        cli.main(["train", "--help"])
    assert ei.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: cirfusion train") and "--hard-negatives" in out and "--option KEY=VALUE" in out
    with pytest.raises(SystemExit):
        cli.main(["data", "stats", "--help"])
    assert "--ids OUT.json" in capsys.readouterr().out


def _all_parsers(table, prefix=()):
    """(command path, parser) of every command and sub-command, each registered through its own module."""
    parser = argparse.ArgumentParser(prog="cirfusion")
    sub = add_lazy_subcommands(parser, table, dest="command", metavar="COMMAND")
    out = []
    for cmd in table:
        sub.load(cmd.name)
        out.append(((*prefix, cmd.name), sub.choices[cmd.name]))
    return out


def _walk(path, parser):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, p in action.choices.items():
                yield from _walk((*path, name), p)


SPHINX = re.compile(r":(func|class|meth|mod|attr|data|exc|obj|ref|doc):`|``")


def test_every_command_module_registers_its_name_and_help_is_plain_text():
    found = []
    for path, parser in _all_parsers(cli.COMMANDS) + _all_parsers(DATA_COMMANDS, ("data",)):
        for sub_path, p in _walk(path, parser):
            texts = [p.description or ""] + [a.help or "" for a in p._actions]
            for t in texts:
                m = SPHINX.search(t)
                if m:
                    found.append(f"cirfusion {' '.join(sub_path)}: ...{t[max(0, m.start() - 20):m.end() + 25]!r}...")
    for cmd in (*cli.COMMANDS, *DATA_COMMANDS):
        assert not SPHINX.search(cmd.help) and "`" not in cmd.help
    assert found == [], "Sphinx markup in help texts:\n" + "\n".join(dict.fromkeys(found))


def test_a_module_that_registers_another_name_is_a_bug(monkeypatch):
    mod = types.ModuleType("cirfusion_fake_misnamed")
    mod.register = lambda sub: sub.add_parser("other")  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    sub = add_lazy_subcommands(argparse.ArgumentParser(), [Command("x", mod.__name__, "h")], "c", "C")
    assert isinstance(sub, LazySubcommands)
    with pytest.raises(RuntimeError, match="did not register a parser named 'x'"):
        sub.load("x")


def test_list_prints_methods_backbones_and_datasets(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("clip4cir", "dafm", "image-only  (no parameters)", "embedded", "colour", "hf-clip", "cirr",
                 "synthetic", "catalog"):
        assert f"  {name}\n" in out or f"  {name}" in out.splitlines()
    assert cli.main(["list", "--json"]) == 0
    reg = json.loads(capsys.readouterr().out)
    assert reg["methods"] == list_methods() and reg["datasets"] == list_datasets()
    assert "embedded" in reg["backbones"] and set(reg["trainable_methods"]) < set(reg["methods"])


# ---- --option for every dataset command (train, eval, fuse, index, data verify use dataset_kwargs) -----------------
def _ns(dataset, *options, category=None):
    return argparse.Namespace(dataset=dataset, option=list(options), category=category)


def test_dataset_kwargs_json_values_checked_against_the_loader():
    assert _common.dataset_kwargs(_ns("custom", "exclude_reference=false")) == {"exclude_reference": False}
    assert _common.dataset_kwargs(_ns("custom", "exclude_reference=true", "image_dir=img")) == {
        "exclude_reference": True, "image_dir": "img"}
    assert _common.dataset_kwargs(_ns("fashioniq", category="dress")) == {"category": "dress"}
    assert _common.dataset_kwargs(_ns("cirr", "captions_ext=null")) == {"captions_ext": None}
    for bad in ("exclude_reference=0", "exclude_reference=flase", 'exclude_reference="false"'):
        with pytest.raises(OptionError, match=r"option 'exclude_reference' must be bool.*valid options: "
                                              r"exclude_reference \(bool\), image_dir \(str \| Path\), "
                                              r"text_policy \(str\)"):
            _common.dataset_kwargs(_ns("custom", bad))
    with pytest.raises(OptionError, match="unknown option 'root'"):  # root and split come from their own flags
        _common.dataset_kwargs(_ns("custom", "root=/x"))
    with pytest.raises(OptionError, match=r"dataset 'cirr' does not take these options \['category'\]; valid"):
        _common.dataset_kwargs(_ns("cirr", category="dress"))
    with pytest.raises(OptionError, match=r"--category and --option category=\.\.\. are both given"):
        _common.dataset_kwargs(_ns("fashioniq", "category=shirt", category="dress"))
    with pytest.raises(UnknownNameError, match=r"unknown dataset 'nope'; known: (.*, )?catalog, circo, cirr"):
        _common.dataset_kwargs(_ns("nope"))


def test_every_loader_signature_can_be_read():
    # The options check reads each registered loader's signature; its string annotations must resolve to types
    # (an unresolvable one would silently accept any value).
    for name in list_datasets():
        accepted = accepted_options(dataset_loader(name), skip=_common.LOADER_POSITIONAL)
        assert "root" not in accepted and "split" not in accepted
        assert all(tp is not Any for tp, _ in accepted.values()), (name, accepted)
