"""MobileNet v1 (Howard et al. 2017); CIFAR layout after kuangliu/pytorch-cifar."""
import torch
import torch.nn as nn

from .registry import register_model, scaled

# out_channels, stride of the depthwise conv; the 3x3 stem has 32 channels.
CFG = [
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
]


class Block(nn.Module):
    """Depthwise 3x3 + pointwise 1x1, each followed by BN and ReLU."""

    def __init__(self, in_planes, out_planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, in_planes, 3, stride, 1, groups=in_planes, bias=False)
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv2 = nn.Conv2d(in_planes, out_planes, 1, 1, 0, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(x)))


class MobileNet(nn.Module):
    def __init__(self, num_classes=10, width_mult=1.0, stem_stride=1):
        super().__init__()
        in_planes = scaled(32, width_mult, 8)
        self.conv1 = nn.Conv2d(3, in_planes, 3, stem_stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU(inplace=True)
        blocks = []
        for out, stride in CFG:
            out = scaled(out, width_mult, 8)
            blocks.append(Block(in_planes, out, stride))
            in_planes = out
        self.layers = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.avgpool(self.layers(x))
        return self.linear(torch.flatten(x, 1))


@register_model("mobilenet", depths={"cifar": (), "imagenet": ()})
def _build(family, layers, width_mult, bn, num_classes):
    # stem stride 2 -> 1 for 32x32 inputs (kuangliu); the final map is 2x2 on CIFAR, 7x7 on ImageNet
    return MobileNet(num_classes, width_mult, stem_stride=1 if family == "cifar" else 2)
