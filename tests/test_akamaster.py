"""resnet_a and akamaster/pytorch_resnet_cifar10's published weights, on the real files.

The .th files and the CIFAR-10 training images are in ../shared/data beside the repository
(see its README); tests that need them are skipped without them. Downloads come from a local
HTTP server on 127.0.0.1: nothing leaves this machine.
"""
import io
import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from conftest import assert_user_error, run_main
from test_download import Server, cli, sha

import data
import down_ckpt
import models
import pretrained
import torchvision_to_ours as t2o
import utils
from download import file_digest

pytestmark = pytest.mark.usefixtures("one_thread")

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
AKAMASTER = SHARED / "akamaster"
CIFAR_SUBSET = SHARED / "cifar10-train-subset.npz"
AKA_SOURCES = [s for s in pretrained.SOURCES.values() if s.layout == "akamaster"]
PINNED = [s for s in AKA_SOURCES if s.pinned_sha256]


def real_file(src: pretrained.Source) -> Path:
    path = AKAMASTER / src.file
    if not path.is_file():
        pytest.skip(f"{path} not found: the real akamaster files live in ../shared/data/akamaster "
                    f"beside the repository (CI has them)")
    return path


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


# ---------------------------------------------------------------- akamaster's own model
# Their resnet.py as published (conv1, bn1, layer1..3, linear; option-A LambdaLayer shortcut),
# written out here so that our conversion is checked against their code, not against ours.


class LambdaLayer(nn.Module):
    def __init__(self, lambd):
        super().__init__()
        self.lambd = lambd

    def forward(self, x):
        return self.lambd(x)


