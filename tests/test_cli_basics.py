"""The CLI's entry points: --help, python -m, the error convention."""
from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

from dynopool_cli.app import app


def test_help_lists_commands():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "demo" in result.output


def test_python_dash_m_runs():
    out = subprocess.run([sys.executable, "-m", "dynopool_cli", "demo", "--size", "9"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "output (2, 8, 4, 4)" in out.stdout or "output (2, 8, 5, 5)" in out.stdout


def test_bad_option_value_exits_2():
    out = subprocess.run([sys.executable, "-m", "dynopool_cli", "demo", "--size", "zero"], capture_output=True, text=True)
    assert out.returncode == 2
