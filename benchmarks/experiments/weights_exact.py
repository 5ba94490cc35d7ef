"""Trained weights in (issue 14, item 4): does each placement start at the original's accuracy,
and where is it after short fine-tuning at the original's FLOPs?

1. Train the original model (timm, random init) on Fashion-MNIST until its validation accuracy
   plateaus (the accuracy after every epoch is printed and saved); save its weights
   (safetensors) and that history next to them (``MODEL.history.json``).
2. For each placement, ``dynopool convert MODEL --weights FILE --placement P`` (the CLI, in a
   subprocess); validation accuracy of the converted model right after conversion.
3. Fine-tune each converted model with ``dynopool finetune``'s defaults for a fraction of an
   epoch and for one epoch, under a budget equal to the original's FLOPs; validation accuracy of
   the saved (budget-projected) model, its groups' sizes, and the size search's choice. Placement
   ``none`` is the control: nothing converted, the original fine-tuned the same way.

    python -m benchmarks.experiments.weights_exact --model resnet18 --size 32 --epochs 10 \
        --out /tmp/weights_exact --json docs/results/weights_exact/resnet18.json
    # only train (and save) the original:   --placements ""
    # fine-tune an original trained before: --trained /tmp/weights_exact/resnet18.safetensors
    # other fine-tuning settings (task-1 style diagnostics): --ft '{"scale_lr": 0.02, "size_search": false}'

Prints a Markdown table (docs/RESULTS.md §7); CPU, minutes per epoch of the 6000 bundled images.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
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
from dynopool_convert.training.group_sizes import GroupGeometry
from dynopool_convert.weights import build_with_weights


def evaluate(model: nn.Module, loader: DataLoader) -> float:
    """Top-1 accuracy on ``loader`` (eval mode, no gradients)."""
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((model(x).argmax(1) == y).sum())
            total += int(y.numel())
    return correct / total


def train_original(model: nn.Module, data, args, log) -> list[float]:
    """One-cycle SGD (or AdamW), label smoothing 0.1; validation accuracy after every epoch."""
    train = DataLoader(data.train, batch_size=args.batch, shuffle=True, drop_last=True,
                       generator=torch.Generator().manual_seed(0))
    val = DataLoader(data.val, batch_size=256)
    if args.opt == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * len(train),
                                                pct_start=args.warmup)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    history = []
    for epoch in range(args.epochs):
        data.train.set_epoch(epoch)
        model.train()
        t0 = time.perf_counter()
        for x, y in train:
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()
            sched.step()
        history.append(evaluate(model, val))
        log(f"original epoch {epoch + 1}/{args.epochs}: val acc {history[-1]:.4f} ({time.perf_counter() - t0:.0f}s)")
    return history


def group_sizes(model: nn.Module, size: tuple[int, int, int]) -> list[list[int]]:
    """Each group's output size at the reference input (empty when nothing is converted)."""
    geometry = GroupGeometry(model, size)
    return [list(s) for s in geometry.measure()[1]] if geometry.params else []


def acc_at_initial_sizes(model: nn.Module, size, val: DataLoader) -> float | None:
    """Accuracy with every group's stride put back to its value at conversion (None: unchanged)."""
    geometry = GroupGeometry(model, size)
    initial = [m.stride_init for m in geometry.sites]
    if not geometry.params or geometry.sizes_at(initial) == geometry.measure()[1]:
        return None
    geometry.set_strides(initial)
    return evaluate(model, val)


