"""Run many ``dynopool`` command lines as separate processes while importing the CLI once.

Used by tests/test_bad_input.py: ``python tests/_cli_batch.py CASES.json RESULTS.json``. CASES is a
list of ``{"argv": [...], "cwd": "..."}``. The CLI is imported once, then every case runs in a
forked child (its own process: own cwd, own stdout/stderr file descriptors, own exit code,
own ``sys.modules``), exactly as ``python -m dynopool_cli ARGV`` would from ``main()`` on. RESULTS
gets ``{"code", "stdout", "stderr", "seconds"}`` per case. A child that raises (a bug) prints the traceback
to its stderr and exits 1, as the interpreter would.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback


def _child(argv: list[str], cwd: str, out_path: str, err_path: str) -> None:
    os.chdir(cwd)
    sys.path.insert(0, cwd)  # 'python -m' puts the current folder first on sys.path
    for fd, path in ((1, out_path), (2, err_path)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(target, fd)
        os.close(target)
    sys.argv = ["dynopool", *argv]
    code = 1
    try:
        from dynopool_cli.app import main

        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, (int, type(None))):
            print(exc.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - report exactly what the interpreter would
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_cases(cases: list[dict]) -> list[dict]:
    # the expensive imports, done once before forking (the commands import these lazily)
    import dynopool_cli.app  # noqa: F401
    import dynopool_convert.budget  # noqa: F401
    import dynopool_convert.report  # noqa: F401
    import timm  # noqa: F401
    import torchvision  # noqa: F401

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, case in enumerate(cases):
            out_path, err_path = os.path.join(tmp, f"{i}.out"), os.path.join(tmp, f"{i}.err")
            sys.stdout.flush()
            sys.stderr.flush()
            start = time.perf_counter()
            pid = os.fork()
            if pid == 0:
                _child(case["argv"], case["cwd"], out_path, err_path)
            _, status = os.waitpid(pid, 0)
            code = os.waitstatus_to_exitcode(status)
            seconds = time.perf_counter() - start
            with open(out_path, encoding="utf-8", errors="replace") as f_out, open(err_path, encoding="utf-8", errors="replace") as f_err:
                results.append({"code": code, "stdout": f_out.read(), "stderr": f_err.read(), "seconds": seconds})
    return results


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as f:
        all_cases = json.load(f)
    with open(sys.argv[2], "w", encoding="utf-8") as f:
        json.dump(run_cases(all_cases), f)
