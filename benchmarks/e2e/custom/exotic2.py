# Hand-written test models for benchmarks/e2e/custom/run_all.sh.
import torch, torch.nn as nn, torch.nn.functional as F


class Base(nn.Module):
    """conv, ``down`` (the op under test), conv, ``pool``, conv, global mean, linear."""

    def __init__(self, num_classes=10, in_chans=3):
        super().__init__()
        self.c1 = nn.Conv2d(in_chans, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1)
        self.c3 = nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32, num_classes)

    def down(self, x):
        raise NotImplementedError

    def pool(self, x):
        return F.max_pool2d(x, 2)

    def head(self, x):
        return self.fc(x.mean((2, 3)))

    def forward(self, x):
        x = F.relu(self.c2(self.down(F.relu(self.c1(x)))))
        return self.head(F.relu(self.c3(self.pool(x))))


class DynSizeInterp(Base):
    def down(self, x):
        return F.interpolate(x, size=(x.shape[2] // 2, x.shape[3] // 2), mode='bilinear', align_corners=False)


class DynAdaptive(Base):
    def down(self, x):
        return F.adaptive_avg_pool2d(x, (x.shape[2] // 2, x.shape[3] // 2))

    def pool(self, x):
        return F.avg_pool2d(x, 2)


class SliceSub(Base):
    def down(self, x):
        return x[:, :, ::2, ::2]


class ReshapePool(Base):
    def down(self, x):
        b, c, h, w = x.shape
        return x.view(b, c, h // 2, 2, w // 2, 2).mean((3, 5))


class ShuffleUp(Base):
    def __init__(self, num_classes=10, in_chans=3):
        super().__init__(num_classes, in_chans)
        self.c2 = nn.Conv2d(16, 128, 3, stride=2, padding=1)
        self.ps = nn.PixelShuffle(2)
    def forward(self, x):
        x = F.relu(self.c1(x))
        x = self.ps(F.relu(self.c2(x)))  # 128 -> 32 channels, back to full size
        x = F.max_pool2d(x, 2)
        return self.head(F.relu(self.c3(x)))


class PatchViT(nn.Module):
    """patchify by reshape (no strided conv), learned pos embedding sized for the grid"""
    def __init__(self, num_classes=10, in_chans=3, img=32, p=4, dim=32):
        super().__init__()
        self.p = p
        self.proj = nn.Linear(p * p * in_chans, dim)
        self.pos = nn.Parameter(torch.zeros(1, (img // p) ** 2, dim))
        self.block = nn.TransformerEncoderLayer(dim, 2, 64, batch_first=True)
        self.fc = nn.Linear(dim, num_classes)
    def forward(self, x):
        b, c, h, w = x.shape
        p = self.p
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)
        x = self.proj(x) + self.pos
        return self.fc(self.block(x).mean(1))


class SpaceToDepth(nn.Module):
    """Downsampling by space to depth only: ``nn.PixelUnshuffle(2)``, then TResNet's
    ``view``/``permute`` form of it (no strided conv or pool anywhere)."""
    def __init__(self, num_classes=10, in_chans=3):
        super().__init__()
        self.c1 = nn.Conv2d(in_chans, 8, 3, padding=1)
        self.s2d = nn.PixelUnshuffle(2)
        self.c2 = nn.Conv2d(32, 16, 3, padding=1)
        self.c3 = nn.Conv2d(64, 32, 3, padding=1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = F.relu(self.c2(self.s2d(F.relu(self.c1(x)))))
        n, c, h, w = x.size()
        x = x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 3, 5, 1, 2, 4).reshape(n, c * 4, h // 2, w // 2)
        return self.fc(F.relu(self.c3(x)).mean((2, 3)))


class Focus(nn.Module):
    """YOLOv5's Focus stem (the image's four quarters as channels), then strided convs."""
    def __init__(self, num_classes=10, in_chans=3):
        super().__init__()
        self.c1 = nn.Conv2d(4 * in_chans, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = torch.cat([x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]], 1)
        return self.fc(F.relu(self.c2(F.relu(self.c1(x)))).mean((2, 3)))
