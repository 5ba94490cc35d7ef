"""Export a converted checkpoint to every format and report how close each file is to PyTorch.

    dynopool convert resnet50 --budget 4G --out resnet50-4G.pt
    python -m benchmarks.coverage.export_check resnet50-4G.pt --out exports/

A freshly converted timm ResNet has its last batch norm of every block at zero (timm's
``zero_init_last``), so the residual branches, and the resize sites inside them, would not reach
the output. The script first gives every batch norm random affine parameters and running
statistics (seeded), then scales the classifier so that the outputs have the spread of trained
logits (std ``--logit-std``, default 5: without normalised weights the features grow to ~1e3
and an absolute tolerance would measure that growth), saves that as ``OUT/randomized.pt``, then
runs ``dynopool export`` for each format on it, as a user would.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

import dynopool_convert as dc


def randomize_norms(model: nn.Module, seed: int = 0) -> None:
    """Random affine parameters and running statistics for every batch norm of ``model``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--out", default="exports")
    ap.add_argument("--logit-std", type=float, default=5.0)
    ap.add_argument("--formats", nargs="+", default=["onnx", "torchscript", "pt2", "safetensors"])
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = dc.load_checkpoint(args.checkpoint)
    randomize_norms(ckpt.model)
    x = torch.randn(3, *ckpt.input_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = ckpt.model.eval()(x)
        head = [m for m in ckpt.model.modules() if isinstance(m, nn.Linear)][-1]
        head.weight.mul_(args.logit_std / float(y.std()))
        head.bias.mul_(args.logit_std / float(y.std()))
        y = ckpt.model(x)
    path = dc.save(out / "randomized.pt", ckpt.model, ckpt.plan, ckpt.source, ckpt.build_args, ckpt.input_size, ckpt.budget)
    print(f"{ckpt.source} at {ckpt.input_size}: output max |y| {y.abs().max():.3g}, std {y.std():.3g}")
    for fmt in args.formats:
        t0 = time.time()
        cmd = [sys.executable, "-m", "dynopool_cli", "export", str(path), "--format", fmt, "--out", str(out / f"model.{fmt}")]
        run = subprocess.run(cmd, capture_output=True, text=True)
        print(f"[{fmt}] exit {run.returncode} in {time.time() - t0:.0f}s: {(run.stdout + run.stderr).strip()}")


if __name__ == "__main__":
    main()
