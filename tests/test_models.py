import pytest
import torch

import models

# ImageNet-size builds take seconds each (up to 60M weights to initialise): the fast tier keeps these
# depths, one per block type; the deeper ones are marked slow
FAST_IMAGENET_DEPTHS = {"resnet": (18, 50), "vgg": (11,), "wideresnet": (50,)}
CASES = []
for arch in models.list_models():
    for dataset in ("cifar10", "cifar100", "imagenet"):
        if not models.has_variant(arch, dataset):  # resnet_a: CIFAR only
            continue
        depths = models.supported_depths(arch, dataset) or (16,)
        # ResNet-1202 is ResNet-110's code with 200 blocks a stage, built and counted below; a
        # forward here costs seconds, and untrained in eval mode (BN statistics 0 and 1) its
        # 600 residual sums overflow, as akamaster's own resnet1202 does
        for layers in (d for d in depths if d < 1000):
            for bn in ((False, True) if arch == "vgg" else (False,)):
                slow = dataset == "imagenet" and layers not in FAST_IMAGENET_DEPTHS.get(arch, depths)
                CASES.append(pytest.param(arch, dataset, layers, bn, marks=pytest.mark.slow if slow else ()))


@pytest.mark.parametrize("arch,dataset,layers,bn", CASES)
def test_every_model_builds_and_classifies(arch, dataset, layers, bn):
    torch.manual_seed(0)
    n_classes = models.DATASET_FAMILY[dataset][1]
    model = models.build_model(arch, dataset, layers=layers, bn=bn).eval()
    # ImageNet nets pool adaptively, so a 64x64 input checks them at a fraction of the cost
    size = 32 if models.dataset_family(dataset) == "cifar" else 64
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, n_classes)
    assert torch.isfinite(out).all()


def test_digits_uses_the_cifar_variants():
    out = models.build_model("resnet", "digits", layers=20)(torch.randn(1, 3, 32, 32))
    assert out.shape == (1, 10)


@pytest.mark.parametrize("arch,dataset,layers,expected", [
    ("resnet", "cifar10", 20, 272_474),        # He et al. 2016, table 6: 0.27M
    ("resnet", "cifar10", 56, 855_770),        # 0.85M
    ("resnet", "imagenet", 50, 25_557_032),    # torchvision resnet50
    ("mobilenetv2", "imagenet", 16, 3_504_872),  # torchvision mobilenet_v2
    # option A (akamaster/pytorch_resnet_cifar10's table): 0.27M, 0.46M, 0.66M, 0.85M, 1.7M, 19.4M
    ("resnet_a", "cifar10", 20, 269_722),
    ("resnet_a", "cifar10", 32, 464_154),
    ("resnet_a", "cifar10", 44, 658_586),
    ("resnet_a", "cifar10", 56, 853_018),
    ("resnet_a", "cifar10", 110, 1_727_962),
    ("resnet_a", "cifar10", 1202, 19_421_274),
])
def test_parameter_counts_match_the_published_models(arch, dataset, layers, expected):
    model = models.build_model(arch, dataset, layers=layers)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_unsupported_depth_lists_the_supported_ones():
    with pytest.raises(models.ModelError, match="supported: 20, 32, 44, 56, 110"):
        models.build_model("resnet", "cifar10", layers=18)
    with pytest.raises(models.ModelError, match="supported: 20, 32, 44, 56, 110, 1202"):
        models.build_model("resnet_a", "cifar10", layers=18)
    with pytest.raises(models.ModelError, match="resnet_a has no imagenet variant"):
        models.build_model("resnet_a", "imagenet", layers=20)


def test_resnet_a_is_resnet_without_the_shortcut_tensors():
    # the same layer names as resnet (compression plans, --fc, the tables treat both alike),
    # minus the 1x1-conv+BN shortcuts that option A replaces with a zero-padded identity
    a = models.build_model("resnet_a", "cifar10", 20).state_dict()
    b = models.build_model("resnet", "cifar10", 20).state_dict()
    assert set(a) == {k for k in b if ".downsample." not in k}
    assert all(a[k].shape == b[k].shape for k in a)


def test_option_a_shortcut_subsamples_and_zero_pads():
    from models.resnet import PadShortcut
    x = torch.randn(2, 16, 8, 8)
    y = PadShortcut(16, 32, 2)(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])  # planes // 4 = 8 zero channels each side
    assert not y[:, :8].any() and not y[:, 24:].any()
    # a --width-mult that breaks the doubling still adds up: 5 -> 10 -> 19 channels at 0.3
    out = models.build_model("resnet_a", "cifar10", 20, width_mult=0.3)(torch.randn(1, 3, 32, 32))
    assert out.shape == (1, 10)


def test_only_resnet_a_declares_its_input_statistics():
    assert models.input_stats("resnet_a") == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert [a for a in models.list_models() if models.input_stats(a)] == ["resnet_a"]
    assert models.input_stats(None) is None


def test_registry_refuses_duplicates():
    with pytest.raises(RuntimeError, match="registered twice"):
        models.register_model("resnet", depths={})(lambda **kw: None)


def test_width_mult_thins_every_family():
    for arch in models.list_models():
        layers = (models.supported_depths(arch, "cifar10") or (16,))[0]
        full = sum(p.numel() for p in models.build_model(arch, "cifar10", layers).parameters())
        thin = sum(p.numel() for p in models.build_model(arch, "cifar10", layers, 0.5).parameters())
        assert thin < 0.5 * full, arch


def test_model_name_is_the_checkpoint_folder():
    assert models.model_name("resnet", 56) == "resnet56"
    assert models.model_name("vgg", 16, bn=True) == "vgg16_bn"
    assert models.model_name("mobilenet", 16) == "mobilenet"
    assert models.model_name("mobilenetv2", 16, 0.5) == "mobilenetv2_w0.5"
    assert models.model_name("resnet_a", 20) == "resnet_a20"
