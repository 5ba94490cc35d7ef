"""GPU correctness and speed check of DynOPool (run on a CUDA machine).

    python benchmarks/gpu_check.py            # prints a report, exits 1 on a correctness failure
    python benchmarks/gpu_check.py --only native   # only the native-path vs reference section

Checks: the CUDA result equals the CPU reference (forward, grad x, grad stride) in float32 and
float64; bfloat16/float16 forward; stride 2 equals max_pool2d exactly; then times forward+backward
against F.max_pool2d at the issue's shapes (interleaved, median of 20) and, when the conversion
pass is available, a training step of a converted ResNet-50 against the original.
"""
from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.nn.functional as F

from dynopool_convert import DynOPool, dynopool2d


def _check(name: str, ok: bool, failures: list[str]) -> None:
    print(f"[{'ok' if ok else 'FAIL'}] {name}")
    if not ok:
        failures.append(name)


def correctness(failures: list[str]) -> None:
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        for shape, stride in [((2, 3, 17, 23), (1.7, 2.6)), ((2, 5, 8, 8), (0.6, 0.9)), ((1, 2, 1, 9), (3.0, 1.3))]:
            for aggregate in ("max", "mean"):
                x = torch.randn(*shape, dtype=dtype)
                outs = {}
                for device in ("cpu", "cuda"):
                    xd = x.detach().to(device).requires_grad_(True)
                    s = torch.tensor(stride, dtype=dtype, device=device, requires_grad=True)
                    y = dynopool2d(xd, s, aggregate, backend="reference")
                    g = torch.randn_like(y, device="cpu").to(device) if device == "cpu" else outs["cpu"][3].to(device)
                    (y * g).sum().backward()
                    outs[device] = (y.detach().cpu(), xd.grad.cpu(), s.grad.cpu(), g.cpu())
                tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
                ok = all(torch.allclose(a, b, **tol) for a, b in zip(outs["cpu"][:3], outs["cuda"][:3]))
                _check(f"cuda == cpu reference {dtype} {shape} s={stride} {aggregate}", ok, failures)
    x = torch.randn(4, 8, 32, 32, device="cuda")
    two = torch.tensor([2.0, 2.0], device="cuda")
    _check("s=2 == max_pool2d on cuda", torch.equal(dynopool2d(x, two, "max"), F.max_pool2d(x, 2)), failures)
    _check("s=2 mean == avg_pool2d on cuda", torch.equal(dynopool2d(x, two, "mean"), F.avg_pool2d(x, 2)), failures)
    for dtype in (torch.bfloat16, torch.float16):
        s = torch.tensor([1.6, 2.4], device="cuda")
        y = dynopool2d(x.to(dtype), s, "max")
        ref = dynopool2d(x, s, "max")
        _check(f"{dtype} forward close", y.dtype == dtype and torch.allclose(y.float(), ref, rtol=2e-2, atol=2e-2), failures)
    cl = x.to(memory_format=torch.channels_last)
    s = torch.tensor([1.7, 2.3], device="cuda")
    # the native path runs layout-specific kernels: equal up to float rounding, not bit for bit
    _check("channels-last matches", torch.allclose(dynopool2d(cl, s, "max"), dynopool2d(x, s, "max"), rtol=1e-5, atol=1e-6), failures)


