"""Weights in: ``--weights FILE`` and ``--pretrained`` (files written by the tests)."""
from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

import dynopool_convert as dc
from dynopool_cli.app import main
from dynopool_convert import UserInputError
from dynopool_convert.weights import build_pretrained, build_with_weights, file_sha256, load_weights_file

SOURCE, ARGS = "timm:resnet18", {"num_classes": 3}


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(1)
    model = dc.build_model(SOURCE, ARGS)
    with torch.no_grad():  # weights that differ from any fresh build
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("layout", ["plain.pt", "wrapped.pth", "module.pth", "plain.safetensors"])
def test_weights_files_load_in_every_layout(trained, tmp_path, layout):
    state = trained.state_dict()
    path = tmp_path / layout
    if layout == "plain.pt":
        torch.save(state, path)
    elif layout == "wrapped.pth":  # a training script's checkpoint: weights under 'model', plus other data
        torch.save({"model": {f"model.{k}": v for k, v in state.items()}, "epoch": 4, "args": {"lr": 0.1}}, path)
    elif layout == "module.pth":  # DataParallel / DDP prefixes under 'state_dict'
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    model, origin = build_with_weights(SOURCE, ARGS, weights=path)
    assert _same(model, trained)
    assert origin == {"path": str(path.resolve()), "sha256": file_sha256(path)}


def test_timm_filter_reads_a_torchvision_layout(tmp_path):
    """timm's own checkpoint filter maps other layouts (here torchvision's RegNet) onto timm's keys."""
    import torchvision

    tv = torchvision.models.regnet_y_400mf(num_classes=3)
    torch.save(tv.state_dict(), tmp_path / "regnet.pt")
    model, _ = build_with_weights("timm:regnety_004", ARGS, weights=tmp_path / "regnet.pt")
    assert torch.equal(model.stem.conv.weight, tv.stem[0].weight)
    assert sorted(v.sum().item() for v in model.state_dict().values()) == sorted(v.sum().item() for v in tv.state_dict().values())


def test_bad_weights_files_are_one_line_errors(trained, tmp_path):
    state = trained.state_dict()
    with pytest.raises(UserInputError, match="does not exist"):
        load_weights_file(dc.build_model(SOURCE, ARGS), tmp_path / "missing.pt")
    wrong = dict(state)
    wrong.pop("fc.bias")
    wrong["head.extra"] = torch.zeros(1)
    torch.save(wrong, tmp_path / "keys.pt")
    with pytest.raises(UserInputError, match=r"missing 'fc.bias', unexpected 'head.extra'"):
        load_weights_file(dc.build_model(SOURCE, ARGS), tmp_path / "keys.pt")
    shapes = dict(state)
    shapes["fc.weight"] = torch.zeros(10, 512)
    torch.save(shapes, tmp_path / "shapes.pt")
    with pytest.raises(UserInputError, match=r"'fc.weight' has shape \[10, 512\] in the file, \[3, 512\] in the model "
                                             r"\(a different variant"):
        load_weights_file(dc.build_model(SOURCE, ARGS), tmp_path / "shapes.pt")
    shapes["fc.bias"] = torch.zeros(10)  # a whole classifier of 10 classes: the class count to build with
    torch.save(shapes, tmp_path / "classes.pt")
    with pytest.raises(UserInputError, match=r"its classifier has 10 classes: add --build-arg num_classes=10\)$"):
        load_weights_file(dc.build_model(SOURCE, ARGS), tmp_path / "classes.pt")
    tv = dc.build_model("torchvision:resnet18", {"num_classes": 3})  # no num_classes attribute: its last Linear
    torch.save({k: (torch.zeros(7, *v.shape[1:]) if k.startswith("fc.") else v) for k, v in tv.state_dict().items()},
               tmp_path / "tv.pt")
    with pytest.raises(UserInputError, match=r"its classifier has 7 classes: add --build-arg num_classes=7\)$"):
        load_weights_file(dc.build_model("torchvision:resnet18", {"num_classes": 3}), tmp_path / "tv.pt")
    shapes["conv1.weight"] = torch.zeros(64, 3, 3, 3)  # not only the classifier: another variant
    torch.save(shapes, tmp_path / "variant.pt")
    with pytest.raises(UserInputError, match=r"'conv1.weight' .*\(a different variant"):
        load_weights_file(dc.build_model(SOURCE, ARGS), tmp_path / "variant.pt")
    torch.save(trained, tmp_path / "pickled_model.pt")  # a whole pickled module: code, refused
    with pytest.raises(UserInputError, match=r"refusing to load .* could run code.*torch.save\(model.state_dict\(\), PATH\)"):
        load_weights_file(dc.build_model(SOURCE, ARGS), tmp_path / "pickled_model.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(UserInputError, match="not a readable safetensors file"):
        load_weights_file(dc.build_model(SOURCE, ARGS), tmp_path / "junk.safetensors")
    torch.save({"epoch": 3}, tmp_path / "nostate.pt")
    with pytest.raises(UserInputError, match="holds no state dict"):
        load_weights_file(dc.build_model(SOURCE, ARGS), tmp_path / "nostate.pt")


class _Evil:
    def __reduce__(self):
        return (print, ("code ran",))


def test_pickle_with_code_is_refused(tmp_path, capsys):
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"fc.weight": _Evil()}, f)
    with pytest.raises(UserInputError, match="weights file"):
        load_weights_file(dc.build_model(SOURCE, ARGS), tmp_path / "evil.pt")
    assert "code ran" not in capsys.readouterr().out


