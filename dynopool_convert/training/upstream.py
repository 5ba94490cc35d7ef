"""The one seam between fine-tuning and the rest of the library (conversion, checkpoint, budget).

Everything the trainer needs from other modules is imported here, under the contract names of
COMMON.md. TEMPORARY: a module that is not on main yet falls back to :mod:`._standin` and is
listed in ``STANDINS_IN_USE`` (the CLI warns); once all are merged, the fallbacks go away.
"""
from __future__ import annotations

STANDINS_IN_USE: list[str] = []

try:
    from ..checkpoint import load_checkpoint, save_checkpoint
except ImportError:  # TEMPORARY until the convert helper's checkpoint.py is merged
    from ._standin import load_checkpoint, save_checkpoint

    STANDINS_IN_USE.append("checkpoint")
try:
    from ..convert import convert
    from ..models import build_model, resolve_source
except ImportError:  # TEMPORARY
    from ._standin import build_model, convert, resolve_source

    STANDINS_IN_USE.append("convert")
try:
    from ..flops import count_flops
except ImportError:  # TEMPORARY until the budget helper's flops.py is merged
    from ._standin import count_flops

    STANDINS_IN_USE.append("flops")
try:
    from ..budget import budget_penalty, fit_to_budget, parse_budget, project_to_budget
except ImportError:  # TEMPORARY
    from ._standin import budget_penalty, parse_budget, project_to_budget

    fit_to_budget = project_to_budget
    STANDINS_IN_USE.append("budget")
try:
    from ..cost_model import CostModel
except ImportError:  # TEMPORARY
    from ._standin import CostModel

    STANDINS_IN_USE.append("cost_model")

__all__ = [
    "load_checkpoint", "save_checkpoint", "convert", "build_model", "resolve_source", "count_flops",
    "budget_penalty", "fit_to_budget", "parse_budget", "project_to_budget", "CostModel", "STANDINS_IN_USE",
]
