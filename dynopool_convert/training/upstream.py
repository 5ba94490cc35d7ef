"""The one seam between fine-tuning and the rest of the library (conversion, checkpoint, budget)."""
from __future__ import annotations

from ..budget import budget_penalty, check_budget, check_reachable, fit_to_budget, parse_budget, project_to_budget
from ..checkpoint import load_checkpoint, save_checkpoint
from ..checkpoint_extra import original_flops
from ..conversion import convert_source
from ..convert import convert
from ..cost_model import CostModel
from ..flops import count_flops
from ..models import build_model, resolve_source

__all__ = [
    "load_checkpoint", "save_checkpoint", "convert", "convert_source", "build_model", "resolve_source", "count_flops",
    "budget_penalty", "check_budget", "check_reachable", "fit_to_budget", "parse_budget", "project_to_budget",
    "original_flops", "CostModel",
]
