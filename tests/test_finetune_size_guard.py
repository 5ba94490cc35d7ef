"""A stride step that breaks the forward stops finetune cleanly (issue 19): the message names the
group and its sizes, last.pt keeps the strides before the step, the CLI exits 2 with one line.

The optimiser's step is simulated: ``clamp_strides_`` (called right after ``optimizer.step()``)
is wrapped to push the pool's stride to 4 after the third step, as a large learning rate
could; 12 px input, 6x6 after the pool at stride 2, 3x3 at 4 (2x2 to 4x4 with one pixel of size
jitter), and the unpadded 5x5 conv after it needs at least 5x5."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import dynopool_convert as dc
from dynopool_cli.app import main
from dynopool_convert.training import finetune, trainer
from dynopool_convert.training.size_guard import SizeChangeBroke

SOURCE = "_convert_models:needs_min_size"
SIZE = (3, 12, 12)
DATA = "synthetic:classes=3,train=16,val=8"
FIXED = {"size_jitter": 0, "size_search": False}  # the strides move only by the simulated step


@pytest.fixture()
def ckpt(tmp_path) -> Path:
    torch.manual_seed(0)
    r = dc.convert(dc.build_model(SOURCE, {}), input_size=SIZE, validate=False)  # the pool stays free
    return dc.save_checkpoint(tmp_path / "conv.pt", r.model, r.plan, SOURCE, {}, SIZE)


@pytest.fixture()
def push_after_three(monkeypatch) -> list[list[list[float]]]:
    """After the third optimiser step, the pool's stride jumps to 4; returns the strides
    seen before each push (those the last good step used)."""
    real, calls, before = trainer.clamp_strides_, [0], []

    def clamp(model):
        real(model)
        calls[0] += 1
        params = dc.scale_parameters(model)
        before.append([p.detach().tolist() for p in params])
        if calls[0] == 3:
            with torch.no_grad():
                for p in params:
                    p.fill_(4.0)
    monkeypatch.setattr(trainer, "clamp_strides_", clamp)
    return before


@pytest.mark.parametrize("jitter", [0, 1])
def test_a_size_change_that_breaks_saves_and_says_which_group(ckpt, tmp_path, push_after_three, jitter):
    out = tmp_path / "run"
    with pytest.raises(SizeChangeBroke) as err:
        finetune(ckpt, out, trust_source=True, overrides={"data": DATA, "train": {
            "steps": 8, "batch_size": 4, "log_every": 1, "device": "cpu", "size_jitter": jitter, "size_search": False}})
    msg = str(err.value)
    assert "\n" not in msg
    if jitter:  # the sizes of the last good step and of the failing one are jittered
        assert re.match(r"step 4: RuntimeError after the sizes changed: group 0 \(pool\) from [5-7]x[5-7] to [2-4]x[2-4] ", msg), msg
    else:
        assert msg.startswith("step 4: RuntimeError after the sizes changed: group 0 (pool) from 6x6 to 3x3 ")
    assert "-> 4x4)" in msg and "last.pt holds the strides before that step" in msg
    loaded = dc.load_checkpoint(out / "last.pt", trust_source=True)
    assert loaded.training["progress"]["step"] == 3
    saved = [p.tolist() for p in dc.scale_parameters(loaded.model)]
    assert saved == push_after_three[1] == [p.tolist() for p in loaded.training["raw_strides"]]
    assert all(abs(s - 4.0) > 0.5 for pair in saved for s in pair)
    with torch.no_grad():  # the saved model runs
        assert loaded.model.eval()(torch.randn(2, *SIZE)).shape == (2, 3)


def test_cli_exits_2_with_one_line(ckpt, tmp_path, push_after_three, capsys):
    with pytest.raises(SystemExit) as err:
        main(["finetune", str(ckpt), "--out", str(tmp_path / "cli"), "--data", DATA, "--steps", "8",
              "--batch-size", "4", "--device", "cpu", "--trust-source", "--size-jitter", "0", "--no-size-search"])
    assert err.value.code == 2
    msg = capsys.readouterr().err
    assert "group 0 (pool) from 6x6 to 3x3" in msg and msg.count("\n") == 1 and "Traceback" not in msg
    assert (tmp_path / "cli" / "last.pt").exists()


def test_other_failures_pass_through(ckpt, tmp_path, monkeypatch):
    """A failure with no size change is not ours to explain: it is raised as it was."""
    calls = [0]
    real_step = trainer._Run._step

    def step(self, images, labels):
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("something else")
        return real_step(self, images, labels)
    monkeypatch.setattr(trainer._Run, "_step", step)
    with pytest.raises(RuntimeError, match="something else"):
        finetune(ckpt, tmp_path / "other", trust_source=True, overrides={"data": DATA, "train": {
            "steps": 4, "batch_size": 4, "device": "cpu", "scale_lr": 0.0, **FIXED}})
