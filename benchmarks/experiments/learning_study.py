"""Does learning the sizes pay? DynOPool variants against the fixed network and lower resolution.

    python -m benchmarks.experiments.learning_study --variant stretch-V --methods fixed,dyn-paper,dyn --seeds 3
    python -m benchmarks.experiments.learning_study --variant original --budget-frac 0.5 --methods fixed,lowres,dyn

Data: Fashion-MNIST and the paper's variants (``toy_experiments.py``); a training subset of
``--train-size`` images, a held-out split of ``--holdout`` further training images (for the size
search; never the test split), the full 10k test split for the reported accuracy. All methods
share the data, network (the small VGG), epochs, optimiser (AdamW, one-cycle) and augmentation.

Methods: ``fixed`` (the network as is, at 28 px), ``lowres`` (the network on inputs resized to the
largest size within the budget), ``resN``, ``resHxW`` (the network on N x N or H x W inputs, whatever the budget), ``dyn-paper`` (the three max-pools as DynOPool, strides learned
by their straight-through gradient under the ceiling penalty: the paper's method and our old
default) and ``dyn`` (dynopool's default: see ``--help`` of each knob), whose parts can be
switched off for the ablation (``dyn:nojitter``, ``dyn:nosearch``, ``dyn:noinput``, ...), and
``aspect`` (the fixed network trained on five input shapes within the budget in turn, the one of
lowest held-out loss kept from 70% of the steps: a supernet over input aspect ratios).
One JSON line per run goes to ``--out``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.experiments.toy_experiments import (FASHION_DIR, VARIANTS, backward, load_fashion_mnist,
                                                    optimiser_step, small_vgg)

from dynopool_convert import convert, scale_parameters
from dynopool_convert.budget import budget_penalty, fit_to_budget, project_to_budget
from dynopool_convert.cost_model import CostModel
from dynopool_convert.flops import count_flops
from dynopool_convert.dynresize import DynResize
from dynopool_convert.training.group_sizes import GroupGeometry
from dynopool_convert.training.size_control import SizeControl

#: the dyn method's parts; "dyn:noX" switches part X off
DYN_DEFAULTS = {"input": True, "jitter": 1, "search": True, "scale_lr": 0.01, "mode": "ceiling", "settle": 0.3,
                "placement": "before"}


def dyn_options(method: str, args) -> dict:
    opts = dict(DYN_DEFAULTS, scale_lr=args.scale_lr)
    for flag in method.split(":")[1:]:
        if flag == "nojitter":
            opts["jitter"] = 0
        elif flag == "nosearch":
            opts["search"] = False
        elif flag == "noinput":
            opts["input"] = False
        elif flag == "target":
            opts["mode"] = "target"
        elif flag == "frozen":
            opts["scale_lr"] = 0.0
        elif flag in ("exact", "before", "after"):
            opts["placement"] = flag
        elif flag.startswith("jitter"):
            opts["jitter"] = int(flag[6:])
        elif flag.startswith("slr"):
            opts["scale_lr"] = float(flag[3:])
        elif flag == "aa":  # exact placement: antialiased shrinks
            opts["antialias"] = True
        elif flag.startswith("settle"):  # the share of the steps trained after the search
            opts["settle"] = float(flag[6:])
        elif flag == "fitflops":  # the budget fit of session 8: the most FLOPs within the budget
            opts["allocation"] = "flops"
        elif flag == "fitmostres":  # the allocation keeping the most resolution, whatever it spends
            opts["allocation"] = "most-resolution"
        elif flag.startswith("sizes"):  # pinned square sizes after each site, e.g. sizes22-10-4-3
            opts["sizes"] = [int(v) for v in flag[5:].split("-")]
        else:
            raise SystemExit(f"unknown dyn flag {flag!r}")
    return opts


def pin_sizes(model: torch.nn.Module, sides: list[int], budget: int) -> None:
    """Set the groups' sizes to ``sides`` (square); refused if unreachable or over ``budget``."""
    geo = GroupGeometry(model, (1, 28, 28))
    if not geo.set_sizes([(s, s) for s in sides]):
        raise SystemExit(f"sizes {sides} cannot be reached")
    flops = count_flops(model, (1, 28, 28))
    if flops > budget:
        raise SystemExit(f"sizes {sides} cost {flops} FLOPs, over the budget {budget}")


def resize_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``x`` at ``size`` (rows, columns), antialiased, as the fixed network's lower-resolution inputs."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)


def input_size(method: str, width: int, budget: int) -> tuple[int, int]:
    """The fixed network's input: 28 px, the largest square within ``budget`` (``lowres``), or
    ``resN`` / ``resHxW`` (rows x columns)."""
    if method == "lowres":
        side = 28
        while count_flops(small_vgg(width=width), (1, side, side)) > budget:
            side -= 1
        return side, side
    if method.startswith("res"):
        h, _, w = method[3:].partition("x")
        return int(h), int(w or h)
    return 28, 28


