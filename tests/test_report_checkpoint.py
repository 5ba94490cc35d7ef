"""The report from real checkpoints: a converted ResNet-18, then one whose strides the test moves."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from dynopool_cli.app import main
from dynopool_convert import checkpoint
from dynopool_convert.report import render, report_from_checkpoint
from dynopool_convert.report.flops import flops_by_module
from dynopool_convert.report.schema import check_report


SIZE = (3, 64, 64)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Converted ResNet-18 at 64 px (as converted) and a copy with hand-moved strides."""
    from dynopool_convert import build_model, convert

    folder = tmp_path_factory.mktemp("ckpt")
    result = convert(build_model("timm:resnet18"), SIZE)
    fresh = checkpoint.save_checkpoint(folder / "r18.pt", result.model, result.plan, "timm:resnet18", input_size=SIZE)
    per_module = flops_by_module(result.model, SIZE)  # as converted
    paths = dict(result.site_modules())
    with torch.no_grad():
        result.model.get_submodule(paths["maxpool"]).stride.copy_(torch.tensor([1.5, 2.5]))
        result.model.get_submodule(paths["layer3.0.conv1"]).stride.copy_(torch.tensor([2.0, 1.25]))
    history = [{"epoch": e, "r": {"1": [0.5 + e / 12, 0.5 - e / 20]}, "flops": 10**8 - e, "val_acc1": 0.1 * e} for e in range(3)]
    moved = checkpoint.save_checkpoint(  # extra as a fine-tuning run may leave it (no rebuild needed)
        folder / "r18-moved.pt", result.model, result.plan, "timm:resnet18", input_size=SIZE,
        budget=150_000_000, training={"epoch": 3, "history": history}, extra={"flops_original": 148_000_000},
    )
    return fresh, moved, per_module


@pytest.fixture(scope="module")
def reports(saved):
    return report_from_checkpoint(saved[0]), report_from_checkpoint(saved[1])


def test_converted_resnet18(reports, saved):
    report, _ = reports
    assert check_report(report) == []
    assert report["source"] == "timm:resnet18" and report["input_size"] == [3, 64, 64]
    sites = {s["name"]: s for s in report["sites"]}
    assert sites["conv1"]["module"] == "conv1_dynopool" and sites["maxpool"]["module"] == "maxpool"
    assert sites["conv1"]["output_size"] == [32, 32] and sites["layer4.0.conv1"]["output_size"] == [2, 2]
    # as converted, the strided convs of a residual block are tied and nothing has moved
    assert sites["layer2.0.conv1"]["group"] == sites["layer2.0.downsample.0"]["group"]
    assert report["flops"]["converted"] == report["flops"]["current"]
    # conversion keeps every op's output size at s = 2: the FLOPs of the convs are unchanged,
    # the converted model only adds DynOPool's own cost (0 in the pre-budget stand-in count)
    per = saved[2]
    dynopool_cost = sum(per.get(s["module"], 0) for s in report["sites"] if s["module"])
    assert report["flops"]["current"] - report["flops"]["original"] == dynopool_cost
    assert sites["global_pool.pool"]["status"] == "skipped" and sites["global_pool.pool"]["r"] is None


def test_moved_checkpoint(reports):
    before, report = reports
    assert check_report(report) == []
    sites = {s["name"]: s for s in report["sites"]}
    pool = sites["maxpool"]
    assert pool["r"] == pytest.approx([1 / 1.5, 1 / 2.5]) and pool["r_init"] == [0.5, 0.5]
    assert pool["input_size"] == [32, 32] and pool["output_size"] == [21, 13]  # round(32/1.5), round(32/2.5)
    for s in report["sites"]:
        if s["r"] is not None:
            assert s["output_size"] == [max(1, round(r * n)) for r, n in zip(s["r"], s["input_size"])]
    tied = sites["layer3.0.downsample.0"]
    assert tied["r"] == sites["layer3.0.conv1"]["r"] == pytest.approx([0.5, 0.8])
    assert report["flops"]["current"] != report["flops"]["converted"] == before["flops"]["current"]
    assert report["flops"]["within_budget"] is (report["flops"]["current"] <= 150_000_000)
    assert pool["receptive_field"] != pool["receptive_field_init"] == before["sites"][1]["receptive_field"]
    assert report["training"] == {"epoch": 3} and len(report["history"]) == 3
    assert report["accuracy"]["val_acc1"]["best"] == pytest.approx(0.2)


def test_sizes_match_a_real_forward(saved, reports):
    # the report propagates shapes on fake tensors: compare with the model's real forward
    model = checkpoint.load(saved[1]).eval()
    seen = {}
    for name, module in model.named_modules():
        if type(module).__name__ == "DynOPool":
            module.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, [list(i[0].shape[2:]), list(o.shape[2:])]))
    with torch.no_grad():
        model(torch.zeros(1, *SIZE))
    for site in reports[1]["sites"]:
        if site["module"]:
            assert seen[site["module"]] == [site["input_size"], site["output_size"]], site["name"]


@pytest.mark.parametrize("fmt", ["md", "json", "yaml", "html"])
def test_every_format(reports, fmt):
    for report in reports:
        text = render(report, fmt)
        assert "layer3.0.conv1" in text
    if fmt == "yaml":
        assert yaml.safe_load(render(reports[1], "yaml")) == json.loads(render(reports[1], "json"))


def test_cli_on_checkpoint(saved, reports, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["report", str(saved[1]), "--format", "json", "--figures", str(tmp_path)])
    assert exc.value.code == 0
    data = json.loads(capsys.readouterr().out)
    assert data == json.loads(render(reports[1], "json"))
    assert data["flops"]["original"] == 148_000_000 and data["flops"]["within_budget"] is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scale_factors.png", "shapes.png"]
