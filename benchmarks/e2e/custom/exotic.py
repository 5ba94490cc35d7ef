# Hand-written test models for benchmarks/e2e/custom/run_all.sh.
import torch, torch.nn as nn, torch.nn.functional as F


class BlurPool(nn.Module):
    """antialiased-cnns style: reflect pad + fixed depthwise blur at stride 2."""
    def __init__(self, c):
        super().__init__()
        a = torch.tensor([1., 2., 1.])
        f = (a[:, None] * a[None, :]); f = f / f.sum()
        self.register_buffer('filt', f[None, None].repeat(c, 1, 1, 1))
        self.c = c
    def forward(self, x):
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode='reflect'), self.filt, stride=2, groups=self.c)


class Blur(nn.Module):
    def __init__(self, num_classes=10, in_chans=3):
        super().__init__()
        self.c1 = nn.Conv2d(in_chans, 16, 3, padding=1)
        self.p1 = nn.Sequential(nn.MaxPool2d(2, 1), BlurPool(16))
        self.c2 = nn.Conv2d(16, 32, 3, padding=1)
        self.p2 = BlurPool(32)
        self.fc = nn.Linear(32, num_classes)
    def forward(self, x):
        x = self.p1(F.relu(self.c1(x)))
        x = self.p2(F.relu(self.c2(x)))
        return self.fc(x.mean((2, 3)))


class Unshuffle(nn.Module):
    def __init__(self, num_classes=10, in_chans=3):
        super().__init__()
        self.c1 = nn.Conv2d(in_chans, 8, 3, stride=2, padding=1)
        self.ps = nn.PixelUnshuffle(2)
        self.c2 = nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32, num_classes)
    def forward(self, x):
        x = self.ps(F.relu(self.c1(x)))
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.c2(x)), 1).flatten(1))


class Odd(nn.Module):
    """LPPool, asymmetric strides, dilation, circular padding, ResNet-D shortcut, SE."""
    def __init__(self, num_classes=10, in_chans=3):
        super().__init__()
        self.stem = nn.Conv2d(in_chans, 16, (3, 1), stride=(2, 1), padding=(1, 0))
        self.lp = nn.LPPool2d(2, 2)
        self.dil = nn.Conv2d(16, 16, 3, stride=2, padding=2, dilation=2, padding_mode='circular')
        self.short = nn.Sequential(nn.AvgPool2d(2, ceil_mode=True, count_include_pad=False), nn.Conv2d(16, 32, 1))
        self.main = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1, groups=16), nn.BatchNorm2d(32))
        self.se = nn.Sequential(nn.Conv2d(32, 8, 1), nn.ReLU(), nn.Conv2d(8, 32, 1), nn.Sigmoid())
        self.fc = nn.Linear(32, num_classes)
    def forward(self, x):
        x = self.lp(F.relu(self.stem(x)))
        x = F.relu(self.dil(x))
        y = self.main(x) + self.short(x)
        y = y * self.se(y.mean((2, 3), keepdim=True))
        return self.fc(torch.flatten(F.adaptive_max_pool2d(y, 1), 1))


class Hourglass(nn.Module):
    """interpolate down by a factor, up by nn.Upsample, skip add."""
    def __init__(self, num_classes=10, in_chans=3):
        super().__init__()
        self.c1 = nn.Conv2d(in_chans, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2, mode='nearest')
        self.c3 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, num_classes)
    def forward(self, x):
        a = F.relu(self.c1(x))
        b = F.interpolate(a, scale_factor=0.5, mode='bilinear', align_corners=False)
        b = F.relu(self.c2(b))
        c = self.up(b) + a
        c = F.max_pool2d(F.relu(self.c3(c)), kernel_size=3, stride=2, padding=1)
        return self.fc(F.avg_pool2d(c, c.shape[2:]).flatten(1))


class TupleOut(nn.Module):
    def __init__(self, num_classes=10, in_chans=3):
        super().__init__()
        self.c1 = nn.Conv2d(in_chans, 16, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.fc = nn.Linear(32, num_classes)
    def forward(self, x):
        f = F.relu(self.c2(F.relu(self.c1(x))))
        return self.fc(f.mean((2, 3))), f


class DictOut(TupleOut):
    def forward(self, x):
        logits, f = super().forward(x)
        return {'logits': logits, 'features': f}


class Gray(TupleOut):
    def __init__(self, num_classes=10, in_chans=1):
        super().__init__(num_classes, in_chans)
    def forward(self, x):
        return super().forward(x)[0]


class Unpool(nn.Module):
    def __init__(self, num_classes=10, in_chans=3):
        super().__init__()
        self.c1 = nn.Conv2d(in_chans, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2, return_indices=True)
        self.unpool = nn.MaxUnpool2d(2)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, num_classes)
    def forward(self, x):
        y, i = self.pool(F.relu(self.c1(x)))
        y = self.unpool(y, i)
        return self.fc(F.relu(self.c2(y)).mean((2, 3)))


class FracPool(nn.Module):
    def __init__(self, num_classes=10, in_chans=3):
        super().__init__()
        self.c1 = nn.Conv2d(in_chans, 8, 3, padding=1)
        self.fp = nn.FractionalMaxPool2d(2, output_ratio=0.7)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, num_classes)
    def forward(self, x):
        return self.fc(F.relu(self.c2(self.fp(F.relu(self.c1(x))))).mean((2, 3)))
