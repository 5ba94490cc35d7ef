"""``dynopool report``: parse, call the library, write the chosen format."""
from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer


class ReportFormat(str, Enum):
    md = "md"
    json = "json"
    yaml = "yaml"
    html = "html"


def report(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint written by 'dynopool convert' or 'dynopool finetune'.")],
    format: Annotated[
        Optional[ReportFormat],
        typer.Option("--format", "-f", help="md, json, yaml or html. Default: a table on a terminal, Markdown otherwise (or the --out file's suffix)."),
    ] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write the report to this file instead of stdout.")] = None,
    input_size: Annotated[
        Optional[str], typer.Option("--input-size", help="Reference input size: H, HxW or C,H,W (default: the checkpoint's).")
    ] = None,
    figures: Annotated[Optional[Path], typer.Option("--figures", help="Also write the figures (PNG) into this directory.")] = None,
    trust_source: Annotated[
        bool, typer.Option("--trust-source", help="Allow a package.module:factory or file.py:factory model source to be imported (runs its code).")
    ] = False,
    wide: Annotated[
        bool, typer.Option("--wide", help="Terminal tables: every column (by default they fit 100 columns: no op, kind, r init, RF init).")
    ] = False,
) -> None:
    """The learned shapes, receptive fields and FLOPs of a converted or fine-tuned checkpoint.

    JSON and YAML carry the same data (schema: docs/REPORT.md). HTML is one self-contained file with the figures embedded; on a terminal without --out it is written to ./CHECKPOINT-report.html.
    """
    from dynopool_convert.report import render, report_from_checkpoint, to_rich, write_figures
    from dynopool_convert.report.options import format_from_path, parse_input_size

    from rich.console import Console

    from dynopool_convert.files import atomic_write_text, check_output_path, check_output_dir

    size = parse_input_size(input_size) if input_size is not None else None
    if out is not None:
        check_output_path(out, "report", missing_parents_ok=True)
    if figures is not None:
        check_output_dir(figures, "figures")
    with Console(stderr=True).status(f"reading {checkpoint} and computing the report"):  # shown on a TTY only
        data = report_from_checkpoint(checkpoint, input_size=size, trust_source=trust_source)
    fmt = format.value if format is not None else (format_from_path(out) if out is not None else None)

    if figures is not None:
        for path in write_figures(data, figures):
            typer.echo(f"wrote {path}", err=True)
    if fmt is None and out is None and sys.stdout.isatty():
        Console().print(to_rich(data, wide=wide))
        return
    fmt = fmt or "md"
    if fmt == "html" and out is None and sys.stdout.isatty():
        out = Path(f"{checkpoint.stem}-report.html")
    text = render(data, fmt)
    if out is None:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        return
    atomic_write_text(out, text)
    typer.echo(f"wrote {out}", err=True)
