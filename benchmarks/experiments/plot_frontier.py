"""Accuracy against FLOPs per data variant: the fixed network at several input resolutions (a
curve) against dynopool's default at several budgets (docs/RESULTS.md §6.3).

    python -m benchmarks.experiments.plot_frontier FOLDER [FOLDER ...] OUT.png [--method DYN_METHOD ...]

A later FOLDER's runs of a variant, method and budget replace the earlier folders' runs of it.

The fixed network's points are its runs at 28 px (``fixed``), at set resolutions (``resN``) and at
the resolution that fits a budget (``lowres``); dynopool's are each DYN_METHOD's runs (default
``dyn:frozen:nojitter``), one point per budget.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def _points(rows: list[dict], variant: str, dyn: bool, dyn_method: str) -> list[tuple[float, float, float]]:
    """(mean FLOPs, mean accuracy %, std) per (method, budget), sorted by FLOPs."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["variant"] != variant or r["method"].startswith("dyn") != dyn:
            continue
        if not dyn and r["method"] not in ("fixed", "lowres") and not r["method"].startswith("res"):
            continue
        if not dyn and isinstance(r["input"], list):  # anisotropic inputs are not on the resolution curve
            continue
        if dyn and r["method"] != dyn_method:
            continue
        groups.setdefault((r["method"], r["budget"], r["input"] if not dyn else None), []).append(r)
    out = []
    for runs in groups.values():
        accs = [100 * r["accuracy"] for r in runs]
        out.append((statistics.mean(r["flops"] for r in runs) / 1e6, statistics.mean(accs),
                    statistics.stdev(accs) if len(accs) > 1 else 0.0))
    return sorted(out)


def _latest_rows(folders: list[Path]) -> list[dict]:
    """The runs of every folder (``gradient``/``plateau`` files left out); where a later folder
    has runs of the same variant, method and budget, they replace the earlier folders' (a rerun
    of some cells under a changed default)."""
    by_cell: dict[tuple, list[dict]] = {}
    for folder in folders:
        fresh: dict[tuple, list[dict]] = {}
        for p in sorted(folder.glob("*.jsonl")):
            if any(k in p.name for k in ("gradient", "plateau")):
                continue
            for line in p.read_text().splitlines():
                if line.strip():
                    r = json.loads(line)
                    fresh.setdefault((r["variant"], r["method"], r["budget"]), []).append(r)
        by_cell.update(fresh)
    return [r for runs in by_cell.values() for r in runs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", type=Path, nargs="+", help="folders of learning_study.py's JSON lines (*.jsonl)")
    ap.add_argument("out", type=Path, help="the figure (PNG)")
    ap.add_argument("--method", action="append", help="dynopool's method to plot (repeatable; default dyn:frozen:nojitter)")
    args = ap.parse_args()
    out, methods = args.out, args.method or ["dyn:frozen:nojitter"]
    rows = _latest_rows(args.folders)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = [v for v in ("original", "stretch-V", "tile", "large") if any(r["variant"] == v for r in rows)]
    fig, axes = plt.subplots(1, len(variants), figsize=(4.2 * len(variants), 3.4))
    for ax, variant in zip(axes, variants):
        series = [(False, "", "o-", "fixed network at 16–28 px")]
        series += [(True, m, "sdv^"[i % 4], f"dynopool {m}") for i, m in enumerate(methods)]
        for dyn, method, style, label in series:
            pts = _points(rows, variant, dyn, method)
            if pts:
                xs, ys, es = zip(*pts)
                ax.errorbar(xs, ys, yerr=es, fmt=style, capsize=3, label=label)
        ax.set_title(variant)
        ax.set_xlabel("FLOPs (M, fvcore)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main()
