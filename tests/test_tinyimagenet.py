"""TinyImageNet-200 in its released layout, and WideResNet on it: build, train a step,
compress with every MESS version, evaluate."""
import os

import pytest
import torch
from conftest import assert_user_error, run_main
from PIL import Image

import data
import find_similar_kernel as fsk
import models
from config import VERSIONS
from utils import load_checkpoint

WNIDS = ["n01443537", "n01629819", "n01641577"]
TRAIN_PER_CLASS = 4
VAL = [("val_0.JPEG", 2), ("val_1.JPEG", 0), ("val_2.JPEG", 1), ("val_3.JPEG", 0), ("val_4.JPEG", 2),
       ("val_5.JPEG", 1)]


pytestmark = pytest.mark.usefixtures("one_thread")


def jpeg(path, seed, mode="RGB"):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (64, 64, 3 if mode == "RGB" else 1), generator=g, dtype=torch.uint8)
    Image.fromarray(pixels.squeeze(-1).numpy(), mode).save(path, "JPEG")


def make_tinyimagenet(root):
    """tiny-imagenet-200/ as the zip unpacks: wnids.txt, words.txt, train/<wnid>/images/ with a
    boxes file beside them, val/images/ with val_annotations.txt, and an unlabelled test/."""
    base = root / "tiny-imagenet-200"
    (base / "val/images").mkdir(parents=True)
    (base / "test/images").mkdir(parents=True)
    (base / "wnids.txt").write_text("".join(f"{w}\n" for w in WNIDS))
    (base / "words.txt").write_text("".join(f"{w}\tthing {i}\n" for i, w in enumerate(WNIDS)))
    for c, w in enumerate(WNIDS):
        (base / "train" / w / "images").mkdir(parents=True)
        boxes = []
        for i in range(TRAIN_PER_CLASS):
            # some of the real images are grayscale
            jpeg(base / "train" / w / "images" / f"{w}_{i}.JPEG", 10 * c + i, "L" if i == 0 else "RGB")
            boxes.append(f"{w}_{i}.JPEG\t0\t0\t63\t63\n")
        (base / "train" / w / f"{w}_boxes.txt").write_text("".join(boxes))
    lines = []
    for i, (name, c) in enumerate(VAL):
        jpeg(base / "val/images" / name, 100 + i)
        lines.append(f"{name}\t{WNIDS[c]}\t1\t2\t60\t61\n")
    (base / "val/val_annotations.txt").write_text("".join(lines))
    jpeg(base / "test/images/test_0.JPEG", 999)
    return root


def test_the_released_layout_is_read_with_val_annotations(tmp_path):
    train, val = data.get_datasets("tinyimagenet", make_tinyimagenet(tmp_path))
    assert train.classes == WNIDS and len(train) == len(WNIDS) * TRAIN_PER_CLASS
    assert len(val) == len(VAL)
    assert [y for _, y in val.samples] == [c for _, c in VAL]
    x, y = val[0]
    assert x.shape == (3, 64, 64) and y == VAL[0][1]
    gray = next(i for i, (p, _) in enumerate(train.samples) if p.endswith("_0.JPEG"))
    assert train[gray][0].shape == (3, 64, 64)  # grayscale images come out as RGB


def test_missing_or_inconsistent_data_is_one_line(tmp_path, capsys):
    import main
    from utils import run_cli
    argv = ["tinyimagenet", "-a", "wideresnet", "--layers", "10", "--width-mult", "0.25", "-j", "0",
            "--epochs", "1", "--datapath", str(tmp_path)]
    with pytest.raises(SystemExit) as e:
        run_cli(main.main, main.get_args_parser(), argv)
    assert_user_error(e.value.code, capsys.readouterr().err, "TinyImageNet not found",
                      "tiny-imagenet-200.zip")
    make_tinyimagenet(tmp_path)
    ann = tmp_path / "tiny-imagenet-200/val/val_annotations.txt"
    ann.write_text(ann.read_text() + "val_6.JPEG\tn99999999\t0\t0\t1\t1\n")
    with pytest.raises(SystemExit) as e:
        run_cli(main.main, main.get_args_parser(), argv)
    assert_user_error(e.value.code, capsys.readouterr().err, "n99999999")


WRN = ["tinyimagenet", "-a", "wideresnet", "--layers", "10", "--width-mult", "0.25"]
LOADER = ["-j", "0", "-b", "4", "--datapath", "data"]
CKPT_DIR = "checkpoint/wideresnet10_w0.25/tinyimagenet"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """WRN-10-0.25 trained for one epoch (3 steps) on tiny TinyImageNet: the folder it ran in."""
    root = tmp_path_factory.mktemp("tiny")
    make_tinyimagenet(root / "data")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        torch.set_num_threads(1)
        res = run_main(WRN + LOADER + ["--epochs", "1"])
    finally:
        os.chdir(cwd)
    assert len(res["history"]) == 1 and (root / CKPT_DIR / "ckpt_epoch_1.pth").is_file()
    return root


@pytest.mark.parametrize("version", VERSIONS)
def test_wideresnet_on_tinyimagenet_compresses_and_evaluates_with_every_version(trained, version,
                                                                                monkeypatch):
    monkeypatch.chdir(trained)
    before = load_checkpoint(trained / CKPT_DIR / "ckpt_epoch_1.pth")
    assert before["arch"] == {"arch": "wideresnet", "layers": 10, "width_mult": 0.25, "bn": False,
                              "dataset": "tinyimagenet", "num_classes": 200}
    res = fsk.main(fsk.get_args_parser().parse_args(WRN + ["-v", version, "--ckpt", "ckpt_epoch_1.pth"]))
    out = res["path"]
    ckpt = load_checkpoint(out)
    assert ckpt["mess"]["version"] == version and ckpt["mess"]["kernel"]["bank"] == "conv1"
    assert res["ratio"] > 1.0
    ev = run_main(WRN + LOADER + ["-E", "--ckpt", out.name])
    # -E evaluated the compressed weights: their loss and top-1 on the six validation images, computed here
    model = models.build_model("wideresnet", "tinyimagenet", 10, 0.25)
    model.load_state_dict(ckpt["model"])
    _, val = data.get_datasets("tinyimagenet", trained / "data")
    x = torch.stack([val[i][0] for i in range(len(val))])
    y = torch.tensor([val[i][1] for i in range(len(val))])
    with torch.no_grad():
        logits = model.eval()(x)
    assert ev["metrics"]["val_loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item(),
                                                      rel=1e-4)
    assert ev["metrics"]["val_top1"] == pytest.approx(100.0 * (logits.argmax(1) == y).sum().item() / len(y))
    # the evaluated weights are the compressed ones: every covered layer changed, and they load
    changed = [n for n in ckpt["mess"]["kernel"]["layers"]
               if not torch.equal(ckpt["model"][f"{n}.weight"], before["model"][f"{n}.weight"])]
    assert changed == list(ckpt["mess"]["kernel"]["layers"]) and changed
    models.build_model("wideresnet", "tinyimagenet", 10, 0.25).load_state_dict(ckpt["model"])


@pytest.mark.parametrize("arch,layers", [
    ("mobilenet", 16), ("mobilenetv2", 16), ("resnet", 20), ("wideresnet", 16),
    ("vgg", 16),
])
def test_cifar_style_models_take_tinyimagenets_64x64_inputs(arch, layers):
    model = models.build_model(arch, "tinyimagenet", layers, 0.25).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 200)
