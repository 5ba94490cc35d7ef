"""Export sweep: ``dynopool export`` (ONNX and ``torch.export``) on every model the coverage sweep
converts, each file checked against the live converted model (docs/results/export_sweep.md).

    python -m benchmarks.coverage.export_sweep                       # everything, resumable
    python -m benchmarks.coverage.export_sweep --only timm:resnet18 --fresh
    python -m benchmarks.coverage.export_sweep --render-only

Each model of ``docs/results/zoo_sweep.jsonl`` whose status is ``ok`` is converted again at the
same input size and build arguments the way the CLI does it (``convert_source``: validation
included, no weights), once per placement (``before``, ``exact``), fitted to half its FLOPs so
that its sizes have moved as a trained model's have (without a budget where the budget is
refused), its batch norms given random statistics (seeded: a fresh timm block's last norm is zero,
which would hide its branch), then exported by ``dynopool_convert.export`` as the CLI does:
frozen at the reference size, written, loaded back in its runtime (onnxruntime,
``torch.export.load``) and compared with the live model on random batches. A cell is ``ok`` when
``ExportResult.passes`` (the CLI's default tolerances: 1e-4 + 1e-5 x max |output|, or as close
to the float64 result as PyTorch float32 is), ``differs`` when not, ``refused`` when the export
says one line (``UserInputError``), ``error`` otherwise. Models run in worker subprocesses with a
timeout each (``zoo_sweep``'s workers); results are appended to a JSON-lines file.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.coverage.budget_sweep import zoo_rows
from benchmarks.coverage.zoo_sweep import ROOT, _Worker, add_sweep_arguments, forget_rows, sweep_cells

RESULTS = ROOT / "docs" / "results" / "export_sweep.jsonl"
TABLE = ROOT / "docs" / "results" / "export_sweep.md"
PLACEMENTS = ("before", "exact")
FORMATS = ("onnx", "pt2")
BUDGET = "0.5x"
ATOL, RTOL = 1e-4, 1e-5  # the CLI's defaults
MODULE = "benchmarks.coverage.export_sweep"


def _one_line(text: object, limit: int = 300) -> str:
    return " ".join(str(text).split())[:limit]


def _converted(source: str, zoo: dict, placement: str):
    """The model converted as the CLI does, fitted to ``BUDGET`` (unfitted when refused)."""
    import dynopool_convert as dc
    from dynopool_convert.conversion import convert_source

    h, _, w = zoo["input"].partition("x")
    size = (3, int(h), int(w or h))
    build_args = {"dynamic_img_size": True} if zoo.get("build_args") else {}
    try:
        return convert_source(source, build_args, input_size=size, budget=BUDGET, placement=placement), BUDGET
    except dc.UserInputError:
        return convert_source(source, build_args, input_size=size, placement=placement), "none"


def export_cells(source: str, zoo: dict, placement: str, out: Path) -> list[dict]:
    """One cell per format: the export's distance from the live model, or why it failed."""
    import dynopool_convert as dc
    from benchmarks.coverage.export_check import randomize_norms
    from dynopool_convert.export import export

    t0 = time.perf_counter()
    try:
        done, budget = _converted(source, zoo, placement)
    except Exception as err:  # recorded, never fatal
        why = _one_line(f"convert: {type(err).__name__}: {err}")
        return [{"placement": placement, "format": f, "status": "error", "reason": why, "seconds": 0.0} for f in FORMATS]
    model = done.model.eval()
    randomize_norms(model)
    convert_s = round(time.perf_counter() - t0, 1)
    cells = []
    for fmt in FORMATS:
        cell: dict = {"placement": placement, "format": fmt, "budget": budget, "convert_s": convert_s}
        t0 = time.perf_counter()
        try:
            res = export(model, fmt, out / f"{placement}.{fmt}")
            cell.update(max_abs_diff=float(f"{res.max_abs_diff:.3g}"), output_max=float(f"{res.output_max:.3g}"),
                        float64_diff=res.float64_max_abs_diff and float(f"{res.float64_max_abs_diff:.3g}"),
                        float32_diff=res.float32_max_abs_diff and float(f"{res.float32_max_abs_diff:.3g}"),
                        status="ok" if res.passes(ATOL, RTOL) else "differs", **({"note": res.note} if res.note else {}))
        except dc.UserInputError as err:
            cell.update(status="refused", reason=_one_line(err))
        except Exception as err:  # a bug on our side or in the exporter: recorded, never fatal
            cell.update(status="error", reason=_one_line(f"{type(err).__name__}: {err}"))
        cell["seconds"] = round(time.perf_counter() - t0, 1)
        cells.append(cell)
    return cells


