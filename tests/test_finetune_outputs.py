"""finetune on models whose forward returns a tuple, dict or namedtuple: ``--output auto`` picks
the first N x classes element and says which, an index or key picks one, a bad one is refused
in one line (exit code 2), the choice survives --resume, and report/export still work.

The models' source is this module (``module:factory``), hence ``--trust-source``."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from torch import nn

import dynopool_convert as dc
from dynopool_cli.app import main
from dynopool_convert.training.outputs import resolve_output, select_logits

ROOT = Path(__file__).resolve().parent.parent
SIZE = (3, 16, 16)
DATA = "synthetic:classes=3,train=16,val=8"
FAST = ["--data", DATA, "--steps", "2", "--batch-size", "4", "--device", "cpu", "--trust-source"]
Heads = namedtuple("Heads", ["features", "logits"])


class TupleNet(nn.Module):
    """Returns ``(logits, features map)`` or, with ``embed_first``, ``(embedding N x 8, logits)``."""

    def __init__(self, num_classes: int = 3, embed_first: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, num_classes)
        self.embed_first = embed_first

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))

    def forward(self, x: torch.Tensor):
        f = self.features(x)
        if self.embed_first:
            return f.mean((2, 3)), self.fc(f.mean((2, 3)))
        return self.fc(f.mean((2, 3))), f


class DictNet(TupleNet):
    def forward(self, x: torch.Tensor):
        f = self.features(x)
        return {"features": f, "logits": self.fc(f.mean((2, 3)))}


class NamedNet(TupleNet):
    def forward(self, x: torch.Tensor):
        f = self.features(x)
        return Heads(f, self.fc(f.mean((2, 3))))


class MapsNet(TupleNet):
    def forward(self, x: torch.Tensor):
        f = self.features(x)
        return [f, f * 2]


class AuxNet(TupleNet):
    """Logits and an auxiliary head's logits: the auxiliary head never reaches the loss."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__(num_classes)
        self.aux = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor):
        f = self.features(x).mean((2, 3))
        return self.fc(f), self.aux(f)


def aux_net(num_classes: int = 3) -> nn.Module:
    return AuxNet(num_classes)


def maps_net(num_classes: int = 3) -> nn.Module:
    return MapsNet(num_classes)


def tuple_net(num_classes: int = 3) -> nn.Module:
    return TupleNet(num_classes)


def embed_net(num_classes: int = 3) -> nn.Module:
    return TupleNet(num_classes, embed_first=True)


def dict_net(num_classes: int = 3) -> nn.Module:
    return DictNet(num_classes)


def named_net(num_classes: int = 3) -> nn.Module:
    return NamedNet(num_classes)


def _ckpt(folder: Path, factory: str, classes: int = 3) -> Path:
    torch.manual_seed(0)
    source = f"{__name__}:{factory}"
    result = dc.convert(dc.build_model(source, {"num_classes": classes}), SIZE)
    budget = int(0.8 * dc.count_flops(result.model, SIZE))
    return dc.save_checkpoint(folder / f"{factory}.pt", result.model, result.plan, source, {"num_classes": classes},
                              SIZE, budget=budget)


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


@pytest.mark.parametrize("factory, said", [
    ("tuple_net", "the model returns a tuple of 2; training on output [0], shape (1, 3); --output selects another"),
    ("dict_net", "the model returns a dict of 2; training on output ['logits'], shape (1, 3)"),
    ("named_net", "the model returns a namedtuple Heads of 2; training on output ['logits'], shape (1, 3)"),
    ("embed_net", "training on output [1], shape (1, 3)"),  # the N x 8 embedding is not N x 3 classes
])
def test_structured_outputs_train_end_to_end(tmp_path, capsys, factory, said):
    ckpt = _ckpt(tmp_path, factory)
    code, out, err = _cli(capsys, "finetune", ckpt, "--out", tmp_path / "run", *FAST)
    assert code == 0, err
    assert err.count(said) == 1 and "done: 2 steps" in out, err
    saved = dc.load_checkpoint(tmp_path / "run" / "last.pt", trust_source=True)
    assert saved.training["config"]["train"]["output"] == "auto"
    assert saved.extra["flops"]["current"] <= saved.budget
    code, out, err = _cli(capsys, "report", tmp_path / "run" / "last.pt", "--trust-source", "--format", "json")
    assert code == 0 and json.loads(out), err


