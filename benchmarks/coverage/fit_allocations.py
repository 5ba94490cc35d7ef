"""The budget fit's allocation per model and budget, under two rules (docs/RESULTS.md §6.6).

    python -m benchmarks.coverage.fit_allocations timm:regnety_002,torchvision:mobilenet_v2 --size 64

For each model (random weights, placement ``before`` with an input site) and each budget (a
share of the original's FLOPs): the fit of session 8 (``allocation="flops"``: the most expensive
allocation within the budget) against the default (``"resolution"``), each as FLOPs / budget,
log-resolution, the fit's seconds and the groups' output sizes; ``changed`` where they differ.
Both are confirmed within the budget by fvcore's count (``fit_to_budget`` does).
"""
from __future__ import annotations

import argparse
import time
import warnings

import dynopool_convert as dc
from dynopool_convert.allocation import log_resolution
from dynopool_convert.cost_model import CostModel


def fit_row(name: str, size: tuple[int, int, int], frac: float, allocation: str) -> tuple[str, list]:
    """One fit: a printable summary and the groups' output sides."""
    original = dc.count_flops(dc.build_model(name, {"num_classes": 10}).eval(), size)
    model = dc.convert(dc.build_model(name, {"num_classes": 10}).eval(), size, input_site=True, validate=False).model
    cost = CostModel(model, size)
    start = time.perf_counter()
    fit = dc.fit_to_budget(model, int(frac * original), size, cost_model=cost, allocation=allocation)
    seconds = time.perf_counter() - start
    sides = [io[1][0] for io in cost.group_sizes(fit.strides) if io is not None]
    summary = f"{fit.final_flops / original:.3f}x logres {log_resolution(cost, fit.strides):.2f} {seconds:.1f}s {sides}"
    return summary, sides


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", help="comma-separated model names (timm:..., torchvision:...)")
    ap.add_argument("--size", type=int, default=64, help="input side in pixels (3 channels)")
    ap.add_argument("--budgets", default="0.5,0.8", help="comma-separated shares of the original's FLOPs")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    size = (3, args.size, args.size)
    for name in args.models.split(","):
        for frac in (float(b) for b in args.budgets.split(",")):
            old, old_sides = fit_row(name, size, frac, "flops")
            new, new_sides = fit_row(name, size, frac, "resolution")
            flag = "changed" if old_sides != new_sides else "same"
            print(f"{name} {frac}x {flag} | flops: {old} | resolution: {new}", flush=True)


if __name__ == "__main__":
    main()
