"""`dynopool --help` answers at once: the CLI imports the library (torch, timm, fvcore, numba)
only when a command runs. Checked in a fresh interpreter (pytest itself has torch loaded)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

HEAVY = ("torch", "timm", "fvcore", "numba", "torchvision", "matplotlib", "dynopool_convert")

_PROBE = """
import contextlib, io, json, sys
from dynopool_cli.app import main
for argv in ([], ["--help"], ["report", "--help"], ["convert", "--help"], ["finetune", "--help"]):
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            main(argv)
        except SystemExit as exc:
            assert exc.code in (0, None), (argv, exc.code)
print(json.dumps(sorted(m for m in HEAVY if m in sys.modules)))
import os
print(os.environ.get("OMP_WAIT_POLICY"))
"""


def test_help_imports_no_heavy_library():
    code = f"HEAVY = {HEAVY!r}\n" + _PROBE
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    loaded, policy = out.stdout.strip().splitlines()[-2:]
    assert json.loads(loaded) == []
    assert policy == "PASSIVE"  # set by main(), before any command could load torch


def test_user_errors_still_exit_2_after_lazy_imports(tmp_path):
    # the library is imported by the command itself; its UserInputError must still map to exit 2
    missing = tmp_path / "missing.pt"
    out = subprocess.run([sys.executable, "-m", "dynopool_cli", "report", str(missing)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr



def test_idle_openmp_threads_sleep_unless_the_user_chose(monkeypatch):
    # spinning threads lose ~5x on a loaded machine (benchmarks/speed/thread_pools.py); OpenMP reads
    # the policy when torch loads, which the CLI only does after main() has set it
    from dynopool_cli.threads import quiet_thread_pools

    monkeypatch.delitem(sys.modules, "torch", raising=False)  # as in a fresh `dynopool` process (restored after)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    quiet_thread_pools()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    quiet_thread_pools()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"  # the user's choice is kept
