"""VGG (Simonyan & Zisserman 2015) with torchvision's layer names.

The CIFAR head (512-512-classes, no 7x7 pooling) matches chenyaofo/pytorch-cifar-models'
vgg*_bn; the ImageNet variant matches torchvision.models.vgg*.
"""
import torch
import torch.nn as nn

from .registry import register_model, scaled

# conv output channels; "M" is a 2x2 max-pool
CFGS = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
         512, 512, 512, 512, "M"],
}


def make_features(cfg, bn, width_mult):
    layers, in_ch = [], 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
            continue
        v = scaled(v, width_mult)
        layers.append(nn.Conv2d(in_ch, v, 3, padding=1))
        if bn:
            layers.append(nn.BatchNorm2d(v))
        layers.append(nn.ReLU(inplace=True))
        in_ch = v
    return nn.Sequential(*layers), in_ch


class VGG(nn.Module):
    def __init__(self, cfg, bn, num_classes, width_mult, imagenet):
        super().__init__()
        self.features, ch = make_features(cfg, bn, width_mult)
        if imagenet:
            hidden = scaled(4096, width_mult)
            self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
            in_fc = ch * 7 * 7
        else:  # chenyaofo's head; 32x32 inputs end as a 1x1 map, larger ones (64x64) are pooled to it
            hidden = ch
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            in_fc = ch
        self.classifier = nn.Sequential(
            nn.Linear(in_fc, hidden), nn.ReLU(True), nn.Dropout(),
            nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(),
            nn.Linear(hidden, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


@register_model("vgg", depths={"cifar": tuple(CFGS), "imagenet": tuple(CFGS)}, uses_bn_flag=True,
                default_depth={"cifar": 16, "imagenet": 16})
def _build(family, layers, width_mult, bn, num_classes):
    return VGG(CFGS[layers], bn, num_classes, width_mult, imagenet=family == "imagenet")
