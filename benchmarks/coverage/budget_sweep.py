"""Budget sweep: ``dynopool convert MODEL --budget F`` on every model the coverage sweep
converts, under each placement, checked by fvcore's count (docs/results/budget_sweep.md).

    python -m benchmarks.coverage.budget_sweep                       # everything, resumable
    python -m benchmarks.coverage.budget_sweep --only timm:resnet18 --fresh
    python -m benchmarks.coverage.budget_sweep --render-only
    python -m benchmarks.coverage.budget_sweep --axis-fill         # converting with --axis-fill

Each model of ``docs/results/zoo_sweep.jsonl`` whose status is ``ok`` is converted again at the
same input size and build arguments, the way the CLI does it (``convert_source``: validation
included, no weights), once per placement (``before``: the default without weights; ``exact``:
the default with weights) and budget share (default 0.5x), and fitted to that budget. A cell is
``ok`` when fvcore's count of the fitted model, made here independently of the fit, is within
the budget and a forward pass gives finite outputs; ``refused`` when the conversion says one line
(``UserInputError``: e.g. a budget its groups cannot reach), with that line as the reason;
``over`` or ``error`` otherwise. Models run in worker subprocesses with a timeout each
(``zoo_sweep``'s workers), results appended to a JSON-lines file (re-running resumes).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks.coverage.zoo_sweep import (RESULTS as ZOO_RESULTS, ROOT, _Worker, add_sweep_arguments, forget_rows,
                                           sweep_cells)

RESULTS = ROOT / "docs" / "results" / "budget_sweep.jsonl"
TABLE = ROOT / "docs" / "results" / "budget_sweep.md"
# ``--axis-fill``: the same sweep converting with ``--axis-fill``, in files of its own
FILL_RESULTS = ROOT / "docs" / "results" / "budget_sweep_axis_fill.jsonl"
FILL_TABLE = ROOT / "docs" / "results" / "budget_sweep_axis_fill.md"
PLACEMENTS = ("before", "exact")
MODULE = "benchmarks.coverage.budget_sweep"


def zoo_rows() -> dict[str, dict]:
    """The coverage sweep's latest row per model whose conversion was ``ok``."""
    rows: dict[str, dict] = {}
    for line in ZOO_RESULTS.read_text().splitlines():
        row = json.loads(line)
        rows[row["source"]] = row
    return {s: r for s, r in rows.items() if r.get("status") == "ok"}


def _one_line(text: object) -> str:
    return " ".join(str(text).split())[:2000]


def fit_cell(source: str, zoo: dict, placement: str, share: str, axis_fill: bool = False) -> dict:
    """Convert ``source`` as the CLI does with ``--budget share --placement placement`` and check
    the fitted model: fvcore's count within the budget, a finite forward pass."""
    import torch

    import dynopool_convert as dc
    from dynopool_convert.conversion import convert_source

    h, _, w = zoo["input"].partition("x")
    size = (3, int(h), int(w or h))
    build_args = {"dynamic_img_size": True} if zoo.get("build_args") else {}
    cell: dict = {"placement": placement, "share": share}
    t0 = time.perf_counter()
    try:
        done = convert_source(source, build_args, input_size=size, budget=share, placement=placement, axis_fill=axis_fill)
        model = done.model.eval()
        counted = int(dc.count_flops(model, size))
        with torch.no_grad():
            out = model(torch.randn(2, *size))
        out = out["out"] if isinstance(out, dict) else out
        finite = bool(torch.isfinite(out).all())
        fit = done.fit
        cell.update(
            groups=done.plan.summary()["groups"], budget=done.budget, original=done.original_flops,
            counted=counted, ratio=round(counted / done.budget, 4), method=fit.method,
            moving=any(f > 1 for f in fit.group_factors),
            status="ok" if counted <= done.budget and finite else ("over" if counted > done.budget else "error"),
            reason="" if finite else "non-finite outputs",
        )
    except dc.UserInputError as err:
        cell.update(status="refused", reason=_one_line(err))
    except Exception as err:  # a bug on our side or in the model: recorded, never fatal
        cell.update(status="error", reason=_one_line(f"{type(err).__name__}: {err}"))
    cell["seconds"] = round(time.perf_counter() - t0, 1)
    return cell


def run_one(source: str, shares: list[str], axis_fill: bool = False) -> dict:
    """Every placement and budget share of one model."""
    import torch

    torch.set_num_threads(1)
    zoo = zoo_rows()[source]
    cells = [fit_cell(source, zoo, placement, share, axis_fill) for placement in PLACEMENTS for share in shares]
    return {"source": source, "input": zoo["input"], "cells": cells,
            "status": "ok" if all(c["status"] in ("ok", "refused") for c in cells) else "failed",
            "seconds": round(sum(c["seconds"] for c in cells), 1)}


