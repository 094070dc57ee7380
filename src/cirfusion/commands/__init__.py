"""CLI verbs, one module each (see ``cirfusion.cli``)."""