class AkaBlock(nn.Module):
    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = LambdaLayer(
                lambda x: F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4), "constant", 0))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class AkaResNet(nn.Module):
    def __init__(self, n, num_classes=10):
        super().__init__()
        self.in_planes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(16, n, 1)
        self.layer2 = self._make_layer(32, n, 2)
        self.layer3 = self._make_layer(64, n, 2)
        self.linear = nn.Linear(64, num_classes)

    def _make_layer(self, planes, n, stride):
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(AkaBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.avg_pool2d(out, out.size()[3])
        return self.linear(out.view(out.size(0), -1))


def theirs_from(raw: dict, layers: int) -> nn.Module:
    """Their model holding a .th file's weights, loaded as their trainer does (after DataParallel)."""
    model = AkaResNet((layers - 2) // 6)
    model.load_state_dict({k.removeprefix("module."): v for k, v in raw["state_dict"].items()})
    return model.eval()


def th_bytes(model: AkaResNet) -> bytes:
    """A .th file as their trainer writes it: DataParallel keys, the best top-1 beside them."""
    buf = io.BytesIO()
    torch.save({"best_prec1": 90.0, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}},
               buf)
    return buf.getvalue()


def ours_from(ckpt_path: Path, layers: int) -> nn.Module:
    ckpt = utils.load_checkpoint(ckpt_path)
    model = models.build_model("resnet_a", "cifar10", layers)
    model.load_state_dict(ckpt["model"])
    return model.eval()


def assert_same_logits(theirs, ours, n=8):
    x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = theirs(x), ours(x)
    assert torch.isfinite(a).all() and a.std() > 0  # logits that can tell two networks apart
    assert torch.equal(a, b), (a - b).abs().max()


# ---------------------------------------------------------------- the table


def test_akamaster_table_is_their_readme():
    assert {s.layers: s.acc1 for s in AKA_SOURCES} == {20: 91.73, 32: 92.63, 44: 93.10, 56: 93.39,
                                                       110: 93.68, 1202: 93.82}
    for s in AKA_SOURCES:
        assert (s.dataset, s.name) == ("cifar10", f"resnet_a{s.layers}")
        assert s.url == ("https://raw.githubusercontent.com/akamaster/pytorch_resnet_cifar10/master/"
                         f"pretrained_models/{s.file}")
        assert s.file.startswith(f"resnet{s.layers}-") and s.file.endswith(".th")
    assert [s.layers for s in PINNED] == [20, 32, 44, 56]
    assert [s.layers for s in AKA_SOURCES if s.size] == [20, 32, 44, 56]  # a size is known with the hash
    assert {s.file for s in AKA_SOURCES if not s.pinned_sha256} == {"resnet110-1d1ed7c2.th",
                                                                   "resnet1202-f3b1deed.th"}


def test_every_pinned_hash_is_full_and_extends_its_name():
    for s in pretrained.SOURCES.values():
        if s.pinned_sha256:
            assert len(s.pinned_sha256) == 64 and s.pinned_sha256.startswith(s.name_sha256), s.file
            assert s.sha256 == s.pinned_sha256
        else:
            assert s.sha256 == s.name_sha256 and len(s.sha256) >= 8


@pytest.mark.skipif(not AKAMASTER.is_dir(), reason=f"{AKAMASTER} not found (CI has it at ../shared)")
def test_the_pinned_hashes_are_those_of_the_real_files():
    files = sorted(p.name for p in AKAMASTER.glob("*.th"))
    assert files == sorted(s.file for s in PINNED)  # a new file there gets a row (and a test)
    for s in PINNED:
        assert file_digest(AKAMASTER / s.file) == s.pinned_sha256
        assert (AKAMASTER / s.file).stat().st_size == s.size  # the download's cap


# ---------------------------------------------------------------- conversion of the real files


@pytest.mark.parametrize("src", PINNED, ids=lambda s: s.name)
def test_real_file_converts_to_akamasters_logits_bit_for_bit(src, in_tmp):
    path = real_file(src)
    theirs = theirs_from(torch.load(path, map_location="cpu", weights_only=True), src.layers)
    out = utils.run_cli(t2o.main, t2o.get_args_parser(),
                        ["-a", "resnet_a", "--layers", str(src.layers), "--src", str(path)])
    # a published file brings its data set, layout and top-1: no flags needed
    assert out == utils.CKPT_ROOT / f"resnet_a{src.layers}/cifar10/ckpt_best.pth"
    ckpt = utils.load_checkpoint(out)
    assert ckpt["arch"]["dataset"] == "cifar10" and ckpt["arch"]["num_classes"] == 10
    assert ckpt["best_acc1"] == src.acc1 and ckpt["source"] == {"url": src.url, "sha256": src.pinned_sha256}
    assert_same_logits(theirs, ours_from(out, src.layers))


def test_another_akamaster_layout_file_needs_its_data_set_and_layout(in_tmp, capsys):
    torch.manual_seed(0)
    theirs = AkaResNet(3).eval()
    (in_tmp / "mine.th").write_bytes(th_bytes(theirs))
    base = ["-a", "resnet_a", "--layers", "20", "--src", "mine.th"]
    rc, _, err = cli(t2o, base, capsys)  # not a published file: ImageNet and torchvision's keys assumed
    assert_user_error(rc, err, "resnet_a has no imagenet variant")
    rc, _, err = cli(t2o, base + ["--dataset", "cifar10"], capsys)
    assert_user_error(rc, err, "mine.th does not fit this model", "linear.weight")
    rc, _, err = cli(t2o, base + ["--dataset", "cifar10", "--layout", "akamaster"], capsys)
    assert rc == 0, err
    out = in_tmp / "checkpoint/resnet_a20/cifar10/ckpt_best.pth"
    assert utils.load_checkpoint(out)["best_acc1"] == 0.0  # no published figure for this file
    assert_same_logits(theirs, ours_from(out, 20))


# ---------------------------------------------------------------- down_ckpt.py and the hashes


def test_full_sha256_refuses_a_file_that_only_matches_the_name_prefix(server, in_tmp, monkeypatch, capsys):
    src = pretrained.SOURCES["cifar10", "resnet_a20"]
    body = real_file(src).read_bytes()
    assert sha(body).startswith(src.name_sha256)  # the name's 8-hex check alone lets these bytes through
    # A second file sharing those 32 bits takes ~2^32 hashes to make, so the real bytes stand in
    # for it, checked against a pinned hash that differs from theirs past the name's prefix.
    wrong = src.name_sha256 + ("1" if src.pinned_sha256[8] == "0" else "0") + src.pinned_sha256[9:]
    monkeypatch.setitem(pretrained.SOURCES, ("cifar10", "resnet_a20"), replace(src, pinned_sha256=wrong))
    server.files[src.file] = body
    argv = ["cifar10", "-a", "resnet_a", "--layers", "20", *server.mirror, "--cache-dir", "cache"]
    rc, _, err = cli(down_ckpt, argv, capsys)
    assert_user_error(rc, err, src.file, "not the published file", "the download was deleted")
    assert len(server.requests_for(src.file)) == 1
    assert not any((in_tmp / "cache").iterdir()) and not (in_tmp / "checkpoint").exists()
    # the same bytes already in the cache: refused as well, not fetched again
    (in_tmp / "cache" / src.file).write_bytes(body)
    rc, _, err = cli(down_ckpt, argv, capsys)
    assert_user_error(rc, err, src.file, "exists but its sha256", "delete it")
    assert len(server.requests_for(src.file)) == 1 and not (in_tmp / "checkpoint").exists()


def test_unpinned_files_keep_the_name_prefix_check(server, in_tmp, monkeypatch, capsys):
    # resnet110's full hash is not known here: its file is checked against the name's 8 hex digits
    src = pretrained.SOURCES["cifar10", "resnet_a110"]
    assert not src.pinned_sha256 and src.sha256 == "1d1ed7c2"
    torch.manual_seed(0)
    theirs = AkaResNet(18).eval()
    body = th_bytes(theirs)
    fake = replace(src, url=src.url.replace("1d1ed7c2", sha(body)[:8]))  # served under its own prefix
    monkeypatch.setitem(pretrained.SOURCES, ("cifar10", "resnet_a110"), fake)
    server.files[fake.file] = body
    argv = ["cifar10", "-a", "resnet_a", "--layers", "110", *server.mirror, "--cache-dir", "cache"]
    rc, out, err = cli(down_ckpt, argv, capsys)
    assert rc == 0, err
    assert "published top-1 93.68%" in out
    assert_same_logits(theirs, ours_from(in_tmp / "checkpoint/resnet_a110/cifar10/ckpt_best.pth", 110), n=2)
    server.files[fake.file] = body[:-4] + b"\0\0\0\0"  # another file under the same name
    (in_tmp / "cache" / fake.file).unlink()
    rc, _, err = cli(down_ckpt, argv + ["--force"], capsys)
    assert_user_error(rc, err, "not the published file")


# ---------------------------------------------------------------- end to end, on real images


def write_cifar10(root: Path, x: np.ndarray, y: np.ndarray) -> None:
    """CIFAR-10's pickle layout holding ``x`` (uint8 NHWC) as its test batch; the train
    batches (which main.py -E loads but does not use) hold two images each."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rows = x.transpose(0, 3, 1, 2).reshape(len(x), -1)  # CIFAR rows: the R, G, B planes of an image
    for name, n in [(f"data_batch_{i}", 2) for i in range(1, 6)] + [("test_batch", len(x))]:
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rows[:n], "labels": y[:n].tolist()}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)


def test_downloaded_resnet_a20_evaluates_with_imagenet_statistics(server, in_tmp, monkeypatch, capsys):
    src = pretrained.SOURCES["cifar10", "resnet_a20"]
    server.files[src.file] = real_file(src).read_bytes()
    if not CIFAR_SUBSET.is_file():
        pytest.skip(f"{CIFAR_SUBSET} not found (CI has it at ../shared/data)")
    rc, out, err = cli(down_ckpt, ["cifar10", "-a", "resnet_a", "--layers", "20", *server.mirror,
                                   "--cache-dir", "cache"], capsys)
    assert rc == 0, err
    assert "resnet_a20" in out and "91.73%" in out
    # the first 500 real training images (the net saw them: this checks the pipeline, not the
    # net) as the test batch of a CIFAR-10 folder, evaluated by main.py -E as a user would
    npz = np.load(CIFAR_SUBSET)
    x, y = npz["x_train"][:500], npz["y_train"][:500]
    write_cifar10(in_tmp / "data", x, y)
    # these files are not the official ones, so their MD5s cannot match torchvision's table
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    res = run_main(["cifar10", "-a", "resnet_a", "--layers", "20", "-E", "--ckpt", "ckpt_best.pth",
                    "--datapath", str(in_tmp / "data"), "-j", "0", "-b", "250"])
    assert res["metrics"]["val_top1"] > 90.0  # 38.8% on unnormalised pixels

    ours = ours_from(in_tmp / "checkpoint/resnet_a20/cifar10/ckpt_best.pth", 20)
    pixels = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255

    def loss_with(stats):
        mean, std = (torch.tensor(s).view(1, 3, 1, 1) for s in stats)
        with torch.no_grad():
            return F.cross_entropy(ours((pixels - mean) / std), torch.from_numpy(y)).item()

    # Top-1 is near 100% with CIFAR-10's own statistics too (they are close), so the loss tells the
    # normalisations apart: main.py's is that of the statistics resnet_a declares, ImageNet's,
    # which fit these weights better than CIFAR-10's (akamaster trained with them).
    declared = data.input_stats("cifar10", "resnet_a")
    assert declared == models.input_stats("resnet_a") == data.IMAGENET_STATS
    assert res["metrics"]["val_loss"] == pytest.approx(loss_with(declared), rel=1e-3)
    assert loss_with(declared) < 0.8 * loss_with(data.CIFAR10_STATS)
    assert res["metrics"]["val_loss"] != pytest.approx(loss_with(data.CIFAR10_STATS), rel=1e-3)
