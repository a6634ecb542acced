"""pretrained.py's conversion (behind torchvision_to_ours.py and down_ckpt.py): every published
layout converts into a model with identical logits.

Random weights are enough: a wrong rename, a transposed tensor or a missing BN statistic
changes the logits. BN running statistics are randomized too, so that they count.
"""
import pytest
import torch
import torch.nn as nn
import torchvision
from conftest import assert_user_error

import models
import pretrained
import torchvision_to_ours as t2o
import utils

pytestmark = pytest.mark.usefixtures("one_thread")


def randomize(model: nn.Module, seed=0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


def uninitialized(build, *args, **kwargs) -> nn.Module:
    """``build(...)`` without its weight init (seconds for a VGG's 120M-weight head): every
    tensor is overwritten before use, by ``random_weights`` or by the conversion."""
    with torch.device("meta"):
        model = build(*args, **kwargs)
    return model.to_empty(device="cpu")


def random_weights(model: nn.Module, seed=0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            bound = (3 / p[0].numel()) ** 0.5 if p.dim() > 1 else 0.1  # unit-variance outputs
            p.uniform_(-bound, bound, generator=g)
        for b in model.buffers():
            b.zero_()
    return randomize(model, seed)


def converted(theirs: nn.Module, src: pretrained.Source) -> nn.Module:
    ours = uninitialized(models.build_model, src.arch, src.dataset, src.layers, src.width_mult, src.bn)
    pretrained.convert_state_dict(theirs.state_dict(), ours, src.layout, src.file)
    return ours.eval()


def same_logits(theirs, ours, size):
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = theirs(x), ours(x)
    assert torch.isfinite(a).all() and a.std() > 0  # logits that can tell two networks apart
    assert torch.equal(a, b), (a - b).abs().max()


# ---------------------------------------------------------------- torchvision (ImageNet)

TORCHVISION_BUILDERS = {  # model name in our table -> torchvision builder
    "resnet18": "resnet18", "resnet34": "resnet34", "resnet50": "resnet50", "resnet101": "resnet101",
    "resnet152": "resnet152", "vgg11": "vgg11", "vgg11_bn": "vgg11_bn", "vgg13": "vgg13",
    "vgg13_bn": "vgg13_bn", "vgg16": "vgg16", "vgg16_bn": "vgg16_bn", "vgg19": "vgg19",
    "vgg19_bn": "vgg19_bn", "mobilenetv2": "mobilenet_v2", "wideresnet50_w2": "wide_resnet50_2",
    "wideresnet101_w2": "wide_resnet101_2",
}
TV_SOURCES = [s for s in pretrained.SOURCES.values() if s.layout == "torchvision"]


def test_every_torchvision_file_has_a_builder_here():
    assert sorted(TORCHVISION_BUILDERS) == sorted(s.name for s in TV_SOURCES)
    for s in TV_SOURCES:  # the file names are torchvision's own
        weights = torchvision.models.get_model_weights(TORCHVISION_BUILDERS[s.name]).IMAGENET1K_V1
        assert weights.url == s.url
        assert weights.meta["_metrics"]["ImageNet-1K"]["acc@1"] == pytest.approx(s.acc1)


@pytest.mark.parametrize("src", TV_SOURCES, ids=lambda s: s.name)
def test_torchvision_weights_give_identical_logits(src):
    torch.manual_seed(0)
    theirs = random_weights(uninitialized(getattr(torchvision.models, TORCHVISION_BUILDERS[src.name])))
    # the ImageNet heads pool adaptively, so 32x32 checks the whole graph at little cost
    same_logits(theirs, converted(theirs, src), 32)


# ---------------------------------------------------------------- chenyaofo (CIFAR)
# Built like chenyaofo/pytorch-cifar-models builds them: its resnet and vgg are torchvision's
# modules cut down for 32x32 inputs, its mobilenetv2 is torchvision's with two strides at 1.


class BasicBlock(nn.Module):
    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class CifarResNet(nn.Module):
    """chenyaofo's CifarResNet: 3x3 stem, three stages of 16/32/64 channels, 1x1 conv+BN shortcut."""

    def __init__(self, blocks, num_classes=10):
        super().__init__()
        self.inplanes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(16, blocks[0], 1)
        self.layer2 = self._make_layer(32, blocks[1], 2)
        self.layer3 = self._make_layer(64, blocks[2], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(64, num_classes)

    def _make_layer(self, planes, n, stride):
        down = None
        if stride != 1 or self.inplanes != planes:
            down = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False),
                                 nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, down)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, n)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x))))))
        return self.fc(self.avgpool(x).view(x.size(0), -1))


