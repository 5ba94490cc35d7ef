"""Convert models that live on a GPU: validation, DynOPool strides, forward/backward and a
checkpoint round trip on CUDA, compared with the same converted model on the CPU.

    python -m benchmarks.gpu.convert_cuda_check     # falls back to CPU without CUDA
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

import dynopool_convert as dc

MODELS = [("timm:resnet18", 64), ("timm:tf_efficientnet_b0", 64), ("timm:densenet121", 64),
          ("torchvision:deeplabv3_mobilenet_v3_large", 64), ("timm:inception_v3", 75)]


def _main(out):
    return out["out"] if isinstance(out, dict) else out


def check(source: str, size: int, device: str, dtype: torch.dtype = torch.float32) -> bool:
    torch.manual_seed(0)
    model = dc.build_model(source).to(device, dtype)
    t0 = time.perf_counter()
    result = dc.convert(model, input_size=(3, size, size))
    seconds = time.perf_counter() - t0
    gm = result.model.eval()
    params = dc.scale_parameters(gm)
    on_device = all(p.device.type == torch.device(device).type for p in params)
    x = torch.randn(4, 3, size, size, device=device, dtype=dtype)
    out = _main(gm(x))
    (out.float() * torch.randn_like(out.float())).sum().backward()
    grads = all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    cpu = copy.deepcopy(gm).to("cpu", torch.float32).eval()
    with torch.no_grad():
        ref = _main(cpu(x.float().cpu()))
        got = _main(gm(x)).float().cpu()
    diff = (ref - got).abs().max().item() / max(ref.abs().max().item(), 1e-6)
    with tempfile.TemporaryDirectory() as tmp:
        path = dc.save_checkpoint(Path(tmp) / "m.pt", gm, result.plan, source, input_size=(3, size, size))
        loaded = dc.load(path).to(device, dtype).eval()
        with torch.no_grad():
            same = torch.equal(_main(loaded(x)), _main(gm(x)))
    ok = on_device and grads and same and diff < (1e-3 if dtype == torch.float32 else 5e-2)
    print(f"{source:42} {str(dtype):15} groups={len(params)} convert={seconds:5.1f}s strides on {device}: {on_device} "
          f"finite grads: {grads} rel.diff vs CPU={diff:.2e} checkpoint same: {same} -> {'OK' if ok else 'FAIL'}", flush=True)
    return ok


def main() -> int:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"torch {torch.__version__}, device {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}", flush=True)
    results = [check(s, n, device) for s, n in MODELS]
    results.append(check("timm:resnet18", 64, device, torch.bfloat16))
    print(f"{sum(results)}/{len(results)} OK")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