ASPECTS = (0.5, 2 / 3, 1.0, 1.5, 2.0)  # rows / columns


def aspect_candidates(width: int, budget: int) -> list[tuple[int, int]]:
    """For each aspect ratio (rows / columns) in ``ASPECTS``, the largest input within ``budget``."""
    net, out = small_vgg(width=width), []
    for a in ASPECTS:
        side = 28.0
        while side > 4:
            h, w = max(1, round(side * a ** 0.5)), max(1, round(side / a ** 0.5))
            if count_flops(net, (1, h, w)) <= budget:
                out.append((h, w))
                break
            side -= 0.25
    return out


def recalibrate(model: torch.nn.Module, xs: list[torch.Tensor]) -> None:
    """Batch-norm running statistics recomputed on ``xs`` (a cumulative average; weights untouched)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    with torch.no_grad():
        for x in xs:
            model(x)
    for m, momentum in zip(norms, saved):
        m.momentum = momentum


def batches(data, pool: dict, transform, gen, size, bs):
    """Endless shuffled epochs over ``pool["idx"]`` (read again at each epoch, so that the pool can
    grow when the held-out images rejoin training); yields (epoch, x, y)."""
    epoch = 0
    while True:
        idx = pool["idx"]
        order = idx[torch.randperm(len(idx), generator=gen)]
        for i in range(0, len(order), bs):
            j = order[i: i + bs]
            yield epoch, resize_to(transform(data["train_x"][j], gen), size), data["train_y"][j]
        epoch += 1


def accuracy(model, xs, ys, size, bs=1000) -> tuple[float, float]:
    model.eval()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for i in range(0, len(ys), bs):
            out = model(resize_to(xs[i: i + bs], size))
            correct += (out.argmax(1) == ys[i: i + bs]).sum().item()
            loss += F.cross_entropy(out, ys[i: i + bs], reduction="sum").item()
    model.train()
    return correct / len(ys), -loss / len(ys)


def per_image(model, xs, ys, size) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image held-out loss and correctness."""
    model.eval()
    with torch.no_grad():
        out = model(xs)
    model.train()
    return F.cross_entropy(out, ys, reduction="none"), out.argmax(1) == ys


