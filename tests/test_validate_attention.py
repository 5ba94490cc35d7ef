"""Attention whose key and value each come through their own strided conv (MobileNetV4's
multi-query attention): moving one of them alone gives keys and values of different lengths.
PyTorch's fused CPU attention does not check that and corrupts memory (timm's
mobilenetv4_hybrid_medium_075 died with "double free or corruption" in conversion); validation
runs attention on the math kernel, which raises; and attention ties its keys and values, so
both learn one size (they were pinned)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import dynopool_convert as dc
from dynopool_convert import scale_parameters
from dynopool_convert.cost_model import CostModel
from dynopool_convert.flops import count_flops


class KeyValueStrided(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.key = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16)
        self.value = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem(x)
        b, c, h, w = x.shape
        # contiguous, as MobileNetV4's: the fused kernel takes them (it leaves strided ones to math)
        q = x.flatten(2).transpose(1, 2).unsqueeze(1).contiguous()              # B, 1, HW, C
        k = self.key(x).flatten(2).transpose(1, 2).unsqueeze(1).contiguous()    # B, 1, hw, C
        v = self.value(x).flatten(2).transpose(1, 2).unsqueeze(1).contiguous()
        o = F.scaled_dot_product_attention(q, k, v)
        return self.fc(o.mean((1, 2)))


def test_keys_and_values_of_different_lengths_are_found_not_run():
    result = dc.convert(KeyValueStrided().eval(), (3, 32, 32), placement="exact")
    status = {s.name: (s.status, s.group) for s in result.plan.sites}
    key, value = status["key"], status["value"]
    assert key[0] != "converted" or value[0] != "converted" or key[1] == value[1], status  # never apart
    model = result.model.eval()  # and the converted model runs at its sizes
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_keys_and_values_are_tied_and_learn_one_size():
    result = dc.convert(KeyValueStrided().eval(), (3, 32, 32), placement="exact")
    status = {s.name: (s.status, s.group) for s in result.plan.sites}
    assert status["key"] == status["value"] == ("converted", status["key"][1]) != status["stem"], status
    cost = CostModel(result.model, (3, 32, 32))
    for strides in ([[1.5, 2.5], [2.5, 3.0]], [[2.6, 1.9], [1.6, 2.2]]):
        with torch.no_grad():
            for p, s in zip(scale_parameters(result.model), strides):
                p.copy_(torch.tensor(s))
        assert result.model(torch.randn(1, 3, 32, 32)).shape == (1, 5)
        assert cost.flops() == count_flops(result.model, (3, 32, 32))