#: the exported files of one model live under a folder of this prefix (a worker killed for memory
#: cannot remove its own: the next sweep does, before it starts)
TMP_PREFIX = "dynopool-export-sweep-"


def remove_leftovers() -> None:
    """Remove the temporary folders of earlier sweeps' killed workers (models' files, GBs each)."""
    import shutil

    for folder in Path(tempfile.gettempdir()).glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(folder, ignore_errors=True)


def run_one(source: str) -> dict:
    """Every placement and format of one model."""
    import torch

    torch.set_num_threads(1)
    zoo = zoo_rows()[source]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=TMP_PREFIX) as tmp:
        cells = [c for p in PLACEMENTS for c in export_cells(source, zoo, p, Path(tmp))]
    return {"source": source, "input": zoo["input"], "cells": cells,
            "status": "ok" if all(c["status"] == "ok" for c in cells) else "failed",
            "seconds": round(time.perf_counter() - t0, 1)}


def serve() -> None:
    """Worker loop: one source per stdin line, one JSON row per stdout line."""
    for line in sys.stdin:
        source = line.strip()
        if source:
            print(json.dumps(run_one(source)), flush=True)


def sweep(sources: list[str], timeout: float, workers: int, again: bool = False) -> None:
    sweep_cells(RESULTS, sources, lambda: _Worker(0, MODULE), timeout, workers,
                lambda c: f"{c['placement']}/{c['format']}:{c['status']}", again)


def _latest(results: Path) -> dict[str, dict]:
    rows: dict[str, dict] = {}
    for line in results.read_text().splitlines():
        row = json.loads(line)
        rows[row["source"]] = row
    return rows


def _cell_text(c: dict) -> str:
    if c["status"] in ("ok", "differs"):
        return f"{c['status']} {c['max_abs_diff']:.1e} / {c['output_max']:.2g}"
    return f"{c['status']}: {c.get('reason', '')[:120]}"


def render(results: Path = RESULTS) -> str:
    """The markdown table of the latest row per model, with totals per placement and format."""
    import onnxruntime
    import torch

    rows = _latest(results)
    keys = [(p, f) for p in PLACEMENTS for f in FORMATS]
    totals = {k: {} for k in keys}
    lines = []
    for source in sorted(rows, key=lambda s: (not s.startswith("torchvision"), s)):
        row = rows[source]
        cells = {(c["placement"], c["format"]): c for c in row.get("cells", [])}
        for k in keys:
            status = cells[k]["status"] if k in cells else row["status"]
            totals[k][status] = totals[k].get(status, 0) + 1
        texts = [_cell_text(cells[k]) if k in cells else f"{row['status']}: {row.get('reason', '')[:80]}" for k in keys]
        lines.append(f"| {source} | {row.get('input', '')} | " + " | ".join(texts) + f" | {row['seconds']} |")
    head = [
        "# Export sweep", "",
        f"Generated by `python -m benchmarks.coverage.export_sweep` (torch {torch.__version__}, "
        f"onnxruntime {onnxruntime.__version__}, CPU). Each cell: status, then the file's max abs difference "
        "from the live converted model / the largest |output| (random inputs, batch 3, at the reference size).", "",
    ]
    statuses = sorted({s for t in totals.values() for s in t})
    head += ["| placement, format | " + " | ".join(statuses) + " |", "|---|" + "---:|" * len(statuses)]
    head += [f"| {p}, {f} | " + " | ".join(str(totals[(p, f)].get(s, 0)) for s in statuses) + " |" for p, f in keys]
    head += ["", "| model | input | " + " | ".join(f"{p} {f}" for p, f in keys) + " | s |",
             "|---|---|" + "---|" * len(keys) + "---:|"]
    return "\n".join(head + lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sweep_arguments(parser)
    parser.add_argument("--again", action="store_true",
                        help="run the models even if done, appending their rows (the table reads each model's last)")
    args = parser.parse_args()
    if args.serve:
        serve()
        return
    if not args.render_only:
        zoo = zoo_rows()
        sources = args.only or sorted(zoo, key=lambda s: zoo[s].get("seconds", 0))  # quickest first
        if args.fresh:
            forget_rows(RESULTS, sources)
        remove_leftovers()
        sweep(sources, args.timeout, args.workers, args.again)
        remove_leftovers()
    TABLE.write_text(render())
    print(f"wrote {TABLE}")


if __name__ == "__main__":
    main()
