"""The paper's toy experiments (Section 3) and the resolution baseline, on Fashion-MNIST.

    apt-get install dataset-fashion-mnist
    python -m benchmarks.experiments.toy_experiments --study toy --out docs/results       # 7.1
    python -m benchmarks.experiments.toy_experiments --study resolution --out docs/results  # 7.2

Study ``toy``: three variants of the data as the paper builds them from CIFAR-100, here from
Fashion-MNIST (28 x 28): *stretch-V* (stretched 2x vertically, randomly cropped back to 28 x 28),
*tile* (downsampled by 2, tiled 2 x 2) and *large* (downsampled by 2, upsampled back). The same
small VGG is trained with its max-pools as they are (baseline) and converted to DynOPool with the
baseline's FLOPs as the budget, for each seed.

Study ``resolution``: at a budget of about half the original FLOPs, DynOPool (budget fitted at
convert time, then budget-constrained training) against simply lowering the input resolution to
meet the same budget, and against the original at full cost; same data and epochs.

Training runs with the library's pieces: ``convert``, the cost model and budget penalty, the
final budget projection and fvcore counting. Results (JSON, a Markdown table and a figure of the
learned shapes) go to ``--out``.
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dynopool_convert import clamp_strides_, convert, dynopool_modules, scale_parameters
from dynopool_convert.budget import budget_penalty, fit_to_budget, project_to_budget
from dynopool_convert.cost_model import CostModel
from dynopool_convert.flops import count_flops

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def small_vgg(in_chans: int = 1, num_classes: int = 10, width: int = 32) -> nn.Module:
    """Three VGG stages of two 3x3 convs each, a 2x2 max-pool after each stage, a linear head."""

    def stage(cin: int, cout: int) -> list[nn.Module]:
        return [
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        ]

    w = width
    return nn.Sequential(
        *stage(in_chans, w), *stage(w, 2 * w), *stage(2 * w, 4 * w),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, num_classes),
    )


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzipped or not) into a numpy array."""
    data = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist(root: Path, device: torch.device) -> dict[str, torch.Tensor]:
    def images(name: str) -> torch.Tensor:
        return torch.from_numpy(read_idx(root / name).copy()).float().div_(255).unsqueeze(1).to(device)

    def labels(name: str) -> torch.Tensor:
        return torch.from_numpy(read_idx(root / name).astype(np.int64)).to(device)

    return {
        "train_x": images("train-images-idx3-ubyte.gz"), "train_y": labels("train-labels-idx1-ubyte.gz"),
        "test_x": images("t10k-images-idx3-ubyte.gz"), "test_y": labels("t10k-labels-idx1-ubyte.gz"),
    }


# --- the paper's data variants ------------------------------------------------------------

