"""``dynopool convert`` read from a pipe or a file: whole lines (no 80-column wrapping), the
fitted factors labelled by group id in group order."""
from __future__ import annotations

import re

import pytest

from dynopool_cli.app import main


def test_redirected_output_is_unwrapped_and_groups_are_labelled(capsys, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)  # as a newcomer's shell: Rich would use 80
    with pytest.raises(SystemExit) as info:
        main(["convert", "resnet18", "--input-size", "32", "--budget", "30M", "--dry-run"])
    out = capsys.readouterr().out
    assert info.value.code == 0
    lines = out.splitlines()
    assert max(map(len, lines)) > 80  # the table and the budget line are wider than 80: kept whole
    for name in ("layer2.0.downsample.0", "layer3.0.downsample.0", "layer4.0.downsample.0"):
        row = next(line for line in lines if name in line)
        assert re.search(r"\d+x\d+ -> \d+x\d+", row) and "converted" in row  # one site, one line
    fitted = next(line for line in lines if "fitted to" in line)
    groups = [int(g) for g in re.findall(r"group (\d+): [\d.]+", fitted)]
    assert groups == [0, 1, 2, 3, 4]  # every group, labelled, in the report's order, on one line
