"""``dynopool convert`` end to end (in-process through ``main``)."""
from __future__ import annotations

import pytest

import dynopool_convert as dc
from dynopool_cli.app import main


@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # Rich wraps table cells at the default 80


def _run(argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_convert_writes_a_checkpoint_that_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = _run(["convert", "resnet18", "--input-size", "32", "--build-arg", "num_classes=7"], capsys)
    assert code == 0, err
    assert "layer2.0.downsample.0" in out and "converted" in out and "16x16 -> 8x8" in out
    assert "checkpoint: resnet18-dynopool.pt" in out
    ck = dc.load_checkpoint(tmp_path / "resnet18-dynopool.pt")
    assert ck.build_args == {"num_classes": 7} and ck.model.get_submodule("fc").out_features == 7
    assert len(dc.scale_parameters(ck.model)) == 5


def test_dry_run_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, _ = _run(["convert", "timm:resnet18", "--input-size", "32x48", "--dry-run", "--include", "kind:pool"], capsys)
    assert code == 0 and "dry run" in out
    # the status column numbers the reasons; each distinct reason is printed once, below the table
    assert "skipped [1]" in out and out.count("[1] not matched by --include") == 1
    assert list(tmp_path.iterdir()) == []


def test_one_channel_input_size_c_h_w(tmp_path, capsys, monkeypatch):
    # the one size parser: C,H,W gives its own channels (a 1-channel model was refused before)
    monkeypatch.chdir(tmp_path)
    code, out, err = _run(["convert", "dynopool_convert.training.zoo:small_cnn", "--input-size", "1,28,28",
                           "--build-arg", "width=4", "--dry-run"], capsys)  # small_cnn takes 1 channel
    assert code == 0, err
    assert "FLOPs at 28x28" in out and "2 sites converted" in out and "dry run" in out


@pytest.mark.parametrize(
    "argv, words",
    [
        (["convert", "resnt18"], "close matches: resnet18"),
        (["convert", "resnet18", "--input-size", "abc"], "input size"),
        (["convert", "resnet18", "--placement", "middle"], "placement"),
        (["convert", "resnet18", "--build-arg", "oops"], "KEY=VALUE"),
    ],
)
def test_bad_input_exits_2_with_one_line(argv, words, capsys):
    code, _, err = _run(argv, capsys)
    assert code == 2
    assert words in err and len(err.strip().splitlines()) == 1


def test_custom_model_example_runs(capsys):
    import runpy
    from pathlib import Path

    example = Path(__file__).parents[1] / "examples" / "convert_custom_model.py"
    runpy.run_path(str(example), run_name="__main__")
    out = capsys.readouterr().out
    assert "learned groups: 2" in out and "reloaded model gives the same output: True" in out
