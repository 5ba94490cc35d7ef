"""``train.val_limit`` / ``dynopool finetune --val-limit``: validation on a fixed random sample."""
from __future__ import annotations

import json

import pytest
import torch

from dynopool_convert.training import finetune
from dynopool_convert.training.evaluation import score
from dynopool_convert.training.upstream import convert, load_checkpoint, save_checkpoint
from dynopool_convert.training.zoo import small_cnn

SIZE = (3, 16, 16)
SOURCE = "dynopool_convert.training.zoo:small_cnn"
BUILD = {"num_classes": 4, "in_chans": 3, "width": 4}
DATA = "synthetic:classes=4,train=24,val=40"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    result = convert(small_cnn(**BUILD), input_size=SIZE)
    path = tmp_path_factory.mktemp("val") / "tiny.pt"
    save_checkpoint(path, result.model, result.plan, SOURCE, build_args=BUILD, input_size=SIZE)
    return path


def _epochs(out) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "epoch"]


def test_val_limit_scores_a_fixed_sample(ckpt, tmp_path):
    """With 40 validation images and a limit of 10: the epoch scores 10 images, the seeded sample's
    (its loss is the mean of those 10 images' losses under the saved model); without the limit all 40."""
    train = {"epochs": 1, "batch_size": 8, "device": "cpu", "seed": 3}
    limited = _epochs_of(ckpt, tmp_path / "limited", {**train, "val_limit": 10})
    full = _epochs_of(ckpt, tmp_path / "full", train)
    assert [r["val_images"] for r in limited] == [10] and [r["val_images"] for r in full] == [40]
    assert abs(limited[0]["val_acc"] * 10 - round(limited[0]["val_acc"] * 10)) < 1e-9
    from dynopool_convert.training.data import build_datasets, parse_data_spec

    val = build_datasets(parse_data_spec(DATA), SIZE, seed=3).val
    model = load_checkpoint(tmp_path / "limited" / "last.pt", trust_source=True).model
    losses, _ = score(model, val, 8, 0, torch.device("cpu"), "off")
    sample = torch.randperm(40, generator=torch.Generator().manual_seed(3))[:10]
    assert float(losses[sample].double().mean()) == pytest.approx(limited[0]["val_loss"], rel=1e-5)
    assert float(losses.double().mean()) != pytest.approx(limited[0]["val_loss"], rel=1e-5)


def _epochs_of(ckpt, out, train: dict) -> list[dict]:
    finetune(ckpt, out, trust_source=True, overrides={"data": DATA, "train": train})
    return _epochs(out)


def test_val_limit_must_be_positive(ckpt, tmp_path):
    from dynopool_convert.errors import UserInputError

    with pytest.raises(UserInputError, match="train.val_limit"):
        finetune(ckpt, tmp_path / "x", trust_source=True, overrides={"data": DATA, "train": {"val_limit": 0}})
