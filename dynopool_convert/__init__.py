"""dynopool_convert: make any vision model learn the size and shape of its feature maps.

The library behind the ``dynopool`` command line (no Typer import here).
"""
from .dynopool import (
    R_MAX,
    R_MIN,
    DynOPool,
    clamp_strides_,
    dynopool2d,
    dynopool_modules,
    dynopool_output_size,
    refresh_sizes,
    scale_parameters,
)
from .dynresize import DynResize
from .errors import UserInputError
from .plan import Plan
from .convert import ConversionResult, apply_plan, convert
from .models import build_model, resolve_source
from .checkpoint import Checkpoint, load, load_checkpoint, save, save_checkpoint
from .flops import count_flops, flops_by_module, format_flops
from .cost_model import CostModel
from .budget import budget_penalty, fit_to_budget, parse_budget, project_to_budget
from .freeze import freeze

__version__ = "0.1.0"

__all__ = [
    "DynOPool",
    "DynResize",
    "dynopool2d",
    "dynopool_output_size",
    "dynopool_modules",
    "scale_parameters",
    "clamp_strides_",
    "refresh_sizes",
    "R_MIN",
    "R_MAX",
    "__version__",
    "UserInputError",
    "convert",
    "apply_plan",
    "ConversionResult",
    "Plan",
    "build_model",
    "resolve_source",
    "save_checkpoint",
    "load_checkpoint",
    "load",
    "save",
    "Checkpoint",
    "count_flops",
    "flops_by_module",
    "format_flops",
    "CostModel",
    "parse_budget",
    "budget_penalty",
    "fit_to_budget",
    "project_to_budget",
    "freeze",
]
