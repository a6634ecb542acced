"""Wide residual networks (Zagoruyko & Komodakis 2016), ``-a wideresnet``.

    python main.py cifar10 -a wideresnet --layers 28 --width-mult 10     # WRN-28-10
    python main.py imagenet -a wideresnet --layers 50 --width-mult 2     # torchvision wide_resnet50_2

``--layers`` is the depth and ``--width-mult`` the widening factor k, as in the paper's
"WRN-depth-k"; the checkpoint's ``arch["width_mult"]`` holds k.

* CIFAR (32x32, also TinyImageNet's 64x64): depth 6n+4, pre-activation basic blocks
  (BN-ReLU-conv3x3, twice) with 16k, 32k, 64k channels after a 16-channel 3x3 stem, a 1x1
  shortcut where the shape changes, then BN-ReLU, global pooling and the classifier.
* ImageNet: torchvision's ``wide_resnet{50,101}_2``: a ResNet bottleneck whose inner
  3x3 width is ``64 * k`` per group (``width_per_group``), so k=2 loads its weights by key.
"""
import torch
import torch.nn as nn

from .registry import register_model, scaled
from .resnet import IMAGENET_DEPTHS, Bottleneck, ResNet

CIFAR_DEPTHS = (10, 16, 22, 28, 34, 40)  # 6n + 4, n = 1..6 blocks per stage
IMAGENET_WIDE_DEPTHS = tuple(d for d, (block, _) in IMAGENET_DEPTHS.items() if block is Bottleneck)


class WideBasic(nn.Module):
    """Pre-activation block; the shortcut sees the activated input when the shape changes."""

    def __init__(self, inplanes, planes, stride=1, dropout=0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut = None
        if stride != 1 or inplanes != planes:
            self.shortcut = nn.Conv2d(inplanes, planes, 1, stride, 0, bias=False)

    def forward(self, x):
        o = self.relu(self.bn1(x))
        identity = x if self.shortcut is None else self.shortcut(o)
        out = self.conv1(o)
        out = self.conv2(self.dropout(self.relu(self.bn2(out))))
        return out + identity


class WideResNet(nn.Module):
    def __init__(self, depth, k, num_classes, dropout=0.0):
        super().__init__()
        n = (depth - 4) // 6
        widths = [scaled(c, k) for c in (16, 32, 64)]
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)  # the stem stays 16 wide (paper, table 1)
        inplanes = 16
        for i, w in enumerate(widths):
            blocks = []
            for j in range(n):
                blocks.append(WideBasic(inplanes, w, stride=2 if i > 0 and j == 0 else 1, dropout=dropout))
                inplanes = w
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.bn1 = nn.BatchNorm2d(inplanes)  # the last blocks are pre-activation: normalize once more
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = self.avgpool(self.relu(self.bn1(x)))
        return self.fc(torch.flatten(x, 1))


@register_model("wideresnet", depths={"cifar": CIFAR_DEPTHS, "imagenet": IMAGENET_WIDE_DEPTHS},
                default_depth={"cifar": 28, "imagenet": 50})
def _build(family, layers, width_mult, bn, num_classes):
    if family == "cifar":
        return WideResNet(layers, width_mult, num_classes)
    _, blocks = IMAGENET_DEPTHS[layers]
    # torchvision's wide_resnet50_2 is resnet50 with width_per_group = 64 * 2
    return ResNet(Bottleneck, blocks, [64, 128, 256, 512], num_classes, imagenet_stem=True,
                  base_width=int(round(64 * width_mult)))
