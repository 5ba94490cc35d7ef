"""Convert your own nn.Module through the Python API, print its plan, save and reload it.

Run from the repository root:  python examples/convert_custom_model.py
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import dynopool_convert as dc


class DownBlock(nn.Module):
    """Residual downsampling: a strided 3x3 branch and a strided 1x1 shortcut."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(cout)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride=2)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x))) + self.shortcut(x)


class SmallNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.block = DownBlock(16, 32)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.stem(x)), 2)  # a functional pooling call
        x = self.block(x)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def small_net(num_classes: int = 10) -> nn.Module:
    """The factory a checkpoint rebuilds the model from (source 'convert_custom_model:small_net')."""
    return SmallNet(num_classes)


def main() -> None:
    result = dc.convert(small_net(), input_size=(3, 64, 64))
    for s in result.plan.sites:
        sizes = f"{s.input_size} -> {s.converted_size or s.output_size}"
        print(f"{s.name:16} {s.op:32} group={s.group!s:4} {sizes:18} {s.status} {s.reason}")
    print("plan as JSON:", len(json.dumps(result.plan.to_dict())), "characters")
    print("learned groups:", result.plan.summary()["groups"])  # the functional pool + the tied block
    print(result.model.code)  # the rewritten forward, DynOPool calls included

    # a checkpoint names the source the model is rebuilt from: an importable module:factory
    sys.path.insert(0, str(Path(__file__).parent))
    source = "convert_custom_model:small_net"
    with tempfile.TemporaryDirectory() as tmp:
        path = dc.save_checkpoint(Path(tmp) / "small.pt", result.model, result.plan, source, input_size=(3, 64, 64))
        model = dc.load(path, trust_source=True)  # imports this file: only for sources you trust
    x = torch.randn(2, 3, 64, 64)
    result.model.eval(), model.eval()
    with torch.no_grad():
        same = torch.equal(model(x), result.model(x))
    print("reloaded model gives the same output:", same)


if __name__ == "__main__":
    main()