def stretch_v(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Stretch 2x vertically, crop 28 rows back (random offset per image; centre without generator)."""
    n, _, h, w = x.shape
    tall = F.interpolate(x, size=(2 * h, w), mode="bilinear", align_corners=False)
    if generator is None:
        offsets = torch.full((n,), h // 2, device=x.device)
    else:
        offsets = torch.randint(0, h + 1, (n,), generator=generator, device="cpu").to(x.device)
    rows = offsets[:, None] + torch.arange(h, device=x.device)[None]
    return tall.gather(2, rows[:, None, :, None].expand(n, x.shape[1], h, w))


def tile(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Downsample by 2 and tile 2 x 2."""
    return F.avg_pool2d(x, 2).repeat(1, 1, 2, 2)


def large(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Downsample by 2 and upsample back."""
    return F.interpolate(F.avg_pool2d(x, 2), size=x.shape[-2:], mode="bilinear", align_corners=False)


def original(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return x


VARIANTS = {"stretch-V": stretch_v, "tile": tile, "large": large, "original": original}


@dataclass
class RunResult:
    study: str
    variant: str
    method: str
    seed: int
    accuracy: float
    flops: int
    budget: int | None
    input_size: int
    shapes: list[list[int]] = field(default_factory=list)
    strides: list[list[float]] = field(default_factory=list)
    seconds: float = 0.0


def feature_shapes(model: nn.Module, input_size: int, device: torch.device) -> list[list[int]]:
    """Spatial size after each resizing layer (max-pool or DynOPool), at the reference size."""
    shapes: list[list[int]] = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: shapes.append(list(out.shape[-2:])))
        for m in model.modules()
        if isinstance(m, nn.MaxPool2d) or type(m).__name__ == "DynOPool"
    ]
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 1, input_size, input_size, device=device))
    for h in hooks:
        h.remove()
    return shapes


def evaluate(model: nn.Module, data: dict, transform, input_size: int, batch: int = 1000) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(data["test_y"]), batch):
            x = transform(data["test_x"][i: i + batch], None)
            if x.shape[-1] != input_size:
                x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False, antialias=True)
            correct += (model(x).argmax(1) == data["test_y"][i: i + batch]).sum().item()
    return correct / len(data["test_y"])


def train(
    model: nn.Module, data: dict, transform, args: argparse.Namespace, seed: int, input_size: int,
    budget: int | None,
) -> nn.Module:
    """Train weights (AdamW, cosine) and, for DynOPool models, strides (Adam) + budget penalty."""
    device = data["train_x"].device
    gen = torch.Generator().manual_seed(seed)
    strides = scale_parameters(model)
    stride_ids = {id(p) for p in strides}
    weights = [p for p in model.parameters() if id(p) not in stride_ids]
    opt = torch.optim.AdamW(weights, lr=args.lr, weight_decay=5e-4)
    opt_s = torch.optim.Adam(strides, lr=args.scale_lr) if strides else None
    n_train = min(args.train_size, len(data["train_y"]))
    steps = args.epochs * math.ceil(n_train / args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.1)
    cost = CostModel(model, (1, input_size, input_size)) if strides and budget else None
    model.train()
    for _ in range(args.epochs):
        order = torch.randperm(n_train, generator=gen).to(device)
        for i in range(0, n_train, args.batch_size):
            idx = order[i: i + args.batch_size]
            x = transform(data["train_x"][idx], gen)
            if x.shape[-1] != input_size:
                x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False, antialias=True)
            loss = F.cross_entropy(model(x), data["train_y"][idx], label_smoothing=0.1)
            if cost is not None:
                loss = loss + args.penalty_weight * budget_penalty(cost(), budget)
            backward(loss, opt, opt_s)
            optimiser_step(model, opt, sched, opt_s)
    if strides and budget:
        project_to_budget(model, budget, (1, input_size, input_size))
    return model


def backward(loss: torch.Tensor, opt, opt_s) -> None:
    """Zero the weights' (and the strides', when learned) gradients, then backpropagate ``loss``."""
    opt.zero_grad(set_to_none=True)
    if opt_s is not None:
        opt_s.zero_grad(set_to_none=True)
    loss.backward()


def optimiser_step(model: nn.Module, opt, sched, opt_s) -> None:
    """Step the weights, their schedule and (when learned) the strides, kept within bounds."""
    opt.step()
    sched.step()
    if opt_s is not None:
        opt_s.step()
        clamp_strides_(model)


def run_one(study: str, variant: str, method: str, seed: int, data: dict, args, budget: int | None,
            input_size: int = 28) -> RunResult:
    torch.manual_seed(seed)
    device = data["train_x"].device
    model = small_vgg(width=args.width)
    if method == "dynopool":
        model = convert(model, input_size=(1, 28, 28)).model
        if budget is not None:
            fit_to_budget(model, budget, (1, 28, 28))
    model = model.to(device)
    t0 = time.perf_counter()
    train(model, data, VARIANTS[variant], args, seed, input_size, budget if method == "dynopool" else None)
    seconds = time.perf_counter() - t0
    acc = evaluate(model, data, VARIANTS[variant], input_size)
    flops = count_flops(model.cpu(), (1, input_size, input_size))
    model.to(device)
    strides = [list(m.stride_value) for _, m in dynopool_modules(model)]
    return RunResult(study, variant, method, seed, acc, flops, budget, input_size,
                     feature_shapes(model, input_size, device), strides, seconds)


def summarise(results: list[RunResult]) -> str:
    rows = {}
    for r in results:
        rows.setdefault((r.study, r.variant, r.method, r.input_size), []).append(r)
    lines = ["| study | data | method | input | accuracy (mean ± std) | FLOPs | shapes after each resize (seed 0) |",
             "|---|---|---|---|---|---|---|"]
    for (study, variant, method, size), runs in rows.items():
        accs = [100 * r.accuracy for r in runs]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        flops = statistics.mean(r.flops for r in runs) / 1e6
        shapes = " → ".join(f"{h}×{w}" for h, w in runs[0].shapes)
        lines.append(f"| {study} | {variant} | {method} | {size}² | {statistics.mean(accs):.2f} ± {std:.2f} (n={len(accs)}) "
                     f"| {flops:.2f}M | {shapes} |")
    return "\n".join(lines)


def plot_shapes(results: list[RunResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    toy = [r for r in results if r.study == "toy" and r.seed == results[0].seed]
    variants = list(dict.fromkeys(r.variant for r in toy))
    fig, axes = plt.subplots(1, len(variants), figsize=(4 * len(variants), 3.2), squeeze=False)
    for ax, variant in zip(axes[0], variants):
        for r in (r for r in toy if r.variant == variant):
            x = 0.0
            for h, w in [[28, 28]] + r.shapes:
                y0 = 0 if r.method == "baseline" else -32
                ax.add_patch(plt.Rectangle((x, y0 + (28 - h) / 2), w, h, fill=False,
                                           color="grey" if r.method == "baseline" else "tab:red"))
                x += w + 4
        ax.set_title(f"{variant}: baseline (top) vs DynOPool (bottom)", fontsize=9)
        ax.set_xlim(-2, 140)
        ax.set_ylim(-36, 32)
        ax.set_aspect("equal")
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _emit(result: RunResult, stream) -> None:
    line = json.dumps(asdict(result))
    print(line, flush=True)
    stream.write(line + "\n")
    stream.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", choices=["toy", "resolution", "all"], default="all")
    parser.add_argument("--data-dir", type=Path, default=FASHION_DIR)
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--train-size", type=int, default=60000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--scale-lr", type=float, default=0.01)
    parser.add_argument("--penalty-weight", type=float, default=5.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    data = load_fashion_mnist(args.data_dir, device)
    args.out.mkdir(parents=True, exist_ok=True)
    base_flops = count_flops(small_vgg(width=args.width), (1, 28, 28))
    results: list[RunResult] = []
    t_start = time.perf_counter()
    stem = f"fashion_mnist_{args.study}"
    stream = open(args.out / f"{stem}.jsonl", "w")  # one line per finished run, kept if interrupted
    if args.study in ("toy", "all"):
        for variant in ("stretch-V", "tile", "large"):
            for seed in range(args.seeds):
                for method in ("baseline", "dynopool"):
                    results.append(run_one("toy", variant, method, seed, data, args, base_flops))
                    _emit(results[-1], stream)
    if args.study in ("resolution", "all"):
        half = base_flops // 2
        low_res = int(28 * math.sqrt(0.5))  # conv FLOPs scale with area
        while count_flops(small_vgg(width=args.width), (1, low_res, low_res)) > half:
            low_res -= 1
        for seed in range(args.seeds):
            for method, size, budget in [("original", 28, None), ("lower-resolution", low_res, None), ("dynopool", 28, half)]:
                results.append(run_one("resolution", "original", method if method != "original" else "baseline",
                                       seed, data, args, budget, input_size=size))
                results[-1].method = method
                _emit(results[-1], stream)
    total = time.perf_counter() - t_start
    stream.close()
    (args.out / f"{stem}.json").write_text(json.dumps({
        "args": {k: str(v) for k, v in vars(args).items()}, "baseline_flops": base_flops, "seconds": total,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "runs": [asdict(r) for r in results]}, indent=1))
    table = summarise(results)
    (args.out / f"{stem}.md").write_text(table + "\n")
    if any(r.study == "toy" for r in results):
        plot_shapes(results, args.out / f"{stem}_shapes.png")
    print(table)
    print(f"total {total:.0f} s on {args.device}")


if __name__ == "__main__":
    main()
