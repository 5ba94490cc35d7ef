"""Peak memory of a conversion: how much the resident set grows while ``convert`` runs,
against the size of the model's parameters (one process per model, so peaks do not mix).

    python -m benchmarks.speed.convert_memory timm:hrnet_w18_small:64 timm:efficientformer_l1:224
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def measure(source: str, size: int) -> str:
    """One table row for ``source`` converted at ``size`` (run in this process)."""
    import dynopool_convert as dc

    model = dc.build_model(source, {"dynamic_img_size": True} if source.startswith("timm:") and "vit" in source else {})
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    result = dc.convert(model, (3, size, size))
    seconds = time.perf_counter() - start
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024  # kB -> MB
    params = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    s = result.plan.summary()
    return (f"| {source} | {size} | {params:.0f} | {grown:.0f} | {grown / params:.1f}x | {seconds:.1f} | "
            f"{s['groups']} learned, {s['pinned']} pinned, {s['reverted']} reverted |")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        source, size = sys.argv[2].rsplit(":", 1)
        print(measure(source, int(size)), flush=True)
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("specs", nargs="+", metavar="SOURCE:SIZE", help="a model source and its input size")
    specs = ap.parse_args().specs
    print("| model | input | parameters MB | peak RSS growth MB | growth / parameters | convert s | groups |")
    print("|---|---|---|---|---|---|---|")
    for spec in specs:
        out = subprocess.run([sys.executable, "-m", "benchmarks.speed.convert_memory", "--child", spec],
                             capture_output=True, text=True, cwd=ROOT)
        print(out.stdout.strip() or f"| {spec} | failed: {out.stderr.strip().splitlines()[-1:]} |", flush=True)


if __name__ == "__main__":
    main()
