"""Who may write: the bearer-token rule of ``cirfusion serve``. Searching is open; ``POST /api/images`` needs the
token whenever one is set, and a server that binds to anything but loopback must have one (it refuses to start
without), so a catalog reachable from other machines is never writable by them without the token."""

from __future__ import annotations

import ipaddress
import os

from ..errors import CirfusionError

TOKEN_ENV = "CIRFUSION_SERVE_TOKEN"
_MIN_TOKEN_CHARS = 16


def is_loopback(host: str) -> bool:
    """Whether binding to ``host`` keeps the server reachable from this machine only (``localhost``, 127.0.0.0/8,
    ::1). ``0.0.0.0``, ``::`` and every other address or name are not loopback."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def resolve_token(given: str | None) -> str | None:
    """The token from ``--token``, else from the ``CIRFUSION_SERVE_TOKEN`` environment variable, else None."""
    token = given if given is not None else os.environ.get(TOKEN_ENV)
    if token is None:
        return None
    token = token.strip()
    if not token:
        raise CirfusionError(f"the bearer token is empty (--token or ${TOKEN_ENV}); give one of at least "
                             f"{_MIN_TOKEN_CHARS} characters, or leave both unset on loopback")
    if len(token) < _MIN_TOKEN_CHARS:
        raise CirfusionError(f"the bearer token has {len(token)} characters; use at least {_MIN_TOKEN_CHARS} "
                             "(e.g. python -c 'import secrets; print(secrets.token_urlsafe())')")
    return token


def check_binding(host: str, token: str | None) -> None:
    """Refuse to serve off loopback without a token (see the module docstring)."""
    if token is None and not is_loopback(host):
        raise CirfusionError(f"--host {host} is not loopback: anyone who can reach it could add images, so a bearer "
                             f"token is required; set ${TOKEN_ENV} (or pass --token), or bind to 127.0.0.1")
