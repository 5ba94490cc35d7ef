"""FLOPs for the report: the library's fvcore counter (``dynopool_convert.flops``)."""
from __future__ import annotations

from ..flops import count_flops, flops_by_module

__all__ = ["count_flops", "flops_by_module"]
