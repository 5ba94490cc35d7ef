"""Hand-made stand-ins for converted models (until ``convert()`` is on main).

``dynopoolify(model)`` swaps every strided conv for DynOPool + the same conv at stride 1
(placement "before"; "after" for even kernels, whose stride-1 conv cannot keep the size) and
every strided max/avg pool for DynOPool. Sites inside one block (the first two components of
the module path, e.g. ``layer2.0`` or ``stages.1``) share ONE stride parameter, as tied groups
do; the residual add of such a block joins both branches.
"""
from __future__ import annotations

import random

import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from timm.layers import register_notrace_module

from dynopool_convert import DynOPool


def _group_key(name: str, depth: int) -> str:
    return ".".join(name.split(".")[:depth])


def dynopoolify(model: nn.Module, depth: int = 2) -> nn.Module:
    params: dict[str, nn.Parameter] = {}
    ids: dict[str, int] = {}

    def site(name: str, stride, aggregate: str) -> DynOPool:
        key = _group_key(name, depth)
        s = stride if isinstance(stride, (tuple, list)) else (stride, stride)
        if key not in params:
            params[key] = nn.Parameter(torch.tensor([float(s[0]), float(s[1])]))
            ids[key] = len(ids)
        return DynOPool(params[key], aggregate=aggregate, group=ids[key])

    for name, m in list(model.named_modules()):
        for child_name, child in list(m.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            new = None
            if isinstance(child, nn.Conv2d) and max(child.stride) > 1:
                stride = child.stride
                child.stride = (1, 1)
                k, d, p = child.kernel_size, child.dilation, child.padding
                if all(d[i] * (k[i] - 1) == 2 * p[i] for i in range(2)):
                    new = nn.Sequential(site(full, stride, "max"), child)
                else:
                    new = nn.Sequential(child, site(full, stride, "max"))
            elif isinstance(child, (nn.MaxPool2d, nn.AvgPool2d)):
                stride = child.stride if child.stride is not None else child.kernel_size
                if (max(stride) if isinstance(stride, tuple) else stride) > 1:
                    new = site(full, stride, "max" if isinstance(child, nn.MaxPool2d) else "mean")
            if new is not None:
                setattr(m, child_name, new)
    return model


class TwoBranch(nn.Module):
    """Concat and residual branches that share one stride parameter (a tied group)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        s = nn.Parameter(torch.tensor([2.0, 2.0]))
        self.pool_a, self.pool_b = DynOPool(s, group=0), DynOPool(s, "mean", group=0)
        self.conv_a = nn.Conv2d(8, 8, 3, padding=1)
        self.conv_b = nn.Conv2d(8, 8, 1)
        self.pool_c = DynOPool(1.5, group=1)
        self.fuse = nn.Conv2d(16, 16, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2.0, mode="bilinear")
        self.valid = nn.Conv2d(16, 16, 3)  # unpadded: size - 2
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        a = self.conv_a(self.pool_a(x))
        b = self.conv_b(self.pool_b(x))
        y = torch.cat([a + b, a * torch.sigmoid(b.mean((2, 3), keepdim=True))], 1)
        y = self.fuse(self.pool_c(y))
        y = self.valid(self.up(y))
        return self.head(torch.nn.functional.adaptive_avg_pool2d(y, 1).flatten(1))


def vgg_like() -> nn.Module:
    cfg = [16, "M", 32, "M", 32, 32, "A", 64]
    layers: list[nn.Module] = []
    c = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        elif v == "A":
            layers.append(nn.AvgPool2d(3, 2, padding=1))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU()]
            c = v
    return nn.Sequential(nn.Sequential(*layers), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * c, 10))


class ShapeKernelPool(nn.Module):
    """Pools whose kernel the forward reads off the map (``F.avg_pool2d(x, x.shape[2:])``, a
    global pool written by hand; a 2-pixel max pool at the map's own stride): the kernel
    follows the map, it is no fixed window."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.p1 = DynOPool(2.0)
        self.c2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.p1(self.c1(x))
        x = F.max_pool2d(self.c2(x), kernel_size=2, stride=1, padding=x.shape[-1] // x.shape[-1])
        return self.fc(F.avg_pool2d(x, x.shape[2:]).flatten(1))


class CropEven(nn.Module):
    """A map cropped to even sizes by slicing before a 2x2 pool (``x[:, :, :h // 2 * 2, :w // 2 * 2]``:
    the bounds computed from the map's own size)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.p1 = DynOPool(2.0)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.p1(self.c1(x))
        h, w = x.shape[2] // 2 * 2, x.shape[3] // 2 * 2
        x = F.max_pool2d(x[:, :, :h, :w], 2)
        return self.fc(self.c2(x).mean((2, 3)))


class ShuffleNet(nn.Module):
    """Space to channels and back (``PixelUnshuffle`` after a pool whose sizes are multiples of
    its factor, ``PixelShuffle`` after a learned stride), as super-resolution nets do."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.p1 = DynOPool(2.0, multiple=(2, 2))
        self.down = nn.PixelUnshuffle(2)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.p2 = DynOPool(1.5)
        self.c3 = nn.Conv2d(16, 32, 3, padding=1)
        self.c4 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c2(self.down(self.p1(self.c1(x))))
        x = self.c4(F.pixel_shuffle(self.c3(self.p2(x)), 2))
        return self.fc(x.mean((2, 3)))


class ConvMlpHead(nn.Module):
    """timm's VGG head (a not-traceable leaf whose forward pads small inputs up to its
    kernel size: output max(h, k) - k + 1) after DynOPool sites, at toy widths."""

    def __init__(self) -> None:
        super().__init__()
        from timm.models.vgg import ConvMlp

        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), DynOPool(2.0), nn.Conv2d(8, 8, 3, padding=1),
                                      DynOPool(2.0))
        self.pre_logits = ConvMlp(8, 16, kernel_size=3)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.pre_logits(self.features(x)).mean((2, 3)))


