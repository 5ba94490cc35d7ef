"""Progress display of ``dynopool finetune`` (imports the training library: loaded when the command runs)."""
from __future__ import annotations

from typing import Any

import typer

from dynopool_convert.flops import format_flops
from dynopool_convert.group_ids import by_group, format_by_group
from dynopool_convert.training import FinetuneResult, TrainCallbacks

__all__ = ["PlainLog", "RichProgress", "fmt_flops"]


def fmt_flops(value: float | None) -> str:
    """A FLOPs count as convert and report print it (``-`` for None)."""
    return "-" if value is None else format_flops(value)


def _step_text(row: dict[str, Any]) -> str:
    budget = f"/{fmt_flops(row['budget'])}" if row.get("budget") else ""
    return (f"loss {row['loss']:.4f} acc {row['acc']:.3f} FLOPs {fmt_flops(row['flops'])}{budget} "
            f"{row['img_s']:.0f} img/s")


def _val_count(row: dict[str, Any]) -> str:
    return f" ({row['val_images']} images)" if row.get("val_images") is not None else ""


def _epoch_text(row: dict[str, Any], groups: list[int | None] | None) -> str:
    """The epoch's line; the scale factors labelled by group id, in group order (as in the report)."""
    ids = groups if groups is not None and len(groups) == len(row["r_saved"]) else [None] * len(row["r_saved"])
    r = format_by_group(by_group(row["r_saved"], ids), lambda v: f"{v[0]:.3f}x{v[1]:.3f}")
    return (f"epoch {row['epoch']} step {row['step']}: train loss {row['train_loss']:.4f} acc {row['train_acc']:.3f} | "
            f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}{_val_count(row)} | saved FLOPs {fmt_flops(row['flops'])}"
            f"{'/' + fmt_flops(row['budget']) if row.get('budget') else ''} | r {r} | {row['time_s']:.1f}s")


class PlainLog(TrainCallbacks):
    """One log line per logging step and per epoch (not a TTY)."""

    groups: list[int | None] | None = None  # group id of each entry of a row's r, from on_start

    def on_start(self, info: dict[str, Any]) -> None:
        self.groups = info.get("groups")
        typer.echo(f"finetune: {info['total_steps']} steps ({info['steps_per_epoch']}/epoch, {info['epochs']} epochs) "
                   f"from step {info['start_step']} on {info['device']} x{info['world']}; "
                   f"{info['train_size']} train / {info['val_size']} val images, {info['num_classes']} classes, "
                   f"input {info['input_size']}, budget {fmt_flops(info['budget'])}")

    def on_step(self, row: dict[str, Any]) -> None:
        typer.echo(f"step {row['step']} " + _step_text(row))

    def on_epoch(self, row: dict[str, Any]) -> None:
        typer.echo(_epoch_text(row, self.groups))

    def on_message(self, text: str) -> None:
        typer.echo(text, err=True)

    def on_search(self, scored: int) -> None:
        if scored % 10 == 0:
            typer.echo(f"size search: {scored} allocations scored", err=True)


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
        self.groups = info.get("groups")
        self.console.print(f"{info['total_steps']} steps on {info['device']} x{info['world']}, "
                           f"{info['train_size']} train / {info['val_size']} val images, budget {fmt_flops(info['budget'])}")
        self.progress.start()
        self.task = self.progress.add_task("train", total=info["total_steps"], completed=info["start_step"], stats="")

    def on_step(self, row: dict[str, Any]) -> None:
        self.progress.update(self.task, completed=row["step"], stats=_step_text(row))

    def on_epoch(self, row: dict[str, Any]) -> None:
        self.progress.console.print(_epoch_text(row, self.groups))

    def on_message(self, text: str) -> None:
        self.progress.console.print(text)

    def on_search(self, scored: int) -> None:
        self.progress.update(self.task, stats=f"size search: {scored} allocations scored on held-out images")

    def on_end(self, result: FinetuneResult) -> None:
        self.progress.stop()
