"""data.py: digits split, CIFAR in its real on-disk format, offline messages."""
import pickle
import urllib.error

import numpy as np
import pytest
import torch
import torchvision

import data
from utils import UserError


def test_digits_split_is_fixed_and_disjoint():
    tr1, te1 = data.digits_datasets()
    tr2, te2 = data.digits_datasets()
    assert (len(tr1), len(te1)) == (1438, 359)
    assert torch.equal(te1.images, te2.images) and torch.equal(te1.labels, te2.labels)
    assert tr1.images.shape[1:] == (3, 32, 32)
    train_rows = {tuple(r.tolist()) for r in tr1.images[:, 0, ::4, ::4].reshape(len(tr1), -1)}
    test_rows = {tuple(r.tolist()) for r in te1.images[:, 0, ::4, ::4].reshape(len(te1), -1)}
    assert len(train_rows & test_rows) <= 3  # only byte-identical scans can coincide
    assert set(te1.labels.tolist()) == set(range(10))



def test_two_ranks_share_every_epoch_and_the_validation_set_without_overlap():
    """What each torchrun process reads (tests/test_ddp.py runs the real thing, marked slow)."""
    train, val = [], []
    for rank in (0, 1):
        _, val_loader, shuffler = data.get_loaders("digits", "data", 32, 0, rank=rank, world_size=2)
        data.set_epoch(shuffler, 0, 3)
        train.append(list(shuffler))
        val.append(list(val_loader.dataset.indices))
    assert sorted(train[0] + train[1]) == list(range(1438))  # each sample once an epoch, 719 per rank
    assert len(train[0]) == len(train[1]) == 719
    assert sorted(val[0] + val[1]) == list(range(359))
    data.set_epoch(shuffler, 0, 4)
    assert list(shuffler) != train[1]  # a new order every epoch


def write_cifar10(root, n=20):
    """CIFAR-10's python pickle layout: five data batches, a test batch and the meta file."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.RandomState(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.randint(0, 256, (n, 3072), dtype=np.uint8),
                 "labels": rng.randint(0, 10, n).tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)


def test_cifar10_loads_from_its_on_disk_format(tmp_path, monkeypatch):
    write_cifar10(tmp_path)
    # our files are not the real ones, so their MD5s cannot match torchvision's table
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    train_loader, val_loader, _ = data.get_loaders("cifar10", tmp_path, batch_size=8, workers=0)
    x, y = next(iter(train_loader))
    assert x.shape == (8, 3, 32, 32) and y.dtype == torch.int64
    assert len(train_loader.dataset) == 100 and len(val_loader.dataset) == 20


def test_normalisation_is_the_datasets_unless_the_architecture_declares_one(tmp_path, monkeypatch):
    write_cifar10(tmp_path)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)

    def val_batch(arch):
        _, val, _ = data.get_loaders("cifar10", tmp_path, batch_size=20, workers=0, arch=arch)
        return next(iter(val))[0]

    raw = torch.from_numpy(torchvision.datasets.CIFAR10(str(tmp_path), train=False).data)
    x = raw.permute(0, 3, 1, 2).float() / 255

    def normalised(stats):
        mean, std = (torch.tensor(s).view(1, 3, 1, 1) for s in stats)
        return (x - mean) / std

    # resnet_a: the ImageNet statistics akamaster's weights were trained with
    assert data.input_stats("cifar10", "resnet_a") == data.IMAGENET_STATS
    assert torch.allclose(val_batch("resnet_a"), normalised(data.IMAGENET_STATS), atol=1e-6)
    # every other architecture, and no architecture at all: CIFAR-10's own, as before
    plain = val_batch(None)
    assert torch.allclose(plain, normalised(data.CIFAR10_STATS), atol=1e-6)
    assert torch.equal(val_batch("resnet"), plain)
    assert not torch.allclose(val_batch("resnet_a"), plain, atol=1e-2)


def test_cifar_offline_says_where_to_put_the_files(tmp_path, monkeypatch):
    def no_network(*a, **k):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets.CIFAR100, "download", no_network)
    with pytest.raises(UserError) as e:
        data.get_datasets("cifar100", tmp_path)
    msg = str(e.value)
    assert "\n" not in msg
    assert "cifar-100-python.tar.gz" in msg and str(tmp_path) in msg
