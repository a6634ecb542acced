"""Data loading: CIFAR-10/100, ImageNet, TinyImageNet-200, and scikit-learn's digits for offline runs.

    from data import get_loaders
    train_loader, val_loader, _ = get_loaders("digits", "../data", batch_size=128, workers=0)

Images are normalised with their data set's statistics, or with those the architecture
declares (``models.input_stats``: resnet_a's published weights expect ImageNet's).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

import models
from utils import UserError

# per-channel mean / std of the training sets
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
TINYIMAGENET_STATS = ((0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821))
DATASET_STATS = {"cifar10": CIFAR10_STATS, "cifar100": CIFAR100_STATS, "imagenet": IMAGENET_STATS,
                 "tinyimagenet": TINYIMAGENET_STATS}

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0  # the split never changes, so every run and checkpoint sees the same test set


class TensorImages(Dataset):
    """Images held in memory as one (N, 3, H, W) tensor, with optional random shift."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, shift: int = 0):
        self.images, self.labels, self.shift = images, labels, shift

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        x = self.images[i]
        if self.shift:  # pad-and-crop translation; no flips, digits are not mirror-symmetric
            p = self.shift
            dx, dy = torch.randint(0, 2 * p + 1, (2,)).tolist()
            x = F.pad(x, (p, p, p, p))[:, dy:dy + x.shape[1], dx:dx + x.shape[2]]
        return x, self.labels[i]


def input_stats(dataset: str, arch: str | None = None) -> tuple:
    """(mean, std) the images of ``dataset`` are normalised with for ``arch``: what the
    architecture declares (models.input_stats), else the data set's own statistics. digits
    has none here: its grey pixels are standardised by their own train-split mean and std."""
    return models.input_stats(arch) or DATASET_STATS[dataset]


def digits_datasets(size: int = 32):
    """scikit-learn's 8x8 handwritten digits (1797 real images), upsampled to 3x32x32."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.from_numpy(np.random.RandomState(DIGITS_SPLIT_SEED).permutation(len(y)))
    n_test = int(round(len(y) * DIGITS_TEST_FRACTION))
    test_idx, train_idx = perm[:n_test], perm[n_test:]
    mean, std = x[train_idx].mean(), x[train_idx].std()
    x = (x - mean) / std
    return (TensorImages(x[train_idx], y[train_idx], shift=2),
            TensorImages(x[test_idx], y[test_idx]))


def cifar_datasets(name: str, root: Path, stats: tuple | None = None, download: bool = True):
    import torchvision
    import torchvision.transforms as T
    cls, folder, archive = {
        "cifar10": (torchvision.datasets.CIFAR10, "cifar-10-batches-py", "cifar-10-python.tar.gz"),
        "cifar100": (torchvision.datasets.CIFAR100, "cifar-100-python", "cifar-100-python.tar.gz"),
    }[name]
    stats = stats or DATASET_STATS[name]
    train_tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                          T.Normalize(*stats)])
    val_tf = T.Compose([T.ToTensor(), T.Normalize(*stats)])
    if download:
        root.mkdir(parents=True, exist_ok=True)
    try:
        train = cls(str(root), train=True, transform=train_tf, download=download)
        val = cls(str(root), train=False, transform=val_tf, download=download)
    except (OSError, RuntimeError) as e:  # URLError is an OSError; torchvision raises RuntimeError too
        how = f"could not be downloaded ({e})" if download else "was not downloaded"
        raise UserError(f"{name} is not in {root / folder} and {how}; "
                        f"put {archive} from https://www.cs.toronto.edu/~kriz/ in {root}") from None
    return train, val


def imagenet_datasets(root: Path, stats: tuple = IMAGENET_STATS):
    import torchvision
    import torchvision.transforms as T
    base = root / "imagenet"
    for split in ("train", "val"):
        if not (base / split).is_dir():
            raise UserError(f"ImageNet data directory not found: {base / split} "
                            f"(run `python down_imagenet.py --datapath {root}`)")
    norm = T.Normalize(*stats)
    train_tf = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    val_tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), norm])
    return (torchvision.datasets.ImageFolder(str(base / "train"), train_tf),
            torchvision.datasets.ImageFolder(str(base / "val"), val_tf))


class TinyImageNetVal(Dataset):
    """TinyImageNet's val/images/*.JPEG, labelled by val/val_annotations.txt (file, wnid, box)."""

    def __init__(self, folder: Path, class_to_idx: dict, transform):
        from torchvision.datasets.folder import default_loader
        self.loader, self.transform, self.samples = default_loader, transform, []
        for line in (folder / "val_annotations.txt").read_text().splitlines():
            if not line.strip():
                continue
            name, wnid = line.split("\t")[:2]
            if wnid not in class_to_idx:
                raise UserError(f"{folder / 'val_annotations.txt'} labels {name} as {wnid}, "
                                f"a class with no train/ folder")
            self.samples.append((folder / "images" / name, class_to_idx[wnid]))

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        return self.transform(self.loader(path)), label