def test_pretrained_reads_the_local_cache_only(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(UserInputError, match="not in the local cache .* nothing is downloaded"):
        build_pretrained("torchvision:resnet18")
    cached = tmp_path / "checkpoints" / torchvision.models.ResNet18_Weights.DEFAULT.url.rsplit("/", 1)[-1]
    cached.parent.mkdir()
    reference = torchvision.models.resnet18()
    torch.save(reference.state_dict(), cached)
    model, origin = build_pretrained("torchvision:resnet18")
    assert _same(model, reference)
    assert origin["pretrained"] == "torchvision:resnet18.IMAGENET1K_V1" and origin["sha256"] == file_sha256(cached)
    with pytest.raises(UserInputError, match="--pretrained needs a timm or torchvision model"):
        build_pretrained("_convert_models:tiny_net")


def _cli(argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_cli_convert_with_weights_is_exact_and_records_their_origin(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "200")
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(tmp_path / "w.safetensors"))
    code, out, err = _cli(["convert", "resnet18", "--build-arg", "num_classes=3", "--input-size", "32",
                           "--weights", "w.safetensors", "--out", "c.pt"], capsys)
    assert code == 0, err
    assert "placement exact" in out
    (tmp_path / "w.safetensors").rename(tmp_path / "gone.safetensors")  # replay needs only the checkpoint
    ck = dc.load_checkpoint(tmp_path / "c.pt")
    assert ck.extra["weights"]["sha256"] == file_sha256(tmp_path / "gone.safetensors")
    assert ck.extra["weights"]["path"] == str(tmp_path / "w.safetensors")
    assert ck.plan.policy["placement"] == "exact"
    x = torch.randn(2, 3, 32, 32)
    trained.eval(), ck.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(ck.model(x), trained(x), rtol=0, atol=0)


@pytest.mark.parametrize("argv, words", [
    (["--weights", "missing.pt"], "does not exist"),
    (["--weights", "keys.pt"], "missing 'fc.bias'"),
    (["--weights", "keys.pt", "--pretrained"], "either --weights FILE or --pretrained"),
])
def test_cli_bad_weights_exit_2_with_one_line(trained, tmp_path, capsys, monkeypatch, argv, words):
    monkeypatch.chdir(tmp_path)
    state = dict(trained.state_dict())
    state.pop("fc.bias")
    torch.save(state, tmp_path / "keys.pt")
    code, out, err = _cli(["convert", "resnet18", "--build-arg", "num_classes=3", "--input-size", "32", *argv], capsys)
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_recipe_weights_convert_exactly_and_the_head_follows_the_data(trained, tmp_path):
    """A recipe naming a model and its weights: converted (placement exact), fine-tuned on data
    with another class count (the head is replaced), the weights' origin kept."""
    from dynopool_convert.training import finetune

    torch.save({"state_dict": trained.state_dict()}, tmp_path / "w.pth")
    recipe = {"model": SOURCE, "build_args": ARGS, "weights": str(tmp_path / "w.pth"), "input_size": [3, 32, 32],
              "data": "synthetic:classes=4,train=16,val=8", "train": {"steps": 1, "batch_size": 8, "device": "cpu"}}
    res = finetune(None, tmp_path / "run", overrides=recipe)
    assert res.completed
    converted = dc.load_checkpoint(tmp_path / "run" / "converted.pt")
    assert converted.plan.policy["placement"] == "exact" and converted.extra["weights"]["sha256"] == file_sha256(tmp_path / "w.pth")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(converted.model.eval()(x), trained.eval()(x), rtol=0, atol=0)
    assert dc.load_checkpoint(tmp_path / "run" / "last.pt").build_args["num_classes"] == 4


def _old_densenet_layout(state: dict) -> dict:
    """DenseNet keys as torchvision's checkpoints before 0.3 name them (``norm.1`` for ``norm1``)."""
    import re

    return {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v for k, v in state.items()
            if not k.endswith("num_batches_tracked")}  # nor did batch norm have this buffer then


@pytest.mark.parametrize("source", ["torchvision:densenet121", "timm:densenet121"])
def test_densenet_old_key_names_load(source, tmp_path):
    """torchvision's (and timm's) own remapping of DenseNet's old key names is applied."""
    torch.manual_seed(0)
    reference = dc.build_model(source, ARGS)
    old = _old_densenet_layout(reference.state_dict())
    assert sum(".norm.1." in k for k in old) > 50 and "features.denseblock1.denselayer1.norm1.weight" not in old
    torch.save({"state_dict": old}, tmp_path / "old.pth")
    model, origin = build_with_weights(source, ARGS, weights=tmp_path / "old.pth")
    assert set(model.state_dict()) == set(reference.state_dict())
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in model.state_dict().items()
               if not k.endswith("num_batches_tracked"))
    assert "build_args" not in origin


