"""Cost model vs fvcore on real ``convert()`` outputs: max relative error, gradient signs.

    python -m benchmarks.coverage.cost_model_zoo [--size 64] [--configs 3] [--relative]
        [--build-arg KEY=VALUE ...] [MODEL ...]

For each model: convert at ``--size``, build the CostModel, then at ``--configs`` random
stride settings (every group's (s_h, s_w) uniform in [0.7, 3.0]; with ``--relative``, its
reference stride times a factor uniform in [0.6, 1.6], for ViTs whose patch stride is 14-16)
compare ``CostModel.flops()`` with ``count_flops`` (fvcore). ``--build-arg`` is passed to
every model's builder (e.g. ``dynamic_img_size=true``; ``image_size`` is set to ``--size``
for torchvision ViTs). With ``--grad``, also check the sign of the gradient along each
group's stride against a central finite difference of fvcore's count (s x 1.3 vs s / 1.3).
"""
from __future__ import annotations

import argparse
import random
import time

import torch

from dynopool_convert import build_model, convert, scale_parameters as cost_groups
from dynopool_convert.cost_model import CostModel
from dynopool_convert.flops import count_flops
from dynopool_convert.models import parse_build_args

DEFAULT = ["resnet18", "resnet50", "densenet121", "efficientnet_b0", "mobilenetv3_small_100",
           "convnext_atto", "vgg11", "regnetx_002"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="*", default=DEFAULT)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--configs", type=int, default=3)
    ap.add_argument("--grad", action="store_true")
    ap.add_argument("--relative", action="store_true")
    ap.add_argument("--build-arg", action="append", default=[])
    args = ap.parse_args()
    build_args = parse_build_args(args.build_arg)
    size = (3, args.size, args.size)
    print(f"| model | groups | build s | max error % over {args.configs} random strides | grad signs |")
    print("|---|---|---|---|---|")
    worst = 0.0
    failures: list[str] = []
    for name in args.models:
        torch.manual_seed(0)
        try:
            extra = {"image_size": args.size} if name.startswith("torchvision:vit_") else {}
            model = convert(build_model(name, {**build_args, **extra}), size).model
        except Exception as err:  # not the cost model's business: reported and skipped
            print(f"| {name} | - | - | conversion failed: {type(err).__name__}: {str(err)[:80]} | - |", flush=True)
            continue
        if not cost_groups(model):
            print(f"| {name} | 0 | - | no learned group | - |", flush=True)
            continue
        t = time.perf_counter()
        try:
            cost = CostModel(model, size)
        except Exception as err:
            print(f"| {name} | - | - | COST MODEL ERROR: {type(err).__name__}: {' '.join(str(err).split())[:160]} | - |", flush=True)
            failures.append(name)
            continue
        build = time.perf_counter() - t
        rng = random.Random(0)
        err = abs(cost.flops() - cost.reference_flops) / cost.reference_flops
        try:
            for _ in range(args.configs):
                with torch.no_grad():
                    for p, ref in zip(cost.parameters, cost.reference_strides):
                        if args.relative:
                            p.copy_(torch.tensor([ref[0] * rng.uniform(0.6, 1.6), ref[1] * rng.uniform(0.6, 1.6)]))
                        else:
                            p.copy_(torch.tensor([rng.uniform(0.7, 3.0), rng.uniform(0.7, 3.0)]))
                expected = count_flops(model, size)
                err = max(err, abs(cost.flops() - expected) / expected)
        except RuntimeError as e:  # the converted model itself fails at these strides
            print(f"| {name} | {len(cost.parameters)} | {build:.1f} | model fails at random strides: "
                  f"{' '.join(str(e).split())[:100]} | - |", flush=True)
            continue
        worst = max(worst, err)
        signs = "-"
        if args.grad:
            cost.parameters[0].grad = None
            value = cost()
            value.backward()
            ok = total = 0
            for p in cost.parameters:
                d = float((p.grad * p.detach()).sum())
                base = p.detach().clone()
                with torch.no_grad():
                    p.copy_(base * 1.3)
                up = count_flops(model, size)
                with torch.no_grad():
                    p.copy_(base / 1.3)
                down = count_flops(model, size)
                with torch.no_grad():
                    p.copy_(base)
                total += 1
                ok += (d > 0) == (up - down > 0) and up != down
            signs = f"{ok}/{total}"
        print(f"| {name} | {len(cost.parameters)} | {build:.1f} | {100 * err:.4f} | {signs} |", flush=True)
    print(f"max error over all models: {100 * worst:.4f}%; cost model failed to build on: {failures or 'none'}")


if __name__ == "__main__":
    main()
