"""The report as JSON or YAML: the same plain data, the stable format for scripts."""
from __future__ import annotations

import json
from typing import Any

import yaml

__all__ = ["to_json", "to_yaml"]


def to_json(report: dict[str, Any]) -> str:
    """JSON text of ``report`` (floats at full precision, keys in the documented order)."""
    return json.dumps(report, indent=2, allow_nan=False) + "\n"


def to_yaml(report: dict[str, Any]) -> str:
    """YAML text of ``report``: loads back to exactly the data ``to_json`` writes."""
    return yaml.safe_dump(report, sort_keys=False, allow_unicode=True, default_flow_style=None, width=100)
