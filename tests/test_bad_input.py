"""Bad input everywhere (issue 8): every refused command line exits 2 with exactly one line on
stderr saying what is wrong, prints no traceback and writes or overwrites no file.

The command lines run as real processes: ``tests/_cli_batch.py`` imports the CLI once and forks
one child per case (own cwd, file descriptors and exit code), which keeps ~60 cases under half
a minute. A few cases also run through a plain ``python -m dynopool_cli`` to check the driver.
"""
from __future__ import annotations

import json
import os
import pickle
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import dynopool_convert as dc

REPO = Path(__file__).resolve().parents[1]
SOURCE, SIZE = "timm:test_resnet", "32"  # 0.5M parameters: a 1.5 MB checkpoint
BUILD = ["--build-arg", "num_classes=10"]
CONVERT = ["convert", SOURCE, "--input-size", SIZE, *BUILD]
DEFAULT_OUT = "test_resnet-dynopool.pt"  # convert's default output name, pre-created in every cwd
OLD = b"old contents that must survive\n"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "cli"), env.get("PYTHONPATH", "")])
    env["COLUMNS"] = "200"
    return env


# ---------------------------------------------------------------- input files


class _Evil:
    """Unpickling this runs a shell command (the classic malicious-pickle payload)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _write_inputs(folder: Path) -> dict[str, Path]:
    """A good checkpoint and every broken variant of it; returns name -> path."""
    model = dc.build_model(SOURCE, {"num_classes": 10})
    result = dc.convert(model, input_size=(3, 32, 32), validate=False)
    good = dc.save_checkpoint(folder / "good.pt", result.model, result.plan, SOURCE, {"num_classes": 10}, (3, 32, 32))
    raw = good.read_bytes()
    payload = torch.load(good, weights_only=True)
    files = {"good": good}

    def save(name: str, obj) -> None:
        files[name] = folder / f"{name}.pt"
        torch.save(obj, files[name])

    def edited(**changes) -> dict:
        out = dict(payload)
        out.update(changes)
        return out

    def write(name: str, data: bytes) -> None:
        files[name] = folder / f"{name}.pt"
        files[name].write_bytes(data)

    write("empty", b"")
    write("truncated_half", raw[: len(raw) // 2])
    write("truncated_100", raw[:100])
    write("random", os.urandom(4096))
    write("text", b"this is not a checkpoint\n")
    save("foreign_state_dict", result.model.state_dict())  # a plain torch.save of weights
    save("tensor", torch.zeros(3))
    save("future_version", edited(format_version=99))
    save("no_plan", {k: v for k, v in payload.items() if k != "plan"})
    save("input_size_str", edited(input_size="abc"))
    save("plan_garbage", edited(plan={"format_version": 1, "sites": "garbage"}))
    plan = payload["plan"]
    first = next(i for i, s in enumerate(plan["sites"]) if s["status"] == "converted")
    renamed = [dict(s) for s in plan["sites"]]
    renamed[first]["name"] = "no.such.layer"
    save("plan_renamed_site", edited(plan={**plan, "sites": renamed}))
    flipped = [dict(s) for s in plan["sites"]]
    flipped[first]["status"] = "skipped"  # the plan no longer creates a layer the weights hold
    save("plan_vs_weights", edited(plan={**plan, "sites": flipped}))
    state = payload["state_dict"]
    stride_key = next(k for k in state if k.endswith("stride"))
    save("weights_missing_key", edited(state_dict={k: v for k, v in state.items() if k != stride_key}))
    weight_key = next(k for k in state if k.endswith("weight") and state[k].dim() == 4)
    save("weights_wrong_shape", edited(state_dict={**state, weight_key: torch.zeros(1, 1)}))
    save("nan_stride", edited(state_dict={**state, stride_key: torch.full_like(state[stride_key], float("nan"))}))
    save("unknown_source", edited(source="timm:no_such_model_xyz"))
    save("factory_source", edited(source="evilmod:factory"))
    marker = folder.parent / "PWNED"  # must never exist: loading must not run the payload
    save("malicious_torch_save", edited(extra=_Evil(f"echo pwned > {shlex.quote(str(marker))}")))
    files["malicious_pickle"] = folder / "malicious_pickle.pt"
    with open(files["malicious_pickle"], "wb") as f:  # a bare pickle (not torch's zip format)
        pickle.dump({"format": "dynopool-checkpoint", "x": _Evil(f"echo pwned > {shlex.quote(str(marker))}")}, f)
    files["marker"] = marker
    return files


# A module:factory source whose import leaves a marker and which rebuilds the same model.
EVILMOD = """
import pathlib
pathlib.Path("IMPORTED").write_text("imported")

