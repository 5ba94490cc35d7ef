"""GPU check of DynOPool in one command (issue 15): correctness, operator speed, train steps, toy VGG.

    PYTHONUNBUFFERED=1 python -m benchmarks.gpu.gpu_check --out gpu_check.md
    python -m benchmarks.gpu.gpu_check --device cpu --tiny --out /tmp/g.md   # dry run, any machine
    ... --only correctness,operator        # some sections only

Sections (about 3 minutes on an H200; ``--tiny`` shrinks every size for a dry run on the CPU,
where the Triton kernels run through Triton's interpreter):
1. ``correctness``: every backend that runs on the device (``triton``, ``native``, ``auto``)
   against ``backend="reference"`` there: forward, grad x and both stride gradients, max and
   mean, NCHW and channels-last, float32 tight and bfloat16/float16 loose; stride 2 equals
   ``max_pool2d`` / ``avg_pool2d`` bit for bit.
2. ``operator``: forward+backward (stride gradient included) of each backend over
   ``F.max_pool2d(x, 2)`` (the layer a conversion replaces) at 32x64x56x56 and 32x256x28x28,
   strides 2 and 1.7, float32 and bfloat16; medians of interleaved rounds.
3. ``resnet``: timm ResNet-50 train step (batch 32, 224 px, bf16 autocast, SGD), original and
   converted in one run, for strides frozen / learning x ``cudnn.benchmark`` on / off; 3
   warm-up and 10 timed steps, the mean (size changes and their autotuning count). Learning
   strides move as in the trainer: clamp, then ``SizeSchedule`` (sizes re-read every
   ``--size-refresh-every`` steps); the distinct sizes visited are reported.
4. ``vgg``: the small VGG of ``toy_experiments.py`` on random 28x28 data: seconds per epoch
   (60000 images, batch 256, AdamW + Adam on the strides as there) fixed vs DynOPool. The
   budget penalty runs only when fvcore imports (the cost model needs it).

No fvcore needed. Results: printed, and written to ``--out`` (Markdown with a JSON block).
Exit code 1 on a correctness failure.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 2) -> float:
    """Median seconds of ``fn`` over ``reps`` calls after ``warmup``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _backends(device: torch.device) -> list[str]:
    from dynopool_convert import _fast_triton

    probe = torch.zeros(1, 1, 2, 2, device=device)
    return (["triton"] if _fast_triton.applies(probe) else []) + ["native", "auto"]


# ---------------------------------------------------------------------------------- correctness
def correctness(device: torch.device, tiny: bool, out: dict) -> list[str]:
    from dynopool_convert import dynopool2d

    failures: list[str] = []
    rows = out.setdefault("correctness", [])

    def check(name: str, ok: bool, detail: str = "") -> None:
        print(f"[{'ok' if ok else 'FAIL'}] {name} {detail}")
        rows.append({"check": name, "ok": bool(ok), "detail": detail})
        if not ok:
            failures.append(name)

    def run(backend, x, stride, aggregate, g):
        xb = x.detach().clone().requires_grad_()
        s = torch.tensor(stride, device=device, requires_grad=True)
        y = dynopool2d(xb, s, aggregate, backend=backend)
        y.backward(g)
        return y.detach(), xb.grad, s.grad

    cases = [((2, 3, 17, 23), (1.7, 2.6)), ((2, 5, 8, 8), (0.6, 0.9)), ((1, 2, 1, 9), (3.0, 1.3)), ((2, 8, 28, 28), (1.37, 2.0))]
    if not tiny:
        cases.append(((4, 16, 56, 56), (1.7, 1.7)))
    from dynopool_convert import _fast_triton

    torch.manual_seed(0)
    for backend in _backends(device):
        for dtype, tol in [(torch.float32, dict(rtol=1e-4, atol=1e-4)), (torch.bfloat16, dict(rtol=2e-2, atol=2e-2)),
                           (torch.float16, dict(rtol=1e-2, atol=1e-2))]:
            for channels_last in (False, True):
                fmt = torch.channels_last if channels_last else torch.contiguous_format
                for aggregate in ("max", "mean"):
                    worst = [0.0, 0.0, 0.0]
                    ok = True
                    # the native path rounds the interpolated values to bfloat16/float16 before the
                    # max, so its winners (and gradients) may differ from the reference: forward only
                    auto_fused = device.type == "cuda" and _fast_triton.applies(torch.zeros(1, device=device, dtype=dtype))
                    fused = backend == "triton" or (backend == "auto" and auto_fused)
                    compared = 3 if (dtype == torch.float32 or fused or aggregate == "mean") else 1
                    for shape, stride in cases:
                        x = torch.randn(*shape, device=device).to(dtype).to(memory_format=fmt)
                        y_ref = dynopool2d(x, torch.tensor(stride, device=device), aggregate, backend="reference")
                        g = torch.randn(y_ref.shape, device=device).to(dtype)
                        got = run(backend, x, stride, aggregate, g)
                        want = run("reference", x, stride, aggregate, g)
                        for i, (a, b) in enumerate(list(zip(got, want))[:compared]):
                            # stride gradients are sums over the tensor: relative to their magnitude
                            scale = 1.0 if i < 2 else max(1.0, float(g.float().abs().sum()) * max(shape[-2:]) * 1e-3)
                            err = float((a.float() - b.float()).abs().max()) / scale if a.numel() else 0.0
                            worst[i] = max(worst[i], err)
                            ok &= torch.allclose(a.float() / scale, b.float() / scale, **tol)
                    name = (f"{backend} == reference {str(dtype)[6:]} {'channels_last' if channels_last else 'NCHW'} {aggregate}"
                            + ("" if compared == 3 else " (forward)"))
                    check(name, ok, f"max err y {worst[0]:.1e} gx {worst[1]:.1e} gs(rel) {worst[2]:.1e}")
        x = torch.randint(-2, 3, (4, 8, 32, 32), device=device).float()  # ties
        g = torch.randn(4, 8, 16, 16, device=device)
        for channels_last in (False, True):
            xf = x.to(memory_format=torch.channels_last) if channels_last else x
            y, gx, _ = run(backend, xf, (2.0, 2.0), "max", g)
            xm = xf.clone().requires_grad_()
            F.max_pool2d(xm, 2).backward(g)
            layout = "channels_last" if channels_last else "NCHW"
            check(f"{backend} s=2 == max_pool2d (values and gradient routing) {layout}",
                  torch.equal(y, F.max_pool2d(xf, 2)) and torch.equal(gx, xm.grad))
        y = dynopool2d(x, torch.tensor([2.0, 2.0], device=device), "mean", backend=backend)
        check(f"{backend} s=2 mean == avg_pool2d", torch.equal(y, F.avg_pool2d(x, 2)))
    return failures


