"""Checkpoints and model sources: save/load round trip, weights_only, trust, bad files, names."""
from __future__ import annotations

import pickle
import sys

import pytest
import torch

import dynopool_convert as dc
from dynopool_convert import UserInputError
from dynopool_convert.models import default_input_size, parse_input_size


@pytest.fixture(scope="module")
def converted():
    source = dc.resolve_source("resnet18")
    model = dc.build_model(source, {"num_classes": 7})
    return source, dc.convert(model, input_size=(3, 32, 32), validate=False)


def test_round_trip_rebuilds_the_same_model(converted, tmp_path):
    source, result = converted
    with torch.no_grad():  # learned strides must survive the round trip
        for p in dc.scale_parameters(result.model):
            p.mul_(1.3)
    path = dc.save_checkpoint(
        tmp_path / "r18.pt", result.model, result.plan, source, {"num_classes": 7}, (3, 32, 32),
        budget=123_000_000, training={"step": 5, "rng": torch.get_rng_state()}, extra={"flops": 1.5e9},
    )
    assert [p.name for p in tmp_path.iterdir()] == ["r18.pt"]  # no temp file left behind
    raw = torch.load(path, weights_only=True)  # plain data + tensors only
    assert raw["format_version"] == 1 and raw["source"] == "timm:resnet18"
    ck = dc.load_checkpoint(path)
    assert (ck.source, ck.build_args, ck.input_size, ck.budget) == (source, {"num_classes": 7}, (3, 32, 32), 123_000_000)
    assert ck.training["step"] == 5 and ck.extra == {"flops": 1.5e9}
    assert ck.plan.to_dict() == result.plan.to_dict()
    x = torch.randn(2, 3, 32, 32)
    result.model.eval(), ck.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(ck.model(x), result.model(x), rtol=0, atol=0)
    loaded_strides = [p.detach() for p in dc.scale_parameters(ck.model)]
    assert len(loaded_strides) == 5 and all(torch.allclose(s, torch.tensor([2.6, 2.6])) for s in loaded_strides)
    assert isinstance(dc.load(path), torch.nn.Module)


