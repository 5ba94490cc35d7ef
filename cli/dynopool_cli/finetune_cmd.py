"""``dynopool finetune``: parse options, call ``dynopool_convert.training.finetune``, render progress."""
from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer


class BudgetMode(str, Enum):
    ceiling = "ceiling"
    target = "target"


def finetune(
    checkpoint: Annotated[Optional[Path], typer.Argument(help="Converted model (from 'dynopool convert'); optional when the recipe names a model.")] = None,
    out: Annotated[Path, typer.Option("--out", help="Output folder: last.pt, best.pt, metrics.jsonl.")] = Path("run"),
    data: Annotated[Optional[str], typer.Option(help="imagefolder:DIR (DIR/train, DIR/val|valid|validation|test; no validation split: 10% of each class set aside; DIR/<class>/ alone: all training) | csv:FILE (rows of image path, label[, split]; paths relative to FILE's folder) | npz:FILE (arrays x_train, y_train[, x_test, y_test]) | cifar10:DIR | cifar100:DIR | fashion-mnist:DIR | mnist:DIR | kmnist:DIR (IDX files) | synthetic | bundled (default).")] = None,
    epochs: Annotated[Optional[int], typer.Option(min=1, help="Epochs to train (default 1).")] = None,
    steps: Annotated[Optional[int], typer.Option(min=1, help="Optimiser steps to train (instead of --epochs).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Batch size per process.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate of the weights.")] = None,
    scale_lr: Annotated[Optional[float], typer.Option(help="Learning rate of the DynOPool strides by their straight-through gradient (default 0: the sizes come from the budget fit; in our runs gradient learning cost 1.5-2 points, docs/RESULTS.md section 6).")] = None,
    budget: Annotated[Optional[str], typer.Option(help="FLOPs budget (4G, 500M, 4.1e9, or a share of the original model's FLOPs: 0.7x, 70%); default the checkpoint's. Where the data's class count replaces the classifier, the original is counted with the new one and a share, or the checkpoint's budget, is of that count.")] = None,
    penalty_weight: Annotated[Optional[float], typer.Option(help="Weight (lambda) of the budget penalty.")] = None,
    budget_mode: Annotated[Optional[BudgetMode], typer.Option(help="ceiling: penalise FLOPs above the budget only (default); target: also pull a model that drifts under its budget back up to it.")] = None,
    size_jitter: Annotated[Optional[int], typer.Option(min=0, help="While the strides learn, move every group's size by up to this many pixels each step (default 0: off; in our runs 1 pixel cost about 4 points of accuracy, docs/RESULTS.md §6), so the weights work at the neighbouring sizes.")] = None,
    size_search: Annotated[Optional[bool], typer.Option("--size-search/--no-size-search", help="Choose the sizes once by held-out loss on training images set aside for it, then settle the weights at them (default off: in our runs it kept the starting sizes every time and the images set aside cost up to 0.5 points, docs/RESULTS.md section 6.5); off, the strides keep the budget fit's sizes, or learn to the end with --scale-lr > 0, as in the paper.")] = None,
    settle: Annotated[Optional[float], typer.Option(min=0.0, max=0.9, help="With --size-search: fraction of the steps, at the end, trained at the searched sizes (default 0.3).")] = None,
    holdout: Annotated[Optional[float], typer.Option(help="With --size-search: fraction of the training data held out for it (default 0.1, at most train.holdout_max = 5000 images, and with --steps at most steps x batch size, 256 at least); never the validation data.")] = None,
    model_ema: Annotated[Optional[bool], typer.Option("--model-ema/--no-model-ema", help="Evaluate and save an exponential moving average of the weights (timm's ModelEmaV3, with its warm-up) instead of the last weights; the strides are not averaged (default off).")] = None,
    model_ema_decay: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="With --model-ema: the average's decay once warmed up (default 0.9998).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/last.pt.")] = False,
    recipe: Annotated[Optional[Path], typer.Option(help="YAML recipe (flags override it).")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto | cpu | cuda | cuda:N.")] = None,
    workers: Annotated[Optional[int], typer.Option(min=0, help="Data loader worker processes.")] = None,
    log_every: Annotated[Optional[int], typer.Option(min=1, help="Log every N steps.")] = None,
    val_limit: Annotated[Optional[int], typer.Option(min=1, help="Validate on at most N validation images, a fixed random sample (the same every epoch and after --resume; default all). For short runs on large validation sets; the epoch rows record val_images.")] = None,
    output: Annotated[Optional[str], typer.Option("--output", help="Which output the loss and accuracy read where the model's forward returns a tuple, list, namedtuple or dict: auto (default: a tensor output as is, else the first element that is N x classes; the run says which), an index (0, -1) or a dict key / namedtuple field name (logits).")] = None,
    trust_source: Annotated[bool, typer.Option("--trust-source", help="Allow importing the checkpoint's model source module.")] = False,
    num_classes: Annotated[Optional[int], typer.Option("--num-classes", min=1, help="Classes of the data; a model with another class count gets a fresh classifier (timm's configured head, torchvision's last Linear). Default: the data's count, the head replaced when it differs.")] = None,
) -> None:
    """Fine-tune weights and scale factors under the FLOPs budget; write OUT/{last,best}.pt and metrics.jsonl.

    Multi-GPU / multi-process: torchrun --nproc_per_node N -m dynopool_cli finetune ...
    """
    train = {"epochs": epochs, "steps": steps, "batch_size": batch_size, "lr": lr, "scale_lr": scale_lr,
             "penalty_weight": penalty_weight, "budget_mode": budget_mode.value if budget_mode else None, "seed": seed, "device": device, "workers": workers, "log_every": log_every,
             "size_jitter": size_jitter, "size_search": size_search, "settle": settle, "holdout": holdout,
             "model_ema": model_ema, "model_ema_decay": model_ema_decay, "val_limit": val_limit,
             "output": output}
    overrides: dict[str, Any] = {"train": {k: v for k, v in train.items() if v is not None}}
    if budget is not None:
        overrides["budget"] = budget
    if data is not None:
        overrides["data"] = data
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    from dynopool_convert.training import finetune as run_finetune

    from .finetune_progress import PlainLog, RichProgress, fmt_flops

    callbacks = RichProgress() if sys.stderr.isatty() else PlainLog()
    result = run_finetune(checkpoint, out, recipe=recipe, overrides=overrides, resume=resume, callbacks=callbacks,
                          trust_source=trust_source)
    if not result.is_main:
        return
    if result.completed:
        typer.echo(f"done: {result.steps} steps in {result.wall_s:.1f}s; best val acc {result.best_metric:.4f}; "
                   f"saved FLOPs {fmt_flops(result.final_flops)} (budget {fmt_flops(result.budget)}); {out}/last.pt, {out}/best.pt")
    else:
        typer.echo(f"stopped at step {result.steps}/{result.total_steps}; continue with --resume ({out}/last.pt)")
