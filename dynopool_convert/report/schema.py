"""The report's data layout (format_version 1) as a table, and a checker for it.

docs/REPORT.md describes every field listed here; the tests check both against each other and
every built report against the table.
"""
from __future__ import annotations

from typing import Any

__all__ = ["TOP_LEVEL", "FLOPS", "SITE", "GROUP", "STAGE", "check_report"]

_NUM = (int, float)
_OPT = type(None)

#: field -> accepted Python types (after JSON/YAML loading: lists, dicts, numbers, str, None)
TOP_LEVEL: dict[str, tuple[type, ...]] = {
    "format_version": (int,),
    "model": (str,),
    "source": (str, _OPT),
    "input_size": (list,),
    "reference_input_size": (list,),
    "params": (int,),
    "scale_parameters": (int,),
    "budget": (int, _OPT),
    "flops": (dict,),
    "policy": (dict, _OPT),
    "notes": (list,),
    "accuracy": (dict, _OPT),
    "training": (dict, _OPT),
    "sites": (list,),
    "groups": (list,),
    "history": (list, _OPT),
    "stages": (list,),
    "approximate_receptive_fields": (list,),
    "extra": (dict, _OPT),
}
FLOPS: dict[str, tuple[type, ...]] = {
    "original": (int, _OPT),
    "converted": (int,),
    "current": (int,),
    "within_budget": (bool, _OPT),
}
SITE: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "module": (str, _OPT),
    "op": (str, _OPT),
    "kind": (str, _OPT),
    "status": (str, _OPT),
    "reason": (str, _OPT),
    "group": (int, _OPT),
    "placement": (str, _OPT),
    "aggregate": (str, _OPT),
    "r": (list, _OPT),
    "r_init": (list, _OPT),
    "stride": (list, _OPT),
    "input_size": (list, _OPT),
    "output_size": (list, _OPT),
    "output_size_init": (list, _OPT),
    "receptive_field": (list, _OPT),
    "receptive_field_init": (list, _OPT),
    "flops_dependent": (int, _OPT),
    "flops_dependent_share": (float, int, _OPT),
}
GROUP: dict[str, tuple[type, ...]] = {
    "id": (int,),
    "status": (str,),
    "sites": (list,),
    "r": (list, _OPT),
    "r_init": (list, _OPT),
    "multiple": (list, _OPT),
    "r_max": (float, int, _OPT),
    "square": (bool, _OPT),
    "flops_dependent": (int, _OPT),
}
STAGE: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "group": (int, _OPT),
    "size": (list,),
    "size_init": (list,),
}

_PAIRS = {"r", "r_init", "multiple", "stride", "input_size", "output_size", "output_size_init", "receptive_field", "receptive_field_init", "size", "size_init"}


def _check(obj: Any, table: dict[str, tuple[type, ...]], where: str, pairs: set[str] = frozenset()) -> list[str]:
    if not isinstance(obj, dict):
        return [f"{where}: expected an object, got {type(obj).__name__}"]
    errors = [f"{where}: missing {k!r}" for k in table if k not in obj]
    errors += [f"{where}: unknown field {k!r}" for k in obj if k not in table]
    for key, types in table.items():
        value = obj.get(key)
        if key in obj and not isinstance(value, types) or isinstance(value, bool) and bool not in types:
            errors.append(f"{where}.{key}: {type(value).__name__} is not {'/'.join(t.__name__ for t in types)}")
        elif key in pairs and isinstance(value, list) and (len(value) != 2 or not all(isinstance(v, _NUM) for v in value)):
            errors.append(f"{where}.{key}: expected [h, w], got {value!r}")
    return errors


def check_report(report: Any) -> list[str]:
    """Every way ``report`` departs from the documented layout (empty when it conforms)."""
    errors = _check(report, TOP_LEVEL, "report")
    if errors:
        return errors
    errors += _check(report["flops"], FLOPS, "flops")
    for key in ("input_size", "reference_input_size"):
        if len(report[key]) != 3 or not all(isinstance(v, int) and v > 0 for v in report[key]):
            errors.append(f"report.{key}: expected [c, h, w], got {report[key]!r}")
    for i, site in enumerate(report["sites"]):
        errors += _check(site, SITE, f"sites[{i}]", _PAIRS)
    for i, group in enumerate(report["groups"]):
        errors += _check(group, GROUP, f"groups[{i}]", _PAIRS)
    for i, stage in enumerate(report["stages"]):
        errors += _check(stage, STAGE, f"stages[{i}]", _PAIRS)
    return errors
