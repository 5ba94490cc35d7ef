"""A detector's backbone converted in Python (README, "Detection"): torch.fx cannot trace a
detector's list-of-images interface, but its backbone converts, runs inside it exactly as before,
fits a budget, and its strides learn from the detection losses."""
from __future__ import annotations

import pytest
import torch

import dynopool_convert as dc

torchvision = pytest.importorskip("torchvision")
SIZE = (3, 128, 128)


def test_fasterrcnn_backbone_converts_exactly_and_learns_from_the_detection_loss():
    torch.manual_seed(0)
    detector = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=3, min_size=128, max_size=128).eval()
    images = [torch.rand(3, 128, 128), torch.rand(3, 96, 128)]
    with torch.no_grad():
        before = detector(images)
    body = detector.backbone.body
    original = dc.count_flops(body, SIZE)
    result = dc.convert(body, input_size=SIZE, placement="exact")
    assert result.plan.summary()["groups"] >= 3
    detector.backbone.body = result.model
    with torch.no_grad():
        after = detector(images)
    for b, a in zip(before, after):  # the same detections at init
        assert torch.equal(b["labels"], a["labels"]) and torch.allclose(b["boxes"], a["boxes"], atol=1e-4)
    fit = dc.fit_to_budget(result.model, original // 2, SIZE)
    assert fit.final_flops == dc.count_flops(result.model, SIZE) <= original // 2
    detector.train()
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 90.0, 100.0]]), "labels": torch.tensor([1])}] * 2
    cost = dc.CostModel(result.model, SIZE)
    loss = sum(detector(images, targets).values()) + dc.budget_penalty(cost(), original // 2)
    loss.backward()
    grads = [p.grad for p in dc.scale_parameters(detector)]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)