def factory(**kwargs):
    import timm
    return timm.create_model("test_resnet", pretrained=False, **kwargs)
"""


# ---------------------------------------------------------------- the matrix


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]  # "{in}/NAME" is an input file; everything else is literal
    words: tuple[str, ...]  # each must appear (case-insensitive) in the error line


def _report(name: str, *more: str) -> tuple[str, ...]:
    return ("report", f"{{in}}/{name}.pt", "-f", "json", "-o", "out.json", *more)


CASES = [
    # models
    Case("model-misspelled", ("convert", "resnt50"), ("unknown", "'resnt50'", "resnet50")),
    Case("model-timm-misspelled", ("convert", "timm:resnt18"), ("unknown timm model", "resnet18")),
    Case("model-torchvision-misspelled", ("convert", "torchvision:resnt18"), ("unknown torchvision model", "resnet18")),
    Case("model-garbage", ("convert", "not a model!"), ("unknown", "accepted")),
    Case("model-bad-factory-form", ("convert", "a-b:c"), ("package.module:factory",)),
    Case("model-factory-missing-module", ("convert", "no_such_module_xyz:factory"), ("cannot import", "no_such_module_xyz")),
    Case("build-arg-unknown", ("convert", SOURCE, "--input-size", SIZE, "--build-arg", "foo=1"), ("cannot build", "foo")),
    Case("build-arg-no-equals", ("convert", SOURCE, "--build-arg", "noequals"), ("key=value", "noequals")),
    Case("build-arg-wrong-type", ("convert", SOURCE, "--input-size", SIZE, "--build-arg", "num_classes=abc"), ("cannot build", "num_classes")),
    # budgets
    *[
        Case(f"budget-malformed-{label}", (*CONVERT, "--budget", text), ("invalid budget", "4G"))
        for label, text in [("4X", "4X"), ("neg", "-1G"), ("nan", "nanG"), ("space", "4 G"), ("empty", ""), ("inf", "inf"), ("zero", "0")]
    ],
    Case("budget-impossible", (*CONVERT, "--budget", "1k"), ("cannot be met", "at least")),
    # input sizes
    *[
        Case(f"input-size-{label}", ("convert", SOURCE, "--input-size", text), ("input size", "positive integers"))
        for label, text in [("zero", "0"), ("abc", "abc"), ("10x", "10x"), ("neg", "-3"), ("3d", "32x32x32"), ("empty", "")]
    ],
    Case("input-size-too-small", ("convert", "torchvision:squeezenet1_0", "--input-size", "8"), ("fails on an input", "--input-size")),
    Case("input-size-not-patch-multiple", ("convert", "timm:test_vit", "--input-size", "24"), ("fails on an input", "patch size")),
    Case("report-input-size-abc", _report("good", "--input-size", "abc"), ("bad input size", "accepted")),
    Case("report-input-size-zero", _report("good", "--input-size", "0"), ("bad input size",)),
    Case("report-input-size-channels", _report("good", "--input-size", "1,32,32"), ("1 channels", "takes 3")),
    # options and values
    Case("option-unknown", (*CONVERT, "--bogus"), ("no such option", "--bogus")),
    Case("option-missing-value", ("convert", SOURCE, "--input-size"), ("requires an argument", "--input-size")),
    Case("enum-placement", (*CONVERT, "--placement", "middle"), ("--placement", "before", "after")),
    Case("enum-aggregate", (*CONVERT, "--aggregate", "median"), ("--aggregate", "max", "mean")),
    Case("enum-report-format", _report("good", "--format", "pdf"), ("--format", "json")),
    Case("command-unknown", ("nosuchcommand",), ("no such command", "nosuchcommand")),
    Case("argument-missing", ("report",), ("missing argument", "checkpoint")),
    Case("demo-size-zero", ("demo", "--size", "0"), ("--size",)),
    Case("demo-size-huge", ("demo", "--size", "100000000"), ("--size", "4096")),
    Case("demo-stride-nan", ("demo", "--stride", "nan"), ("--stride",)),
    # output paths
    Case("out-is-directory", (*CONVERT, "--out", "."), ("directory",)),
    Case("out-folder-missing", (*CONVERT, "--out", "nodir/x.pt"), ("does not exist", "nodir")),
    Case("out-under-a-file", (*CONVERT, "--out", "out.json/x.pt"), ("not a folder",)),
    Case("report-out-is-directory", ("report", "{in}/good.pt", "-f", "json", "-o", "."), ("directory",)),
    Case("report-figures-is-file", _report("good", "--figures", "out.json"), ("figures", "not a folder")),
    # checkpoint paths and files
    Case("ckpt-missing", _report("missing"), ("not found", "missing.pt")),
    Case("ckpt-is-directory", ("report", "{in}", "-f", "json", "-o", "out.json"), ("not a file",)),
    Case("ckpt-empty", _report("empty"), ("empty",)),
    Case("ckpt-truncated-half", _report("truncated_half"), ("not a readable", "truncated")),
    Case("ckpt-truncated-100-bytes", _report("truncated_100"), ("not a readable",)),
    Case("ckpt-random-bytes", _report("random"), ("not a readable",)),
    Case("ckpt-text", _report("text"), ("not a readable",)),
    Case("ckpt-foreign-state-dict", _report("foreign_state_dict"), ("not a dynopool checkpoint",)),
    Case("ckpt-foreign-tensor", _report("tensor"), ("not a dynopool checkpoint",)),
    Case("ckpt-future-version", _report("future_version"), ("format version 99",)),
    Case("ckpt-no-plan", _report("no_plan"), ("corrupt", "'plan'")),
    Case("ckpt-input-size-str", _report("input_size_str"), ("corrupt", "'input_size'")),
    Case("ckpt-plan-garbage", _report("plan_garbage"), ("corrupt", "plan")),
    Case("ckpt-plan-renamed-site", _report("plan_renamed_site"), ("plan does not match", "no.such.layer")),
    Case("ckpt-plan-vs-weights", _report("plan_vs_weights"), ("does not match", "unexpected key")),
    Case("ckpt-weights-missing-key", _report("weights_missing_key"), ("does not match", "missing key")),
    Case("ckpt-weights-wrong-shape", _report("weights_wrong_shape"), ("does not match", "size mismatch")),
    Case("ckpt-nan-stride", _report("nan_stride"), ("corrupt", "non-finite")),
    Case("ckpt-unknown-source", _report("unknown_source"), ("unknown timm model", "no_such_model_xyz")),
    Case("ckpt-malicious-torch-save", _report("malicious_torch_save"), ("refusing", "system")),
    Case("ckpt-malicious-pickle", _report("malicious_pickle"), ("not a readable", "never loads")),
    Case("ckpt-factory-untrusted", _report("factory_source"), ("evilmod:factory", "--trust-source")),
]
if hasattr(os, "geteuid") and os.geteuid() != 0:  # root reads mode-000 files, so only a user can check this
    CASES.append(Case("ckpt-unreadable", _report("unreadable"), ("cannot read", "permission denied")))

# (argv, cwd files) run with a trust flag: the positive controls of the refusal cases
TRUSTED = ("report", "{in}/factory_source.pt", "--trust-source", "-f", "json", "-o", "out.json")


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder below ``folder`` (hidden ones too) with its size and mtime."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def _prepare_cwd(folder: Path) -> None:
    folder.mkdir()
    (folder / DEFAULT_OUT).write_bytes(OLD)  # a convert that fails must not overwrite it
    (folder / "out.json").write_bytes(OLD)  # nor a report
    (folder / "evilmod.py").write_text(EVILMOD)


def _run_batch(cases: list[dict], tmp: Path) -> list[dict]:
    (tmp / "cases.json").write_text(json.dumps(cases))
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "_cli_batch.py"), str(tmp / "cases.json"), str(tmp / "results.json")],
        env=_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp / "results.json").read_text())
    (tmp / "timings.txt").write_text("".join(f"{r['seconds']:.2f} {' '.join(c['argv'])}\n" for c, r in zip(cases, results)))
    return results


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    """Run every case (and the trusted control) once; per case: result, cwd before/after."""
    tmp = tmp_path_factory.mktemp("bad_input")
    inputs = tmp / "inputs"
    inputs.mkdir()
    files = _write_inputs(inputs)
    if any(c.id == "ckpt-unreadable" for c in CASES):
        files["unreadable"] = inputs / "unreadable.pt"
        files["unreadable"].write_bytes(files["good"].read_bytes())
        files["unreadable"].chmod(0)
    inputs_before = _snapshot(inputs)
    runs, befores = [], {}
    for case_id, argv in [(c.id, c.argv) for c in CASES] + [("trusted", TRUSTED)]:
        cwd = tmp / case_id
        _prepare_cwd(cwd)
        befores[case_id] = _snapshot(cwd)
        runs.append({"argv": [a.replace("{in}", str(inputs)) for a in argv], "cwd": str(cwd)})
    results = _run_batch(runs, tmp)
    return {
        "results": {run_id: res for run_id, res in zip([c.id for c in CASES] + ["trusted"], results)},
        "before": befores,
        "after": {case_id: _snapshot(tmp / case_id) for case_id in befores},
        "inputs_before": inputs_before,
        "inputs_after": _snapshot(inputs),
        "files": files,
        "tmp": tmp,
    }


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_refused_with_one_line_and_nothing_written(matrix, case):
    res = matrix["results"][case.id]
    assert "Traceback" not in res["stderr"] + res["stdout"], res["stderr"]
    lines = res["stderr"].splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{res['stderr']}"
    assert res["code"] == 2, f"exit code {res['code']}: {res['stderr']}"
    line = lines[0].lower()
    assert line.startswith("error: ")
    for word in case.words:
        assert word.lower() in line, f"{word!r} not in {lines[0]!r}"
    assert matrix["after"][case.id] == matrix["before"][case.id]  # nothing written, created or touched
    assert (matrix["tmp"] / case.id / DEFAULT_OUT).read_bytes() == OLD
    assert (matrix["tmp"] / case.id / "out.json").read_bytes() == OLD


def test_no_input_file_was_modified(matrix):
    assert matrix["inputs_after"] == matrix["inputs_before"]


def test_malicious_pickles_never_ran(matrix):
    """Both payloads are live (plain unpickling runs them, see below) yet nothing ran."""
    assert not matrix["files"]["marker"].exists()


def test_malicious_payload_is_live(matrix, tmp_path):
    """Control: unrestricted unpickling of the same files does run the payload."""
    marker = matrix["files"]["marker"]
    try:
        torch.load(matrix["files"]["malicious_torch_save"], weights_only=False)
        assert marker.exists()
        marker.unlink()
        with open(matrix["files"]["malicious_pickle"], "rb") as f:
            pickle.load(f)
        assert marker.exists()
    finally:
        marker.unlink(missing_ok=True)


def test_untrusted_factory_source_is_not_imported(matrix):
    assert not (matrix["tmp"] / "ckpt-factory-untrusted" / "IMPORTED").exists()


def test_trust_flag_imports_the_factory(matrix):
    """Control: with --trust-source the same checkpoint's module is imported and the report written."""
    res = matrix["results"]["trusted"]
    assert res["code"] == 0, res["stderr"]
    cwd = matrix["tmp"] / "trusted"
    assert (cwd / "IMPORTED").exists()
    assert json.loads((cwd / "out.json").read_text())["source"] == "evilmod:factory"


@pytest.mark.parametrize("argv,word", [
    (["convert", "resnt50"], "resnet50"),
    (["convert", SOURCE, "--bogus"], "--bogus"),
])
def test_plain_python_dash_m(tmp_path, argv, word):
    """The fork driver behaves as ``python -m dynopool_cli``: the same checks, a few cases."""
    proc = subprocess.run([sys.executable, "-m", "dynopool_cli", *argv], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and word in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_saved_files_keep_usual_permissions(tmp_path):
    """Atomic writes go through mkstemp (mode 0600); the final file gets 0666 minus the umask."""
    from dynopool_convert.files import atomic_write_text

    umask = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capfd):
    """Ctrl-C during a command: exit code 130 (typer's mapping), no traceback."""
    from dynopool_cli.app import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dc, "build_model", interrupted)
    with pytest.raises(SystemExit) as exc:
        main(["convert", SOURCE, "--input-size", SIZE, "--dry-run"])
    assert exc.value.code == 130
    assert "Traceback" not in capfd.readouterr().err