def run(variant: str, method: str, seed: int, data, args, budget: int, base_flops: int) -> dict:
    torch.manual_seed(seed)
    transform = VARIANTS[variant]
    model = small_vgg(width=args.width)
    dyn = method.startswith("dyn")
    opts = dyn_options(method, args) if method.startswith("dyn:") or method == "dyn" else {}
    size = input_size(method, args.width, budget)
    if dyn:
        model = convert(model, input_size=(1, 28, 28), input_site=bool(opts.get("input", False)),
                        placement=opts.get("placement", "before")).model
        for m in model.modules():
            if isinstance(m, DynResize):
                m.antialias = bool(opts.get("antialias", False))
        fit_to_budget(model, budget, (1, 28, 28), allocation=opts.get("allocation", "resolution"))
        if opts.get("sizes"):
            pin_sizes(model, opts["sizes"], budget)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(data["train_y"]), generator=g)
    train_idx = perm[: args.train_size]
    if args.holdout_mode == "extra":  # further training images, seen by no method's training
        hold_idx = perm[args.train_size: args.train_size + args.holdout]
    else:  # carved from the training images, as dynopool finetune does
        hold_idx = train_idx[: args.holdout]
    # what a method trains on: all training images, or (a method that searches) all but the held-out
    searching = (dyn and bool(opts.get("search"))) or method == "aspect"
    pool = {"idx": train_idx[args.holdout:] if searching and args.holdout_mode != "extra" else train_idx}
    hold_x = transform(data["train_x"][hold_idx], None)
    hold_y = data["train_y"][hold_idx]
    strides = scale_parameters(model)
    ids = {id(p) for p in strides}
    opt = torch.optim.AdamW([p for p in model.parameters() if id(p) not in ids], lr=args.lr, weight_decay=5e-4)
    scale_lr = opts.get("scale_lr", args.scale_lr)
    opt_s = torch.optim.Adam(strides, lr=scale_lr) if dyn and scale_lr > 0 else None
    if opt_s is None:  # not learned by gradient: no stride gradients (as dynopool finetune does)
        for p in strides:
            p.requires_grad_(False)
    steps_per_epoch = math.ceil(args.train_size / args.batch_size)
    total = args.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total, pct_start=0.1)
    cost = CostModel(model, (1, 28, 28)) if dyn else None
    # the trainer's size schedule (training/size_control.py), with the same knobs
    sizes = SizeControl(model, (1, 28, 28), jitter=opts.get("jitter", 0), search=bool(opts.get("search")),
                        settle=opts.get("settle", 0.3), total_steps=total, seed=seed) if dyn else None
    mode = opts.get("mode", "ceiling")
    searched, curve, step = None, [], 0
    t0 = time.perf_counter()
    model.train()
    aspects = aspect_candidates(args.width, budget) if method == "aspect" else []
    aspect_search = int(0.7 * total)
    for epoch, x, y in batches(data, pool, transform, g, size if not aspects else (28, 28), args.batch_size):
        if step == total:
            break
        if aspects:  # the fixed network trained on every candidate shape in turn, then the best one
            if step == aspect_search:
                calibration = transform(data["train_x"][pool["idx"][:1024]], None).split(256)
                losses = {}
                for c in aspects:  # batch-norm statistics of each shape first, as a supernet needs
                    recalibrate(model, [resize_to(b, c) for b in calibration])
                    losses[c] = per_image(model, resize_to(hold_x, c), hold_y, c)[0].mean().item()
                size = min(losses, key=losses.get)
                searched = {"sizes": [list(size)], "evaluated": [{"sizes": [list(c)], "loss": v} for c, v in losses.items()]}
                aspects = [size]
                recalibrate(model, [resize_to(b, size) for b in calibration])
                if args.holdout_mode == "rejoin":
                    pool["idx"] = train_idx
            x = resize_to(x, aspects[step % len(aspects)])
        if sizes is not None and sizes.search_due(step):
            searched = sizes.search(cost.flops, budget, lambda: per_image(model, hold_x, hold_y, size),
                                    lambda: project_to_budget(model, budget, (1, 28, 28), cost))
            searched = dict(searched, evaluated=searched["evaluated"][:8])  # the starts and the first moves
            opt_s = None  # settle: sizes held from here on
            if args.holdout_mode == "rejoin":  # the held-out images train again from the next epoch
                pool["idx"] = train_idx
        with sizes.step(step) if sizes is not None else contextlib.nullcontext():
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
            if opt_s is not None:
                loss = loss + args.penalty_weight * budget_penalty(cost(), budget, mode)
            backward(loss, opt, opt_s)
        optimiser_step(model, opt, sched, opt_s)
        if sizes is not None:
            sizes.hold()
        step += 1
        if args.curve and step % steps_per_epoch == 0:
            curve.append(round(accuracy(model, data["test_x_" + variant], data["test_y"], size)[0], 4))
    if dyn:
        project_to_budget(model, budget, (1, 28, 28))
    acc = accuracy(model, data["test_x_" + variant], data["test_y"], size)[0]
    flops = count_flops(model, (1, *size))
    sizes = GroupGeometry(model, (1, 28, 28)).measure()[1] if dyn else []
    return {"variant": variant, "method": method, "seed": seed, "accuracy": acc, "flops": flops, "budget": budget,
            "base_flops": base_flops, "input": size[0] if size[0] == size[1] else list(size), "sizes": sizes, "search": searched, "curve": curve,
            "seconds": round(time.perf_counter() - t0, 1), "epochs": args.epochs, "train_size": args.train_size,
            "opts": opts, "holdout": args.holdout, "holdout_mode": args.holdout_mode if dyn else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="stretch-V", choices=list(VARIANTS))
    ap.add_argument("--methods", default="fixed,dyn-paper,dyn")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--budget-frac", type=float, default=1.0, help="budget as a fraction of the fixed network's FLOPs")
    # defaults: the CPU protocol of docs/RESULTS.md section 6
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--train-size", type=int, default=3000)
    ap.add_argument("--holdout", type=int, default=1000)
    ap.add_argument("--holdout-mode", default="extra", choices=["extra", "carve", "rejoin"],
                    help="the search's held-out images: further images (extra), carved from the training "
                         "images (carve: as dynopool finetune does), or carved and back in training once the "
                         "sizes are chosen (rejoin). Training steps are the same for every method")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--scale-lr", type=float, default=0.01)
    ap.add_argument("--penalty-weight", type=float, default=5.0)
    ap.add_argument("--curve", action="store_true", help="test accuracy after every epoch (plateau check)")
    ap.add_argument("--data-dir", type=Path, default=FASHION_DIR)
    ap.add_argument("--out", type=Path, default=None, help="JSON lines (default docs/results/learning/VARIANT.jsonl)")
    args = ap.parse_args()
    if args.out is None:
        name = args.variant if args.budget_frac == 1.0 else f"{args.variant}-{args.budget_frac:g}x"
        args.out = Path("docs/results/learning") / f"{'half-budget' if name == 'original-0.5x' else name}.jsonl"
    data = load_fashion_mnist(args.data_dir, torch.device("cpu"))
    data["test_x_" + args.variant] = VARIANTS[args.variant](data["test_x"], None)
    base = count_flops(small_vgg(width=args.width), (1, 28, 28))
    budget = int(base * args.budget_frac)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for seed in (int(s) for s in args.seeds.split(",")):
        for method in args.methods.split(","):
            row = run(args.variant, method, seed, data, args, budget, base)
            line = json.dumps(row)
            print(line, flush=True)
            with open(args.out, "a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
