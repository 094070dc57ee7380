"""CIR methods: one file per method, registered by name (``@register_method``), built with ``create_method``."""

from .base import (
    Batch,
    CIRMethod,
    HardNegativesUnsupported,
    HyperParameterError,
    MethodDims,
    NoParams,
    Stage,
    cosine_or_maxsim,
    hparam,
    join_negatives,
    make_params,
    params_help,
    stage_parameters,
)
from .encoders import TokenEncoder
from .registry import METHODS, create_method, get_method_class, list_methods, register_method

__all__ = [
    "METHODS",
    "Batch",
    "CIRMethod",
    "HardNegativesUnsupported",
    "HyperParameterError",
    "MethodDims",
    "NoParams",
    "Stage",
    "TokenEncoder",
    "cosine_or_maxsim",
    "create_method",
    "get_method_class",
    "hparam",
    "join_negatives",
    "list_methods",
    "make_params",
    "params_help",
    "register_method",
    "stage_parameters",
]
