"""Cost of conversion: a full training step of the converted model vs the original.

    python -m benchmarks.speed.step_overhead                      # ResNet-18 and ResNet-50, 224 px, batch 8, CPU
    python -m benchmarks.speed.step_overhead --models resnet18 --batch-size 4 --reps 10

For each model: forward + backward + optimiser step (SGD with momentum) of the original and of
the converted model at its initial strides (equal FLOPs by fvcore, printed; the strides get their
gradient but are not stepped, so the FLOPs stay equal), interleaved in one
process, median of ``--reps``; and the memory training adds: in a fresh process per model, the
peak resident memory over three steps minus the resident memory once model and data are built.
Targets (issue 7): <= 1.10x time, <= 1.20x memory.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import timm
import torch
from torch import nn

from dynopool_convert import convert, scale_parameters
from dynopool_convert.flops import count_flops

ROOT = Path(__file__).resolve().parents[2]


def build(name: str, converted: bool, size: int) -> nn.Module:
    model = timm.create_model(name, pretrained=False, num_classes=100)
    return convert(model, input_size=(3, size, size)).model if converted else model


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """SGD over the weights; DynOPool strides still get their gradient (part of the step's cost)
    but stay put, so that both models keep equal FLOPs through the measurement."""
    strides = {id(p) for p in scale_parameters(model)}
    return torch.optim.SGD([p for p in model.parameters() if id(p) not in strides], lr=0.01, momentum=0.9)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def training_memory_child(name: str, converted: bool, size: int, batch: int) -> int:
    """Memory a fresh process adds while training one model: its peak resident memory over three
    steps (``ru_maxrss``) minus its resident memory once the model and data are built."""
    code = (
        "import resource, torch, sys; sys.argv=['x'];"
        "from benchmarks.speed.step_overhead import build, make_optimizer, train_step;"
        f"m = build({name!r}, {converted}, {size}); opt = make_optimizer(m);"
        f"x = torch.randn({batch}, 3, {size}, {size}); y = torch.randint(0, 100, ({batch},));"
        "before = int(open('/proc/self/statm').read().split()[1]) * resource.getpagesize();"
        "[train_step(m, opt, x, y) for _ in range(3)];"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return int(out.stdout.strip().splitlines()[-1])


def measure(name: str, size: int, batch: int, reps: int) -> dict:
    torch.manual_seed(0)
    models = {kind: build(name, kind == "converted", size) for kind in ("original", "converted")}
    flops = {kind: count_flops(m, (3, size, size)) for kind, m in models.items()}
    opts = {kind: make_optimizer(m) for kind, m in models.items()}
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 100, (batch,))
    times: dict[str, list[float]] = {"original": [], "converted": []}
    for kind in models:  # warm-up (numba JIT, allocator)
        train_step(models[kind], opts[kind], x, y)
    for _ in range(reps):
        for kind in models:
            t0 = time.perf_counter()
            train_step(models[kind], opts[kind], x, y)
            times[kind].append(time.perf_counter() - t0)
    memory = {kind: training_memory_child(name, kind == "converted", size, batch) for kind in models}
    med = {kind: statistics.median(t) for kind, t in times.items()}
    return {
        "model": name, "input": size, "batch": batch, "reps": reps,
        "flops": flops, "step_s": med,
        "time_ratio": med["converted"] / med["original"],
        "training_memory": memory, "memory_ratio": memory["converted"] / memory["original"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [measure(name, args.input_size, args.batch_size, args.reps) for name in args.models]
    print(f"{'model':<10} {'FLOPs orig/conv (G)':>20} {'step orig/conv (s)':>20} {'time':>6} {'memory orig/conv (MB)':>22} {'memory':>7}")
    for r in rows:
        f, s, mem = r["flops"], r["step_s"], r["training_memory"]
        print(f"{r['model']:<10} {f['original'] / 1e9:>9.3f}/{f['converted'] / 1e9:<10.3f} "
              f"{s['original']:>9.3f}/{s['converted']:<10.3f} {r['time_ratio']:>5.2f}x "
              f"{mem['original'] / 2**20:>10.0f}/{mem['converted'] / 2**20:<11.0f} {r['memory_ratio']:>6.2f}x")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