def tinyimagenet_datasets(root: Path, stats: tuple = TINYIMAGENET_STATS):
    """TinyImageNet-200 as released: train/<wnid>/images/*.JPEG, val/images + val_annotations.txt."""
    import torchvision
    import torchvision.transforms as T
    base = root / "tiny-imagenet-200"
    if not (base / "train").is_dir() or not (base / "val" / "val_annotations.txt").is_file():
        raise UserError(f"TinyImageNet not found in {base}; unzip tiny-imagenet-200.zip "
                        f"(http://cs231n.stanford.edu/tiny-imagenet-200.zip) in {root}")
    norm = T.Normalize(*stats)
    train_tf = T.Compose([T.RandomCrop(64, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    val_tf = T.Compose([T.ToTensor(), norm])
    # ImageFolder finds train/<wnid>/images/*.JPEG (it walks each class folder) and loads
    # images as RGB: some TinyImageNet images are grayscale
    train = torchvision.datasets.ImageFolder(str(base / "train"), train_tf)
    return train, TinyImageNetVal(base / "val", train.class_to_idx, val_tf)


def get_datasets(dataset: str, datapath, arch: str | None = None,
                 download: bool = True) -> tuple[Dataset, Dataset]:
    """Train and validation sets of ``dataset``, normalised as ``arch`` expects (``input_stats``);
    ``download``: fetch CIFAR when it is not there (the others are never downloaded here)."""
    root = Path(datapath)
    if dataset == "digits":
        return digits_datasets()
    if root.exists() and not root.is_dir():
        raise UserError(f"--datapath {datapath} is a file; it names the folder that holds (or receives) the "
                        f"data sets")
    if dataset not in DATASET_STATS:
        raise UserError(f"unknown dataset {dataset!r}")
    stats = input_stats(dataset, arch)
    if dataset in ("cifar10", "cifar100"):
        return cifar_datasets(dataset, root, stats, download)
    if dataset == "imagenet":
        return imagenet_datasets(root, stats)
    return tinyimagenet_datasets(root, stats)


def calibration_images(dataset: str, datapath, n: int, arch: str | None = None,
                       seed: int = 0) -> torch.Tensor:
    """``n`` training images (a fixed random choice), each through the training augmentation, as one
    tensor: what ``mess.bn.calibrate_bn`` brings BatchNorm statistics up to date on."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserError(f"--bn-images must be at least 1, got {n}")
    train_set, _ = get_datasets(dataset, datapath, arch, download=False)  # compressing downloads nothing
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(train_set), generator=g)[:n].tolist()
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # the augmentation's draws: the same images every time
    try:
        return torch.stack([train_set[i][0] for i in idx])
    finally:
        torch.random.set_rng_state(state)


def get_loaders(dataset: str, datapath, batch_size: int, workers: int, pin_memory: bool = False,
                persistent_workers: bool = False, rank: int = 0, world_size: int = 1,
                arch: str | None = None):
    """Train and validation loaders, plus the object that fixes each epoch's shuffling.

    ``arch`` (``-a``) picks the input normalisation where the architecture declares one.

    One process: the train loader shuffles with the returned ``torch.Generator``, which the
    caller re-seeds each epoch, so a resumed run sees the same order. Several processes
    (DDP): a ``DistributedSampler`` (call ``set_epoch``) and a validation shard per rank,
    with ``batch_size`` per process.
    """
    train_set, val_set = get_datasets(dataset, datapath, arch)
    if dataset == "digits":
        workers = 0  # in-memory tensors: worker processes cost more than they save
    common = dict(num_workers=workers, pin_memory=pin_memory,
                  persistent_workers=persistent_workers and workers > 0)
    if world_size > 1:
        from torch.utils.data.distributed import DistributedSampler
        shuffler = DistributedSampler(train_set, world_size, rank, shuffle=True)
        train_loader = DataLoader(train_set, batch_size=batch_size, sampler=shuffler, **common)
        # every sample once: shards of unequal size, summed across ranks by the caller
        val_shard = torch.utils.data.Subset(val_set, range(rank, len(val_set), world_size))
        val_loader = DataLoader(val_shard, batch_size=batch_size, shuffle=False, **common)
        return train_loader, val_loader, shuffler
    shuffler = torch.Generator()
    train_loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, generator=shuffler, **common)
    val_loader = DataLoader(val_set, batch_size=batch_size, shuffle=False, **common)
    return train_loader, val_loader, shuffler


def set_epoch(shuffler, seed: int, epoch: int) -> None:
    """Make the epoch's shuffling a function of (seed, epoch) alone."""
    if isinstance(shuffler, torch.Generator):
        shuffler.manual_seed(seed * 100_003 + epoch)
    else:
        shuffler.seed = seed
        shuffler.set_epoch(epoch)