def test_the_chosen_logits_get_a_new_head_for_other_classes(tmp_path, capsys):
    code, out, err = _cli(capsys, "finetune", _ckpt(tmp_path, "embed_net"), "--out", tmp_path / "run", *FAST,
                          "--data", "synthetic:classes=5,train=16,val=8")
    assert code == 0 and "head: fc replaced (3 -> 5 classes" in err and "training on output [1], shape (1, 5)" in err, err


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnxscript") is None,
                    reason="the optional [export] extra")
def test_a_tuple_model_exports_to_onnx_after_finetuning(tmp_path, capsys):
    code, _, err = _cli(capsys, "finetune", _ckpt(tmp_path, "tuple_net"), "--out", tmp_path / "run", *FAST)
    assert code == 0, err
    code, out, err = _cli(capsys, "export", tmp_path / "run" / "last.pt", "--trust-source", "--format", "onnx",
                          "--out", tmp_path / "m.onnx")
    assert code == 0 and (tmp_path / "m.onnx").is_file(), err


@pytest.mark.parametrize("factory, sel, said", [
    ("dict_net", "logits", "training on output ['logits'], shape (1, 3); chosen by --output"),
    ("dict_net", "1", "training on output ['logits']"),  # a dict by position too
    ("tuple_net", "0", "training on output [0]"),
    ("named_net", "-1", "training on output ['logits']"),
])
def test_explicit_output(tmp_path, capsys, factory, sel, said):
    code, _, err = _cli(capsys, "finetune", _ckpt(tmp_path, factory), "--out", tmp_path / "run", "--output", sel, *FAST)
    assert code == 0 and said in err, err
    saved = dc.load_checkpoint(tmp_path / "run" / "last.pt", trust_source=True)
    assert saved.training["config"]["train"]["output"] == sel


@pytest.mark.parametrize("factory, sel, needle", [
    ("tuple_net", "5", "--output 5: the model returns a tuple of 2 (shape (1, 3), shape (1, 8, 8, 8)), which has no element '5'"),
    ("dict_net", "scores", "which has no element 'scores'"),
    ("dict_net", "features", "--output features: ['features'] is a tensor of shape (1, 8, 8, 8), not N x 3"),
    ("maps_net", "auto", "this model returns a list of 2 (shape (1, 8, 8, 8), shape (1, 8, 8, 8)), none of it an "
                         "N x 3 tensor: pass --output INDEX|KEY to pick the logits"),
])
def test_bad_output_is_one_line_exit_2(tmp_path, capsys, factory, sel, needle):
    code, _, err = _cli(capsys, "finetune", _ckpt(tmp_path, factory), "--out", tmp_path / "run", "--output", sel, *FAST)
    assert code == 2 and needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "run" / "last.pt").exists()


def test_resume_keeps_the_selection_and_refuses_another(tmp_path, capsys):
    ckpt, run = _ckpt(tmp_path, "dict_net"), tmp_path / "run"
    dc.training.finetune(ckpt, run, trust_source=True, stop_after_steps=1, overrides={
        "data": DATA, "train": {"steps": 2, "batch_size": 4, "device": "cpu", "output": "logits"}})
    code, _, err = _cli(capsys, "finetune", "--out", run, "--resume", "--output", "1", "--trust-source")
    assert code == 2 and "train.output = 'logits', not '1'" in err, err
    code, out, err = _cli(capsys, "finetune", "--out", run, "--resume", "--trust-source")
    assert code == 0 and "chosen by --output" in err and "done: 2 steps" in out, err


def test_an_unused_auxiliary_head_trains_under_torchrun(tmp_path):
    """DistributedDataParallel sees the chosen logits alone (the auxiliary head gets no gradient)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "cli"), str(Path(__file__).parent)]),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "dynopool_cli",
           "finetune", str(_ckpt(tmp_path, "aux_net")), "--out", str(tmp_path / "run"), *FAST]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done: 2 steps") == 1 and "training on output [0], shape (1, 3)" in proc.stderr


def test_a_recipe_integer_and_the_flag_string_agree(tmp_path):
    from dynopool_convert.training.recipes import merge_config

    assert merge_config({"train": {"output": 1}}).train.output == "1"
    with pytest.raises(dc.UserInputError, match="train.output"):
        merge_config({"train": {"output": True}})


def test_select_logits_and_a_plain_tensor():
    logits = torch.zeros(2, 3)
    assert resolve_output(logits, "auto", 3) == (None, None) and select_logits(logits, None) is logits
    assert select_logits(Heads(None, logits), "logits") is logits and select_logits([None, logits], 1) is logits
    with pytest.raises(dc.UserInputError, match="--output 0 picks an element of a tuple, list or dict output"):
        resolve_output(logits, "0", 3)
