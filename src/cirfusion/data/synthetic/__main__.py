"""Render worker of the synthetic benchmark: ``python -m cirfusion.data.synthetic --render TASKS.json``, started by
``rendering._Renderer`` (internal; use ``cirfusion data make-synthetic``)."""

from __future__ import annotations

import sys

from .rendering import _render_main

if len(sys.argv) == 3 and sys.argv[1] == "--render":
    sys.exit(_render_main(sys.argv[2]))
sys.exit("usage: python -m cirfusion.data.synthetic --render TASKS.json (internal; use cirfusion data make-synthetic)")
