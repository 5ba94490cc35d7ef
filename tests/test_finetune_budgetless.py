"""Fine-tuning a model that the FLOPs cost model refuses: without a budget it trains (the cost
model is not built), with a budget it is refused before the first step, writing nothing."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from dynopool_convert import CostModel
from dynopool_convert.errors import UnsupportedModelError
from dynopool_convert.training import TrainCallbacks, finetune
from dynopool_convert.training.upstream import convert, save_checkpoint

SIZE = (3, 16, 16)
DATA = "synthetic:classes=4,train=32,val=16"
TRAIN = {"steps": 2, "batch_size": 8, "log_every": 1, "device": "cpu"}


class AttnNet(nn.Module):
    """A max pool (converted to DynOPool), then ``nn.MultiheadAttention`` whose attention map
    (``need_weights=True``) is used: a single call mixing L and L^2, which the cost model refuses."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1)
        self.pool = nn.MaxPool2d(2)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.pool(torch.relu(self.stem(x))).flatten(2).transpose(1, 2)
        y, w = self.attn(t, t, t, need_weights=True)
        return self.head(y.mean(1) + w.mean((1, 2)).unsqueeze(1))


def attn_net(num_classes: int = 4) -> nn.Module:
    return AttnNet(num_classes)


@pytest.fixture(scope="module")
def attn_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    result = convert(attn_net(), input_size=SIZE)
    assert result.plan.summary()["converted"] == 1
    with pytest.raises(UnsupportedModelError, match="without a budget"):
        CostModel(result.model, SIZE)  # the premise: the cost model refuses this model
    path = tmp_path_factory.mktemp("attn") / "attn.pt"
    save_checkpoint(path, result.model, result.plan, f"{__name__}:attn_net", input_size=SIZE)
    return path


def test_without_a_budget_a_refused_model_fine_tunes(attn_ckpt, tmp_path):
    res = finetune(attn_ckpt, tmp_path / "run", trust_source=True, overrides={"data": DATA, "train": TRAIN})
    assert res.completed and res.steps == 2 and res.budget is None
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["kind"] == "step"]
    assert len(steps) == 2 and all(r["flops"] is None and r["penalty"] == 0 for r in steps)
    assert isinstance(rows[-1]["flops"], int)  # the saved model's FLOPs: fvcore's count, no cost model


class _Recorder(TrainCallbacks):
    def __init__(self) -> None:
        self.started = False

    def on_start(self, info) -> None:
        self.started = True


def test_with_a_budget_it_is_refused_before_training(attn_ckpt, tmp_path):
    calls = _Recorder()
    with pytest.raises(UnsupportedModelError, match="without a budget"):
        finetune(attn_ckpt, tmp_path / "run", trust_source=True, callbacks=calls,
                 overrides={"data": DATA, "budget": "100K", "train": TRAIN})
    assert not calls.started and not (tmp_path / "run").exists()


class _Messages(TrainCallbacks):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def on_message(self, text: str) -> None:
        self.lines.append(text)


def half_cnn(**build) -> nn.Module:
    from dynopool_convert.training.zoo import small_cnn

    return small_cnn(**build).half()


def test_a_float16_model_fine_tunes_in_float32(tmp_path):
    """A model built in half precision (a factory that returns ``.half()``) crashed on its first
    batch (float32 images, float16 weights); it trains in float32, and says so."""
    build = {"num_classes": 4, "in_chans": 3, "width": 4}
    result = convert(half_cnn(**build), input_size=SIZE)
    path = tmp_path / "half.pt"
    save_checkpoint(path, result.model, result.plan, f"{__name__}:half_cnn", build_args=build, input_size=SIZE)
    said = _Messages()
    res = finetune(path, tmp_path / "run", callbacks=said, trust_source=True, overrides={"data": DATA, "train": TRAIN})
    assert res.completed and any("float16: fine-tuned and saved in float32" in line for line in said.lines)
    saved = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    weights = saved["state_dict"] if "state_dict" in saved else saved["model"]
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.float32}
