"""torchvision-style token flattening (reshape to a hard-coded n_h * n_w) follows the learned grid."""
from __future__ import annotations

import importlib

import torch
import torchvision

from dynopool_convert import apply_plan, convert, scale_parameters

convert_module = importlib.import_module("dynopool_convert.convert")  # the package exports the function


def _tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=10
    )
    torch.nn.init.normal_(model.heads.head.weight)  # torchvision zero-initialises the head
    return model


def test_vit_reshape_follows_the_grid_and_learns():
    result = convert(_tiny_vit(), input_size=(3, 32, 32))
    assert result.plan.summary()["groups"] == 1
    assert any("follows its grid (flatten)" in note for note in result.plan.notes)
    model = result.model.train()
    (stride,) = scale_parameters(model)
    x = torch.randn(2, 3, 32, 32)
    for s in (6.0, 11.0):  # 5x5 and 3x3 token grids instead of 4x4
        with torch.no_grad():
            stride.fill_(s)
        stride.grad = None
        out = model(x)
        assert out.shape == (2, 10) and torch.isfinite(out).all()
        out.pow(2).sum().backward()
        assert torch.isfinite(stride.grad).all() and stride.grad.abs().sum() > 0


def test_without_the_pass_the_group_is_reverted(monkeypatch):
    # torchvision's n_h = h // p also reads the conv's output since site_sizes.py: either pass
    # alone keeps the group; without both it is reverted
    monkeypatch.setattr(convert_module, "follow_site_sizes", lambda gm, candidates: [])
    assert convert(_tiny_vit(), input_size=(3, 32, 32)).plan.summary()["groups"] == 1
    monkeypatch.setattr(convert_module, "follow_flattens", lambda gm, candidates: [])
    result = convert(_tiny_vit(), input_size=(3, 32, 32))
    assert result.plan.summary()["groups"] == 0


def test_plan_replay_gives_the_same_model():
    result = convert(_tiny_vit(), input_size=(3, 32, 32))
    replayed = apply_plan(_tiny_vit(), result.plan)
    replayed.load_state_dict(result.model.state_dict())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        for p in scale_parameters(result.model) + scale_parameters(replayed):
            p.fill_(6.0)
    torch.testing.assert_close(replayed.eval()(x), result.model.eval()(x), rtol=0, atol=0)
