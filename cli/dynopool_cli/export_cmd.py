"""``dynopool export``: load a checkpoint, freeze it, export it, check the file against PyTorch."""
from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer


class ExportFormat(str, Enum):
    onnx = "onnx"
    torchscript = "torchscript"
    pt2 = "pt2"
    safetensors = "safetensors"


def export(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint written by 'dynopool convert' or 'dynopool finetune'.")],
    format: Annotated[ExportFormat, typer.Option("--format", "-f", help="onnx (opset 18, onnxruntime), torchscript (torch.jit), pt2 (torch.export) or safetensors (weights of the frozen model).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="File to write.")],
    atol: Annotated[float, typer.Option("--atol", min=0.0, help="Absolute part of the check's tolerance on the max abs difference from the PyTorch model.")] = 1e-4,
    rtol: Annotated[float, typer.Option("--rtol", min=0.0, help="Relative part of the tolerance, times the largest |output| of the PyTorch model.")] = 1e-5,
    batch: Annotated[
        int | None, typer.Option("--batch", min=1, help="Fix the batch size of the graph formats at this (default: dynamic, checked at another batch size than the one exported with).")
    ] = None,
    trust_source: Annotated[
        bool, typer.Option("--trust-source", help="Allow a package.module:factory or file.py:factory model source to be imported (runs its code).")
    ] = False,
) -> None:
    """Freeze the learned sizes (at the checkpoint's reference input size) and export the model.

    The written file is loaded back in its own runtime (onnxruntime, torch.jit.load, torch.export.load, or a reloaded state dict) and compared with the PyTorch model on random inputs at the reference size; the max absolute difference is printed, and a difference above --atol + --rtol x max|output| exits with code 1, unless rounding in the model's precision (float32, float16 or bfloat16) explains it: the file is then compared with the model run in float64 and passes if it is no farther from it than that tolerance plus twice the PyTorch model's own distance. What each format keeps: docs/EXPORT.md.
    """
    from dynopool_convert.checkpoint import load_checkpoint
    from dynopool_convert.export import export as run_export
    from dynopool_convert.files import check_output_path

    from rich.console import Console

    check_output_path(out, f"{format.value} export", missing_parents_ok=True)
    with Console(stderr=True).status(f"loading {checkpoint}, freezing and exporting to {format.value}"):  # TTY only
        ckpt = load_checkpoint(checkpoint, trust_source=trust_source)
        result = run_export(ckpt.model, format.value, out, ckpt.input_size, batch=batch)
    c, h, w = result.input_size
    opset = f", ONNX opset {result.opset}" if result.opset is not None else ""
    n, batch_dim = ("N", "batch dynamic") if result.batch is None else (result.batch, "batch fixed")
    typer.echo(f"wrote {result.path} ({format.value}{opset}; input {n} x {c} x {h} x {w}, {batch_dim})"
               if format is not ExportFormat.safetensors else f"wrote {result.path} (safetensors: the frozen model's weights)")
    if result.note:
        typer.echo(f"note: {result.note}")
    typer.echo(f"max abs difference from the PyTorch model at {h}x{w}: {result.max_abs_diff:.3g} "
               f"(frozen PyTorch model: {result.frozen_max_abs_diff:.3g}; outputs up to {result.output_max:.3g})")
    if result.float64_max_abs_diff is not None:
        typer.echo(f"from the model run in float64: {result.float64_max_abs_diff:.3g} "
                   f"(the PyTorch model itself, in {result.precision}: {result.float32_max_abs_diff:.3g})")
    if not result.passes(atol, rtol):
        tolerance = result.tolerance(atol, rtol)
        rounding = (f"; from float64 {result.float64_max_abs_diff:.3g} > {tolerance:.3g} + 2 x PyTorch {result.precision}'s "
                    f"{result.float32_max_abs_diff:.3g}" if result.float64_max_abs_diff is not None else "")
        typer.echo(f"Error: the export differs from the PyTorch model by {result.max_abs_diff:.3g} > {tolerance:.3g} "
                   f"(--atol {atol:g} + --rtol {rtol:g} x {result.output_max:.3g}){rounding}{_batch_hint(result, tolerance)}", err=True)
        sys.exit(1)


def _batch_hint(result, tolerance: float) -> str:
    """Where the file is right at the batch size it was exported with only: say so, and the way out."""
    if result.example_max_abs_diff is None or result.example_max_abs_diff > tolerance:
        return ""
    return (f"; at the batch size it was exported with ({result.example_batch}) it differs by "
            f"{result.example_max_abs_diff:.3g} only: the exporter fixed a value the model computes from the batch "
            f"size (an int() of a size, say); export with --batch N for a graph of batch N")
