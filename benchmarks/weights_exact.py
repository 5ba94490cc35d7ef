"""Trained weights in (issue 14, item 4): does each placement start at the original's accuracy,
and where is it after short fine-tuning at the original's FLOPs?

1. Train the original model (timm, random init) on the bundled Fashion-MNIST subset until its
   validation accuracy plateaus; save its weights (safetensors).
2. For each placement, ``dynopool convert MODEL --weights FILE --placement P`` (the CLI, in a
   subprocess); validation accuracy of the converted model right after conversion.
3. Fine-tune each converted model (weights and strides) for a fraction of an epoch and for one
   epoch, under a budget equal to the original's FLOPs; validation accuracy of the saved
   (budget-projected) model. Placement ``none`` is the control: nothing converted, the original
   fine-tuned the same way.

    PYTHONPATH=.:cli python benchmarks/weights_exact.py --model resnet18 --size 32 --epochs 12 \
        --out /tmp/weights_exact --json benchmarks/results/weights_exact.json

Prints a Markdown table (docs/RESULTS.md); CPU, a few minutes per epoch of the 6000 images.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

import dynopool_convert as dc
from dynopool_convert.training import finetune
from dynopool_convert.training.data import build_datasets, parse_data_spec
from dynopool_convert.weights import build_with_weights

ROOT = Path(__file__).resolve().parents[1]


def evaluate(model: nn.Module, loader: DataLoader) -> float:
    """Top-1 accuracy on ``loader`` (eval mode, no gradients)."""
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((model(x).argmax(1) == y).sum())
            total += int(y.numel())
    return correct / total


def train_original(model: nn.Module, data, epochs: int, batch: int, lr: float, log) -> list[float]:
    """SGD + cosine, label smoothing 0.1 (the fine-tuning defaults); val accuracy per epoch."""
    train = DataLoader(data.train, batch_size=batch, shuffle=True, drop_last=True,
                       generator=torch.Generator().manual_seed(0))
    val = DataLoader(data.val, batch_size=256)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * len(train), pct_start=0.1)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    history = []
    for epoch in range(epochs):
        data.train.set_epoch(epoch)
        model.train()
        t0 = time.perf_counter()
        for x, y in train:
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()
            sched.step()
        history.append(evaluate(model, val))
        log(f"original epoch {epoch + 1}/{epochs}: val acc {history[-1]:.4f} ({time.perf_counter() - t0:.0f}s)")
    return history


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=12, help="epochs to train the original")
    ap.add_argument("--lr", type=float, default=0.1, help="peak learning rate of the original's training")
    ap.add_argument("--ft-lr", type=float, default=0.01, help="learning rate of the fine-tuning")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--fractions", default="0.1,1", help="fine-tuning lengths in epochs")
    ap.add_argument("--placements", default="exact,before,after,none", help="none: the unconverted control")
    ap.add_argument("--out", type=Path, default=Path("/tmp/weights_exact"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--trained", type=Path, default=None,
                    help="weights of an original trained by an earlier run (skips the training; no history)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    def log(text: str) -> None:
        print(text, flush=True)

    size = (3, args.size, args.size)
    data = build_datasets(parse_data_spec("bundled"), size, seed=0)
    val = DataLoader(data.val, batch_size=256)
    build_args = {"num_classes": data.num_classes}
    weights = args.out / f"{args.model}.safetensors"
    from safetensors.torch import save_file

    if args.trained is not None:
        model, _ = build_with_weights(args.model, build_args, weights=args.trained)
        history: list[float] = []
    else:
        model = dc.build_model(args.model, build_args)
        history = train_original(model, data, args.epochs, args.batch, args.lr, log)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    original_acc = evaluate(model, val)
    original_flops = dc.count_flops(model, size)
    steps_per_epoch = len(data.train) // args.batch
    rows = []
    for placement in args.placements.split(","):
        ck = args.out / f"{placement}.pt"
        cmd = [sys.executable, "-m", "dynopool_cli", "convert", args.model, "--build-arg", f"num_classes={data.num_classes}",
               "--input-size", str(args.size), "--weights", str(weights), "--out", str(ck)]
        # "none": the control, nothing converted (the original fine-tuned the same way)
        cmd += ["--include", "no-site-matches-this"] if placement == "none" else ["--placement", placement]
        subprocess.run(cmd, check=True, capture_output=True, cwd=args.out)
        converted = dc.load_checkpoint(ck)
        row = {"placement": placement, "groups": converted.plan.summary()["groups"],
               "flops_init": dc.count_flops(converted.model, size), "acc_init": evaluate(converted.model, val)}
        log(f"{placement}: {row['groups']} groups, init acc {row['acc_init']:.4f}, FLOPs {row['flops_init']}")
        for fraction in (float(f) for f in args.fractions.split(",")):
            steps = max(1, math.ceil(fraction * steps_per_epoch))
            run = args.out / f"{placement}_{fraction:g}"
            if run.exists():
                import shutil

                shutil.rmtree(run)
            result = finetune(ck, run, overrides={"budget": str(original_flops), "data": "bundled", "train": {
                "steps": steps, "batch_size": args.batch, "lr": args.ft_lr, "device": "cpu", "log_every": 1000,
                "warmup_steps": 0}})
            tuned = dc.load_checkpoint(run / "last.pt")
            row[f"acc_{fraction:g}"] = evaluate(tuned.model, val)
            row[f"flops_{fraction:g}"] = dc.count_flops(tuned.model, size)
            row[f"r_{fraction:g}"] = [[round(1 / s, 3) for s in p.detach().tolist()] for p in dc.scale_parameters(tuned.model)]
            log(f"{placement} after {fraction:g} epoch ({steps} steps): acc {row[f'acc_{fraction:g}']:.4f}, "
                f"FLOPs {row[f'flops_{fraction:g}']} ({result.wall_s:.0f}s)")
        rows.append(row)
    summary = {"model": args.model, "size": args.size, "epochs": args.epochs, "history": history,
               "original_acc": original_acc, "original_flops": original_flops, "steps_per_epoch": steps_per_epoch,
               "ft_lr": args.ft_lr, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    fractions = [f"{float(f):g}" for f in args.fractions.split(",")]
    print(f"\noriginal {args.model} at {args.size}px: val acc {original_acc:.4f}, {original_flops} FLOPs "
          f"(last epochs: {', '.join(f'{a:.4f}' for a in history[-3:])})\n")
    print("| placement | groups | acc at init | FLOPs at init | " + " | ".join(f"acc after {f} epoch" for f in fractions) + " |")
    print("|---|---|---|---|" + "---|" * len(fractions))
    for r in rows:
        accs = " | ".join(f"{r[f'acc_{f}']:.4f} ({r[f'flops_{f}'] / original_flops:.3f}x FLOPs)" for f in fractions)
        print(f"| {r['placement']} | {r['groups']} | {r['acc_init']:.4f} | {r['flops_init'] / original_flops:.3f}x | {accs} |")


if __name__ == "__main__":
    main()
