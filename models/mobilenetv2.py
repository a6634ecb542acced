"""MobileNetV2 (Sandler et al. 2018) with torchvision's layer names.

The CIFAR variant matches chenyaofo/pytorch-cifar-models (stem and second stage at
stride 1), so its released weights load by key without renames.
"""
import torch
import torch.nn as nn

from .registry import register_model

# t (expansion), c (output channels), n (repeats), s (stride of the first repeat)
CFG_IMAGENET = [
    [1, 16, 1, 1],
    [6, 24, 2, 2],
    [6, 32, 3, 2],
    [6, 64, 4, 2],
    [6, 96, 3, 1],
    [6, 160, 3, 2],
    [6, 320, 1, 1],
]
CFG_CIFAR = [row[:] for row in CFG_IMAGENET]
CFG_CIFAR[1][3] = 1  # stride 2 -> 1 for CIFAR (chenyaofo)


def make_divisible(v: float, divisor: int = 8) -> int:
    """Round channels to a multiple of 8, never more than 10% down (TF slim, torchvision)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class ConvBNReLU(nn.Sequential):
    def __init__(self, inp, oup, kernel_size=3, stride=1, groups=1):
        super().__init__(
            nn.Conv2d(inp, oup, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(oup),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    def __init__(self, inp, oup, stride, expand_ratio):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU(inp, hidden, kernel_size=1))
        layers += [
            ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes=1000, width_mult=1.0, cfg=CFG_IMAGENET, stem_stride=2):
        super().__init__()
        inp = make_divisible(32 * width_mult)
        self.last_channel = make_divisible(1280 * max(1.0, width_mult))
        features = [ConvBNReLU(3, inp, stride=stem_stride)]
        for t, c, n, s in cfg:
            oup = make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(inp, oup, s if i == 0 else 1, t))
                inp = oup
        features.append(ConvBNReLU(inp, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(self.last_channel, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


@register_model("mobilenetv2", depths={"cifar": (), "imagenet": ()})
def _build(family, layers, width_mult, bn, num_classes):
    if family == "cifar":
        return MobileNetV2(num_classes, width_mult, CFG_CIFAR, stem_stride=1)  # stride 2 -> 1 for CIFAR
    return MobileNetV2(num_classes, width_mult, CFG_IMAGENET, stem_stride=2)
