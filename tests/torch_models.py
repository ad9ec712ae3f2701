"""Standard CNN architectures written out with torch.nn pooling modules, for
fastpool.torch's conversion tests and timings: torchvision's ResNet-18, and
VGG-16-, DenseNet-121- and Inception-v3-style networks (torchvision 0.28 on PyPI
is built for CUDA torch and does not load against the CPU build of torch 2.13).

Every pooling layer is a module (torchvision writes some as functional calls,
which ``fastpool.torch.convert`` cannot see).  ``width`` scales the channels.
"""

import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


def resnet18(num_classes=10, width=64):
    """torchvision.models.resnet18's layout: stem, max pool 3/2/1, 4 stages of 2
    basic blocks, global average pooling."""
    widths = [width, 2 * width, 4 * width, 8 * width]
    layers, cin = [], width
    for i, w in enumerate(widths):
        layers.append(nn.Sequential(BasicBlock(cin, w, 1 if i == 0 else 2),
                                    BasicBlock(w, w, 1)))
        cin = w
    return nn.Sequential(
        nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1), *layers, nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(),
        nn.Linear(cin, num_classes))


def vgg16(num_classes=10, width=64):
    """VGG-16 (configuration D): 13 convolutions in 5 stages, each closed by a 2x2 max
    pool, then adaptive average pooling to 7x7 and the classifier."""
    config = [1, 1, "M", 2, 2, "M", 4, 4, 4, "M", 8, 8, 8, "M", 8, 8, 8, "M"]
    layers, cin = [], 3
    for item in config:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, item * width, 3, padding=1), nn.ReLU(inplace=True)]
            cin = item * width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d((7, 7)), nn.Flatten(),
                         nn.Linear(cin * 49, 4 * width), nn.ReLU(inplace=True),
                         nn.Linear(4 * width, num_classes))


class DenseLayer(nn.Module):
    def __init__(self, cin, growth):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.Conv2d(cin, 4 * growth, 1, bias=False),
            nn.BatchNorm2d(4 * growth), nn.ReLU(inplace=True),
            nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False))

    def forward(self, x):
        return torch.cat([x, self.body(x)], 1)


def densenet121(num_classes=10, growth=32, blocks=(6, 12, 24, 16)):
    """torchvision.models.densenet121's layout: stem with max pool 3/2/1, dense blocks
    joined by transitions (1x1 convolution, 2x2 average pool), global average pool."""
    cin = 2 * growth
    layers = [nn.Conv2d(3, cin, 7, 2, 3, bias=False), nn.BatchNorm2d(cin),
              nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
    for i, n in enumerate(blocks):
        for _ in range(n):
            layers.append(DenseLayer(cin, growth))
            cin += growth
        if i < len(blocks) - 1:
            layers += [nn.BatchNorm2d(cin), nn.ReLU(inplace=True),
                       nn.Conv2d(cin, cin // 2, 1, bias=False), nn.AvgPool2d(2, 2)]
            cin //= 2
    return nn.Sequential(*layers, nn.BatchNorm2d(cin), nn.ReLU(inplace=True),
                         nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(cin, num_classes))


def _conv(cin, cout, kernel, stride=1, padding=0):
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class InceptionA(nn.Module):
    """Inception-v3's Mixed_5b block: 1x1, 5x5, double 3x3 and average-pool branches."""

    def __init__(self, cin, pool_features, width=64):
        super().__init__()
        w = width
        self.branch1x1 = _conv(cin, w, 1)
        self.branch5x5 = nn.Sequential(_conv(cin, 3 * w // 4, 1),
                                       _conv(3 * w // 4, w, 5, padding=2))
        self.branch3x3dbl = nn.Sequential(_conv(cin, w, 1), _conv(w, 3 * w // 2, 3, padding=1),
                                          _conv(3 * w // 2, 3 * w // 2, 3, padding=1))
        self.branch_pool = nn.Sequential(nn.AvgPool2d(3, 1, 1), _conv(cin, pool_features, 1))

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5(x), self.branch3x3dbl(x),
                          self.branch_pool(x)], 1)


class InceptionB(nn.Module):
    """Inception-v3's Mixed_6a grid reduction: strided 3x3 convolutions and a 3/2 max pool."""

    def __init__(self, cin, width=64):
        super().__init__()
        self.branch3x3 = _conv(cin, 6 * width, 3, 2)
        self.branch3x3dbl = nn.Sequential(_conv(cin, width, 1),
                                          _conv(width, 3 * width // 2, 3, padding=1),
                                          _conv(3 * width // 2, 3 * width // 2, 3, 2))
        self.pool = nn.MaxPool2d(3, 2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl(x), self.pool(x)], 1)


def inception_block(num_classes=10, width=64):
    """Inception-v3's stem pooling (max pool 3/2) then Mixed_5b and Mixed_6a, global pool."""
    stem = 3 * width // 2
    cin_a = width + width + 3 * width // 2 + width // 2
    return nn.Sequential(
        _conv(3, stem, 3, padding=1), nn.MaxPool2d(3, 2), InceptionA(stem, width // 2, width),
        InceptionB(cin_a, width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(6 * width + 3 * width // 2 + cin_a, num_classes))
