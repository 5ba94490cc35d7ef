"""Head replacement: finetune a model trained on other classes (its classifier is replaced, said
in one line; ``--num-classes`` makes it explicit; a clear refusal where no classifier is found)."""
from __future__ import annotations

import pytest
import torch

import dynopool_convert as dc
from dynopool_convert import UserInputError
from dynopool_convert.training import finetune
from dynopool_convert.training.heads import check_classifier, classifier_paths, replace_classifier
from dynopool_convert.training.trainer import TrainCallbacks

DATA = "synthetic:classes=4,train=16,val=8"
TRAIN = {"steps": 1, "batch_size": 8, "device": "cpu", "log_every": 1}


class _Messages(TrainCallbacks):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def on_message(self, text: str) -> None:
        self.lines.append(text)


def _converted(tmp_path, source: str, classes: int, size: int = 32):
    model = dc.build_model(source, {"num_classes": classes})
    result = dc.convert(model, (3, size, size), placement="exact")
    return dc.save_checkpoint(tmp_path / "c.pt", result.model, result.plan, source, {"num_classes": classes}, (3, size, size))


@pytest.mark.parametrize("source, head", [("timm:resnet18", "fc"), ("torchvision:mobilenet_v3_small", "classifier.3"),
                                          ("timm:mobilenetv3_small_050", "classifier"),  # timm's Linear: traced through
                                          ("torchvision:squeezenet1_1", "classifier.1")])  # a 1x1 conv
def test_finetune_replaces_a_head_with_another_class_count(tmp_path, source, head):
    ckpt = _converted(tmp_path, source, classes=10)
    before = dc.load(ckpt).get_submodule(head).weight.detach().clone()
    said = _Messages()
    res = finetune(ckpt, tmp_path / "run", callbacks=said, overrides={"data": DATA, "train": TRAIN})
    assert res.completed
    assert [line for line in said.lines if line.startswith("head:")] == [
        f"head: {head} replaced (10 -> 4 classes, fresh weights)"]
    saved = dc.load_checkpoint(tmp_path / "run" / "last.pt")  # rebuilt with the new head
    assert saved.build_args["num_classes"] == 4 and saved.model.get_submodule(head).weight.shape[0] == 4
    assert saved.model.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 4)
    assert not torch.equal(saved.model.get_submodule(head).weight[:4], before[:4])
    body = [k for k in saved.model.state_dict() if not k.startswith(head)]
    assert body  # the rest of the model is what was fine-tuned from the checkpoint, not rebuilt


@pytest.mark.parametrize("source, args, heads", [
    ("timm:deit_tiny_distilled_patch16_224", {"img_size": 32, "depth": 1}, ["head", "head_dist"]),  # averaged
    ("timm:efficientvim_m1", {}, ["heads.0", "heads.1", "heads.2", "heads.3"]),  # weighed per stage
])
def test_several_classifier_heads_are_all_replaced(tmp_path, source, args, heads):
    model = dc.build_model(source, {**args, "num_classes": 10})
    assert classifier_paths(model, source) == heads
    result = dc.convert(model, (3, 32, 32), placement="exact")
    ckpt = dc.save_checkpoint(tmp_path / "c.pt", result.model, result.plan, source, {**args, "num_classes": 10}, (3, 32, 32))
    said = _Messages()
    assert finetune(ckpt, tmp_path / "run", callbacks=said, overrides={"data": DATA, "train": TRAIN}).completed
    assert f"head: {', '.join(heads)} replaced (10 -> 4 classes, fresh weights)" in said.lines
    saved = dc.load_checkpoint(tmp_path / "run" / "last.pt")  # rebuilt with 4 classes in every head
    assert all(saved.model.get_submodule(h).weight.shape[0] == 4 for h in heads)
    for mode in (True, False):  # one N x 4 output in training and in evaluation
        assert saved.model.train(mode)(torch.zeros(2, 3, 32, 32)).shape == (2, 4)


def test_num_classes_must_agree_with_the_data(tmp_path):
    ckpt = _converted(tmp_path, "timm:resnet18", classes=10)
    with pytest.raises(UserInputError, match="--num-classes 7 but the data has 4 classes"):
        finetune(ckpt, tmp_path / "run", overrides={"data": DATA, "num_classes": 7, "train": TRAIN})
    res = finetune(ckpt, tmp_path / "run2", overrides={"data": DATA, "num_classes": 4, "train": TRAIN})
    assert res.completed


