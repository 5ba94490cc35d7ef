"""Training speed of the quick CPU demo under each thread-pool setting, on a (possibly loaded) machine.

    python -m benchmarks.speed.thread_pools                    # 60 steps per setting, 2 rounds, interleaved
    python -m benchmarks.speed.thread_pools --steps 40 --rounds 1 --settings default one-thread

Each setting runs ``finetune`` on the quick demo's recipe (small CNN, bundled Fashion-MNIST,
batch 64) for ``--steps`` steps in a fresh process with its environment:

- ``default``: torch's and numba's thread pools as they come (one thread per core each);
- ``passive``: the same, with ``OMP_WAIT_POLICY=PASSIVE`` (idle OpenMP threads sleep, not spin);
- ``one-thread``: ``OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1``;
- ``dynopool``: what the ``dynopool`` command sets by itself before torch loads
  (``dynopool_cli.threads.quiet_thread_pools``: ``OMP_WAIT_POLICY=PASSIVE`` unless set).

Prints one JSON line per run: setting, threads seen, the load average before the run, and the
training speed (img/s, the median over the logging windows after the first, which holds the
kernels' warm-up). The settings are interleaved so that a change in the machine's load hits
them alike. Results: docs/BENCHMARKS.md, "Thread pools on a loaded machine".
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = {
    "default": {},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "one-thread": {"OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"},
    "dynopool": {},
}
_CLEARED = ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS")

_CHILD = r"""
import json, os, statistics, sys
if sys.argv[3] == "dynopool":
    from dynopool_cli.threads import quiet_thread_pools
    quiet_thread_pools()
from dynopool_convert.training import finetune
import torch
res = finetune(None, sys.argv[1], recipe=sys.argv[2],
               overrides={"train": {"steps": int(sys.argv[4]), "log_every": 10, "epochs": None}})
rows = [json.loads(l) for l in open(os.path.join(sys.argv[1], "metrics.jsonl")) if '"step"' in l]
speeds = [r["img_s"] for r in rows if r["kind"] == "step"][1:]
import numba
print(json.dumps({"torch_threads": torch.get_num_threads(), "numba_threads": numba.get_num_threads(),
                  "img_s": statistics.median(speeds), "wall_s": round(res.wall_s, 1)}))
"""


def run(setting: str, steps: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _CLEARED}
    env.update(SETTINGS[setting])
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, str(Path(tmp) / "run"), str(ROOT / "recipes" / "quick-cpu-demo.yaml"),
             setting, str(steps)],
            capture_output=True, text=True, env=env, cwd=ROOT,
        )
    if out.returncode != 0:
        raise SystemExit(out.stderr[-2000:])
    return {"setting": setting, "load_before": round(load, 2), **json.loads(out.stdout.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    args = parser.parse_args()
    results: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for setting in args.settings:
            row = run(setting, args.steps)
            results.setdefault(setting, []).append(row["img_s"])
            print(json.dumps(row), flush=True)
    print(json.dumps({"median_img_s": {k: statistics.median(v) for k, v in results.items()}}))


if __name__ == "__main__":
    main()
