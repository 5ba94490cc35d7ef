"""Operator speed: forward+backward of DynOPool vs max_pool2d at the same shapes (issue 2, item 6).

    python -m benchmarks.speed.op_speed             # 3 runs, prints, updates docs/BENCHMARKS.md
    python -m benchmarks.speed.op_speed --no-write --runs 1

Every configuration times, interleaved in one loop (one call of each per round, rounds
repeated ``--reps`` times after ``--warmup`` rounds; the whole table ``--runs`` times, since the
cores are shared), forward + backward of:
- ``fast``: DynOPool's default backend (the fused numba kernel on CPU), stride gradient included;
- ``reference``: the pure-PyTorch formulation (backend="reference");
- ``max_pool2d``: the baseline with the SAME input and output shape. At stride 2 that is
  ``F.max_pool2d(x, 2)``; at a fractional stride no fixed-kernel max_pool2d gives the same output
  size, so the baseline is ``F.adaptive_max_pool2d(x, (H', W'))`` (max_pool2d's same-output-size
  form, windows of 1-3 px), and ``F.max_pool2d(x, 2)`` is also timed for context.
Ratios are medians of time over the baseline's median. 2 threads for torch and numba.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from dynopool_convert import dynopool2d, dynopool_output_size

SHAPES = [(32, 64, 56, 56), (32, 256, 28, 28)]
STRIDES = [2.0, 1.7, 2.6]
DOC = Path(__file__).resolve().parents[2] / "docs" / "BENCHMARKS.md"
SECTION = "## Operator speed"


def _step(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, grad: torch.Tensor, params: list[torch.Tensor]) -> float:
    """Seconds for one forward + backward of ``fn(x)`` with upstream gradient ``grad``."""
    x.grad = None
    for p in params:
        p.grad = None
    t0 = time.perf_counter()
    fn(x).backward(grad)
    return time.perf_counter() - t0


def bench_config(shape, stride: float, channels_last: bool, reps: int, warmup: int, ref_reps: int) -> dict[str, float]:
    """Median fwd+bwd seconds of each method for one shape/stride/layout (interleaved).

    The slow reference backend takes part in the first warm-up round and the first ``ref_reps``
    timed rounds only.
    """
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(*shape).to(memory_format=fmt).requires_grad_()
    out = (dynopool_output_size(shape[2], stride), dynopool_output_size(shape[3], stride))
    s = torch.tensor([stride, stride], requires_grad=True)
    grad = torch.randn(shape[0], shape[1], *out).to(memory_format=fmt)
    methods: dict[str, tuple[Callable, list]] = {
        "fast": (lambda a: dynopool2d(a, s, "max", backend="auto"), [s]),
        "reference": (lambda a: dynopool2d(a, s, "max", backend="reference"), [s]),
        "max_pool2d(2)": (lambda a: F.max_pool2d(a, 2), []),
    }
    if out != (shape[2] // 2, shape[3] // 2):
        methods["adaptive_max_pool2d"] = (lambda a: F.adaptive_max_pool2d(a, out), [])
    grads = {k: (grad if k != "max_pool2d(2)" else torch.randn(shape[0], shape[1], shape[2] // 2, shape[3] // 2).to(memory_format=fmt)) for k in methods}
    times: dict[str, list[float]] = {k: [] for k in methods}
    for r in range(warmup + reps):
        for name, (fn, params) in methods.items():
            if name == "reference" and (0 < r < warmup or r >= warmup + ref_reps):
                continue
            t = _step(fn, x, grads[name], params)
            if r >= warmup:
                times[name].append(t)
    return {k: statistics.median(v) for k, v in times.items()}


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        m = re.search(r"Model name:\s*(.+)", out)
        if m:
            return m.group(1).strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown CPU"


def run(reps: int, warmup: int, ref_reps: int, channels_last: bool) -> list[dict]:
    """One pass over every configuration; one row (with ratios) per configuration."""
    rows = []
    for cl in [False, True] if channels_last else [False]:
        for shape in SHAPES:
            for stride in STRIDES if not cl else [2.0, 1.7]:
                med = bench_config(shape, stride, cl, reps, warmup, ref_reps)
                base_name = "adaptive_max_pool2d" if "adaptive_max_pool2d" in med else "max_pool2d(2)"
                base = med[base_name]
                rows.append(
                    dict(
                        shape="x".join(map(str, shape)),
                        layout="channels_last" if cl else "NCHW",
                        stride=stride,
                        out="x".join(map(str, (dynopool_output_size(shape[2], stride),) * 2)),
                        baseline=base_name,
                        base_ms=base * 1e3,
                        fast_ms=med["fast"] * 1e3,
                        fast=med["fast"] / base,
                        reference=med["reference"] / base,
                        fast_vs_mp2=med["fast"] / med["max_pool2d(2)"],
                    )
                )
                print(_format_row(rows[-1], [rows[-1]["fast"]]), flush=True)
    return rows


def summarize(runs: list[list[dict]]) -> list[tuple[dict, list[float]]]:
    """Per configuration: the row of median values over runs and the list of fast ratios."""
    out = []
    for rows in zip(*runs):
        merged = dict(rows[0])
        for key in ("base_ms", "fast_ms", "fast", "reference", "fast_vs_mp2"):
            merged[key] = statistics.median(r[key] for r in rows)
        out.append((merged, [r["fast"] for r in rows]))
    return out


HEADER = (
    "| shape (NxCxHxW) | layout | stride | out | baseline (same out shape) | baseline ms | fast ms "
    "| **fast / baseline** (min-max over runs) | reference / baseline | fast / max_pool2d(2) |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)


def _format_row(r: dict, spread: list[float]) -> str:
    rng = f" ({min(spread):.2f}-{max(spread):.2f})" if len(spread) > 1 else ""
    return (
        f"| {r['shape']} | {r['layout']} | {r['stride']:g} | {r['out']} | {r['baseline']} | {r['base_ms']:.1f} "
        f"| {r['fast_ms']:.1f} | **{r['fast']:.2f}x**{rng} | {r['reference']:.2f}x | {r['fast_vs_mp2']:.2f}x |"
    )


def write_doc(
    summary: list[tuple[dict, list[float]]], command: str, threads: int, reps: int, ref_reps: int, runs: int, load: str
) -> None:
    """Replace (or append) the "Operator speed" section of docs/BENCHMARKS.md."""
    import numba

    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = "\n".join(
        [
            SECTION,
            "",
            f"Command: `{command}`",
            "",
            f"Machine: {cpu_model()}, {threads} threads (torch and numba); torch {torch.__version__}, "
            f"numba {numba.__version__}; measured {date}; load average {load} (the 2 cores are shared with "
            f"other jobs, so absolute times vary; ratios are interleaved). Each run: median of {reps} "
            f"interleaved forward+backward rounds after warm-up (the reference: {ref_reps}); {runs} runs: the table shows the median "
            "over runs and, in brackets, the smallest and largest run. Ratios: time over the baseline's "
            "time (lower is better; target <= 1.5x).",
            "",
            HEADER,
            *(_format_row(r, spread) for r, spread in summary),
            "",
            "`fast` is DynOPool's default backend (the fused numba kernel, `dynopool_convert/_fast_cpu.py`), "
            "`reference` the pure-PyTorch formulation; both include the stride gradient. The baseline has "
            "the same input and output shape: `max_pool2d(x, 2)` at stride 2, `adaptive_max_pool2d(x, out)` "
            "at fractional strides (no fixed-kernel max_pool2d gives that output size); the last column "
            "compares with `max_pool2d(x, 2)` whatever the output size. Channels-last rows compare with the "
            "baselines in channels-last (PyTorch's vectorised kernels there are about 2-3x faster than in NCHW).",
        ]
    ).rstrip() + "\n"
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: body + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + body
    DOC.write_text(text.rstrip() + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=10, help="timed rounds per run (median)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--ref-reps", type=int, default=3, help="timed rounds of the (slow) reference backend")
    ap.add_argument("--runs", type=int, default=3, help="repeat the whole table (spread on shared cores)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-channels-last", action="store_true", help="skip the channels-last rows")
    ap.add_argument("--no-write", action="store_true", help="do not update docs/BENCHMARKS.md")
    args = ap.parse_args(argv)
    import numba

    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    load = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    runs = []
    for k in range(args.runs):
        print(f"run {k + 1}/{args.runs}\n{HEADER}", flush=True)
        runs.append(run(args.reps, args.warmup, min(args.ref_reps, args.reps), not args.no_channels_last))
    summary = summarize(runs)
    print(f"\nmedian over {args.runs} runs (min-max of fast / baseline):\n{HEADER}")
    for r, spread in summary:
        print(_format_row(r, spread))
    if not args.no_write:
        cmd = "python -m benchmarks.speed.op_speed " + " ".join(sys.argv[1:] if argv is None else argv)
        write_doc(summary, cmd.strip(), args.threads, args.reps, min(args.ref_reps, args.reps), args.runs, load + " -> " + " / ".join(f"{v:.1f}" for v in os.getloadavg()))
        print(f"updated {DOC}")


if __name__ == "__main__":
    main()
