"""Export with the batch dynamic (the default, checked at another batch size than the one it was
exported with) or fixed (``--batch N``): a model that computes a value from the batch size
(``B = int(y.numel() / (c * h * w))``), which the exporter fixes at the example's batch, is
refused in one line that says so and how to export it; with ``--batch`` it exports."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dynopool_convert import convert
from dynopool_convert.errors import UserInputError
from dynopool_convert.export import export


class BatchFromSize(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = self.conv(x)
        h, w = y.shape[2:]
        b = int(y.numel() / (4 * h * w))
        return self.fc(y.reshape(b, 4, -1).mean(2))


@pytest.fixture(scope="module")
def converted():
    torch.manual_seed(0)
    return convert(BatchFromSize().eval(), input_size=(3, 16, 16), placement="exact").model


def test_a_batch_fixed_by_the_exporter_is_refused_saying_how_to_export(converted, tmp_path):
    with pytest.raises(UserInputError, match=r"runs at the batch size it was exported with \(2\) but not at 3.*--batch N"):
        export(converted, "pt2", tmp_path / "m.pt2")


def test_a_fixed_batch_exports_and_is_checked_at_that_batch(converted, tmp_path):
    result = export(converted, "pt2", tmp_path / "m.pt2", batch=4)
    assert result.batch == 4 and result.max_abs_diff < 1e-6 and result.example_max_abs_diff is None
    loaded = torch.export.load(str(tmp_path / "m.pt2")).module()
    x = torch.randn(4, 3, 16, 16)
    assert torch.allclose(loaded(x), converted.eval()(x), atol=1e-6)
    with pytest.raises(UserInputError, match="at least 1"):
        export(converted, "pt2", tmp_path / "n.pt2", batch=0)


def test_a_dynamic_batch_reads_the_difference_at_the_example_batch_too(converted, tmp_path):
    result = export(converted, "torchscript", tmp_path / "m.ts")
    assert result.batch is None and result.example_batch == 2
    assert result.example_max_abs_diff is not None and result.example_max_abs_diff < 1e-6


def test_the_cli_says_when_the_file_is_right_at_the_example_batch_only():
    from pathlib import Path

    from dynopool_cli.export_cmd import _batch_hint
    from dynopool_convert.export import ExportResult

    def result(at_example):
        return ExportResult(Path("m.onnx"), "onnx", (3, 16, 16), 0.04, 0.0, 1.0, example_max_abs_diff=at_example)

    assert "--batch N" in _batch_hint(result(1e-7), 1e-4) and "(2)" in _batch_hint(result(1e-7), 1e-4)
    assert _batch_hint(result(0.04), 1e-4) == "" and _batch_hint(result(None), 1e-4) == ""


def test_the_cli_fixes_the_batch_with_batch(tmp_path, capsys):
    import dynopool_convert as dc
    from dynopool_cli.app import main

    source = "_export_models:export_net"
    result = convert(dc.build_model(source, {}), input_size=(3, 32, 32))
    ckpt = dc.save(tmp_path / "net.pt", result.model, result.plan, source, {}, (3, 32, 32))
    with pytest.raises(SystemExit) as info:
        main(["export", str(ckpt), "--format", "pt2", "--out", str(tmp_path / "net.pt2"), "--trust-source", "--batch", "3"])
    out, err = capsys.readouterr()
    assert info.value.code == 0, err
    assert "input 3 x 3 x 32 x 32, batch fixed" in out
    with pytest.raises(SystemExit) as info:
        main(["export", str(ckpt), "--format", "pt2", "--out", str(tmp_path / "n.pt2"), "--trust-source", "--batch", "0"])
    assert info.value.code == 2 and capsys.readouterr().err.count("\n") == 1