# ---------------------------------------------------------------------------------- operator
def operator(device: torch.device, tiny: bool, out: dict) -> None:
    from dynopool_convert import dynopool2d

    shapes = [(2, 4, 12, 12), (2, 8, 10, 10)] if tiny else [(32, 64, 56, 56), (32, 256, 28, 28)]
    reps, rounds = (2, 1) if tiny else (10, 3)
    backends = _backends(device)
    if not tiny:
        backends.append("reference")
    rows = out.setdefault("operator", [])
    print(f"\nforward+backward over F.max_pool2d(x, 2), median of {rounds}x{reps} interleaved ({device})")
    print(f"{'shape':>18} {'stride':>6} {'dtype':>9} {'max_pool2d ms':>13} " + " ".join(f"{b:>9}" for b in backends))
    for shape in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            for stride in (2.0, 1.7):
                torch.manual_seed(0)
                x = torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)
                s = torch.tensor([stride, stride], device=device, requires_grad=True)
                y0 = dynopool2d(x, s, "max", backend="reference")
                g = torch.randn_like(y0)
                gm = torch.randn_like(F.max_pool2d(x, 2))

                def make(backend):
                    def fn():
                        x.grad = s.grad = None
                        dynopool2d(x, s, "max", backend=backend).backward(g)
                    return fn

                def baseline():
                    x.grad = None
                    F.max_pool2d(x, 2).backward(gm)

                fns = {"max_pool2d": baseline, **{b: make(b) for b in backends}}
                times: dict[str, list[float]] = {k: [] for k in fns}
                for _ in range(rounds):
                    for k, fn in fns.items():
                        times[k].append(_time(fn, device, reps if k != "reference" else max(1, reps // 3)))
                med = {k: statistics.median(v) for k, v in times.items()}
                ratios = {b: med[b] / med["max_pool2d"] for b in backends}
                rows.append({"shape": list(shape), "stride": stride, "dtype": str(dtype)[6:],
                             "max_pool2d_ms": med["max_pool2d"] * 1e3, "ratios": ratios})
                print(f"{'x'.join(map(str, shape)):>18} {stride:>6} {str(dtype)[6:]:>9} {med['max_pool2d'] * 1e3:>13.3f} "
                      + " ".join(f"{ratios[b]:>8.2f}x" for b in backends))


# ---------------------------------------------------------------------------------- resnet steps
def resnet(device: torch.device, tiny: bool, out: dict, size_refresh_every: int) -> None:
    import timm

    from dynopool_convert import clamp_strides_, convert, scale_parameters
    from dynopool_convert.training.sizes import SizeSchedule

    name, batch, px, warm, steps = ("resnet18", 2, 64, 1, 2) if tiny else ("resnet50", 32, 224, 3, 10)
    torch.manual_seed(0)
    x = torch.randn(batch, 3, px, px, device=device)
    y = torch.randint(0, 100, (batch,), device=device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    rows = out.setdefault("resnet", [])
    torch.manual_seed(0)
    template = convert(timm.create_model(name, num_classes=100), input_size=(3, px, px)).model
    print(f"\ntrain step, {name} {px}px batch {batch}, {'bf16 autocast' if device.type == 'cuda' else 'float32'}, "
          f"SGD; mean of {steps} steps after {warm}; sizes re-read every {size_refresh_every} steps")
    for learning in (False, True):
        for bench in (True, False):
            result = {}
            for kind in ("original", "converted"):
                torch.manual_seed(0)
                model = copy.deepcopy(template) if kind == "converted" else timm.create_model(name, num_classes=100)
                model.to(device).train()
                scales = scale_parameters(model)
                ids = {id(p) for p in scales}
                for p in scales:
                    p.requires_grad_(learning)
                groups = [{"params": [p for p in model.parameters() if id(p) not in ids], "lr": 0.01}]
                if learning and scales:
                    groups.append({"params": scales, "lr": 0.02})  # the trainer's default scale_lr
                opt = torch.optim.SGD(groups, lr=0.01, momentum=0.9)
                sizes = SizeSchedule(model, size_refresh_every, device, learning)
                if device.type == "cuda":
                    torch.backends.cudnn.benchmark = bench
                done = [0]

                def step():
                    with amp:
                        loss = F.cross_entropy(model(x), y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    clamp_strides_(model)
                    done[0] += 1
                    sizes.after_step(done[0])

                for _ in range(warm):
                    step()
                _sync(device)
                seen_before = sizes.distinct
                t0 = time.perf_counter()
                for _ in range(steps):
                    step()
                _sync(device)
                result[kind] = (time.perf_counter() - t0) / steps
                result[f"{kind}_new_sizes"] = sizes.distinct - seen_before
                sizes.close()
                del model, opt
            ratio = result["converted"] / result["original"]
            row = {"strides": "learning" if learning else "frozen", "cudnn_benchmark": bench,
                   "original_ms": result["original"] * 1e3, "converted_ms": result["converted"] * 1e3, "ratio": ratio,
                   "new_sizes_while_timed": result["converted_new_sizes"]}
            rows.append(row)
            print(f"strides {row['strides']:>8}, cudnn.benchmark {'on ' if bench else 'off'}: original {row['original_ms']:.1f} ms, "
                  f"converted {row['converted_ms']:.1f} ms, ratio {ratio:.2f}x (site sizes new while timed: {row['new_sizes_while_timed']})")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False


# ---------------------------------------------------------------------------------- toy VGG
def vgg(device: torch.device, tiny: bool, out: dict) -> None:
    from benchmarks.experiments.toy_experiments import small_vgg

    from dynopool_convert import clamp_strides_, convert, scale_parameters
    from dynopool_convert.training.sizes import SizeSchedule

    n, batch, epochs = (512, 64, 1) if tiny else (60000, 256, 2)
    torch.manual_seed(0)
    data = torch.randn(n, 1, 28, 28, device=device)
    labels = torch.randint(0, 10, (n,), device=device)
    try:
        import fvcore  # noqa: F401

        penalty = True
    except ImportError:
        penalty = False
    rows = out.setdefault("vgg", [])
    print(f"\ntoy VGG (width 32), {n} random 28x28 images, batch {batch}: seconds per epoch "
          f"(budget penalty {'on' if penalty else 'off: no fvcore'})")
    seconds = {}
    for method in ("fixed", "dynopool"):
        torch.manual_seed(0)
        model = small_vgg(width=32)
        if method == "dynopool":
            model = convert(model, input_size=(1, 28, 28)).model
        model.to(device).train()
        strides = scale_parameters(model)
        ids = {id(p) for p in strides}
        opt = torch.optim.AdamW([p for p in model.parameters() if id(p) not in ids], lr=3e-3, weight_decay=5e-4)
        opt_s = torch.optim.Adam(strides, lr=0.01) if strides else None
        cost = None
        if penalty and strides:
            from dynopool_convert import CostModel, budget_penalty

            cost = CostModel(model, (1, 28, 28))
            budget = int(0.9 * float(cost().detach()))
        sizes = SizeSchedule(model, 1, device, bool(strides))
        done = [0]

        def step(i):
            xb, yb = data[i: i + batch], labels[i: i + batch]
            loss = F.cross_entropy(model(xb), yb, label_smoothing=0.1)
            if cost is not None:
                loss = loss + 5.0 * budget_penalty(cost(), budget)
            opt.zero_grad(set_to_none=True)
            if opt_s is not None:
                opt_s.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if opt_s is not None:
                opt_s.step()
                clamp_strides_(model)
            done[0] += 1
            sizes.after_step(done[0])

        for i in range(0, min(n, 10 * batch), batch):  # warm-up: kernels compiled, cuDNN plans
            step(i)
        times = []
        for _ in range(epochs):
            _sync(device)
            t0 = time.perf_counter()
            for i in range(0, n - batch + 1, batch):
                step(i)
            _sync(device)
            times.append(time.perf_counter() - t0)
        sizes.close()
        seconds[method] = min(times)
        print(f"{method:>9}: {seconds[method]:.2f} s per epoch (best of {epochs})")
    ratio = seconds["dynopool"] / seconds["fixed"]
    rows.append({"fixed_s": seconds["fixed"], "dynopool_s": seconds["dynopool"], "ratio": ratio, "budget_penalty": penalty})
    print(f"DynOPool / fixed: {ratio:.2f}x")


# ---------------------------------------------------------------------------------- main
SECTIONS = ("correctness", "operator", "resnet", "vgg")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="GPU correctness and speed check of DynOPool (issue 15)")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (a dry run: use with --tiny)")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes everywhere (a dry run of every section)")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {', '.join(SECTIONS)}")
    ap.add_argument("--size-refresh-every", type=int, default=None, help="train.size_refresh_every for the learning rows (default: the trainer's)")
    ap.add_argument("--out", type=Path, default=Path("gpu_check.md"), help="results file (Markdown with a JSON block)")
    args = ap.parse_args(argv)
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device (use --device cpu --tiny for a dry run)")
        return 2
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton kernels on CPU tensors, interpreted
        torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    from dynopool_convert.training.recipes import TrainConfig

    refresh = args.size_refresh_every or TrainConfig().size_refresh_every
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    out: dict = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "device": name,
                 "torch": torch.__version__, "tiny": args.tiny, "sections": sections}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    print(f"{name}, torch {torch.__version__}, triton {out['triton']}, {out['date']}")
    t_start = time.perf_counter()
    failures: list[str] = []
    try:
        if "correctness" in sections:
            failures += correctness(device, args.tiny, out)
        if "operator" in sections:
            operator(device, args.tiny, out)
        if "resnet" in sections:
            resnet(device, args.tiny, out, refresh)
        if "vgg" in sections:
            vgg(device, args.tiny, out)
    finally:
        out["failures"] = failures
        out["wall_s"] = round(time.perf_counter() - t_start, 1)
        _write(args.out, out)
    print(f"\n{len(failures)} correctness failures; {out['wall_s']} s; results in {args.out}")
    return 1 if failures else 0


def _write(path: Path, out: dict) -> None:
    lines = [f"# DynOPool GPU check: {out['device']}, {out['date']}", "",
             f"torch {out['torch']}, triton {out['triton']}{', TINY dry run' if out['tiny'] else ''}; {out.get('wall_s')} s", ""]
    if out.get("operator"):
        backends = list(out["operator"][0]["ratios"])
        lines += ["| shape | stride | dtype | max_pool2d ms | " + " | ".join(f"{b} / max_pool2d" for b in backends) + " |",
                  "|---|---|---|---|" + "---|" * len(backends)]
        for r in out["operator"]:
            lines.append(f"| {'x'.join(map(str, r['shape']))} | {r['stride']} | {r['dtype']} | {r['max_pool2d_ms']:.3f} | "
                         + " | ".join(f"{r['ratios'][b]:.2f}x" for b in backends) + " |")
        lines.append("")
    if out.get("resnet"):
        lines += ["| train step | original ms | converted ms | ratio | new site sizes while timed |", "|---|---|---|---|---|"]
        for r in out["resnet"]:
            lines.append(f"| strides {r['strides']}, cudnn.benchmark {'on' if r['cudnn_benchmark'] else 'off'} | "
                         f"{r['original_ms']:.1f} | {r['converted_ms']:.1f} | {r['ratio']:.2f}x | {r['new_sizes_while_timed']} |")
        lines.append("")
    if out.get("vgg"):
        r = out["vgg"][0]
        lines += [f"Toy VGG epoch: fixed {r['fixed_s']:.2f} s, DynOPool {r['dynopool_s']:.2f} s, ratio {r['ratio']:.2f}x "
                  f"(budget penalty {'on' if r['budget_penalty'] else 'off'}).", ""]
    if "correctness" in out:
        bad = [r["check"] for r in out["correctness"] if not r["ok"]]
        lines += [f"Correctness: {len(out['correctness']) - len(bad)} of {len(out['correctness'])} checks passed"
                  + (f"; FAILED: {', '.join(bad)}" if bad else "."), ""]
    lines += ["```json", json.dumps(out, indent=1), "```", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