def _time(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def speed() -> None:
    print("\nforward+backward vs F.max_pool2d (CUDA, median of 20, interleaved)")
    print(f"{'shape':>20} {'stride':>8} {'dtype':>9} {'ratio':>7}")
    for shape in [(32, 64, 56, 56), (32, 256, 28, 28)]:
        for dtype in (torch.float32, torch.bfloat16):
            for stride in (2.0, 1.7):
                x = torch.randn(*shape, device="cuda", dtype=dtype, requires_grad=True)
                pool = DynOPool(stride).cuda()
                out = pool(x).shape[-2:]
                k = max(1, round(shape[-1] / out[-1]))

                def run_dyn():
                    pool(x).sum().backward()

                def run_max():
                    F.adaptive_max_pool2d(x, out).sum().backward() if k * out[-1] != shape[-1] else F.max_pool2d(x, k).sum().backward()

                ratios = []
                for _ in range(3):
                    ratios.append(_time(run_dyn) / _time(run_max))
                print(f"{str(shape):>20} {stride:>8} {str(dtype)[6:]:>9} {statistics.median(ratios):>7.2f}")


def native_vs_reference(failures: list[str]) -> None:
    """The default CUDA path (backend="auto" = the native-kernel path) against backend="reference".

    Correctness on CUDA (forward, grad x, grad stride; float64 tight, float32 close; bfloat16
    forward), then forward+backward time of each and of F.max_pool2d(x, 2), interleaved.
    """
    from dynopool_convert import _fast_cpu

    print("\nnative path (backend='auto' on CUDA) vs backend='reference'")
    probe = torch.zeros(1, 1, 4, 4, device="cuda")
    _check("auto does not take the numba kernel on cuda", not _fast_cpu.applies(probe), failures)
    torch.manual_seed(1)
    for dtype, tol in [(torch.float64, dict(rtol=1e-10, atol=1e-10)), (torch.float32, dict(rtol=1e-4, atol=1e-4))]:
        for shape, stride in [((2, 3, 17, 23), (1.7, 2.6)), ((2, 5, 8, 8), (0.6, 0.9)), ((4, 16, 56, 56), (2.0, 2.0)), ((2, 8, 28, 28), (1.37, 1.37))]:
            for aggregate in ("max", "mean"):
                x = torch.randn(*shape, dtype=dtype, device="cuda")
                res = {}
                for backend in ("auto", "reference"):
                    xb = x.clone().requires_grad_(True)
                    s = torch.tensor(stride, dtype=dtype, device="cuda", requires_grad=True)
                    y = dynopool2d(xb, s, aggregate, backend=backend)
                    g = torch.randn(y.shape, dtype=dtype, generator=torch.Generator().manual_seed(2)).to("cuda")
                    (y * g).sum().backward()
                    res[backend] = (y.detach(), xb.grad, s.grad)
                ok = all(torch.allclose(a, b, **tol) for a, b in zip(res["auto"], res["reference"]))
                _check(f"native == reference on cuda {dtype} {shape} s={stride} {aggregate}", ok, failures)
    x = torch.randn(8, 32, 40, 40, device="cuda")
    s = torch.tensor([1.7, 2.3], device="cuda")
    for dtype in (torch.bfloat16, torch.float16):
        y, y_ref = dynopool2d(x.to(dtype), s, "max"), dynopool2d(x.to(dtype), s, "max", backend="reference")
        _check(f"native {dtype} forward close to reference", y.dtype == dtype and torch.allclose(y.float(), y_ref.float(), rtol=1e-2, atol=1e-2), failures)

    print(f"{'shape':>20} {'stride':>6} {'dtype':>9} {'layout':>13} {'maxpool ms':>10} {'native/mp':>9} {'ref/mp':>7} {'ref/native':>10}")
    for shape in [(32, 64, 56, 56), (32, 256, 28, 28)]:
        for dtype in (torch.float32, torch.bfloat16):
            for channels_last in (False, True):
                for stride in (2.0, 1.7):
                    fmt = torch.channels_last if channels_last else torch.contiguous_format
                    x = torch.randn(*shape, device="cuda", dtype=dtype).to(memory_format=fmt).requires_grad_(True)
                    s = torch.tensor([stride, stride], device="cuda", requires_grad=True)

                    def run_native(x=x, s=s):
                        dynopool2d(x, s, "max", backend="auto").sum().backward()

                    def run_ref(x=x, s=s):
                        dynopool2d(x, s, "max", backend="reference").sum().backward()

                    def run_mp(x=x):
                        F.max_pool2d(x, 2).sum().backward()

                    times = {"native": [], "reference": [], "max_pool2d": []}
                    for _ in range(3):
                        for name, fn in (("native", run_native), ("reference", run_ref), ("max_pool2d", run_mp)):
                            times[name].append(_time(fn))
                    med = {k: statistics.median(v) for k, v in times.items()}
                    mp = med["max_pool2d"]
                    layout = "channels_last" if channels_last else "NCHW"
                    print(
                        f"{str(shape):>20} {stride:>6} {str(dtype)[6:]:>9} {layout:>13} {mp * 1e3:>10.3f} "
                        f"{med['native'] / mp:>9.2f} {med['reference'] / mp:>7.2f} {med['reference'] / med['native']:>10.2f}"
                    )


def converted_step(failures: list[str]) -> None:
    """A training step of converted ResNet-50 vs the original on CUDA (bf16 autocast), interleaved."""
    import timm

    from dynopool_convert import convert

    print("\ntraining step, ResNet-50 224px batch 32, bf16 autocast, converted vs original")
    torch.manual_seed(0)
    models = {"original": timm.create_model("resnet50", num_classes=100)}
    models["converted"] = convert(timm.create_model("resnet50", num_classes=100), input_size=(3, 224, 224)).model
    x = torch.randn(32, 3, 224, 224, device="cuda")
    y = torch.randint(0, 100, (32,), device="cuda")
    steps = {}
    for kind, model in models.items():
        model.cuda()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step(model=model, opt=opt):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss

        steps[kind] = step
        _check(f"{kind} step finite", bool(torch.isfinite(step()).item()), failures)
    times = {kind: [] for kind in steps}
    for _ in range(3):
        for kind, step in steps.items():
            times[kind].append(_time(step, reps=10))
    orig, conv = statistics.median(times["original"]), statistics.median(times["converted"])
    print(f"original {orig * 1e3:.1f} ms, converted {conv * 1e3:.1f} ms, ratio {conv / orig:.2f}")


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="GPU correctness and speed check of DynOPool")
    ap.add_argument("--only", choices=["all", "native"], default="all", help="'native': only the native-vs-reference section")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    print(torch.cuda.get_device_name(), torch.__version__)
    failures: list[str] = []
    if args.only == "all":
        correctness(failures)
        speed()
    native_vs_reference(failures)
    if args.only == "all":
        converted_step(failures)
    print(f"\n{len(failures)} correctness failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