def serve(shares: list[str], axis_fill: bool = False) -> None:
    """Worker loop: one source per stdin line, one JSON row per stdout line."""
    for line in sys.stdin:
        source = line.strip()
        if source:
            print(json.dumps(run_one(source, shares, axis_fill)), flush=True)


class _BudgetWorker(_Worker):
    """``zoo_sweep``'s worker process, serving this module's rows."""

    def __init__(self, shares: str, axis_fill: bool = False) -> None:
        super().__init__(0, MODULE, ("--budgets", shares, *(["--axis-fill"] if axis_fill else [])))


def sweep(sources: list[str], shares: str, timeout: float, workers: int, axis_fill: bool = False) -> None:
    sweep_cells(FILL_RESULTS if axis_fill else RESULTS, sources, lambda: _BudgetWorker(shares, axis_fill), timeout,
                workers, lambda c: f"{c['placement']}@{c['share']}:{c['status']}")


def _cell_text(c: dict) -> str:
    if c["status"] == "ok":
        return f"ok {c['ratio']:.3f} {c['method']}{' moving' if c['moving'] else ''}"
    return f"{c['status']}: {c.get('reason', '')[:240]}".replace("|", "\\|")


def render(shares: list[str], results: Path = RESULTS) -> str:
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    latest = {r["source"]: r for r in rows}
    keys = [(p, s) for p in PLACEMENTS for s in shares]
    counts = {k: {} for k in keys}
    for row in latest.values():
        for c in row.get("cells", []):
            key = (c["placement"], c["share"])
            if key in counts:
                counts[key][c["status"]] = counts[key].get(c["status"], 0) + 1
    broken = [r for r in latest.values() if "cells" not in r]
    lines = [
        "# Budget sweep", "",
        "Generated by `python -m benchmarks.coverage.budget_sweep` (see its docstring): every model the",
        "coverage sweep converts (`ok` in `zoo_sweep.jsonl`), converted again as `dynopool convert MODEL",
        "--budget SHARE --placement P` does, at the coverage sweep's input size, random weights. A cell",
        "reads `ok RATIO METHOD`: fvcore's count of the fitted model, made independently of the fit, over",
        "the budget (≤ 1), and how the fit reached it (`moving`: some group's stride factor rose above 1).",
        "`refused`: the conversion said one line and stopped (the reason given).", "",
        "| placement @ budget | models | " + " | ".join(sorted({s for v in counts.values() for s in v})) + " |",
    ]
    statuses = sorted({s for v in counts.values() for s in v})
    lines.append("|---|---:|" + "---:|" * len(statuses))
    for (p, s), v in counts.items():
        lines.append(f"| {p} @ {s} | {sum(v.values())} | " + " | ".join(str(v.get(k, 0)) for k in statuses) + " |")
    if broken:
        lines += ["", "Models whose worker gave no cells (timeout or crash): "
                  + ", ".join(f"{r['source']} ({r['status']}: {r.get('reason', '')[:80]})" for r in broken)]
    lines += ["", "| model | input | " + " | ".join(f"{p} @ {s}" for p, s in keys) + " | s |",
              "|---|---|" + "---|" * len(keys) + "---:|"]
    for source in sorted(latest):
        row = latest[source]
        by_key = {(c["placement"], c["share"]): c for c in row.get("cells", [])}
        texts = [_cell_text(by_key[k]) if k in by_key else "" for k in keys]
        lines.append(f"| {source} | {row.get('input', '')} | " + " | ".join(texts) + f" | {row.get('seconds', '')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", default="0.5x", help="comma-separated budget shares (default 0.5x)")
    parser.add_argument("--axis-fill", action="store_true",
                        help="convert with --axis-fill (results in budget_sweep_axis_fill.jsonl/.md)")
    add_sweep_arguments(parser)
    args = parser.parse_args()
    if args.serve:
        serve(args.budgets.split(","), args.axis_fill)
        return
    results, table = (FILL_RESULTS, FILL_TABLE) if args.axis_fill else (RESULTS, TABLE)
    sources = sorted(zoo_rows())
    if args.only:
        sources = [s for s in sources if s in args.only]
    if args.fresh:
        forget_rows(results, sources)
    if not args.render_only:
        sweep(sources, args.budgets, args.timeout, args.workers, args.axis_fill)
    text = render(args.budgets.split(","), results)
    table.write_text(text.replace("--budget SHARE --placement P` does", "--budget SHARE --placement P --axis-fill` does")
                     if args.axis_fill else text)
    print(f"wrote {table}")


if __name__ == "__main__":
    main()
