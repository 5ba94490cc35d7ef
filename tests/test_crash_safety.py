"""Crash safety (issue 8): ``dynopool finetune`` killed with SIGKILL at several points leaves only
loadable checkpoints, and ``--resume`` finishes with weights equal to an uninterrupted run.

Kill points: (1) during a checkpoint write -- deterministic: the child's ``torch.save`` is
wrapped (by this test, not the product) to pause after writing the temporary file, the test
kills it while that temporary file exists, before the rename; (2) right after a mid-epoch step
is logged; (3) twice a few milliseconds after a randomly chosen (seeded) later step is logged.
CPU, one thread.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dynopool_convert as dc

REPO = Path(__file__).resolve().parents[1]
STEPS = 16  # 4 steps per epoch: 4 epochs

# Runs the real CLI; with SLOW_SAVE_FROM=N the N-th torch.save (and later ones) pauses after
# writing its (temporary) file, so the test can kill the process in the middle of a save.
WRAPPER = """
import os, sys, time, torch
real_save, calls = torch.save, [0]
def slow_save(obj, f, *args, **kwargs):
    calls[0] += 1
    real_save(obj, f, *args, **kwargs)
    if calls[0] >= int(os.environ["SLOW_SAVE_FROM"]):
        open(os.environ["SLOW_SAVE_FLAG"], "w").close()
        time.sleep(120)
torch.save = slow_save
from dynopool_cli.app import main
main(sys.argv[1:])
"""


def _env(**more: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "cli"), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"  # small model: threads only slow it down (and the machine is shared)
    env.update(more)
    return env


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("crash")
    model = dc.build_model("timm:test_resnet", {"num_classes": 4})
    result = dc.convert(model, input_size=(3, 32, 32), validate=False)
    ckpt = dc.save_checkpoint(tmp / "conv.pt", result.model, result.plan, "timm:test_resnet", {"num_classes": 4}, (3, 32, 32))
    (tmp / "recipe.yaml").write_text("train:\n  checkpoint_every: 1\n")  # a save after every step
    args = ["finetune", str(ckpt), "--data", "synthetic:classes=4,train=16,val=8", "--steps", str(STEPS),
            "--batch-size", "4", "--device", "cpu", "--seed", "0", "--log-every", "1", "--recipe", str(tmp / "recipe.yaml")]
    return tmp, args


def _cli(args: list[str], out: Path) -> list[str]:
    return [sys.executable, "-m", "dynopool_cli", *args, "--out", str(out)]


def _assert_all_loadable(out: Path) -> int:
    """Every checkpoint in ``out`` loads; metrics.jsonl parses; returns last.pt's step (0 if none)."""
    import json

    for path in sorted(out.glob("*.pt")):
        dc.load_checkpoint(path)  # raises on a partial or corrupt file
    if (out / "metrics.jsonl").exists():
        [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    if not (out / "last.pt").exists():
        return 0
    return dc.load_checkpoint(out / "last.pt").training["progress"]["step"]


def _kill_after_line(cmd: list[str], predicate, env: dict[str, str], delay: float = 0.0) -> None:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        for line in proc.stdout:
            if predicate(line):
                time.sleep(delay)
                break
        else:
            pytest.fail(f"the run ended (code {proc.wait()}) before the kill point")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def test_sigkill_then_resume_equals_uninterrupted_run(setup):
    tmp, args = setup
    ref = subprocess.run(_cli(args, tmp / "ref"), env=_env(), capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stdout + ref.stderr

    out = tmp / "crashed"
    steps_seen = []
    # (1) killed inside the 3rd save (step 3's last.pt): its temporary file is written, not renamed
    flag = tmp / "saving"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRAPPER, *args, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=_env(SLOW_SAVE_FROM="3", SLOW_SAVE_FLAG=str(flag)),
    )
    try:
        deadline = time.monotonic() + 240
        while not flag.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the run never reached its 3rd save"
            time.sleep(0.05)
        assert list(out.glob(".last.pt.*.tmp")), "not inside a checkpoint write"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    steps_seen.append(_assert_all_loadable(out))
    assert steps_seen[-1] == 2  # the interrupted save of step 3 left step 2's file intact

    # (2) right after step 6 (mid-epoch 1) is logged; (3) twice at random moments once training runs
    resume = _cli([*args, "--resume"], out)
    _kill_after_line(resume, lambda line: line.startswith("step 6 "), _env())
    steps_seen.append(_assert_all_loadable(out))
    rng = random.Random(0)
    k1 = rng.randint(7, 10)  # last.pt is then at step k - 1 or k, so the next run logs k + 1
    for k in (k1, rng.randint(k1 + 1, STEPS - 3)):
        _kill_after_line(resume, lambda line, k=k: line.startswith(f"step {k} "), _env(), delay=rng.uniform(0.0, 0.02))
        steps_seen.append(_assert_all_loadable(out))
    assert steps_seen == sorted(steps_seen) and steps_seen[-1] < STEPS, steps_seen

    done = subprocess.run(resume, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert _assert_all_loadable(out) == STEPS
    assert not list(out.glob(".*.tmp"))  # --resume removed the temporary files the kills left

    a = torch.load(tmp / "ref" / "last.pt", weights_only=True)
    b = torch.load(out / "last.pt", weights_only=True)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    for x, y in zip(a["training"]["raw_strides"], b["training"]["raw_strides"], strict=True):
        assert torch.equal(x, y)
    timeless = lambda rows: [{k: v for k, v in r.items() if k != "time_s"} for r in rows]  # noqa: E731
    assert timeless(a["training"]["progress"]["history"]) == timeless(b["training"]["progress"]["history"])
