"""What does the straight-through stride gradient carry? (issue: make learning pay, item 1)

    python -m benchmarks.experiments.stride_gradient_study --variants stretch-V,original --seeds 0,1 --epochs 4

Trains the small VGG converted to DynOPool (three max-pool sites) with the penalty off (no
budget: only the task loss moves the strides) and, after every epoch, on a held-out split of
training images: (a) the straight-through gradient of the held-out loss with respect to every
group's stride per axis, turned into the loss change it predicts for a size change of +1 and -1
pixel (``dL ~ g * ds`` with ``ds = s * (H'/(H'+d) - 1)``), and (b) the held-out loss actually
measured at that size. Reports sign agreement and correlation of predicted and measured changes,
and the strides' trajectory. One JSON line per (variant, seed, epoch) goes to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.experiments.toy_experiments import FASHION_DIR, VARIANTS, load_fashion_mnist, small_vgg

from dynopool_convert import clamp_strides_, convert, scale_parameters
from dynopool_convert.training.group_sizes import GroupGeometry


def held_out_loss(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        loss = F.cross_entropy(model(x), y).item()
    model.train()
    return loss


def probe(model, geo: GroupGeometry, x, y) -> list[dict]:
    """Predicted and measured held-out loss changes for +-1 pixel on every group and axis."""
    base = geo.strides()
    sizes = geo.measure()[1]
    model.eval()
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()  # eval mode: the same function the measurements use
    grads = [p.grad.detach().reshape(2).tolist() for p in geo.params]
    model.zero_grad(set_to_none=True)
    model.train()
    loss0 = held_out_loss(model, x, y)
    rows = []
    for g, (size, grad) in enumerate(zip(sizes, grads)):
        for axis in (0, 1):
            for d in (1, -1):
                target = [list(s) for s in sizes]
                target[g][axis] += d
                if target[g][axis] < 1 or not geo.set_sizes([tuple(t) for t in target]):
                    geo.set_strides(base)
                    continue
                ds = geo.strides()[g][axis] - base[g][axis]
                measured = held_out_loss(model, x, y) - loss0
                geo.set_strides(base)
                rows.append({"group": g, "axis": "hw"[axis], "size": size[axis], "d": d, "grad": grad[axis],
                             "predicted": grad[axis] * ds, "measured": measured})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="stretch-V,original")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--train-size", type=int, default=3000)
    ap.add_argument("--holdout", type=int, default=1000)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--scale-lr", type=float, default=0.01)
    ap.add_argument("--data-dir", type=Path, default=FASHION_DIR)
    ap.add_argument("--out", type=Path, default=Path("docs/results/learning/gradient_study.jsonl"))
    args = ap.parse_args()
    data = load_fashion_mnist(args.data_dir, torch.device("cpu"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for variant in args.variants.split(","):
        transform = VARIANTS[variant]
        for seed in (int(s) for s in args.seeds.split(",")):
            torch.manual_seed(seed)
            model = convert(small_vgg(width=args.width), input_size=(1, 28, 28)).model
            geo = GroupGeometry(model, (1, 28, 28))
            g = torch.Generator().manual_seed(seed)
            perm = torch.randperm(len(data["train_y"]), generator=g)
            train_idx, hold_idx = perm[: args.train_size], perm[args.train_size: args.train_size + args.holdout]
            hx, hy = transform(data["train_x"][hold_idx], None), data["train_y"][hold_idx]
            strides = scale_parameters(model)
            ids = {id(p) for p in strides}
            opt = torch.optim.AdamW([p for p in model.parameters() if id(p) not in ids], lr=args.lr, weight_decay=5e-4)
            opt_s = torch.optim.Adam(strides, lr=args.scale_lr)
            total = args.epochs * math.ceil(args.train_size / args.batch_size)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total, pct_start=0.1)
            for epoch in range(args.epochs):
                order = train_idx[torch.randperm(len(train_idx), generator=g)]
                for i in range(0, len(order), args.batch_size):
                    j = order[i: i + args.batch_size]
                    loss = F.cross_entropy(model(transform(data["train_x"][j], g)), data["train_y"][j], label_smoothing=0.1)
                    opt.zero_grad(set_to_none=True)
                    opt_s.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    opt_s.step()
                    clamp_strides_(model)
                row = {"variant": variant, "seed": seed, "epoch": epoch + 1, "strides": geo.strides(),
                       "sizes": geo.measure()[1], "held_out_loss": held_out_loss(model, hx, hy),
                       "probes": probe(model, geo, hx, hy)}
                print(json.dumps({k: v for k, v in row.items() if k != "probes"}), flush=True)
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
