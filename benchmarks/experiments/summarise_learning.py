"""Tables for docs/RESULTS.md §6 from the JSON lines of learning_study.py and stride_gradient_study.py.

    python -m benchmarks.experiments.summarise_learning docs/results/learning
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


#: what each method of learning_study.py is (its flags switch parts of the default off or on)
WHAT = {
    "fixed": "the network as is",
    "lowres": "the network on a lower input resolution",
    "dyn-paper": "paper: gradient strides, ceiling penalty",
    "dyn": "input site + jitter 1 px + gradient + search",
    "dyn:noinput": "jitter 1 px + gradient + search",
    "dyn:frozen": "input site + jitter 1 px + search",
    "dyn:nojitter": "input site + gradient + search",
    "dyn:frozen:nojitter": "input site + search (the default until session 8)",
    "dyn:frozen:nojitter:nosearch": "**default** (placement before): input site, budget fit only",
    "dyn:frozen:nojitter:exact": "placement exact: input site + search (the default with weights until session 8)",
    "dyn:frozen:nojitter:nosearch:exact": "**default with loaded weights** (placement exact): input site, budget fit only",
    "dyn:frozen:nojitter:exact:aa": "placement exact, antialiased shrinks: input site + search",
    "dyn:frozen:nojitter:exact:settle0.75": "placement exact, search at 25% of the steps",
}


def _what_res(method: str) -> str:
    if not method.startswith("res"):
        return ""
    h, _, w = method[3:].partition("x")
    return f"the network on {h}×{w} inputs (rows × columns)" if w else f"the network on {h} px inputs"


def methods_table(rows: list[dict]) -> str:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["variant"], r["budget"], r["method"]), []).append(r)
    out = ["| data | budget | method | what | test accuracy % (mean ± std) | seeds | FLOPs (mean) | sizes after each site (seed 0) |",
           "|---|---|---|---|---|---|---|---|"]
    for (variant, budget, method), runs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        accs = [100 * r["accuracy"] for r in runs]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        given = runs[0]["input"]
        sizes = " → ".join(f"{h}×{w}" for h, w in runs[0]["sizes"]) or (
            f"input {given[0]}×{given[1]}" if isinstance(given, list) else f"input {given}²")
        out.append(f"| {variant} | {budget / 1e6:.2f}M | `{method}` | {WHAT.get(method) or _what_res(method)} | {statistics.mean(accs):.2f} ± {std:.2f} | "
                   f"{len(runs)} | {statistics.mean(r['flops'] for r in runs) / 1e6:.3f}M | {sizes} |")
    return "\n".join(out)


def _pearson(a: list[float], b: list[float]) -> float:
    ma, mb = statistics.mean(a), statistics.mean(b)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    va, vb = sum((x - ma) ** 2 for x in a), sum((y - mb) ** 2 for y in b)
    return cov / (va * vb) ** 0.5 if va > 0 and vb > 0 else float("nan")


def gradient_table(rows: list[dict]) -> str:
    out = ["| data | epoch | probes | sign agreement (predicted vs measured ΔL) | Pearson r | measured ΔL > 0 (size change hurts) | sizes (seed 0) |",
           "|---|---|---|---|---|---|---|"]
    by: dict[tuple, list[dict]] = {}
    for r in rows:
        by.setdefault((r["variant"], r["epoch"]), []).append(r)
    for (variant, epoch), runs in sorted(by.items()):
        probes = [p for r in runs for p in r["probes"]]
        pred, meas = [p["predicted"] for p in probes], [p["measured"] for p in probes]
        agree = sum((a > 0) == (b > 0) for a, b in zip(pred, meas)) / max(len(probes), 1)
        hurts = sum(b > 0 for b in meas) / max(len(probes), 1)
        sizes = " → ".join(f"{h}×{w}" for h, w in runs[0]["sizes"])
        out.append(f"| {variant} | {epoch} | {len(probes)} | {100 * agree:.0f}% | {_pearson(pred, meas):.2f} | "
                   f"{100 * hurts:.0f}% | {sizes} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path, nargs="?", default=Path("docs/results/learning"),
                    help="folder of learning_study.py's JSON lines (default docs/results/learning)")
    folder = ap.parse_args().folder
    study = [r for p in sorted(folder.glob("*.jsonl")) if not any(k in p.name for k in ("gradient", "frontier", "plateau"))
             for r in _rows(p)]
    if study:
        print(methods_table(study))
    grad = folder / "gradient_study.jsonl"
    if grad.exists():
        print()
        print(gradient_table(_rows(grad)))


if __name__ == "__main__":
    main()