def _googlenet_reference(**kwargs):
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.GoogLeNet(init_weights=False, **kwargs).eval()


def test_torchvision_release_files_get_transform_input(tmp_path, monkeypatch):
    """A file of torchvision's own googlenet weights (told by its hash, as torchvision names its
    files) is built as torchvision builds it for them: transform_input=True; a user's file is not."""
    import torchvision

    reference = _googlenet_reference(transform_input=True)
    path = tmp_path / "googlenet.pth"
    torch.save(reference.state_dict(), path)
    release = torchvision.models.GoogLeNet_Weights.IMAGENET1K_V1
    mine: dict = {}
    model, origin = build_with_weights("torchvision:googlenet", mine, weights=path)  # not a release: as built
    assert model.transform_input is False and "transform_input" not in mine and "release" not in origin
    monkeypatch.setattr(release.value, "url", f"https://download.pytorch.org/models/googlenet-{file_sha256(path)[:8]}.pth")
    args = {"num_classes": 1000}
    model, origin = build_with_weights("torchvision:googlenet", args, weights=path)
    assert model.transform_input is True and args["transform_input"] is True
    assert origin["release"] == "torchvision:googlenet.IMAGENET1K_V1" and origin["build_args"] == {"transform_input": True}
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference(x), rtol=0, atol=0)
    explicit = {"transform_input": False}  # the user's word stands
    model, origin = build_with_weights("torchvision:googlenet", explicit, weights=path)
    assert model.transform_input is False and "build_args" not in origin


def test_cli_pretrained_googlenet_is_built_as_torchvision_builds_it(tmp_path, capsys, monkeypatch):
    import torchvision

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    reference = _googlenet_reference(transform_input=True)
    cached = tmp_path / "checkpoints" / torchvision.models.GoogLeNet_Weights.DEFAULT.url.rsplit("/", 1)[-1]
    cached.parent.mkdir()
    torch.save(reference.state_dict(), cached)
    code, out, err = _cli(["convert", "torchvision:googlenet", "--pretrained", "--input-size", "64", "--out", "g.pt"], capsys)
    assert code == 0, err
    assert "built with transform_input=True" in out and "placement exact" in out
    ck = dc.load_checkpoint(tmp_path / "g.pt")
    assert ck.build_args["transform_input"] is True and ck.extra["weights"]["build_args"] == {"transform_input": True}
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ck.model.eval()(x), reference(x), rtol=1e-5, atol=1e-5)


def test_release_build_args_follow_torchvision_builders():
    """The arguments set for torchvision's own weights are those its builders set (no drift)."""
    import inspect

    import torchvision

    from dynopool_convert.weights import _TORCHVISION_RELEASE_ARGS

    assert set(_TORCHVISION_RELEASE_ARGS) == {"googlenet", "inception_v3"}
    for name, args in _TORCHVISION_RELEASE_ARGS.items():
        builder = inspect.getsource(getattr(torchvision.models, name))
        assert all(f'_ovewrite_named_param(kwargs, "{k}", {v})' in builder for k, v in args.items())


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_modules_that_check_their_version_load_from_any_file(tmp_path, suffix):
    """torchvision's MNASNet refuses a state dict without module versions; safetensors files carry
    none, so the model's own are used (a ``.pt`` file keeps its own)."""
    torch.manual_seed(0)
    reference = dc.build_model("torchvision:mnasnet0_5", ARGS)
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    else:
        torch.save(reference.state_dict(), path)
    model, _ = build_with_weights("torchvision:mnasnet0_5", ARGS, weights=path)
    assert _same(model, reference)
