"""The base of every error cirfusion raises on purpose (bad input, a missing file, an unusable checkpoint).

``cli.main`` prints such an error as one line on stderr and exits 2; any other exception is a bug and gets a
traceback. Each subclass also derives from the builtin it refines (``ValueError``, ``OSError``, ...), so callers that
catch those keep working."""

from __future__ import annotations


class CirfusionError(Exception):
    """An expected failure with a message that names the file or item and what is wrong with it."""


class UnknownNameError(CirfusionError, KeyError):
    """A name (method, backbone, dataset, command) that no registry knows. A ``KeyError`` for callers that catch
    that, with the plain message as its text (a bare ``KeyError`` would quote it)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""