def test_factory_source_needs_trust(tmp_path):
    source = "_convert_models:tiny_net"
    result = dc.convert(dc.build_model(source, {"num_classes": 3}), input_size=(3, 32, 32))
    path = dc.save(tmp_path / "tiny.pt", result.model, result.plan, source, {"num_classes": 3}, (3, 32, 32))
    with pytest.raises(UserInputError, match="trust_source=True"):
        dc.load_checkpoint(path)
    model = dc.load(path, trust_source=True)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_bad_checkpoint_files(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        dc.load_checkpoint(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(UserInputError, match="not a readable dynopool checkpoint"):
        dc.load_checkpoint(garbage)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(UserInputError, match="not a dynopool checkpoint"):
        dc.load_checkpoint(other)


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_arbitrary_objects_are_not_unpickled(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"format": "dynopool-checkpoint", "x": _Evil()}, f)
    with pytest.raises(UserInputError, match="not a readable"):
        dc.load_checkpoint(path)


def test_newer_format_is_refused(converted, tmp_path):
    source, result = converted
    path = dc.save_checkpoint(tmp_path / "a.pt", result.model, result.plan, source, {"num_classes": 7}, (3, 32, 32))
    payload = torch.load(path, weights_only=True)
    payload["format_version"] = 99
    torch.save(payload, path)
    with pytest.raises(UserInputError, match="format version 99"):
        dc.load_checkpoint(path)


def test_resolve_source():
    assert dc.resolve_source("resnet18") == "timm:resnet18"  # timm first
    assert dc.resolve_source("torchvision:resnet18") == "torchvision:resnet18"
    assert dc.resolve_source("vgg11_bn") == "timm:vgg11_bn"
    assert dc.resolve_source("mobilenet_v3_large") == "torchvision:mobilenet_v3_large"  # torchvision only
    assert dc.resolve_source("pkg.mod:make") == "pkg.mod:make"
    with pytest.raises(UserInputError, match="close matches: resnet50"):
        dc.resolve_source("resnet5O")
    with pytest.raises(UserInputError, match="unknown torchvision model 'vgg1'"):
        dc.resolve_source("torchvision:vgg1")
    with pytest.raises(UserInputError, match="package.module:factory"):
        dc.resolve_source("not a:source!")


def test_a_factory_module_in_the_working_directory_is_found(tmp_path, monkeypatch):
    """``dynopool convert mynet:make`` run from the folder that holds mynet.py works, as with
    ``python -m``: a console script's import path does not hold the working directory."""
    name = "dynopool_test_local_net"
    (tmp_path / f"{name}.py").write_text(
        "from torch import nn\n\ndef make(width=4):\n"
        "    return nn.Sequential(nn.Conv2d(3, width, 3, stride=2), nn.AdaptiveAvgPool2d(1))\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.setattr("sys.path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.chdir(elsewhere)
    with pytest.raises(UserInputError, match="run from the folder that holds it"):
        dc.build_model(f"{name}:make")
    monkeypatch.chdir(tmp_path)
    model = dc.build_model(f"{name}:make", {"width": 5})
    assert model[0].out_channels == 5
    monkeypatch.delitem(sys.modules, name, raising=False)


def test_a_model_file_path_is_a_source_that_loads_from_any_folder(tmp_path, monkeypatch):
    """``dynopool convert nets/mynet.py:make``: the file is imported by its path (its folder on
    the import path for its own imports), and the checkpoint names it absolutely."""
    folder = tmp_path / "nets"
    folder.mkdir()
    (folder / "blocks.py").write_text("from torch import nn\n\ndef stem(w):\n    return nn.Conv2d(3, w, 3, stride=2)\n")
    (folder / "mynet.py").write_text(
        "from torch import nn\nfrom blocks import stem\n\ndef make(width=4):\n"
        "    return nn.Sequential(stem(width), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 3))\n")
    (folder / "broken.py").write_text("def make(:\n")
    monkeypatch.setattr("sys.path", list(sys.path))
    monkeypatch.chdir(tmp_path)
    source = dc.resolve_source("nets/mynet.py:make")
    assert source == f"{folder.resolve() / 'mynet.py'}:make"
    model = dc.build_model(source, {"width": 5})
    assert model[0].out_channels == 5
    result = dc.convert(model, (3, 16, 16))
    path = dc.save(tmp_path / "c.pt", result.model, result.plan, source, {"width": 5}, (3, 16, 16))
    monkeypatch.chdir(folder.parent.parent)
    with pytest.raises(UserInputError, match="imports and runs that Python code"):
        dc.load_checkpoint(path)
    loaded = dc.load_checkpoint(path, trust_source=True)
    x = torch.randn(1, 3, 16, 16)
    assert torch.equal(loaded.model.eval()(x), result.model.eval()(x))
    with pytest.raises(UserInputError, match="model file not found"):
        dc.resolve_source("nets/missing.py:make")
    with pytest.raises(UserInputError, match="failed: SyntaxError"):
        dc.build_model(str(folder / "broken.py") + ":make")
    with pytest.raises(UserInputError, match="has no callable 'nope'"):
        dc.build_model(f"{folder / 'mynet.py'}:nope")


def test_build_arguments_read_yaml_values_and_python_tuples():
    from dynopool_convert.models import parse_build_args

    assert parse_build_args(["num_classes=10", "dynamic_img_size=true", "img_size=(64, 96)", "drop=[1, 2]", "act=gelu"]) == {
        "num_classes": 10, "dynamic_img_size": True, "img_size": (64, 96), "drop": [1, 2], "act": "gelu"}
    with pytest.raises(UserInputError, match="cannot read the value of build argument 'img_size=\\(h, w\\)'"):
        parse_build_args(["img_size=(h, w)"])


def test_build_model_never_downloads():
    seg = dc.build_model("torchvision:deeplabv3_mobilenet_v3_large", {"num_classes": 3})
    assert type(seg).__name__ == "DeepLabV3"
    with pytest.raises(UserInputError, match="cannot build"):
        dc.build_model("timm:resnet18", {"no_such_argument": 1})
    with pytest.raises(UserInputError, match="cannot be downloaded"):
        dc.build_model("torchvision:resnet18", {"weights": "DEFAULT"})


def test_input_sizes():
    assert parse_input_size("64") == (3, 64, 64) and parse_input_size("64x48") == (3, 64, 48)
    for bad in ("0", "axb", "1x2x3", "-4"):
        with pytest.raises(UserInputError, match="input size"):
            parse_input_size(bad)
    assert default_input_size("timm:resnet18") == (3, 224, 224)
    assert default_input_size("torchvision:inception_v3") == (3, 299, 299)


def test_checkpoint_extra_schema():
    from types import SimpleNamespace

    from dynopool_convert.checkpoint_extra import conversion_extra, original_flops, with_current_flops

    fit = SimpleNamespace(final_flops=90, method="common", group_factors=[0.9],
                          as_dict=lambda: {"final_flops": 90})
    extra = conversion_extra(120, 100, fit, keep_fit=True)
    assert extra == {"flops": {"original": 120, "converted": 100, "final": 90, "fit_method": "common",
                               "group_factors": [0.9]}, "fit_to_budget": {"final_flops": 90}}
    fit.axes_raised = 2
    assert conversion_extra(120, 100, fit)["flops"]["axes_raised"] == 2
    saved = with_current_flops(extra, 85)
    assert saved["flops"]["current"] == 85 and saved["flops"]["original"] == 120 and "current" not in extra["flops"]
    assert with_current_flops(None, 7) == {"flops": {"current": 7}}
    assert original_flops(saved) == 120 and original_flops({"flops_original": 5}) == 5 and original_flops(None) is None
