"""models/wideresnet.py: WRN-depth-k as in Zagoruyko & Komodakis (2016) and torchvision's wide_resnet*_2."""
import pytest
import torch
import torchvision

import models
from mess.layers import plan_layers


@pytest.mark.parametrize("depth,k,params", [
    (16, 4, 2_748_890),     # the paper's table 4: 2.7M
    (28, 10, 36_479_194),   # 36.5M
    (40, 4, 8_949_210),     # 8.9M
])
def test_cifar_parameter_counts_match_the_paper(depth, k, params):
    with torch.device("meta"):
        model = models.build_model("wideresnet", "cifar10", depth, k)
    assert sum(p.numel() for p in model.parameters()) == params


@pytest.mark.parametrize("depth,tv", [(50, "wide_resnet50_2"), (101, "wide_resnet101_2")])
def test_imagenet_k2_is_torchvisions_wide_resnet(depth, tv):
    with torch.device("meta"):
        ours = models.build_model("wideresnet", "imagenet", depth, 2).state_dict()
        theirs = getattr(torchvision.models, tv)(weights=None).state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)


def test_names_and_depths():
    assert models.model_name("wideresnet", 28, 10) == "wideresnet28_w10"
    assert models.model_name("wideresnet", 50, 2) == "wideresnet50_w2"
    assert models.supported_depths("wideresnet", "cifar10") == (10, 16, 22, 28, 34, 40)
    assert models.supported_depths("wideresnet", "imagenet") == (50, 101, 152)
    with pytest.raises(models.ModelError, match="supported: 10, 16, 22, 28, 34, 40"):
        models.build_model("wideresnet", "cifar10", 20, 2)


@pytest.mark.parametrize("dataset,size", [("cifar10", 32), ("cifar100", 32), ("tinyimagenet", 64)])
def test_forward_and_backward(dataset, size):
    torch.manual_seed(0)
    model = models.build_model("wideresnet", dataset, 10, 0.5)
    out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, models.DATASET_FAMILY[dataset][1])
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_blocks_are_pre_activation_with_a_1x1_shortcut_where_the_shape_changes():
    model = models.build_model("wideresnet", "cifar10", 16, 2)
    first, second = model.layer1[0], model.layer1[1]
    assert first.shortcut is not None and first.shortcut.kernel_size == (1, 1)  # 16 -> 32 channels
    assert second.shortcut is None
    assert model.layer2[0].conv1.stride == (2, 2) and model.layer2[0].shortcut.stride == (2, 2)
    assert model.conv1.out_channels == 16 and model.fc.in_features == 128  # 64 * k


def test_mess_bank_is_the_stem():
    plans = plan_layers(models.build_model("wideresnet", "cifar10", 10, 2), "wideresnet")
    assert plans["kernel"].bank == "conv1"
    assert plans["pointwise"].bank == "layer1.0.shortcut"  # 16 -> 32: the first 1x1 conv
