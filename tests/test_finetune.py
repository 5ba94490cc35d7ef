"""finetune on a tiny converted CNN and synthetic data: learns, stays in budget, resumes bit-exactly,
runs under torchrun with two processes, and the CLI maps bad input to exit code 2.

The tiny model's source is a ``module:factory``, hence ``trust_source=True`` when loading it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dynopool_cli.app import main
from dynopool_convert import UserInputError
from dynopool_convert.training import finetune
from dynopool_convert.training.upstream import convert, count_flops, load_checkpoint, save_checkpoint
from dynopool_convert.training.zoo import small_cnn

ROOT = Path(__file__).resolve().parent.parent
SOURCE = "dynopool_convert.training.zoo:small_cnn"
BUILD = {"num_classes": 4, "in_chans": 3, "width": 4, "dropout": 0.2}
SIZE = (3, 16, 16)
DATA = "synthetic:classes=4,train=64,val=32"
DATA_LEARN = "synthetic:classes=4,train=128,val=32"


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> tuple[Path, int]:
    """A converted tiny CNN saved with a budget below its FLOPs (the strides must grow)."""
    torch.manual_seed(0)
    result = convert(small_cnn(**BUILD), input_size=SIZE)
    flops = count_flops(result.model, SIZE)
    budget = int(0.8 * flops)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, result.model, result.plan, SOURCE, build_args=BUILD, input_size=SIZE, budget=budget)
    return path, budget


def test_learns_moves_strides_and_ends_within_budget(tiny_ckpt, tmp_path):
    ckpt, budget = tiny_ckpt
    out = tmp_path / "run"
    res = finetune(ckpt, out, trust_source=True, overrides={"data": DATA_LEARN, "train": {
        "epochs": 3, "batch_size": 16, "lr": 0.05, "scale_lr": 0.05, "log_every": 2, "device": "cpu",
        "size_search": False}})  # the strides learn to the end (the size schedule: test_size_schedule.py)
    assert res.completed and res.steps == 24 and res.budget == budget
    hist = res.history
    assert hist[-1]["val_acc"] >= 0.75  # chance is 0.25
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    # the scale factors learned: every group's stride moved away from its initial 2.0
    assert all(abs(s - 2.0) > 1e-3 for pair in res.strides for s in pair), res.strides
    # fvcore-convention FLOPs of the saved models, recounted from the files: within budget
    for name in ("last.pt", "best.pt"):
        loaded = load_checkpoint(out / name, trust_source=True)
        assert count_flops(loaded.model, SIZE) <= budget
        assert loaded.budget == budget
        assert loaded.extra["flops"]["current"] == count_flops(loaded.model, SIZE)  # the one extra schema
    assert load_checkpoint(out / "last.pt", trust_source=True).training["progress"]["step"] == 24
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["kind"] == "step"]
    assert [r["step"] for r in steps] == list(range(2, 25, 2))
    assert {"loss", "task_loss", "penalty", "acc", "flops", "r", "lr", "img_s"} <= set(steps[0])
    assert set(steps[0]["lr"]) == {"weights", "no_decay", "scales"}
    assert steps[0]["penalty"] > 0  # started above the budget
    assert sum(r["kind"] == "epoch" for r in rows) == 3


def test_resume_is_bit_exact_on_cpu(tiny_ckpt, tmp_path):
    ckpt, _ = tiny_ckpt
    ov = {"data": DATA, "train": {"steps": 7, "batch_size": 8, "log_every": 1, "device": "cpu", "seed": 3}}
    full = finetune(ckpt, tmp_path / "a", overrides=ov, trust_source=True)
    part = finetune(ckpt, tmp_path / "b", overrides=ov, stop_after_steps=3, trust_source=True)  # interrupted mid-epoch
    assert not part.completed and part.steps == 3
    last = tmp_path / "b" / "last.pt"
    before = last.stat().st_mtime_ns
    with pytest.raises(UserInputError, match=r"train\.lr = 0\.05, not 0\.5"):  # the saved schedule would override it
        finetune(None, tmp_path / "b", overrides={"train": {"lr": 0.5}}, resume=True, trust_source=True)
    assert last.stat().st_mtime_ns == before
    rest = finetune(None, tmp_path / "b", resume=True, trust_source=True)  # config comes back from last.pt
    assert rest.completed and rest.steps == 7
    sa = load_checkpoint(tmp_path / "a" / "last.pt", trust_source=True).model.state_dict()
    sb = load_checkpoint(tmp_path / "b" / "last.pt", trust_source=True).model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert full.strides == rest.strides
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("img_s", "time_s")} for r in rows]  # noqa: E731
    ra = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert strip(ra) == strip(rb)


def test_torchrun_two_cpu_processes(tiny_ckpt, tmp_path):
    ckpt, budget = tiny_ckpt
    out = tmp_path / "ddp"
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'cli'}", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dynopool_cli", "finetune", str(ckpt), "--out", str(out), "--data", DATA,
           "--steps", "4", "--batch-size", "8", "--log-every", "2", "--device", "cpu", "--trust-source"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done: 4 steps") == 1  # only rank 0 reports and writes
    assert "x2" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "last.pt", "metrics.jsonl"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "step"] == [2, 4]  # written once, not per rank
    loaded = load_checkpoint(out / "last.pt", trust_source=True)
    assert loaded.training["world_size"] == 2 and count_flops(loaded.model, SIZE) <= budget


def test_cli_bad_input_exits_2(tiny_ckpt, tmp_path, capsys):
    ckpt, _ = tiny_ckpt
    for argv, needle in (
        ([str(ckpt), "--out", str(tmp_path / "x"), "--data", "imagenet:/nope"], "unknown data spec"),
        ([str(ckpt), "--out", str(tmp_path / "y"), "--resume"], "nothing to resume"),
        ([str(ckpt), "--out", str(tmp_path / "z"), "--data", DATA, "--budget", "lots"], "budget"),
        ([str(ckpt), "--out", str(tmp_path / "v"), "--data", DATA, "--budget", "70%"], "which are not known here"),
        (["--out", str(tmp_path / "w"), "--data", DATA], "CHECKPOINT"),
    ):
        with pytest.raises(SystemExit) as err:
            main(["finetune", *argv])
        assert err.value.code == 2
        msg = capsys.readouterr().err
        assert needle in msg and msg.count("\n") == 1, msg


def test_recipe_with_unconverted_model_converts_first(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {SOURCE}\nbuild_args: {{in_chans: 3, width: 4}}\ninput_size: [3, 16, 16]\nbudget: 100K\n"
        f"data: '{DATA}'\ntrain: {{steps: 2, batch_size: 8, log_every: 1, device: cpu}}\n"
    )
    res = finetune(None, tmp_path / "run", recipe=recipe, trust_source=True)
    assert res.completed and (tmp_path / "run" / "converted.pt").is_file()
    converted = load_checkpoint(tmp_path / "run" / "converted.pt", trust_source=True)
    assert count_flops(converted.model, SIZE) <= 100_000  # fitted to the budget at conversion
    assert count_flops(load_checkpoint(tmp_path / "run" / "last.pt", trust_source=True).model, SIZE) <= 100_000


def test_a_budget_that_is_a_share_of_the_original_reads_its_flops(tmp_path):
    """``budget: 50%`` in a recipe that converts first, then ``--budget 0.6x`` on its checkpoint:
    both are shares of the unconverted model's FLOPs, which the checkpoint records."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {SOURCE}\nbuild_args: {{in_chans: 3, width: 4}}\ninput_size: [3, 16, 16]\nbudget: 50%\n"
        f"data: '{DATA}'\ntrain: {{steps: 2, batch_size: 8, log_every: 1, device: cpu}}\n"
    )
    res = finetune(None, tmp_path / "run", recipe=recipe, trust_source=True)
    converted = load_checkpoint(tmp_path / "run" / "converted.pt", trust_source=True)
    original = converted.extra["flops"]["original"]
    assert res.budget == converted.budget == round(0.5 * original) and res.final_flops <= res.budget
    again = finetune(tmp_path / "run" / "last.pt", tmp_path / "again", trust_source=True, overrides={
        "budget": "0.6x", "data": DATA, "train": {"steps": 1, "batch_size": 8, "device": "cpu"}})
    assert again.budget == round(0.6 * original) and again.final_flops <= again.budget


def test_bf16_autocast_on_cpu_runs(tiny_ckpt, tmp_path):
    ckpt, budget = tiny_ckpt
    res = finetune(ckpt, tmp_path / "bf16", trust_source=True, overrides={"data": DATA, "train": {
        "steps": 2, "batch_size": 8, "log_every": 1, "device": "cpu", "amp": "bf16"}})
    assert res.completed and res.final_flops <= budget
    rows = [json.loads(x) for x in (tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if r["kind"] == "step")
