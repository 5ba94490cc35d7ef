"""train.model_ema: the saved model holds the weights' moving average and the trained strides;
the live model trains as without it; resume stays bit-exact."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from dynopool_convert import UserInputError
from dynopool_convert.dynopool import scale_parameters
from dynopool_convert.training import finetune
from dynopool_convert.training.upstream import convert, count_flops, load_checkpoint, save_checkpoint
from dynopool_convert.training.weight_average import WeightAverage
from dynopool_convert.training.zoo import small_cnn

SOURCE = "dynopool_convert.training.zoo:small_cnn"
BUILD = {"num_classes": 4, "in_chans": 3, "width": 4, "dropout": 0.0}
SIZE = (3, 16, 16)
DATA = "synthetic:classes=4,train=64,val=32"


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> tuple[Path, int]:
    torch.manual_seed(0)
    result = convert(small_cnn(**BUILD), input_size=SIZE)
    budget = int(0.8 * count_flops(result.model, SIZE))
    path = tmp_path_factory.mktemp("ema") / "tiny.pt"
    save_checkpoint(path, result.model, result.plan, SOURCE, build_args=BUILD, input_size=SIZE, budget=budget)
    return path, budget


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    strides = {id(p) for p in scale_parameters(model)}
    return {n: p.detach().clone() for n, p in model.named_parameters() if id(p) not in strides}


def test_average_follows_timm_warm_up_and_leaves_the_strides_out():
    torch.manual_seed(0)
    model = convert(small_cnn(**BUILD), input_size=SIZE).model
    average = WeightAverage(model, decay=0.5)
    first = _weights(model)
    average.update(model, step=1)  # the first update copies (decay 0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # weights and strides move
    second = _weights(model)
    average.update(model, step=2)
    decay = min(0.5, 1 - 2 ** (-2 / 3))  # timm's warm-up rule at its second update
    saved = average.load_into(copy.deepcopy(model))
    for name, value in _weights(saved).items():
        torch.testing.assert_close(value, decay * first[name] + (1 - decay) * second[name])
    assert all(torch.equal(a, b) for a, b in zip(scale_parameters(saved), scale_parameters(model)))  # live strides


def test_saved_model_is_the_average_at_the_trained_strides(tiny_ckpt, tmp_path):
    ckpt, budget = tiny_ckpt
    train = {"steps": 8, "batch_size": 8, "lr": 0.1, "scale_lr": 0.05, "device": "cpu", "seed": 1, "log_every": 4}
    plain = finetune(ckpt, tmp_path / "plain", trust_source=True, overrides={"data": DATA, "train": train})
    ema = finetune(ckpt, tmp_path / "ema", trust_source=True,
                   overrides={"data": DATA, "train": {**train, "model_ema": True, "model_ema_decay": 0.9}})
    assert ema.strides == plain.strides  # the average never feeds back into training
    a = load_checkpoint(tmp_path / "plain" / "last.pt", trust_source=True).model
    b = load_checkpoint(tmp_path / "ema" / "last.pt", trust_source=True).model
    assert [p.tolist() for p in scale_parameters(a)] == [p.tolist() for p in scale_parameters(b)]
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and any(not torch.equal(wa[k], wb[k]) for k in wa)
    assert count_flops(b, SIZE) <= budget
    assert load_checkpoint(tmp_path / "ema" / "last.pt", trust_source=True).training["config"]["train"]["model_ema"]


def test_resume_with_model_ema_is_bit_exact(tiny_ckpt, tmp_path):
    ckpt, _ = tiny_ckpt
    ov = {"data": DATA, "train": {"steps": 7, "batch_size": 8, "log_every": 1, "device": "cpu", "seed": 3,
                                  "model_ema": True, "model_ema_decay": 0.8}}
    finetune(ckpt, tmp_path / "a", overrides=ov, trust_source=True)
    finetune(ckpt, tmp_path / "b", overrides=ov, stop_after_steps=3, trust_source=True)
    with pytest.raises(UserInputError, match=r"train\.model_ema = True, not False"):
        finetune(None, tmp_path / "b", overrides={"train": {"model_ema": False}}, resume=True, trust_source=True)
    finetune(None, tmp_path / "b", resume=True, trust_source=True)
    sa = load_checkpoint(tmp_path / "a" / "last.pt", trust_source=True).model.state_dict()
    sb = load_checkpoint(tmp_path / "b" / "last.pt", trust_source=True).model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("decay", [-0.1, 1.5, float("nan")])
def test_decay_outside_zero_one_is_refused(tiny_ckpt, tmp_path, decay):
    ckpt, _ = tiny_ckpt
    with pytest.raises(UserInputError, match="model_ema_decay"):
        finetune(ckpt, tmp_path / "x", trust_source=True,
                 overrides={"data": DATA, "train": {"steps": 1, "model_ema": True, "model_ema_decay": decay}})


def test_cli_flags_reach_the_run(tiny_ckpt, tmp_path):
    from dynopool_cli.app import main

    ckpt, _ = tiny_ckpt
    out = tmp_path / "cli"
    try:
        main(["finetune", str(ckpt), "--out", str(out), "--data", DATA, "--steps", "2", "--batch-size", "8",
              "--device", "cpu", "--trust-source", "--model-ema", "--model-ema-decay", "0.5"])
    except SystemExit as err:
        assert err.code in (0, None)
    train = load_checkpoint(out / "last.pt", trust_source=True).training
    assert train["config"]["train"]["model_ema"] is True and train["config"]["train"]["model_ema_decay"] == 0.5
    assert set(train["model_ema"]) == {"average", "trained"}
