"""Inference speed of a frozen converted model against the original, CPU, PyTorch and onnxruntime.

    dynopool convert resnet50 --budget 4G --out resnet50-4G.pt
    python -m benchmarks.speed.export_speed resnet50-4G.pt --threads 1 --reps 15

Models (random weights: speed does not depend on their values), all in eval mode, batch
``--batch``, no gradient:

- ``original``: the checkpoint's source model at the reference size;
- ``original@equal``: the same at the square input size whose FLOPs are closest to the frozen
  model's (the comparison at equal FLOPs);
- ``frozen``: ``dynopool_convert.freeze`` of the checkpoint's model.

PyTorch eager, then onnxruntime (``CPUExecutionProvider``, files exported by
``dynopool_convert.export``'s ONNX writer). Timings are interleaved: each round runs every model
once, and the median over ``--reps`` rounds (after ``--warmup``) is reported; ratios are
frozen / original within the same run. FLOPs by fvcore (``count_flops``) on the frozen model.
"""
from __future__ import annotations

import argparse
import math
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

import dynopool_convert as dc
from dynopool_convert.export import _write_onnx
from dynopool_convert.flops import count_flops


def _equal_flops_size(original: torch.nn.Module, c: int, h: int, target: float) -> tuple[int, int]:
    """Square size near ``h`` whose FLOPs are closest to ``target`` (FLOPs grow as the area)."""
    flops_ref = count_flops(original, (c, h, h))
    guess = round(h * math.sqrt(target / flops_ref))
    best = min(range(guess - 3, guess + 4), key=lambda s: abs(count_flops(original, (c, s, s)) - target))
    return best, count_flops(original, (c, best, best))


def interleaved(runs: dict[str, Callable[[], object]], reps: int, warmup: int) -> dict[str, float]:
    """Median seconds per call of each function, one call of each per round."""
    times: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(warmup + reps):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--skip-onnx", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    ckpt = dc.load_checkpoint(args.checkpoint)
    c, h, w = ckpt.input_size
    original = dc.build_model(ckpt.source, ckpt.build_args).eval()
    frozen = dc.freeze(ckpt.model, ckpt.input_size)
    f_orig, f_conv, f_frozen = count_flops(original, (c, h, w)), count_flops(ckpt.model, (c, h, w)), count_flops(frozen, (c, h, w))
    eq_size, f_eq = _equal_flops_size(original, c, h, f_frozen)
    print(f"# {ckpt.source} at {h}x{w}, batch {args.batch}, {args.threads} thread(s), torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"FLOPs: original {dc.format_flops(f_orig)}, converted (report) {dc.format_flops(f_conv)}, "
          f"frozen (fvcore) {dc.format_flops(f_frozen)}, original@{eq_size} {dc.format_flops(f_eq)}")

    x = torch.randn(args.batch, c, h, w)
    x_eq = torch.randn(args.batch, c, eq_size, eq_size)
    with torch.no_grad():
        t = interleaved({"original": lambda: original(x), "original@equal": lambda: original(x_eq), "frozen": lambda: frozen(x)},
                        args.reps, args.warmup)
    rows = [("PyTorch", t)]
    if not args.skip_onnx:
        import onnxruntime as ort

        with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
            sessions = {}
            for name, model, ex in (("original", original, x), ("original@equal", original, x_eq), ("frozen", frozen, x)):
                path = Path(tmp) / f"{name}.onnx"
                _write_onnx(model, torch.cat([ex, ex]), path)
                opts = ort.SessionOptions()
                opts.intra_op_num_threads, opts.inter_op_num_threads = args.threads, 1
                sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
                feed = {sess.get_inputs()[0].name: ex.numpy()}
                sessions[name] = lambda s=sess, f=feed: s.run(None, f)
            rows.append(("onnxruntime", interleaved(sessions, args.reps, args.warmup)))
    print(f"\n| runtime | original {h} ms | original@{eq_size} (equal FLOPs) ms | frozen ms | frozen / original | frozen / original@equal |")
    print("|---|---|---|---|---|---|")
    for runtime, t in rows:
        print(f"| {runtime} | {t['original'] * 1e3:.1f} | {t['original@equal'] * 1e3:.1f} | {t['frozen'] * 1e3:.1f} | "
              f"{t['frozen'] / t['original']:.3f}x | {t['frozen'] / t['original@equal']:.3f}x |")


if __name__ == "__main__":
    main()
