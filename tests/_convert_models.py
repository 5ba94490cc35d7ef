"""Small hand-made models for the conversion tests (importable as ``_convert_models:FACTORY``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DownBlock(nn.Module):
    """Residual downsampling block: a strided 3x3 branch and a strided 1x1 shortcut (must tie)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=2, padding=1)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride=2)

    def forward(self, x):
        return F.relu(self.conv(x)) + self.shortcut(x)


class TinyNet(nn.Module):
    """Stem conv s2, residual down block, SE gate with a pooled branch, functional pools, upsampling."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.down = DownBlock(8, 16)
        self.se = nn.Conv2d(16, 16, 1)
        self.up = nn.Upsample(scale_factor=2.0, mode="nearest")
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = self.down(x)
        # squeeze-excitation whose gate branch contains its own strided pool: a broadcast
        # 1x1 operand, which must not tie that pool with the block's sites
        gate = torch.sigmoid(self.se(F.adaptive_avg_pool2d(F.max_pool2d(x, 2), 1)))
        x = x * gate
        x = F.avg_pool2d(x, kernel_size=2)
        x = self.up(x)
        x = F.max_pool2d(x, 2, 2)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def tiny_net(num_classes: int = 5) -> nn.Module:
    return TinyNet(num_classes)


class PoolOnly(nn.Module):
    """Convs at stride 1 and 2x2 stride-2 pools only: the conversion is exact at even sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.p1 = nn.MaxPool2d(2)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.p2 = nn.AvgPool2d(2, 2)

    def forward(self, x):
        x = self.p1(torch.relu(self.c1(x)))
        x = F.max_pool2d(torch.relu(self.c2(x)), 2)
        return self.p2(x)


class HardCodedFlatten(nn.Module):
    """A classifier that flattens a fixed 4x4 map: moving the last pool's stride breaks it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        x = self.pool(torch.relu(self.conv(x)))
        return self.fc(x.reshape(x.shape[0], 4 * 4 * 4))


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2)

    def forward(self, x):
        if x.sum() > 0:
            return self.conv(x)
        return x


class SharedPool(nn.Module):
    """One pool module called twice (two sites, which must not share a stride)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.pool(self.c2(self.pool(self.c1(x))))


class OneBranchHardCoded(nn.Module):
    """Two pooled branches: one adapts (adaptive pool), the other flattens a fixed 4x4 map."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.free = nn.MaxPool2d(2)
        self.fixed = nn.AvgPool2d(4)
        self.fc_free = nn.Linear(4, 3)
        self.fc_fixed = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        a = self.fc_free(torch.flatten(F.adaptive_avg_pool2d(self.free(x), 1), 1))
        b = self.fc_fixed(self.fixed(x).reshape(x.shape[0], 64))
        return a + b


class TimmLayersNet(nn.Module):
    """timm's pooling layers and a functional scale-factor interpolation."""

    def __init__(self) -> None:
        super().__init__()
        from timm.layers import BlurPool2d, create_conv2d, create_pool2d

        self.conv = create_conv2d(3, 8, 3, stride=2, padding="same")  # a Conv2dSame
        self.pool = create_pool2d("max", 3, stride=2, padding="same")  # MaxPool2dSame
        self.blur = BlurPool2d(8, filt_size=3, stride=2)
        self.avg = create_pool2d("avg", 2, stride=2, padding="same")  # AvgPool2dSame
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        x = self.blur(self.pool(torch.relu(self.conv(x))))
        x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        x = self.avg(x)
        return self.fc(x.mean((2, 3)))


class ShapeBranch(nn.Module):
    """Loops over its input's rows (``range`` of a traced size): fx cannot trace into it."""

    def forward(self, x):
        rows = [x[:, :, i : i + 1] * (i + 1) for i in range(x.shape[-2])]
        return torch.cat(rows, 2)


class NeedsAutoLeaf(nn.Module):
    """A strided conv, then a block that must be kept as a leaf to trace."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.block = ShapeBranch()

    def forward(self, x):
        return self.block(self.conv(x)).mean((2, 3))


class UNetLike(nn.Module):
    """Down, up, concat with the skip: the two sites cannot share a stride (s and 1/s)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.MaxPool2d(2)
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2.0)
        self.out = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        y = self.up(self.conv(self.down(x)))
        return self.out(torch.cat([x, y], 1))


class WindowNet(nn.Module):
    """Attention-like windows of 4x4 pixels after the pool: the map must stay divisible by 4
    (the window count follows the size, as in windowed attention traced with dynamic shapes)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.mix = nn.Linear(16, 16)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.pool(torch.relu(self.conv(x)))
        n, c, h, w = x.shape
        win = x.reshape(n, c, h // 4, 4, w // 4, 4).permute(0, 1, 2, 4, 3, 5).reshape(n, c, h // 4, w // 4, 16)
        win = self.mix(win).reshape(n, c, h // 4, w // 4, 4, 4).permute(0, 1, 2, 4, 3, 5).reshape(n, c, h, w)
        return self.fc(win.mean((2, 3)))


def window_net() -> nn.Module:
    return WindowNet()


def hard_coded_flatten() -> nn.Module:
    return HardCodedFlatten()


class NeedsMinSize(nn.Module):
    """An unpadded 5x5 conv after the pool: the pool's output must stay at least 5x5, so a stride
    that grows far enough breaks the forward (12 px input: 6x6 at stride 2, 4x4 from stride 2.67)."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.valid = nn.Conv2d(4, 4, 5)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        x = self.valid(self.pool(torch.relu(self.conv(x))))
        return self.fc(x.mean((2, 3)))


def needs_min_size(num_classes: int = 3) -> nn.Module:
    return NeedsMinSize(num_classes)
