"""``dynopool finetune``: parse options, call ``dynopool_convert.training.finetune``, render progress."""
from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from dynopool_convert.training import FinetuneResult, TrainCallbacks, finetune as run_finetune


class BudgetMode(str, Enum):
    ceiling = "ceiling"
    target = "target"


def _fmt_flops(value: float | None) -> str:
    if value is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.0f}"


def _step_text(row: dict[str, Any]) -> str:
    budget = f"/{_fmt_flops(row['budget'])}" if row.get("budget") else ""
    return (f"loss {row['loss']:.4f} acc {row['acc']:.3f} FLOPs {_fmt_flops(row['flops'])}{budget} "
            f"{row['img_s']:.0f} img/s")


def _epoch_text(row: dict[str, Any]) -> str:
    r = " ".join(f"{rh:.3f}x{rw:.3f}" for rh, rw in row["r_saved"])
    return (f"epoch {row['epoch']} step {row['step']}: train loss {row['train_loss']:.4f} acc {row['train_acc']:.3f} | "
            f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f} | saved FLOPs {_fmt_flops(row['flops'])}"
            f"{'/' + _fmt_flops(row['budget']) if row.get('budget') else ''} | r {r} | {row['time_s']:.1f}s")


class PlainLog(TrainCallbacks):
    """One log line per logging step and per epoch (not a TTY)."""

    def on_start(self, info: dict[str, Any]) -> None:
        typer.echo(f"finetune: {info['total_steps']} steps ({info['steps_per_epoch']}/epoch, {info['epochs']} epochs) "
                   f"from step {info['start_step']} on {info['device']} x{info['world']}; "
                   f"{info['train_size']} train / {info['val_size']} val images, {info['num_classes']} classes, "
                   f"input {info['input_size']}, budget {_fmt_flops(info['budget'])}")

    def on_step(self, row: dict[str, Any]) -> None:
        typer.echo(f"step {row['step']} " + _step_text(row))

    def on_epoch(self, row: dict[str, Any]) -> None:
        typer.echo(_epoch_text(row))

    def on_message(self, text: str) -> None:
        typer.echo(text, err=True)


class RichProgress(PlainLog):
    """A Rich progress bar (step, loss, acc, FLOPs vs budget, img/s); epochs printed above it."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.console = Console(stderr=True)
        self.progress = Progress(TextColumn("[bold]finetune"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TimeRemainingColumn(), TextColumn("{task.fields[stats]}"), console=self.console)
        self.task = None

    def on_start(self, info: dict[str, Any]) -> None:
        self.console.print(f"{info['total_steps']} steps on {info['device']} x{info['world']}, "
                           f"{info['train_size']} train / {info['val_size']} val images, budget {_fmt_flops(info['budget'])}")
        self.progress.start()
        self.task = self.progress.add_task("train", total=info["total_steps"], completed=info["start_step"], stats="")

    def on_step(self, row: dict[str, Any]) -> None:
        self.progress.update(self.task, completed=row["step"], stats=_step_text(row))

    def on_epoch(self, row: dict[str, Any]) -> None:
        self.progress.console.print(_epoch_text(row))

    def on_message(self, text: str) -> None:
        self.progress.console.print(text)

    def on_end(self, result: FinetuneResult) -> None:
        self.progress.stop()


def finetune(
    checkpoint: Annotated[Optional[Path], typer.Argument(help="Converted model (from 'dynopool convert'); optional when the recipe names a model.")] = None,
    out: Annotated[Path, typer.Option("--out", help="Output folder: last.pt, best.pt, metrics.jsonl.")] = Path("run"),
    data: Annotated[Optional[str], typer.Option(help="imagefolder:DIR | cifar10:DIR | cifar100:DIR | fashion-mnist:DIR | synthetic | bundled (default).")] = None,
    epochs: Annotated[Optional[int], typer.Option(min=1, help="Epochs to train (default 1).")] = None,
    steps: Annotated[Optional[int], typer.Option(min=1, help="Optimiser steps to train (instead of --epochs).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Batch size per process.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate of the weights.")] = None,
    scale_lr: Annotated[Optional[float], typer.Option(help="Learning rate of the DynOPool strides.")] = None,
    budget: Annotated[Optional[str], typer.Option(help="FLOPs budget (4G, 500M, 4.1e9); default the checkpoint's.")] = None,
    penalty_weight: Annotated[Optional[float], typer.Option(help="Weight (lambda) of the budget penalty.")] = None,
    budget_mode: Annotated[Optional[BudgetMode], typer.Option(help="ceiling: penalise FLOPs above the budget only (default); target: also pull a model that drifts under its budget back up to it.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/last.pt.")] = False,
    recipe: Annotated[Optional[Path], typer.Option(help="YAML recipe (flags override it).")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto | cpu | cuda | cuda:N.")] = None,
    workers: Annotated[Optional[int], typer.Option(min=0, help="Data loader worker processes.")] = None,
    log_every: Annotated[Optional[int], typer.Option(min=1, help="Log every N steps.")] = None,
    trust_source: Annotated[bool, typer.Option("--trust-source", help="Allow importing the checkpoint's model source module.")] = False,
    num_classes: Annotated[Optional[int], typer.Option("--num-classes", min=1, help="Classes of the data; a model with another class count gets a fresh classifier (timm's configured head, torchvision's last Linear). Default: the data's count, the head replaced when it differs.")] = None,
) -> None:
    """Fine-tune weights and scale factors under the FLOPs budget; write OUT/{last,best}.pt and metrics.jsonl.

    Multi-GPU / multi-process: torchrun --nproc_per_node N -m dynopool_cli finetune ...
    """
    train = {"epochs": epochs, "steps": steps, "batch_size": batch_size, "lr": lr, "scale_lr": scale_lr,
             "penalty_weight": penalty_weight, "budget_mode": budget_mode.value if budget_mode else None, "seed": seed, "device": device, "workers": workers, "log_every": log_every}
    overrides: dict[str, Any] = {"train": {k: v for k, v in train.items() if v is not None}}
    if budget is not None:
        overrides["budget"] = budget
    if data is not None:
        overrides["data"] = data
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    callbacks = RichProgress() if sys.stderr.isatty() else PlainLog()
    result = run_finetune(checkpoint, out, recipe=recipe, overrides=overrides, resume=resume, callbacks=callbacks,
                          trust_source=trust_source)
    if not result.is_main:
        return
    if result.completed:
        typer.echo(f"done: {result.steps} steps in {result.wall_s:.1f}s; best val acc {result.best_metric:.4f}; "
                   f"saved FLOPs {_fmt_flops(result.final_flops)} (budget {_fmt_flops(result.budget)}); {out}/last.pt, {out}/best.pt")
    else:
        typer.echo(f"stopped at step {result.steps}/{result.total_steps}; continue with --resume ({out}/last.pt)")
