"""main.py: training, exact resume, evaluation across wrappers, and user errors."""

import pytest
import torch
import torch.nn as nn
from conftest import assert_user_error, run_cli, run_main

import models
from utils import clean_state_dict, load_checkpoint, unwrap_model

TINY = ["digits", "-a", "resnet", "--layers", "20", "--width-mult", "0.5", "-j", "0", "-b", "64"]
CKPT_DIR = "checkpoint/resnet20_w0.5/digits"


@pytest.mark.slow  # 8 epochs at full width; the tests below train the thin model for 1 to 3
def test_quickstart_reaches_97_percent_on_digits(in_tmp):
    # the README quickstart: ResNet-20, 8 epochs, cosine schedule
    res = run_main(["digits", "-a", "resnet", "--layers", "20", "--epochs", "8", "--sched", "cosine",
                    "-j", "0"])
    assert res["best_acc1"] >= 97.0
    ckpt = torch.load(in_tmp / "checkpoint/resnet20/digits/ckpt_best.pth", map_location="cpu",
                      weights_only=True)
    assert ckpt["best_acc1"] == res["best_acc1"]


class StopAfter:
    """A tracker that hits Ctrl-C once the given epoch is saved."""

    def __init__(self, epoch):
        self.epoch = epoch

    def log(self, metrics, step):
        if step == self.epoch:
            raise KeyboardInterrupt

    def artifact(self, path):
        pass


@pytest.mark.slow
def test_resume_is_exact(in_tmp, tmp_path_factory):
    straight = run_main(TINY + ["--epochs", "3"])
    w_straight = torch.load(f"{CKPT_DIR}/ckpt_epoch_3.pth", weights_only=True)["model"]

    other = tmp_path_factory.mktemp("interrupted")
    import os
    os.chdir(other)
    with pytest.raises(KeyboardInterrupt):
        run_main(TINY + ["--epochs", "3"], tracker=StopAfter(2))
    assert not (other / CKPT_DIR / "ckpt_epoch_3.pth").exists()
    assert not list((other / CKPT_DIR).glob("*.tmp"))
    resumed = run_main(TINY + ["--epochs", "3", "-R", "--ckpt", "ckpt_epoch_2.pth"])
    w_resumed = torch.load(f"{CKPT_DIR}/ckpt_epoch_3.pth", weights_only=True)["model"]
    for k in w_straight:
        assert torch.equal(w_straight[k], w_resumed[k]), k
    assert resumed["history"][-1]["val_top1"] == straight["history"][-1]["val_top1"]


def test_checkpoint_follows_the_contract(in_tmp):
    run_main(TINY + ["--epochs", "1"])
    ckpt = torch.load(f"{CKPT_DIR}/ckpt_epoch_1.pth", map_location="cpu", weights_only=True)
    assert {"model", "arch", "epoch", "best_acc1", "optimizer", "scheduler", "args", "rng"} <= set(ckpt)
    assert ckpt["arch"] == {"arch": "resnet", "layers": 20, "width_mult": 0.5, "bn": False,
                            "dataset": "digits", "num_classes": 10}
    assert ckpt["epoch"] == 1
    assert not any(k.startswith("module.") for k in ckpt["model"])
    assert (in_tmp / CKPT_DIR / "ckpt_best.pth").exists()
    assert (in_tmp / CKPT_DIR / "summary.csv").read_text().count("\n") == 2


def test_dataparallel_checkpoint_evaluates_on_cpu(in_tmp):
    import data
    torch.manual_seed(1)  # not main.py's seed 0: a model main.py would not build by itself
    model = models.build_model("resnet", "digits", 20, 0.5)
    dp = nn.DataParallel(model)  # on a CPU-only machine DataParallel runs the module directly
    sd = dp.state_dict()
    assert all(k.startswith("module.") for k in sd)
    assert unwrap_model(dp) is model
    assert list(clean_state_dict(sd)) == list(model.state_dict())
    path = in_tmp / "dp.pth"
    torch.save({"model": sd, "arch": {"arch": "resnet", "layers": 20, "width_mult": 0.5, "bn": False,
                                      "dataset": "digits", "num_classes": 10}}, path)
    res = run_main(TINY + ["-E", "--ckpt", str(path)])
    # the metrics of the DataParallel model's own weights on the validation split
    _, val = data.digits_datasets()
    with torch.no_grad():
        out = model.eval()(val.images)
    top1 = 100.0 * (out.argmax(1) == val.labels).sum().item() / len(val.labels)
    assert res["metrics"]["val_loss"] == pytest.approx(nn.functional.cross_entropy(out, val.labels).item(),
                                                       rel=1e-4)
    assert res["metrics"]["val_top1"] == pytest.approx(top1, abs=100 / 359 + 1e-9)  # a near-tie may flip
    lines = (in_tmp / CKPT_DIR / "eval.csv").read_text().splitlines()
    assert len(lines) == 2 and lines[1].startswith(f"{path},{res['metrics']['val_loss']},")