class CifarVGG(nn.Module):
    """chenyaofo's VGG: torchvision's features (with BN), no 7x7 pooling, a 512-512-classes head."""

    def __init__(self, cfg, num_classes):
        super().__init__()
        self.features = torchvision.models.vgg.make_layers(cfg, batch_norm=True)
        self.classifier = nn.Sequential(nn.Linear(512, 512), nn.ReLU(True), nn.Dropout(),
                                        nn.Linear(512, 512), nn.ReLU(True), nn.Dropout(),
                                        nn.Linear(512, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def cifar_mobilenetv2(width_mult, num_classes):
    cfg = [[1, 16, 1, 1], [6, 24, 2, 1], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2],
           [6, 320, 1, 1]]  # stride 2 -> 1 in the second row, as chenyaofo
    m = torchvision.models.MobileNetV2(num_classes, width_mult, inverted_residual_setting=cfg)
    m.features[0][0].stride = (1, 1)  # stem stride 2 -> 1, as chenyaofo
    return m


VGG_CFGS = {11: "A", 13: "B", 16: "D", 19: "E"}


def chenyaofo_model(src):
    n = models.DATASET_FAMILY[src.dataset][1]
    if src.arch == "resnet":
        return CifarResNet([(src.layers - 2) // 6] * 3, n)
    if src.arch == "vgg":
        return CifarVGG(torchvision.models.vgg.cfgs[VGG_CFGS[src.layers]], n)
    return cifar_mobilenetv2(src.width_mult, n)


CY_SOURCES = [s for s in pretrained.SOURCES.values() if s.layout == "chenyaofo"]


@pytest.mark.parametrize("src", CY_SOURCES, ids=lambda s: f"{s.dataset}-{s.name}")
def test_chenyaofo_weights_give_identical_logits(src):
    torch.manual_seed(0)
    theirs = randomize(chenyaofo_model(src))
    same_logits(theirs, converted(theirs, src), 32)


def test_chenyaofo_table_covers_their_cifar_zoo():
    names = {(s.dataset, s.name) for s in CY_SOURCES}
    for d in ("cifar10", "cifar100"):
        assert {n for dd, n in names if dd == d} == {
            "resnet20", "resnet32", "resnet44", "resnet56", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn",
            "mobilenetv2_w0.5", "mobilenetv2_w0.75", "mobilenetv2", "mobilenetv2_w1.4"}
    for s in CY_SOURCES:
        assert s.file.startswith(f"{s.dataset}_") and len(s.sha256) == 8


# ---------------------------------------------------------------- checks and the CLI


def test_old_files_without_num_batches_tracked_convert():
    # torchvision's vgg*_bn files predate PyTorch 0.4.1 and hold no num_batches_tracked
    theirs = randomize(CifarVGG(torchvision.models.vgg.cfgs["A"], 10))
    sd = {k: v for k, v in theirs.state_dict().items() if not k.endswith("num_batches_tracked")}
    ours = models.build_model("vgg", "cifar10", 11, bn=True)
    out = pretrained.convert_state_dict(sd, ours, "chenyaofo", "old.pth")
    assert int(out["features.1.num_batches_tracked"]) == 0
    same_logits(theirs, ours.eval(), 32)


def test_a_file_of_another_architecture_is_refused_with_one_line():
    theirs = CifarResNet([3, 3, 3], 10)
    ours = models.build_model("resnet", "cifar10", 32)
    with pytest.raises(utils.UserError, match=r"does not fit this model: .*missing keys"):
        pretrained.convert_state_dict(theirs.state_dict(), ours, "chenyaofo", "r20.pt")
    sd = theirs.state_dict()
    sd["fc.weight"] = torch.zeros(100, 64)
    with pytest.raises(utils.UserError, match=r"shape mismatches \(e.g. fc.weight"):
        pretrained.convert_state_dict(sd, models.build_model("resnet", "cifar10", 20), "chenyaofo", "r20.pt")


def test_torchvision_to_ours_cli_converts_a_given_file(in_tmp, capsys):
    torch.manual_seed(0)
    theirs = randomize(torchvision.models.mobilenet_v2(weights=None))
    torch.save(theirs.state_dict(), in_tmp / "mnv2.pth")
    argv = ["-a", "mobilenetv2", "--src", "mnv2.pth"]
    out = utils.run_cli(t2o.main, t2o.get_args_parser(), argv)
    assert out == utils.CKPT_ROOT / "mobilenetv2/imagenet/ckpt_best.pth"
    ckpt = utils.load_checkpoint(out)
    assert ckpt["arch"]["arch"] == "mobilenetv2" and ckpt["arch"]["num_classes"] == 1000
    assert ckpt["source"]["url"].endswith("mnv2.pth") and ckpt["best_acc1"] == 0.0
    ours = models.build_model("mobilenetv2", "imagenet")
    ours.load_state_dict(ckpt["model"])
    same_logits(theirs, ours.eval(), 32)
    # a file of another architecture: one line, exit 2, nothing written
    with pytest.raises(SystemExit) as e:
        utils.run_cli(t2o.main, t2o.get_args_parser(),
                      ["-a", "resnet", "--layers", "18", "--src", "mnv2.pth"])
    assert_user_error(e.value.code, capsys.readouterr().err, "mnv2.pth does not fit this model")
    assert not (in_tmp / "checkpoint/resnet18").exists()
