"""Accuracy against FLOPs per data variant: the fixed network at several input resolutions (a
curve) against dynopool's default at several budgets (docs/RESULTS.md §6.3).

    python -m benchmarks.experiments.plot_frontier docs/results/learning OUT.png
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def _points(rows: list[dict], variant: str, dyn: bool) -> list[tuple[float, float, float]]:
    """(mean FLOPs, mean accuracy %, std) per (method, budget), sorted by FLOPs."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["variant"] != variant or r["method"].startswith("dyn") != dyn:
            continue
        if not dyn and r["method"] not in ("fixed",) and not r["method"].startswith("res"):
            continue
        if dyn and r["method"] != "dyn:frozen:nojitter":
            continue
        groups.setdefault((r["method"], r["budget"]), []).append(r)
    out = []
    for runs in groups.values():
        accs = [100 * r["accuracy"] for r in runs]
        out.append((statistics.mean(r["flops"] for r in runs) / 1e6, statistics.mean(accs),
                    statistics.stdev(accs) if len(accs) > 1 else 0.0))
    return sorted(out)


def main() -> None:
    folder, out = Path(sys.argv[1]), Path(sys.argv[2])
    rows = [json.loads(line) for p in sorted(folder.glob("*.jsonl")) if "gradient" not in p.name
            for line in p.read_text().splitlines() if line.strip()]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = ["stretch-V", "tile", "large"]
    fig, axes = plt.subplots(1, len(variants), figsize=(4.2 * len(variants), 3.4))
    for ax, variant in zip(axes, variants):
        for dyn, style, label in ((False, "o-", "fixed network, input 16–28 px"), (True, "s", "dynopool default, budget 0.5/0.7/1.0×")):
            pts = _points(rows, variant, dyn)
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
