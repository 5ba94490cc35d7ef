"""One wording per problem across commands, and choice errors without pydantic's "Value error,"."""
from __future__ import annotations

import pytest

from dynopool_cli.app import main


def _run(argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(argv)
    out, err = capsys.readouterr()
    return info.value.code, out, err


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
