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
"""


def test_help_imports_no_heavy_library():
    code = f"HEAVY = {HEAVY!r}\n" + _PROBE
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_user_errors_still_exit_2_after_lazy_imports(tmp_path):
    # the library is imported by the command itself; its UserInputError must still map to exit 2
    missing = tmp_path / "missing.pt"
    out = subprocess.run([sys.executable, "-m", "dynopool_cli", "report", str(missing)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


_POLICY = """
import os, sys
from dynopool_cli.app import main
try:
    main(["demo", "--size", "9"])
except SystemExit:
    pass
import torch  # loaded by the command, after the policy was set
print(os.environ.get("OMP_WAIT_POLICY"), "torch" in sys.modules, file=sys.stderr)
"""


def test_idle_openmp_threads_sleep_unless_the_user_chose():
    # spinning threads lose ~5x on a loaded machine (benchmarks/thread_pools.py)
    for given, expected in ((None, "PASSIVE"), ("ACTIVE", "ACTIVE")):
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        if given:
            env["OMP_WAIT_POLICY"] = given
        out = subprocess.run([sys.executable, "-c", _POLICY], capture_output=True, text=True, env=env, timeout=300)
        assert out.returncode == 0, out.stderr
        assert out.stderr.strip().splitlines()[-1] == f"{expected} True"
