"""More models as in kuangliu/pytorch-cifar (written from its layout; GoogLeNet's widths divided
by ``w`` to keep the CPU runs short). Patterns: one MaxPool2d module called twice (GoogLeNet), a
kernel-size-8 stride-1 global pool, an SE gate pooled with ``F.avg_pool2d(out, out.size(2))``
(kernel read off the height), a residual add behind ``if self.stride == 1``, pre-activation
shortcuts, DLA's trees of concatenations."""
import torch, torch.nn as nn, torch.nn.functional as F

from kuangliu import BasicBlock  # DLA's block is the ResNet one


def _cbr(cin, cout, k=1, s=1, p=0, groups=1):
    return [nn.Conv2d(cin, cout, k, s, p, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True)]


class Inception(nn.Module):
    def __init__(self, cin, n1, n3r, n3, n5r, n5, pp):
        super().__init__()
        self.b1 = nn.Sequential(*_cbr(cin, n1))
        self.b2 = nn.Sequential(*_cbr(cin, n3r), *_cbr(n3r, n3, 3, 1, 1))
        self.b3 = nn.Sequential(*_cbr(cin, n5r), *_cbr(n5r, n5, 3, 1, 1), *_cbr(n5, n5, 3, 1, 1))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), *_cbr(cin, pp))

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


class GoogLeNet(nn.Module):
    def __init__(self, num_classes=10, w=4):
        super().__init__()
        c = lambda *v: [max(1, i // w) for i in v]
        self.pre_layers = nn.Sequential(*_cbr(3, 192 // w, 3, 1, 1))
        self.a3 = Inception(*c(192, 64, 96, 128, 16, 32, 32))
        self.b3 = Inception(*c(256, 128, 128, 192, 32, 96, 64))
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.a4 = Inception(*c(480, 192, 96, 208, 16, 48, 64))
        self.b4 = Inception(*c(512, 160, 112, 224, 24, 64, 64))
        self.e4 = Inception(*c(512, 256, 160, 320, 32, 128, 128))
        self.a5 = Inception(*c(832, 256, 160, 320, 32, 128, 128))
        self.b5 = Inception(*c(832, 384, 192, 384, 48, 128, 128))
        self.avgpool = nn.AvgPool2d(8, stride=1)
        self.linear = nn.Linear(1024 // w, num_classes)

    def forward(self, x):
        out = self.b3(self.a3(self.pre_layers(x)))
        out = self.maxpool(out)  # the same module, twice
        out = self.e4(self.b4(self.a4(out)))
        out = self.maxpool(out)
        out = self.avgpool(self.b5(self.a5(out)))
        return self.linear(out.view(out.size(0), -1))


class MBlock(nn.Module):
    def __init__(self, cin, cout, expansion, stride):
        super().__init__()
        self.stride = stride
        planes = expansion * cin
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, groups=planes, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride == 1 and cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = out + self.shortcut(x) if self.stride == 1 else out
        return out


class MobileNetV2(nn.Module):
    cfg = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        layers, cin = [], 32
        for expansion, cout, n, stride in self.cfg:
            for s in [stride] + [1] * (n - 1):
                layers.append(MBlock(cin, cout, expansion, s))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.conv2 = nn.Conv2d(320, 1280, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(1280)
        self.linear = nn.Linear(1280, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = F.relu(self.bn2(self.conv2(out)))
        out = F.avg_pool2d(out, 4)
        return self.linear(out.view(out.size(0), -1))


class PreActBlock(nn.Module):
    def __init__(self, cin, planes, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        if stride != 1 or cin != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        out += shortcut
        return out


class SEBlock(nn.Module):
    def __init__(self, cin, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        self.fc1 = nn.Conv2d(planes, planes // 16, 1)
        self.fc2 = nn.Conv2d(planes // 16, planes, 1)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        w = F.avg_pool2d(out, out.size(2))  # the kernel read off the height
        w = torch.sigmoid(self.fc2(F.relu(self.fc1(w))))
        out = out * w
        out += self.shortcut(x)
        return F.relu(out)


class CifarResNet(nn.Module):
    def __init__(self, block, num_blocks=(2, 2, 2, 2), num_classes=10, pre_bn=True):
        super().__init__()
        self.cin = 64
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64) if pre_bn else nn.Identity()
        self.layers = nn.Sequential(*[self._layer(block, p, n, s) for p, n, s in zip((64, 128, 256, 512), num_blocks, (1, 2, 2, 2))])
        self.linear = nn.Linear(512, num_classes)

    def _layer(self, block, planes, n, stride):
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(block(self.cin, planes, s))
            self.cin = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = F.avg_pool2d(out, 4)
        return self.linear(out.view(out.size(0), -1))


def PreActResNet18(num_classes=10):
    return CifarResNet(PreActBlock, num_classes=num_classes, pre_bn=False)


def SENet18(num_classes=10):
    return CifarResNet(SEBlock, num_classes=num_classes)


class VGG(nn.Module):
    def __init__(self, cfg=(64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"), num_classes=10):
        super().__init__()
        layers, cin = [], 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                cin = v
        layers.append(nn.AvgPool2d(kernel_size=1, stride=1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x):
        out = self.features(x)
        return self.classifier(out.view(out.size(0), -1))


class Root(nn.Module):
    def __init__(self, cin, cout, k=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, 1, (k - 1) // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, xs):
        return F.relu(self.bn(self.conv(torch.cat(xs, 1))))


class Tree(nn.Module):
    def __init__(self, block, cin, cout, level=1, stride=1):
        super().__init__()
        self.root = Root(2 * cout, cout)
        if level == 1:
            self.left_tree = block(cin, cout, stride)
            self.right_tree = block(cout, cout, 1)
        else:
            self.left_tree = Tree(block, cin, cout, level - 1, stride)
            self.right_tree = Tree(block, cout, cout, level - 1, 1)

    def forward(self, x):
        out1 = self.left_tree(x)
        out2 = self.right_tree(out1)
        return self.root([out1, out2])


class SimpleDLA(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.base = nn.Sequential(*_cbr(3, 16, 3, 1, 1))
        self.layer1 = nn.Sequential(*_cbr(16, 16, 3, 1, 1))
        self.layer2 = nn.Sequential(*_cbr(16, 32, 3, 1, 1))
        self.layer3 = Tree(BasicBlock, 32, 64, level=1, stride=1)
        self.layer4 = Tree(BasicBlock, 64, 128, level=2, stride=2)
        self.layer5 = Tree(BasicBlock, 128, 256, level=2, stride=2)
        self.layer6 = Tree(BasicBlock, 256, 512, level=1, stride=2)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x):
        out = self.base(x)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4, self.layer5, self.layer6):
            out = layer(out)
        out = F.avg_pool2d(out, 4)
        return self.linear(out.view(out.size(0), -1))
