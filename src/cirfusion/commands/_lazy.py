"""Sub-commands whose module is imported only when chosen, so ``cirfusion --help`` (and ``cirfusion data --help``)
list every command from a table of names and one-line helps without importing torch or any command module.

A command module exposes ``register(subparsers)``, which adds its full parser with ``subparsers.add_parser(NAME,
help=..., ...)``. Until the command is chosen on the command line, a stand-in parser with the same name and help
stands in for it; when argparse reaches the command name, :class:`LazySubcommands` imports the module (by name, with
importlib), replaces the stand-in with the real parser and lets argparse go on, so ``cirfusion train --help``
still prints train's own options. Standard library only: this module is on the path of every ``--help``.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence
from typing import Any, NamedTuple


class Command(NamedTuple):
    """A row of a command table: the name typed on the command line, the module that implements it (it must
    register a parser under the same name and with the same help) and the one-line help shown in listings."""

    name: str
    module: str
    help: str


class LazySubcommands(argparse._SubParsersAction):  # the action argparse returns from add_subparsers
    """A sub-parsers action whose commands come from a :class:`Command` table and are imported when chosen."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lazy: dict[str, str] = {}  # command name -> module not imported yet

    def add_commands(self, table: Sequence[Command]) -> None:
        """A stand-in parser per row; each becomes the module's real parser when its command is chosen."""
        for cmd in table:
            self.add_parser(cmd.name, help=cmd.help)
            self._lazy[cmd.name] = cmd.module

    def load(self, name: str) -> None:
        """Import ``name``'s module and let it register its real parser in place of the stand-in."""
        module = self._lazy.pop(name, None)
        if module is None:
            return
        # Forget the stand-in: argparse refuses a second parser under one name.
        self._name_parser_map.pop(name, None)
        self._choices_actions[:] = [a for a in self._choices_actions if a.dest != name]
        importlib.import_module(module).register(self)
        if name not in self._name_parser_map:
            raise RuntimeError(f"command module {module} did not register a parser named {name!r}")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: str | Sequence[Any] | None, option_string: str | None = None) -> None:
        if isinstance(values, (list, tuple)) and values:
            self.load(str(values[0]))
        super().__call__(parser, namespace, values, option_string)


def add_lazy_subcommands(parser: argparse.ArgumentParser, table: Sequence[Command], dest: str,
                         metavar: str) -> LazySubcommands:
    """``parser``'s required sub-commands from ``table`` (see :class:`LazySubcommands`)."""
    sub = parser.add_subparsers(dest=dest, required=True, metavar=metavar, action=LazySubcommands)
    assert isinstance(sub, LazySubcommands)
    sub.add_commands(table)
    return sub
