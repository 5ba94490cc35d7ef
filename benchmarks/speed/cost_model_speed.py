"""Cost-model speed: one evaluation (value + backward) for a converted ResNet-50 at 224x224.

    python -m benchmarks.speed.cost_model_speed [--model resnet50] [--size 224] [--build-arg K=V ...]

Prints the median time of ``CostModel()`` (value only), of value + ``backward()``, and, as the
interleaved baseline, one ``torch.ones(2).sum().backward()`` (the cheapest autograd round trip)
so that the ratio is comparable across machines. The model is converted with
``dynopool_convert.convert`` (validation off: it does not change a model that converts cleanly).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from dynopool_convert.cost_model import CostModel


def build(name: str, size: int, build_args: list[str]) -> torch.nn.Module:
    from dynopool_convert import build_model, convert
    from dynopool_convert.models import parse_build_args

    net = build_model(name, parse_build_args(build_args))
    return convert(net, input_size=(3, size, size), validate=False).model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--build-arg", action="append", default=[], help="KEY=VALUE for the model builder (repeatable)")
    args = ap.parse_args()
    model = build(args.model, args.size, args.build_arg)
    t0 = time.perf_counter()
    cost = CostModel(model, (3, args.size, args.size))
    build_s = time.perf_counter() - t0
    params = cost.parameters

    def value() -> None:
        cost()

    def value_backward() -> None:
        cost().backward()

    base_x = torch.ones(2, requires_grad=True)

    def baseline() -> None:
        base_x.sum().backward()

    times: dict[str, list[float]] = {"value": [], "value+backward": [], "baseline": []}
    fns = {"value": value, "value+backward": value_backward, "baseline": baseline}
    for _ in range(args.repeats):
        for key, fn in fns.items():  # interleaved
            t = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t)
    for p in params:
        p.grad = None
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"model={args.model} input=3x{args.size}x{args.size} groups={len(params)} "
          f"size classes={len(cost._eval_classes)} build={build_s:.2f}s torch={torch.__version__} "
          f"threads={torch.get_num_threads()}")
    for k, v in med.items():
        print(f"  {k:15s} median {v:.3f} ms  ({v / med['baseline']:.1f}x baseline)")


if __name__ == "__main__":
    main()
