"""ResNet (He et al. 2016) with torchvision's layer names.

    python main.py cifar10 -a resnet --layers 56      # 1x1-conv+BN shortcuts (option B)
    python main.py cifar10 -a resnet_a --layers 20    # the paper's parameter-free shortcuts (option A)

``resnet``: CIFAR depths (6n+2, basic blocks, 16-32-64 channels, 1x1-conv+BN shortcut) match
chenyaofo/pytorch-cifar-models; ImageNet depths match torchvision.models.resnet*.
``resnet_a``: the CIFAR network of the paper's section 4.2 (option A: where the shape changes
the identity is subsampled and zero-padded), as akamaster/pytorch_resnet_cifar10 trains it;
CIFAR family only. Same layer names as ``resnet`` (its shortcuts hold no tensors).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import register_model, scaled


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, base_width=64):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision's v1.5 bottleneck: the stride sits on the 3x3 conv."""
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, base_width=64):
        super().__init__()
        width = int(planes * (base_width / 64.0))
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def conv_shortcut(inplanes, planes, stride):
    """Option B (torchvision, chenyaofo): a strided 1x1 conv and BN."""
    return nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))


class PadShortcut(nn.Module):
    """Option A: the identity subsampled by ``stride`` and zero-padded on channels, half each side.

    For the paper's doubling widths that is akamaster's ``LambdaLayer`` exactly,
    ``F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4))``; the split
    below also fits a --width-mult whose rounding breaks the doubling. No tensors.
    """

    def __init__(self, inplanes, planes, stride):
        super().__init__()
        self.stride = stride
        self.lo = (planes - inplanes) // 2
        self.hi = planes - inplanes - self.lo

    def forward(self, x):
        s = self.stride
        return F.pad(x[:, :, ::s, ::s], (0, 0, 0, 0, self.lo, self.hi), "constant", 0.0)

    def extra_repr(self):
        return f"stride={self.stride}, pad=({self.lo}, {self.hi})"


class MapAvgPool(nn.Module):
    """Global average pooling as akamaster computes it, ``F.avg_pool2d`` over the whole map:
    their logits bit for bit (``AdaptiveAvgPool2d(1)`` sums in another order, ~1e-6 apart)."""

    def forward(self, x):
        return F.avg_pool2d(x, x.shape[2:])


class ResNet(nn.Module):
    def __init__(self, block, blocks, planes, num_classes, imagenet_stem, base_width=64,
                 shortcut=conv_shortcut, pool=None):
        super().__init__()
        self.inplanes = planes[0]
        self.base_width = base_width
        if imagenet_stem:
            self.conv1 = nn.Conv2d(3, self.inplanes, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        else:  # 3x3 stem, no max-pool for 32x32 inputs
            self.conv1 = nn.Conv2d(3, self.inplanes, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        for i, (n, p) in enumerate(zip(blocks, planes)):
            setattr(self, f"layer{i + 1}", self._make_layer(block, p, n, 1 if i == 0 else 2, shortcut))
        self.num_stages = len(blocks)
        self.avgpool = pool or nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes[-1] * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, block, planes, n, stride, shortcut):
        """``shortcut(inplanes, planes, stride)``: the first block's shortcut where the shape changes."""
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = shortcut(self.inplanes, planes * block.expansion, stride)
        layers = [block(self.inplanes, planes, stride, downsample, self.base_width)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, base_width=self.base_width) for _ in range(1, n)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


# depth -> (block, blocks per stage)
IMAGENET_DEPTHS = {
    18: (BasicBlock, [2, 2, 2, 2]),
    34: (BasicBlock, [3, 4, 6, 3]),
    50: (Bottleneck, [3, 4, 6, 3]),
    101: (Bottleneck, [3, 4, 23, 3]),
    152: (Bottleneck, [3, 8, 36, 3]),
}
CIFAR_DEPTHS = (20, 32, 44, 56, 110)  # 6n + 2 with n = 3, 5, 7, 9, 18


@register_model("resnet", depths={"cifar": CIFAR_DEPTHS, "imagenet": tuple(IMAGENET_DEPTHS)},
                default_depth={"cifar": 20, "imagenet": 18})
def _build(family, layers, width_mult, bn, num_classes):
    if family == "cifar":
        n = (layers - 2) // 6
        planes = [scaled(c, width_mult) for c in (16, 32, 64)]
        return ResNet(BasicBlock, [n] * 3, planes, num_classes, imagenet_stem=False)
    block, blocks = IMAGENET_DEPTHS[layers]
    planes = [scaled(c, width_mult) for c in (64, 128, 256, 512)]
    return ResNet(block, blocks, planes, num_classes, imagenet_stem=True)


# resnet_a depths: 6n + 2 with n = 3, 5, 7, 9, 18, 200 (the paper's table 6, ResNet-1202 included)
CIFAR_A_DEPTHS = (20, 32, 44, 56, 110, 1202)
# akamaster's trainer.py normalises CIFAR-10 with ImageNet's mean / std, not CIFAR-10's: its
# weights expect that, and data.py feeds every resnet_a run so (models.input_stats)
AKAMASTER_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@register_model("resnet_a", depths={"cifar": CIFAR_A_DEPTHS}, input_stats=AKAMASTER_STATS,
                default_depth={"cifar": 20})
def _build_a(family, layers, width_mult, bn, num_classes):
    n = (layers - 2) // 6
    planes = [scaled(c, width_mult) for c in (16, 32, 64)]
    model = ResNet(BasicBlock, [n] * 3, planes, num_classes, imagenet_stem=False, shortcut=PadShortcut,
                   pool=MapAvgPool())
    # akamaster's _weights_init: kaiming_normal_ (fan_in) on every conv and linear weight, so that
    # training from scratch follows the recipe behind the published weights
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight)
    return model