@pytest.mark.parametrize("source, args, head", [
    ("timm:resnet18", {}, "fc"),
    ("timm:eva02_tiny_patch14_224", {"img_size": 28, "depth": 1}, "head"),  # as MIM weights come
])
def test_a_model_built_without_a_classifier_gets_one(tmp_path, source, args, head):
    # timm's num_classes=0 (self-supervised and MIM weights, SAM2-Hiera): the model outputs
    # features, and the classifier slot timm names is an nn.Identity; it was refused
    size = 28 if "eva" in source else 32
    model = dc.build_model(source, {**args, "num_classes": 0})
    assert classifier_paths(model, source) == [head]
    result = dc.convert(model, (3, size, size), placement="exact")
    original = dc.count_flops(model, (3, size, size))
    ckpt = dc.save_checkpoint(tmp_path / "c.pt", result.model, result.plan, source, {**args, "num_classes": 0},
                              (3, size, size), budget=original, extra={"flops": {"original": original}})
    said = _Messages()
    assert finetune(ckpt, tmp_path / "run", callbacks=said, overrides={"data": DATA, "train": TRAIN}).completed
    features = model.num_features
    assert (f"head: the model was built without a classifier (it outputs {features} features): {head} added, "
            f"{features} -> 4 classes, fresh weights") in said.lines
    assert any(line.startswith("original with 4 classes:") and "without a classifier)" in line for line in said.lines)
    saved = dc.load_checkpoint(tmp_path / "run" / "last.pt")  # rebuilt with num_classes=4
    assert saved.build_args["num_classes"] == 4 and saved.extra["head"]["classes"] == [0, 4]
    assert saved.model.eval()(torch.zeros(2, 3, size, size)).shape == (2, 4)


def test_refusals_where_no_single_classifier_is_found(tmp_path):
    headless = dc.build_model("timm:resnet18", {"num_classes": 0})
    with pytest.raises(UserInputError, match="is no classifier"):
        replace_classifier(headless, "timm:resnet18", 4)  # a slot to fill needs the feature count
    # a module:factory source that takes no num_classes: what would rebuild a 4-class model?
    source = "_convert_models:HardCodedFlatten"
    result = dc.convert(dc.build_model(source, {}), input_size=(3, 16, 16))
    path = dc.save(tmp_path / "flat.pt", result.model, result.plan, source, {}, (3, 16, 16))
    with pytest.raises(UserInputError, match=r"outputs 3 classes but the data has 4 classes, and "
                                             r"'_convert_models:HardCodedFlatten' with num_classes=4 does not build"):
        finetune(path, tmp_path / "run", trust_source=True, overrides={"data": DATA, "train": TRAIN})


def test_a_module_factory_model_gets_a_new_classifier_where_its_factory_builds_one(tmp_path):
    # trained on 5 classes, fine-tuned on 4: was refused ("timm and torchvision models only"),
    # while convert with num_classes=4 refused the 5-class weights: no way through
    source = "_convert_models:tiny_net"
    result = dc.convert(dc.build_model(source, {"num_classes": 5}), input_size=(3, 32, 32))
    path = dc.save(tmp_path / "tiny.pt", result.model, result.plan, source, {"num_classes": 5}, (3, 32, 32))
    said = _Messages()
    assert finetune(path, tmp_path / "run", trust_source=True, callbacks=said,
                    overrides={"data": DATA, "train": TRAIN}).completed
    assert "head: head replaced (5 -> 4 classes, fresh weights)" in said.lines
    saved = dc.load_checkpoint(tmp_path / "run" / "last.pt", trust_source=True)
    assert saved.build_args == {"num_classes": 4} and saved.model.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 4)


class _LogitsAndFeatures(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x):
        f = self.conv(x)
        return self.fc(f.mean((2, 3))), f


def test_a_model_returning_logits_and_features_trains_on_its_logits_or_is_told_what_to_do():
    said: list[str] = []
    assert check_classifier(_LogitsAndFeatures(), (3, 16, 16), "cpu", 5, say=said.append) == 0
    assert said == ["the model returns a tuple of 2; training on output [0], shape (1, 5); --output selects another"]
    with pytest.raises(UserInputError, match=r"returns a tuple of 2 \(shape \(1, 5\), shape \(1, 8, 7, 7\)\), "
                                             r"none of it an N x 7 tensor: pass --output"):
        check_classifier(_LogitsAndFeatures(), (3, 16, 16), "cpu", 7)