class StdConvSeg(nn.Module):
    """timm's StdConv2d (conv FLOPs scale with size, weight standardisation's do not), explicit
    padding before a pool, and a segmentation-style upsample to another tensor's size."""

    def __init__(self) -> None:
        super().__init__()
        from timm.layers import StdConv2d

        self.stem = StdConv2d(3, 8, 3, padding=1)
        self.pool1 = DynOPool(2.0)
        self.pad = nn.ConstantPad2d((1, 0, 1, 0), 0.0)
        self.pool2 = DynOPool(1.5)
        self.conv = StdConv2d(8, 8, 3, padding=1)
        self.classifier = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        y = self.pool1(self.stem(x))
        y = self.conv(self.pool2(torch.nn.functional.pad(self.pad(y), (0, 1, 0, 1))))
        return torch.nn.functional.interpolate(self.classifier(y), size=x.shape[-2:], mode="bilinear")


class ChannelsLastBlock(nn.Module):
    """Swin-like block on an N x H x W x C tensor (LayerNorm + Linear: several counted ops),
    with a shape check fx cannot trace, so it stays a leaf the cost model must run alone."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, dim)

    def forward(self, x):
        if x.shape[-1] != self.fc.in_features:
            raise ValueError(f"expected {self.fc.in_features} channels last, got {tuple(x.shape)}")
        return x + self.fc(self.norm(x))


class ChannelsLastNet(nn.Module):
    """A pooled feature map permuted to channels-last for a leaf block (Swin, TinyViT)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.pool = DynOPool(2.0)
        self.block = ChannelsLastBlock(16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        y = self.pool(self.stem(x)).permute(0, 2, 3, 1)
        return self.head(self.block(y).mean((1, 2)))


def window_attend(x: torch.Tensor, weight: torch.Tensor, window: int) -> torch.Tensor:
    """torchvision's ``shifted_window_attention`` in small: pad an N x H x W x C map to whole
    windows, mix tokens within each window, crop back. Its FLOPs follow the windows."""
    n, h, w, c = x.shape
    y = F.pad(x, (0, 0, 0, (window - w % window) % window, 0, (window - h % window) % window))
    hp, wp = y.shape[1], y.shape[2]
    t = y.view(n, hp // window, window, wp // window, window, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)
    t = (t @ t.transpose(1, 2)) @ t @ weight
    t = t.view(n, hp // window, wp // window, window, window, c).permute(0, 1, 3, 2, 4, 5).reshape(n, hp, wp, c)
    return t[:, :h, :w, :]


torch.fx.wrap("window_attend")


class WindowNet(nn.Module):
    """Swin in small (timm's and torchvision's): channels-last stages with window attention
    over a map padded at run time to whole windows, and patch merging (pad to even sizes, fold
    2x2 blocks into channels). ``wrapped``: the attention is one call fx does not enter."""

    def __init__(self, wrapped: bool = False) -> None:
        super().__init__()
        self.wrapped = wrapped
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = DynOPool(2.0)
        self.mix = nn.Parameter(torch.randn(8, 8) * 0.1)
        self.reduce = nn.Linear(32, 8)
        self.head = nn.Linear(8, 4)

    def attend(self, x: torch.Tensor, window: int = 3) -> torch.Tensor:
        if self.wrapped:
            return window_attend(x, self.mix, window)
        n, h, w, c = x.shape
        y = F.pad(x, (0, 0, 0, (window - w % window) % window, 0, (window - h % window) % window))
        hp, wp = y.shape[1], y.shape[2]
        t = y.view(n, hp // window, window, wp // window, window, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)
        t = (t @ t.transpose(1, 2)) @ t @ self.mix
        t = t.view(n, hp // window, wp // window, window, window, c).permute(0, 1, 3, 2, 4, 5).reshape(n, hp, wp, c)
        return x + t[:, :h, :w, :]

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        n, h, w, c = x.shape
        y = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        y = y.reshape(n, y.shape[1] // 2, 2, y.shape[2] // 2, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduce(y)

    def forward(self, x):
        y = self.attend(self.pool(self.stem(x)).permute(0, 2, 3, 1))
        return self.head(self.attend(self.merge(y)).mean((1, 2)))


class PooledKeys(nn.Module):
    """PVT's and Twins' attention in small: queries from a map, keys and values from the same
    map pooled by a second group (FLOPs follow both lengths), then plain self-attention.
    ``fixed_queries``: the map is not learned (Twins' first blocks): only the keys move, and
    they are pooled from the queries' tokens reshaped back into a map. ``sequence_pool``:
    Next-ViT's instead: the keys' tokens pooled as a sequence (``AvgPool1d(4)`` of the
    ``h*w`` tokens, then ``BatchNorm1d``), not as a map."""

    def __init__(self, fixed_queries: bool = False, sequence_pool: bool = False) -> None:
        super().__init__()
        self.fixed_queries = fixed_queries
        self.sequence = nn.Sequential(nn.AvgPool1d(4, 4), nn.BatchNorm1d(8)) if sequence_pool else None
        self.k = nn.Linear(8, 8)
        self.stem = nn.Conv2d(48 if fixed_queries else 3, 8, 1 if fixed_queries else 3, padding=0 if fixed_queries else 1)
        self.pool = nn.Identity() if fixed_queries else DynOPool(2.0)
        self.reduce = nn.Identity() if sequence_pool else DynOPool(2.0)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        if self.fixed_queries:  # a patch embedding the cost model follows by element count only
            x = F.pixel_unshuffle(x, 4)
        y = self.pool(self.stem(x))
        n, c, h, w = y.shape
        q = y.flatten(2).transpose(1, 2)
        if self.sequence is not None:
            kv = self.k(self.sequence(q.transpose(1, 2)).transpose(1, 2))
        else:
            kv = self.reduce(q.transpose(1, 2).reshape(n, c, h, w)).flatten(2).transpose(1, 2)
        t = F.scaled_dot_product_attention(q, kv, kv)
        t = F.scaled_dot_product_attention(t, t, t)
        return self.head(t.mean(1))


@register_notrace_module
class FuseToLargest(nn.Module):
    """MobileNetV5's multi-scale fusion in small, a leaf fx does not enter (its input sizes pick
    its branches): the smaller map resized to the first one's size, both concatenated, a 1x1
    conv at that size, then resized to a fixed output size. It cannot run when the second map
    is the larger."""

    def __init__(self, chans: int, out_size: int = 6) -> None:
        super().__init__()
        self.conv = nn.Conv2d(chans, 8, 1)
        self.out_size = out_size

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        high = inputs[0].shape[-2:]
        resized = [F.interpolate(x, size=high, mode="nearest") if x.shape[-2] < high[0] or x.shape[-1] < high[1] else x
                   for x in inputs]
        y = self.conv(torch.cat(resized, 1))
        if tuple(high) != (self.out_size, self.out_size):
            y = F.interpolate(y, size=(self.out_size, self.out_size), mode="bilinear")
        return y


class FusionNet(nn.Module):
    """Two learned maps (the second pooled from the first) fused by :class:`FuseToLargest`."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.pool1 = DynOPool(2.0)
        self.mid = nn.Conv2d(4, 4, 3, padding=1)
        self.pool2 = DynOPool(2.0)
        self.fuse = FuseToLargest(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        a = self.pool1(self.stem(x))
        b = self.pool2(self.mid(a))
        return self.head(self.fuse([a, b]).mean((2, 3)))


#: name -> builder of a converted stand-in (small variants, random weights)
MODELS = {
    "resnet18": lambda: dynopoolify(timm.create_model("resnet18", pretrained=False, num_classes=10)),
    "resnet50": lambda: dynopoolify(timm.create_model("resnet50", pretrained=False, num_classes=10)),
    "tv_densenet121": lambda: dynopoolify(torchvision.models.densenet121(weights=None, num_classes=10), depth=2),
    "efficientnet_b0": lambda: dynopoolify(timm.create_model("efficientnet_b0", pretrained=False, num_classes=10), depth=3),
    "tv_mobilenet_v3_small": lambda: dynopoolify(torchvision.models.mobilenet_v3_small(weights=None, num_classes=10), depth=3),
    "convnext_atto": lambda: dynopoolify(timm.create_model("convnext_atto", pretrained=False, num_classes=10)),
    "regnetx_002": lambda: dynopoolify(timm.create_model("regnetx_002", pretrained=False, num_classes=10)),
    "vgg_like": lambda: dynopoolify(vgg_like()),
    "two_branch": TwoBranch,
    "convmlp_head": ConvMlpHead,
    "stdconv_seg": StdConvSeg,
    "channels_last": ChannelsLastNet,
    "windows": WindowNet,
    "windows_wrapped": lambda: WindowNet(wrapped=True),
    "pooled_keys": PooledKeys,
    "pooled_keys_fixed": lambda: PooledKeys(fixed_queries=True),
    "pooled_keys_1d": lambda: PooledKeys(sequence_pool=True),
    "fusion": FusionNet,
    "shape_kernel_pool": ShapeKernelPool,
    "crop_even": CropEven,
    "shuffle": ShuffleNet,
}


def randomise_strides(model: nn.Module, rng: random.Random, lo: float = 0.7, hi: float = 3.5) -> None:
    """Set every group's (s_h, s_w) to random values in [lo, hi] (inside the default bounds)."""
    from dynopool_convert import scale_parameters

    with torch.no_grad():
        for p in scale_parameters(model):
            p.copy_(torch.tensor([rng.uniform(lo, hi), rng.uniform(lo, hi)]))


def finite_difference_signs(model: nn.Module, cost, input_size, eps: float = 1.3) -> list[tuple[float, int]]:
    """Per group: (the cost model's derivative, fvcore's central difference) along (s_h, s_w)
    scaled together."""
    from dynopool_convert.flops import count_flops

    value = cost()
    value.backward()
    out = []
    for p in cost.parameters:
        directional = float((p.grad * p.detach()).sum())  # gradient along s -> s (1 + t)
        base = p.detach().clone()
        with torch.no_grad():
            p.copy_(base * eps)
        up = count_flops(model, input_size)
        with torch.no_grad():
            p.copy_(base / eps)
        down = count_flops(model, input_size)
        with torch.no_grad():
            p.copy_(base)
        out.append((directional, up - down))
    return out


class FlattenOnly(nn.Module):
    """pytorch/examples' MNIST net in small: its only pool feeds a flatten into a Linear sized for
    its output, so the pool is pinned and nothing else resizes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.flatten(F.max_pool2d(torch.relu(self.conv(x)), 2), 1))


def flatten_only() -> nn.Module:
    return FlattenOnly()
