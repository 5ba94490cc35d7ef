"""Speed of the native-kernel DynOPool path (``backend="native"``) on CPU.

    python -m benchmarks.speed.native_speed              # 2 threads, prints a Markdown table
    python -m benchmarks.speed.native_speed --reps 5 --dtypes float32 bfloat16

Forward + backward (stride gradient included) of ``native``, ``reference`` (pure PyTorch),
``fast`` (the numba kernel, float32/float64 only) and ``F.max_pool2d(x, 2)``, interleaved: one
call of each per round, median over ``--reps`` rounds after ``--warmup`` rounds (the slow
reference: its first ``--ref-reps`` rounds only). Ratios are medians over max_pool2d's median.
The native path is the one ``backend="auto"`` takes on CUDA and for CPU bfloat16/float16;
on CPU this measures its cost in native-kernel calls, not GPU speed.
"""
from __future__ import annotations

import argparse
import os
import statistics
from typing import Callable

import torch
import torch.nn.functional as F

from benchmarks.speed.op_speed import _step  # the same timed forward+backward step
from dynopool_convert import _fast_cpu, dynopool2d, dynopool_output_size


def bench(shape, stride: float, dtype: torch.dtype, channels_last: bool, reps: int, warmup: int, ref_reps: int) -> dict[str, float]:
    """Median seconds of forward+backward per method at one configuration (interleaved)."""
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(*shape, dtype=dtype).to(memory_format=fmt).requires_grad_()
    out = (dynopool_output_size(shape[2], stride), dynopool_output_size(shape[3], stride))
    s = torch.tensor([stride, stride], requires_grad=True)
    g_out = torch.randn(*shape[:2], *out, dtype=dtype).to(memory_format=fmt)
    g_mp = torch.randn(*shape[:2], shape[2] // 2, shape[3] // 2, dtype=dtype).to(memory_format=fmt)
    methods: dict[str, tuple[Callable, list, torch.Tensor]] = {
        "native": (lambda a: dynopool2d(a, s, "max", backend="native"), [s], g_out),
        "reference": (lambda a: dynopool2d(a, s, "max", backend="reference"), [s], g_out),
        "max_pool2d": (lambda a: F.max_pool2d(a, 2), [], g_mp),
    }
    if _fast_cpu.applies(x):
        methods["fast"] = (lambda a: dynopool2d(a, s, "max", backend="fast"), [s], g_out)
    times: dict[str, list[float]] = {k: [] for k in methods}
    for r in range(warmup + reps):
        for name, (fn, params, grad) in methods.items():
            if name == "reference" and (0 < r < warmup or r >= warmup + ref_reps):
                continue
            t = _step(fn, x, grad, params)
            if r >= warmup:
                times[name].append(t)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=4, default=[32, 64, 56, 56])
    ap.add_argument("--strides", type=float, nargs="+", default=[2.0, 1.7])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--channels-last", action="store_true", help="also time the channels-last layout")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--ref-reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if _fast_cpu.numba_available():
        import numba

        numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    print(f"torch {torch.__version__}, {args.threads} threads, load {' / '.join(f'{v:.1f}' for v in os.getloadavg())}")
    print("| shape | layout | dtype | stride | max_pool2d ms | native ms | **native / max_pool2d** | reference / max_pool2d | fast (numba) / max_pool2d | reference / native |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for cl in [False, True] if args.channels_last else [False]:
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            for stride in args.strides:
                med = bench(tuple(args.shape), stride, dtype, cl, args.reps, args.warmup, args.ref_reps)
                base = med["max_pool2d"]
                fast = f"{med['fast'] / base:.2f}x" if "fast" in med else "n/a"
                print(
                    f"| {'x'.join(map(str, args.shape))} | {'channels_last' if cl else 'NCHW'} | {dtype_name} | {stride:g} "
                    f"| {base * 1e3:.1f} | {med['native'] * 1e3:.1f} | **{med['native'] / base:.2f}x** "
                    f"| {med['reference'] / base:.2f}x | {fast} | {med['reference'] / med['native']:.2f}x |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
