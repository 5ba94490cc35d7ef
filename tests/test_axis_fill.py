"""The budget fit's axis fill (``axis_fill.fill_axes``): one side of one map raised at a time
where a step on both sides falls far below the budget."""
from __future__ import annotations

import random

import pytest
import torch
from torch import nn

import dynopool_convert as dc
from dynopool_convert.allocation import admissible, scaled
from dynopool_convert.axis_fill import fill_axes
from dynopool_convert.cost_model import CostModel
from dynopool_convert.training.group_sizes import GroupGeometry

SIZE = (3, 56, 56)


def patch_grid() -> nn.Module:
    """A patchify stem (8x8, stride 8: a 7x7 grid at 56 px) and 1x1 convs over the grid: the cost
    is proportional to the grid's area, so 5x5 is just over half of 7x7 and 4x4 a third."""
    return nn.Sequential(nn.Conv2d(3, 32, 8, stride=8), nn.ReLU(), nn.Conv2d(32, 64, 1), nn.ReLU(),
                         nn.Conv2d(64, 32, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def test_half_budget_on_a_coarse_grid_takes_a_rectangle():
    """Under half the FLOPs (placement exact: the input resized to a multiple of the patch) the
    square steps give a 4x4 grid (0.70 of the budget); the fill takes 5x4 or 4x5 (0.88), within
    the budget by fvcore's count."""
    original = dc.count_flops(patch_grid(), SIZE)
    budget = original // 2
    squares = dc.convert(patch_grid(), input_size=SIZE, placement="exact").model
    square_fit = dc.fit_to_budget(squares, budget, SIZE)  # the default: no fill
    model = dc.convert(patch_grid(), input_size=SIZE, placement="exact").model
    fit = dc.fit_to_budget(model, budget, SIZE, axis_fill=True)
    assert fit.axes_raised >= 1 and fit.final_flops == dc.count_flops(model, SIZE) <= budget
    assert square_fit.final_flops < 0.75 * budget < 0.85 * budget < fit.final_flops
    assert GroupGeometry(squares, SIZE).measure()[1] == [(32, 32)]
    assert sorted(GroupGeometry(model, SIZE).measure()[1][0]) == [32, 40]
    with torch.no_grad():
        assert model(torch.randn(2, *SIZE)).shape == (2, 10)


def test_the_fill_never_leaves_the_budget_or_enlarges_a_map():
    """From random allocations within the budget: every filled allocation is within the budget,
    costs at least as much, and keeps every map within its starting size."""
    torch.manual_seed(0)
    model = dc.convert(nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                     nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                     nn.Flatten(), nn.Linear(16, 10)), input_size=(3, 40, 40)).model
    cost = CostModel(model, (3, 40, 40))
    base, bounds = cost.clamp(cost.current_strides()), cost.bounds
    original = cost.group_sizes(scaled(base, bounds, 1.0))
    rng = random.Random(0)
    raised_any = False
    for _ in range(8):
        start = scaled(base, bounds, [rng.uniform(0.4, 1.0) for _ in base])
        budget = int(cost.flops(start) * rng.uniform(1.0, 1.3))
        filled, moves = fill_axes(cost, base, bounds, start, budget)
        raised_any |= moves > 0
        assert cost.flops(start) <= cost.flops(filled) <= budget
        assert admissible(cost, original, filled)
        assert (moves == 0) == ([tuple(s) for s in start] == filled)
    assert raised_any


def test_the_fill_stops_at_its_time_limit():
    """Past ``max_seconds`` no further candidate is scored (a cost model probing opaque leaves
    can take seconds per new size): with no time at all, the start comes back unchanged."""
    model = dc.convert(patch_grid(), input_size=SIZE, placement="exact").model
    cost = CostModel(model, SIZE)
    base, bounds = cost.clamp(cost.current_strides()), cost.bounds
    start = scaled(base, bounds, 0.6)
    budget = int(cost.flops(start) * 1.3)
    assert fill_axes(cost, base, bounds, start, budget)[1] >= 1
    assert fill_axes(cost, base, bounds, start, budget, max_seconds=0.0) == ([tuple(s) for s in start], 0)


def _convert_cli(argv, capsys) -> tuple[int, str]:
    from dynopool_cli.app import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code, capsys.readouterr().out


def test_convert_axis_fill_flag(tmp_path, capsys, monkeypatch):
    """``dynopool convert --budget 0.5x``: a small ViT's 8x8 patch grid goes to 5x5 by default;
    with ``--axis-fill`` one side more (6x5), the line says so and the checkpoint records it;
    both within the budget by fvcore's count."""
    monkeypatch.setenv("COLUMNS", "200")
    vit = ["timm:vit_tiny_patch16_224", "--input-size", "32", "--placement", "exact", "--budget", "0.5x"]
    for key, value in (("img_size", 32), ("patch_size", 4), ("depth", 1), ("embed_dim", 32), ("num_heads", 2),
                       ("num_classes", 3), ("dynamic_img_size", "true")):
        vit += ["--build-arg", f"{key}={value}"]
    grids = {}
    for flag in ([], ["--axis-fill"]):
        out_path = tmp_path / f"vit{len(flag)}.pt"
        code, out = _convert_cli(["convert", *vit, *flag, "--out", str(out_path)], capsys)
        assert code == 0
        ck = dc.load_checkpoint(out_path)
        assert dc.count_flops(ck.model, (3, 32, 32)) <= ck.budget
        grids[bool(flag)] = sorted(GroupGeometry(ck.model, (3, 32, 32)).measure()[1][0])
        assert ("raised one step alone" in out) == bool(flag) == ("axes_raised" in ck.extra["flops"])
    assert grids == {False: [20, 20], True: [20, 24]}


def test_recipe_key_convert_axis_fill():
    from dynopool_convert.training.recipes import config_from_dict

    assert config_from_dict({"convert": {"axis_fill": True}}).convert.axis_fill is True
    assert config_from_dict({}).convert.axis_fill is False


def test_finetune_refit_takes_the_recipes_axis_fill(tmp_path, capsys, monkeypatch):
    """A checkpoint at its original FLOPs fine-tuned under ``--budget 0.5x``: the fit before the
    first step gives the 8x8 grid 5x5 by default, 6x5 with the recipe's ``convert.axis_fill``
    (the message says so), every step within the budget."""
    from dynopool_convert.training import finetune
    from dynopool_convert.training.trainer import TrainCallbacks

    class Messages(TrainCallbacks):
        def __init__(self) -> None:
            self.messages: list[str] = []

        def on_message(self, message: str) -> None:
            self.messages.append(message)

    monkeypatch.setenv("COLUMNS", "200")
    vit = ["timm:vit_tiny_patch16_224", "--input-size", "32", "--placement", "exact"]
    for key, value in (("img_size", 32), ("patch_size", 4), ("depth", 1), ("embed_dim", 32), ("num_heads", 2),
                       ("num_classes", 3), ("dynamic_img_size", "true")):
        vit += ["--build-arg", f"{key}={value}"]
    ckpt = tmp_path / "vit.pt"
    assert _convert_cli(["convert", *vit, "--out", str(ckpt)], capsys)[0] == 0
    grids = {}
    for fill in (False, True):
        rec, out = Messages(), tmp_path / f"run{int(fill)}"
        finetune(ckpt, out, trust_source=True, callbacks=rec, overrides={
            "budget": "0.5x", "convert": {"axis_fill": fill}, "data": "synthetic:classes=3,train=20,val=6",
            "train": {"steps": 2, "batch_size": 10, "device": "cpu", "log_every": 1}})
        fitted = [m for m in rec.messages if "over its budget: fitted to" in m]
        assert len(fitted) == 1 and ("raised one step alone" in fitted[0]) == fill
        final = dc.load_checkpoint(out / "last.pt", trust_source=True)
        assert dc.count_flops(final.model, (3, 32, 32)) <= final.budget
        grids[fill] = sorted(GroupGeometry(final.model, (3, 32, 32)).measure()[1][0])
    assert grids == {False: [20, 20], True: [20, 24]}
