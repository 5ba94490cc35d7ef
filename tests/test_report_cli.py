"""`dynopool report` on the command line (the checkpoint loader replaced by the tiny stand-in)."""
from __future__ import annotations

import json
import pytest
import yaml

import dynopool_convert.report as report_pkg
from _report_fixtures import TinyConverted, tiny_plan, tiny_training
from dynopool_cli.app import main
from dynopool_convert.report import build_report


@pytest.fixture
def fake_checkpoint(monkeypatch, tmp_path):
    """A file path whose 'loading' builds the tiny report (records the input size asked for)."""
    path = tmp_path / "tiny.pt"
    path.write_bytes(b"stand-in")
    calls = []

    def fake(p, input_size=None, trust_source=False):
        calls.append(input_size)
        size = (3, *input_size[-2:]) if input_size else (3, 32, 32)
        return build_report(TinyConverted(), tiny_plan(), source="tests:tiny", input_size=size, training=tiny_training())

    monkeypatch.setattr(report_pkg, "report_from_checkpoint", fake)
    return path, calls


def _run(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def test_default_is_markdown_when_not_a_tty(fake_checkpoint, capsys):
    path, _ = fake_checkpoint
    code, out, _ = _run(["report", str(path)], capsys)
    assert code == 0 and out.startswith("# dynopool report: tiny")


def test_json_and_yaml_to_stdout_same_data(fake_checkpoint, capsys):
    path, calls = fake_checkpoint
    code, out_json, _ = _run(["report", str(path), "--format", "json", "--input-size", "40x36"], capsys)
    assert code == 0 and calls[-1] == (40, 36)
    code, out_yaml, _ = _run(["report", str(path), "-f", "yaml", "--input-size", "40x36"], capsys)
    assert code == 0
    assert json.loads(out_json) == yaml.safe_load(out_yaml)
    assert json.loads(out_json)["input_size"] == [3, 40, 36]


def test_out_file_format_from_suffix_and_figures(fake_checkpoint, capsys, tmp_path):
    path, _ = fake_checkpoint
    page = tmp_path / "out" / "report.html"
    code, out, err = _run(["report", str(path), "--out", str(page), "--figures", str(tmp_path / "figs")], capsys)
    assert code == 0 and out == ""
    assert page.read_text().startswith("<!DOCTYPE html>") and "data:image/png;base64," in page.read_text()
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["scale_factors.png", "shapes.png"]
    assert "wrote" in err


def test_missing_checkpoint_exits_2_with_one_line(capsys, tmp_path):
    missing = tmp_path / "missing.pt"
    code, out, err = _run(["report", str(missing)], capsys)
    assert code == 2 and out == ""
    assert err.splitlines() == [f"Error: checkpoint '{missing}' does not exist (give the path of a .pt file written by 'dynopool convert' or 'dynopool finetune')"]


@pytest.mark.parametrize("argv,needle", [
    (["--format", "pdf"], "'pdf' is not one of"),
    (["--input-size", "3x"], "bad input size '3x'"),
])
def test_bad_options_exit_2(fake_checkpoint, capsys, argv, needle):
    path, _ = fake_checkpoint
    code, out, err = _run(["report", str(path), *argv], capsys)
    assert code == 2 and out == "" and needle in err and len(err.strip().splitlines()) == 1


def test_help(capsys):
    code, out, _ = _run(["report", "--help"], capsys)
    assert code == 0 and "--figures" in out and "--input-size" in out


def test_input_size_completion():
    from dynopool_convert.report.options import merge_input_size, parse_input_size

    assert merge_input_size(parse_input_size("48"), (3, 64, 64)) == (3, 48, 48)
    assert merge_input_size(parse_input_size("48x40"), (1, 64, 64)) == (1, 48, 40)
    assert merge_input_size(parse_input_size("3,48,40"), (1, 64, 64)) == (3, 48, 40)


# One wording per problem across commands (issue 18), and choice errors without pydantic's "Value error,".


def test_missing_checkpoint_has_one_wording(tmp_path, capsys):
    missing = tmp_path / "missing.pt"
    errors = []
    for argv in (["report", str(missing)], ["finetune", str(missing), "--out", str(tmp_path / "run")]):
        code, out, err = _run(argv, capsys)
        assert code == 2 and out == "" and len(err.splitlines()) == 1, (argv, err)
        errors.append(err.strip())
    assert errors[0] == errors[1] == (
        f"Error: checkpoint '{missing}' does not exist (give the path of a .pt file written by 'dynopool convert' "
        f"or 'dynopool finetune')"
    )


@pytest.mark.parametrize("argv, words", [
    (["report", "x.pt", "--format", "pdf"], "Invalid value for '--format' / '-f': 'pdf' is not one of 'md', 'json'"),
    (["convert", "resnet18", "--placement", "middle"], "Invalid value for '--placement': 'middle' is not one of"),
    (["finetune", "--budget-mode", "x"], "Invalid value for '--budget-mode': 'x' is not one of"),
])
def test_choice_errors_read_plainly(argv, words, capsys):
    code, out, err = _run(argv, capsys)
    assert code == 2 and out == "" and words in err and "Value error" not in err
