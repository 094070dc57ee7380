"""cirfusion: composed image retrieval (CIR) — DetailFusion, FineCIR, DAFM and their baselines on shared
infrastructure."""

import importlib
from typing import Any

__version__ = "0.1.0"

# Public API, imported lazily so `import cirfusion` (and the CLI start-up) stays light.
_LAZY = {
    "load": ("cirfusion.api", "load"),
    "create_method": ("cirfusion.methods.registry", "create_method"),
    "list_methods": ("cirfusion.methods.registry", "list_methods"),
}


def __getattr__(name: str) -> Any:  # PEP 562
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'cirfusion' has no attribute {name!r}")
