"""CIR methods: one file per method, registered by name (``@register_method``), built with ``create_method``."""

from .base import (
    Batch,
    CIRMethod,
    MethodDims,
    Stage,
    cosine_or_maxsim,
    join_negatives,
    stage_parameters,
)
from .encoders import TokenEncoder
from .registry import create_method, get_method_class, list_methods, register_method

__all__ = [
    "Batch",
    "CIRMethod",
    "MethodDims",
    "Stage",
    "TokenEncoder",
    "cosine_or_maxsim",
    "create_method",
    "get_method_class",
    "join_negatives",
    "list_methods",
    "register_method",
    "stage_parameters",
]
