"""Pyramid vision transformers as research code writes them (PVT v1, Twins-SVT): each stage's
patch embedding returns its tokens with ``(H // p, W // p)`` of the image it was given, and
the blocks take those sizes to reshape tokens into a map (spatial-reduction attention, a
conv position encoding, windows padded to whole windows). Written for these benchmarks,
small: three stages on 32x32 inputs, 10 classes."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchEmbed(nn.Module):
    def __init__(self, cin: int, dim: int, patch: int) -> None:
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(cin, dim, patch, stride=patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        _, _, h, w = x.shape
        x = self.norm(self.proj(x).flatten(2).transpose(1, 2))
        return x, (h // self.patch, w // self.patch)


class SRAttention(nn.Module):
    """Keys and values from the map shrunk by a strided conv (PVT's spatial reduction)."""

    def __init__(self, dim: int, heads: int, sr: int) -> None:
        super().__init__()
        self.heads, self.sr_ratio = heads, sr
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        if sr > 1:
            self.sr, self.norm = nn.Conv2d(dim, dim, sr, stride=sr), nn.LayerNorm(dim)

    def forward(self, x, h, w):
        b, n, c = x.shape
        q = self.q(x).reshape(b, n, self.heads, c // self.heads).transpose(1, 2)
        if self.sr_ratio > 1:
            x = self.norm(self.sr(x.transpose(1, 2).reshape(b, c, h, w)).reshape(b, c, -1).transpose(1, 2))
        k, v = self.kv(x).reshape(b, -1, 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class WindowAttention(nn.Module):
    """Attention inside windows of ``ws x ws`` tokens, the map padded to whole windows."""

    def __init__(self, dim: int, heads: int, ws: int) -> None:
        super().__init__()
        self.heads, self.ws = heads, ws
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x, h, w):
        b, n, c = x.shape
        ws = self.ws
        x = x.view(b, h, w, c)
        pad_b, pad_r = (ws - h % ws) % ws, (ws - w % ws) % ws
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = x.shape[1], x.shape[2]
        x = x.reshape(b, hp // ws, ws, wp // ws, ws, c).transpose(2, 3).reshape(-1, ws * ws, c)
        q, k, v = self.qkv(x).reshape(-1, ws * ws, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(-1)
        x = (attn @ v).transpose(1, 2).reshape(b, hp // ws, wp // ws, ws, ws, c).transpose(2, 3)
        x = x.reshape(b, hp, wp, c)[:, :h, :w].reshape(b, n, c)
        return self.proj(x)


class Block(nn.Module):
    def __init__(self, dim: int, attn: nn.Module) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), attn
        self.norm2, self.mlp = nn.LayerNorm(dim), nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, h, w):
        x = x + self.attn(self.norm1(x), h, w)
        return x + self.mlp(self.norm2(x))


class PosConv(nn.Module):
    """Twins' position encoding: a depthwise conv over the tokens as a map."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x, h, w):
        b, n, c = x.shape
        grid = x.transpose(1, 2).view(b, c, h, w)
        return x + self.proj(grid).flatten(2).transpose(1, 2)


class PVT(nn.Module):
    """PVT v1: position tables per stage (at 32x32: grids of 8x8, 4x4, 2x2), spatial reduction."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, dims=(32, 64, 128), srs=(4, 2, 1)) -> None:
        super().__init__()
        cins, patches, grids = (in_chans, *dims[:-1]), (4, 2, 2), (8, 4, 2)
        self.embeds = nn.ModuleList(PatchEmbed(ci, d, p) for ci, d, p in zip(cins, dims, patches))
        self.pos = nn.ParameterList(nn.Parameter(torch.randn(1, g * g, d) * 0.02) for g, d in zip(grids, dims))
        self.blocks = nn.ModuleList(Block(d, SRAttention(d, 2, sr)) for d, sr in zip(dims, srs))
        self.norm, self.head = nn.LayerNorm(dims[-1]), nn.Linear(dims[-1], num_classes)

    def forward(self, x):
        b = x.shape[0]
        for i, (embed, block) in enumerate(zip(self.embeds, self.blocks)):
            x, (h, w) = embed(x)
            x = block(x + self.pos[i], h, w)
            if i < len(self.blocks) - 1:
                x = x.reshape(b, h, w, -1).permute(0, 3, 1, 2)
        return self.head(self.norm(x).mean(1))


class TwinsSVT(nn.Module):
    """Twins-SVT: windowed attention then spatial reduction in each stage, a conv position
    encoding after the first block."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, dims=(32, 64, 128), srs=(4, 2, 1)) -> None:
        super().__init__()
        cins, patches = (in_chans, *dims[:-1]), (4, 2, 2)
        self.embeds = nn.ModuleList(PatchEmbed(ci, d, p) for ci, d, p in zip(cins, dims, patches))
        self.local = nn.ModuleList(Block(d, WindowAttention(d, 2, 3)) for d in dims)
        self.posconv = nn.ModuleList(PosConv(d) for d in dims)
        self.glob = nn.ModuleList(Block(d, SRAttention(d, 2, sr)) for d, sr in zip(dims, srs))
        self.norm, self.head = nn.LayerNorm(dims[-1]), nn.Linear(dims[-1], num_classes)

    def forward(self, x):
        b = x.shape[0]
        for i in range(len(self.embeds)):
            x, size = self.embeds[i](x)
            x = self.posconv[i](self.local[i](x, *size), *size)
            x = self.glob[i](x, *size)
            if i < len(self.embeds) - 1:
                x = x.reshape(b, *size, -1).permute(0, 3, 1, 2).contiguous()
        return self.head(self.norm(x).mean(1))


class PaddedPatchEmbed(PatchEmbed):
    """The Swin paper code's patch embedding: pads the image to whole patches first."""

    def forward(self, x):
        _, _, h, w = x.size()
        if w % self.patch != 0:
            x = F.pad(x, (0, self.patch - w % self.patch))
        if h % self.patch != 0:
            x = F.pad(x, (0, 0, 0, self.patch - h % self.patch))
        return super().forward(x)


class PVTv1Code(PVT):
    """PVT v1 as its code runs: a stage's position table is interpolated to the grid in the
    model's own forward unless the grid is the one it was made for (``if H * W == ...``), the
    patch embeddings pad to whole patches. fx cannot trace either branch; dynopool takes them
    as at the reference size (a note per branch)."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3) -> None:
        super().__init__(num_classes, in_chans)
        self.embeds[0] = PaddedPatchEmbed(in_chans, 32, 4)
        self.grids = (8, 4, 2)

    def _pos(self, i, h, w):
        g = self.grids[i]
        if h * w == g * g:
            return self.pos[i]
        table = self.pos[i].reshape(1, g, g, -1).permute(0, 3, 1, 2)
        return F.interpolate(table, size=(h, w), mode="bilinear").flatten(2).transpose(1, 2)

    def forward(self, x):
        b = x.shape[0]
        for i, (embed, block) in enumerate(zip(self.embeds, self.blocks)):
            x, (h, w) = embed(x)
            x = block(x + self._pos(i, h, w), h, w)
            if i < len(self.blocks) - 1:
                x = x.reshape(b, h, w, -1).permute(0, 3, 1, 2)
        return self.head(self.norm(x).mean(1))
