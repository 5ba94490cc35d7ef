"""Which input shape keeps the most of the images? A training-free choice of the input shape.

For each data variant and budget (a fraction of the small VGG's FLOPs at 28 px), every input
shape H x W within the budget that no other shape within it contains (the maximal ones) is
(with the five shapes of learning_study's ``aspect`` method added unless ``--no-aspects``)
scored by the mean squared error of 1000 training images resized to it (bilinear, antialiased)
and back to 28 x 28; the three best and their errors are printed (docs/RESULTS.md §6.4).

    python -m benchmarks.experiments.input_shape_energy
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.experiments.learning_study import aspect_candidates
from benchmarks.experiments.toy_experiments import FASHION_DIR, VARIANTS, load_fashion_mnist, small_vgg
from dynopool_convert.flops import count_flops


def maximal_shapes(width: int, budget: int, aspects: bool = True) -> list[tuple[int, int]]:
    """The input shapes within ``budget`` (8..28 px per axis, and with ``aspects`` the five of
    learning_study's ``aspect`` method, which may exceed 28 px) that no other one contains."""
    net = small_vgg(width=width)
    fits = [(h, w) for h in range(8, 29) for w in range(8, 29) if count_flops(net, (1, h, w)) <= budget]
    if aspects:
        fits += [s for s in aspect_candidates(width, budget) if s not in fits]
    return [c for c in fits if not any(d != c and d[0] >= c[0] and d[1] >= c[1] for d in fits)]


def round_trip_error(x: torch.Tensor, shape: tuple[int, int]) -> float:
    """Mean squared error of ``x`` resized to ``shape`` (antialiased) and back."""
    small = F.interpolate(x, size=shape, mode="bilinear", antialias=True, align_corners=False)
    back = F.interpolate(small, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
    return (back - x).pow(2).mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fracs", default="0.5,0.7", help="budgets, as fractions of the 28 px network's FLOPs")
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--no-aspects", action="store_true", help="only shapes of 8..28 px per axis")
    args = ap.parse_args()
    data = load_fashion_mnist(FASHION_DIR, torch.device("cpu"))
    idx = torch.randperm(len(data["train_y"]), generator=torch.Generator().manual_seed(0))[:1000]
    full = count_flops(small_vgg(width=args.width), (1, 28, 28))
    for frac in (float(f) for f in args.fracs.split(",")):
        shapes = maximal_shapes(args.width, int(frac * full), aspects=not args.no_aspects)
        for variant in ("original", "stretch-V", "tile", "large"):
            x = VARIANTS[variant](data["train_x"][idx], None)
            err = {s: round_trip_error(x, s) for s in shapes}
            best = sorted(err, key=err.get)[:3]
            print(f"{frac}x {variant}: " + ", ".join(f"{h}x{w} {err[(h, w)]:.5f}" for h, w in best))


if __name__ == "__main__":
    main()