def finetune_row(ck: Path, run: Path, steps: int, seed: int, args, budget: int, size, val) -> dict:
    """Fine-tune checkpoint ``ck`` for ``steps`` steps; accuracy, FLOPs, sizes and search of the saved model."""
    if run.exists():
        shutil.rmtree(run)
    train = {"steps": steps, "batch_size": args.batch, "lr": args.ft_lr, "device": "cpu", "log_every": 1000,
             "warmup_steps": 0, "seed": seed, **json.loads(args.ft)}
    t0 = time.perf_counter()
    finetune(ck, run, overrides={"budget": str(budget), "data": args.data, "train": train})
    tuned = dc.load_checkpoint(run / "last.pt")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    search = next((r for r in rows if r.get("kind") == "search"), None)
    return {"steps": steps, "seed": seed, "acc": evaluate(tuned.model, val), "flops": dc.count_flops(tuned.model, size),
            "sizes": group_sizes(tuned.model, size), "acc_initial_sizes": acc_at_initial_sizes(tuned.model, size, val),
            "search": None if search is None else {k: search.get(k) for k in ("start", "sizes", "accuracy", "evaluations")},
            "wall_s": round(time.perf_counter() - t0, 1)}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--data", default="bundled", help="--data spec (bundled, fashion-mnist:DIR)")
    ap.add_argument("--eval-data", default=None,
                    help="score every model on this spec's validation split instead of --data's (e.g. "
                         "fashion-mnist:DIR: its 10k test images, none of them in the bundled subset)")
    ap.add_argument("--epochs", type=int, default=12, help="epochs to train the original")
    ap.add_argument("--lr", type=float, default=0.1, help="peak learning rate of the original's training")
    ap.add_argument("--opt", choices=("sgd", "adamw"), default="sgd", help="the original's optimiser")
    ap.add_argument("--warmup", type=float, default=0.1, help="one-cycle warm-up fraction of the original's training")
    ap.add_argument("--ft-lr", type=float, default=0.01, help="learning rate of the fine-tuning")
    ap.add_argument("--ft", default="{}", help="more train.* overrides of the fine-tuning (JSON)")
    ap.add_argument("--build-args", default="{}",
                    help='more builder arguments of the model (JSON), e.g. a small ViT: \'{"img_size": 32, "patch_size": 4}\'')
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--fractions", default="0.01,0.1,1", help="fine-tuning lengths in epochs")
    ap.add_argument("--placements", default="none,exact,before,after", help="none: the unconverted control")
    ap.add_argument("--seeds", default="0", help="fine-tuning seeds of the placements in --seeded")
    ap.add_argument("--seeded", default="none,exact", help="placements fine-tuned with every seed (others: the first)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/weights_exact"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--budget-frac", type=float, default=1.0,
                    help="budget as a fraction of the original's FLOPs (fitted at conversion below 1)")
    ap.add_argument("--input-site", action="store_true", help="convert with a learnable input resolution")
    ap.add_argument("--axis-fill", action="store_true", help="convert with --axis-fill (below budget 1)")
    ap.add_argument("--trained", type=Path, default=None,
                    help="weights of an original trained by an earlier run (skips the training)")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    def log(text: str) -> None:
        print(text, flush=True)

    size = (3, args.size, args.size)
    data = build_datasets(parse_data_spec(args.data), size, seed=0)
    scored = data if args.eval_data is None else build_datasets(parse_data_spec(args.eval_data), size, seed=0)
    val = DataLoader(scored.val, batch_size=256)
    build_args = {"num_classes": data.num_classes, **json.loads(args.build_args)}
    if args.trained is not None:
        weights = args.trained
        model, _ = build_with_weights(args.model, build_args, weights=weights)
        saved = weights.with_suffix(".history.json")
        history = json.loads(saved.read_text())["history"] if saved.is_file() else []
    else:
        from safetensors.torch import save_file

        weights = args.out / f"{args.model}.safetensors"
        model = dc.build_model(args.model, build_args)
        history = train_original(model, data, args, log)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
        weights.with_suffix(".history.json").write_text(json.dumps({"history": history, "args": {
            k: str(v) for k, v in vars(args).items()}}))
    original_acc = evaluate(model, val)
    original_flops = dc.count_flops(model, size)
    steps_per_epoch = len(data.train) // args.batch
    fractions = [float(f) for f in args.fractions.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for placement in filter(None, args.placements.split(",")):
        ck = args.out / f"{placement}.pt"
        cmd = [sys.executable, "-m", "dynopool_cli", "convert", args.model, "--input-size", str(args.size),
               "--weights", str(weights), "--out", str(ck)]
        for key, value in build_args.items():
            cmd += ["--build-arg", f"{key}={json.dumps(value) if isinstance(value, bool) else value}"]
        # "none": the control, nothing converted (the original fine-tuned the same way)
        cmd += ["--include", "no-site-matches-this"] if placement == "none" else ["--placement", placement]
        budget = int(args.budget_frac * original_flops)
        cmd += ["--budget", str(budget)] if args.budget_frac < 1 else []
        cmd += ["--input-site"] if args.input_site and placement != "none" else []
        cmd += ["--axis-fill"] if args.axis_fill and placement != "none" else []
        subprocess.run(cmd, check=True, capture_output=True, cwd=args.out)
        converted = dc.load_checkpoint(ck)
        row = {"placement": placement, "groups": converted.plan.summary()["groups"],
               "flops_init": dc.count_flops(converted.model, size), "acc_init": evaluate(converted.model, val),
               "sizes_init": group_sizes(converted.model, size), "runs": {}}
        log(f"{placement}: {row['groups']} groups, init acc {row['acc_init']:.4f}, FLOPs {row['flops_init']}, "
            f"sizes {row['sizes_init']}")
        for fraction in fractions:
            steps = max(1, math.ceil(fraction * steps_per_epoch))
            runs = []
            for seed in (seeds if placement in args.seeded.split(",") else seeds[:1]):
                r = finetune_row(ck, args.out / f"{placement}_{fraction:g}_s{seed}", steps, seed, args,
                                 budget, size, val)
                runs.append(r)
                log(f"{placement} after {fraction:g} epoch ({steps} steps, seed {seed}): acc {r['acc']:.4f}, "
                    f"FLOPs {r['flops'] / original_flops:.4f}x, sizes {r['sizes']}, at initial sizes "
                    f"{r['acc_initial_sizes']}, search {r['search']} ({r['wall_s']:.0f}s)")
            row["runs"][f"{fraction:g}"] = runs
        rows.append(row)
    summary = {"model": args.model, "build_args": build_args, "size": args.size, "data": args.data, "eval_data": args.eval_data, "epochs": args.epochs, "lr": args.lr,
               "opt": args.opt, "history": history, "original_acc": original_acc, "original_flops": original_flops,
               "steps_per_epoch": steps_per_epoch, "budget_frac": args.budget_frac, "input_site": args.input_site, "axis_fill": args.axis_fill, "ft_lr": args.ft_lr, "ft": json.loads(args.ft), "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    print_table(summary, fractions)


def print_table(summary: dict, fractions: list[float]) -> None:
    """The Markdown table of docs/RESULTS.md §7 (several seeds: their accuracies joined by /)."""
    flops0 = summary["original_flops"]
    print(f"\noriginal {summary['model']} at {summary['size']}px: val acc {summary['original_acc']:.4f}, {flops0} FLOPs; "
          f"per epoch: {', '.join(f'{a:.3f}' for a in summary['history'])}\n")
    print("| placement | groups | acc at init | FLOPs at init | "
          + " | ".join(f"after {f:g} epoch" for f in fractions) + " |")
    print("|---|---|---|---|" + "---|" * len(fractions))
    print(f"| original | – | {summary['original_acc'] * 100:.1f}% | 1.000× | " + " | ".join("–" for _ in fractions) + " |")
    for r in summary["rows"]:
        cells = []
        for f in fractions:
            runs = r["runs"][f"{f:g}"]
            accs = " / ".join(f"{x['acc'] * 100:.1f}" for x in runs)
            flops = " / ".join(f"{x['flops'] / flops0:.3f}" for x in runs)
            cells.append(f"{accs}% ({flops}×)")
        print(f"| {r['placement']} | {r['groups']} | {r['acc_init'] * 100:.1f}% | {r['flops_init'] / flops0:.3f}× | "
              + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