@pytest.mark.slow
def test_evaluate_reproduces_the_best_accuracy(in_tmp):
    res = run_main(TINY + ["--epochs", "2"])
    ev = run_main(TINY + ["-E", "--ckpt", "ckpt_best.pth"])
    assert ev["metrics"]["val_top1"] == pytest.approx(res["best_acc1"])


def test_interrupted_save_keeps_the_previous_file(in_tmp, monkeypatch):
    from utils import save_checkpoint
    path = in_tmp / "ckpt.pth"
    save_checkpoint({"model": {"w": torch.ones(3)}}, path)
    before = path.read_bytes()

    def half_write(obj, f):  # torch.save takes a path or a file
        if hasattr(f, "write"):
            f.write(b"PK\x03\x04 half")
        else:
            with open(f, "wb") as fh:
                fh.write(b"PK\x03\x04 half")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", half_write)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"model": {"w": torch.zeros(3)}}, path)
    assert path.read_bytes() == before
    assert [p.name for p in in_tmp.iterdir()] == ["ckpt.pth"]


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_checkpoints_load_weights_only(in_tmp):
    from utils import UserError
    path = in_tmp / "evil.pth"
    torch.save({"model": {"w": torch.ones(1)}, "x": Evil()}, path)
    with pytest.raises(UserError, match="cannot read checkpoint"):
        load_checkpoint(path)


# ------------------------------------------------------------ user errors, as the shell sees them
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("trained")
    import os
    cwd = os.getcwd()
    os.chdir(d)
    try:
        run_main(TINY + ["--epochs", "1"])
    finally:
        os.chdir(cwd)
    return d


@pytest.mark.parametrize("argv,needles", [
    (["digits", "-a", "alexnet"], ["unknown architecture 'alexnet'", "resnet"]),
    (["mnist", "-a", "resnet", "--layers", "20"], ["unknown dataset 'mnist'"]),
    (["digits", "-a", "resnet", "--layers", "18"], ["no depth 18", "20, 32, 44, 56, 110"]),
    (["digits", "-a", "resnet", "--layers", "20", "-C"], ["no CUDA device"]),
    (["digits", "-a", "resnet", "--layers", "20", "-E", "--ckpt", "nope.pth"], ["checkpoint not found"]),
    (["digits", "-a", "resnet", "--layers", "20", "-E"], ["need --ckpt"]),
    (["imagenet", "-a", "resnet", "--layers", "18", "--datapath", "."],
     ["ImageNet data directory not found"]),
    (["digits", "-a", "resnet", "--layers", "20", "--lr"], ["expected one argument"]),
    (["digits", "-a", "resnet", "--layers", "20", "-p", "0"], ["--print-freq must be at least 1"]),
    (["digits", "-a", "resnet", "--layers", "20", "-j", "-1"], ["-j/--workers must be 0 or more"]),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, argv, needles):
    rc, _, err = run_cli("main.py", *argv, cwd=tmp_path)
    assert_user_error(rc, err, *needles)


def test_corrupt_checkpoint(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint at all")
    rc, _, err = run_cli("main.py", *TINY, "-E", "--ckpt", bad, cwd=tmp_path)
    assert_user_error(rc, err, "cannot read checkpoint")
    assert bad.read_bytes() == b"not a checkpoint at all"


def test_not_a_model(tmp_path):
    p = tmp_path / "list.pth"
    torch.save([1, 2, 3], p)
    rc, _, err = run_cli("main.py", *TINY, "-E", "--ckpt", p, cwd=tmp_path)
    assert_user_error(rc, err, "not a model checkpoint")


def test_checkpoint_of_another_architecture_says_which(trained):
    ckpt = trained / CKPT_DIR / "ckpt_best.pth"
    rc, _, err = run_cli("main.py", "digits", "-a", "mobilenet", "-j", "0", "-E", "--ckpt", ckpt,
                         cwd=trained)
    assert_user_error(rc, err, "resnet20_w0.5", "mobilenet")


@pytest.mark.slow
def test_resume_of_a_weights_only_checkpoint_is_refused(trained):
    p = trained / "weights.pth"
    sd = load_checkpoint(trained / CKPT_DIR / "ckpt_best.pth")["model"]
    torch.save(sd, p)
    rc, _, err = run_cli("main.py", *TINY, "-R", "--ckpt", p, cwd=trained)
    assert_user_error(rc, err, "not resumed")


@pytest.mark.slow
def test_resume_past_the_last_epoch_is_refused(trained):
    rc, _, err = run_cli("main.py", *TINY, "--epochs", "1", "-R", "--ckpt", "ckpt_epoch_1.pth", cwd=trained)
    assert_user_error(rc, err, "already holds epoch 1", "--epochs")


def test_checkpoints_never_hold_the_database_url():
    import main
    args = main.get_args_parser().parse_args(TINY + ["--mongo-url", "mongodb://user:secret@127.0.0.1:1"])
    flags = main.plain_args(args)
    assert "mongo_url" not in flags and flags["arch"] == "resnet"
