"""A checkpoint or .mess file given by path rebuilds its own model: no architecture flags needed, from any
directory; flags that are given must agree, and a disagreement names the flags that would."""
import csv
from pathlib import Path

import pytest
from conftest import DIGITS, assert_user_error, run_cli, run_main

import check_model_params
import find_similar_kernel as fsk
import models
import packed
from config import get_args_parser
from utils import UserError

FOLDER = "checkpoint/resnet20_w0.25/digits"  # the folder the file's model names
QUIET = ["-j", "0", "-b", "64", "--no-track"]
V2QQ = "ckpt_best_v2qq_np_q888"


@pytest.fixture(scope="module")
def files(digits_run, tmp_path_factory):
    """{kind: absolute path}: the plain, MESS, packed and retrained checkpoints of one ResNet-20 (width
    0.25), each made from another directory by a command that names no architecture."""
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    best = digits_run / FOLDER / "ckpt_best.pth"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(elsewhere)
        fsk.main(fsk.get_args_parser().parse_args(
            ["digits", "--ckpt", str(best), "-v", "v2qq", "--np", "--bn-calib", "off", "--no-track"]))
        run_main(["digits", "-T", "--ckpt", str(best.with_name(V2QQ + ".pth")), "--epochs", "1",
                  "--bn-calib", "off"] + QUIET)
    return {"plain": best, "mess": best.with_name(V2QQ + ".pth"), "packed": best.with_name(V2QQ + ".mess"),
            "retrained": elsewhere / FOLDER / f"ckpt_rt1_{V2QQ[10:]}_best.pth"}


@pytest.mark.parametrize("kind", ["plain", "mess", "packed", "retrained"])
def test_evaluate_by_path_from_another_directory_without_architecture_flags(files, kind, tmp_path,
                                                                           monkeypatch, one_thread):
    path = files[kind]
    monkeypatch.chdir(path.parent)  # where its own flags find it: the reference figures
    flagged = run_main(DIGITS + ["-E", "--ckpt", path.name] + QUIET)["metrics"]
    monkeypatch.chdir(tmp_path)  # an empty directory, and no -a, --layers, --width-mult
    bare = run_main(["digits", "-E", "--ckpt", str(path)] + QUIET)
    assert bare["metrics"] == flagged
    # the row lands in the folder of the model the file holds (the original's layout, here in cwd)
    assert bare["ckpt_dir"] == Path(FOLDER)
    with open(tmp_path / FOLDER / "eval.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[-1]["ckpt"] == str(path) and float(rows[-1]["val_top1"]) == flagged["val_top1"]


def test_flags_that_disagree_name_the_flags_that_agree(files, tmp_path):
    rc, _, err = run_cli("main.py", "digits", "-a", "resnet", "--layers", "56", "-E", "--ckpt",
                         files["plain"], *QUIET, cwd=tmp_path)
    assert_user_error(rc, err, str(files["plain"]), "holds a resnet20_w0.25", "-a resnet --layers 56",
                      "give -a resnet --layers 20 --width-mult 0.25")
    assert not (tmp_path / "checkpoint").exists()  # refused before anything was written


def test_flags_that_agree_or_do_not_matter_are_taken(files, tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    # -a and --width-mult as the file says; --bn, which a ResNet ignores, changes nothing
    out = run_main(["digits", "-a", "resnet", "--width-mult", "0.25", "--bn", "-E", "--ckpt",
                    str(files["plain"])] + QUIET)
    assert out["ckpt_dir"] == Path(FOLDER)


def test_a_missing_checkpoint_names_every_path_looked_at(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = get_args_parser().parse_args(DIGITS + ["-E", "--ckpt", "ckpt_nope.pth"] + QUIET)
    import main
    with pytest.raises(UserError) as e:
        main.main(args)
    assert str(tmp_path / "ckpt_nope.pth") in str(e.value)
    assert str(tmp_path / FOLDER / "ckpt_nope.pth") in str(e.value)


def test_the_tools_take_the_model_from_the_file(files, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = packed.main(packed.get_args_parser().parse_args(["digits", "--ckpt", str(files["packed"])]))
    assert out["bytes"] == files["packed"].stat().st_size
    check_model_params.main(check_model_params.get_args_parser().parse_args(
        ["digits", "--ckpt", str(files["mess"])]))
    assert "layer3.2.conv2" in capsys.readouterr().out  # a ResNet-20's last conv: the file's model
    with pytest.raises(UserError, match="give -a resnet --layers 20 --width-mult 0.25"):
        packed.main(packed.get_args_parser().parse_args(["digits", "-a", "vgg", "--ckpt",
                                                         str(files["plain"])]))


@pytest.mark.parametrize("arch, dataset, depth", [("resnet", "digits", 20), ("resnet", "imagenet", 18),
                                                  ("resnet_a", "cifar10", 20), ("vgg", "cifar10", 16),
                                                  ("wideresnet", "cifar100", 28)])
def test_each_architecture_has_its_own_default_depth(arch, dataset, depth):
    args = get_args_parser().parse_args([dataset, "-a", arch])
    assert args.layers == depth
    assert models.default_depth(arch, dataset) == depth
    assert get_args_parser().parse_args([dataset, "-a", arch, "--layers", "56"]).layers == 56


def test_resnet_without_layers_trains(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    out = run_main(["digits", "-a", "resnet", "--width-mult", "0.25", "--epochs", "1"] + QUIET)
    assert out["ckpt_dir"].name == "digits" and out["ckpt_dir"].parent.name == "resnet20_w0.25"


def test_the_record_of_a_run_names_the_model_the_file_holds(files, tmp_path, monkeypatch, one_thread):
    import json

    from conftest import ROOT

    import main
    import tracking
    monkeypatch.chdir(tmp_path)
    args = main.get_args_parser().parse_args(["digits", "-E", "--ckpt", str(files["plain"]), "-j", "0"])
    tracking.tracked_run(tracking.Experiment("main.py", base_dir=str(ROOT)), main.main, args,
                         command=tracking.train_command, check=main.check_args)
    config = json.loads((tmp_path / "runs/1/config.json").read_text())
    assert (config["arch"], config["layers"], config["width_mult"]) == ("resnet", 20, 0.25)
    assert "resnet" in config["tags"] and "mobilenet" not in config["tags"]
    # refused before the run: a file that is not there, or flags that disagree with it, record nothing
    for argv in (["-E", "--ckpt", str(tmp_path / "nothere.pth")],
                 ["-a", "vgg", "-T", "--ckpt", str(files["plain"])]):
        args = main.get_args_parser().parse_args(["digits", *argv, "-j", "0"])
        with pytest.raises(UserError):
            tracking.tracked_run(tracking.Experiment("main.py", base_dir=str(ROOT)), main.main, args,
                                 command=tracking.train_command, check=main.check_args)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["1", "_sources"]


def test_a_bare_name_is_found_in_the_one_model_folder_that_holds_it(digits_run, tmp_path, monkeypatch,
                                                                    one_thread):
    monkeypatch.chdir(digits_run)  # checkpoint/resnet20_w0.25/digits/ckpt_best.pth, and no other model's
    out = run_main(["digits", "-E", "--ckpt", "ckpt_best.pth"] + QUIET)
    assert out["ckpt_dir"] == Path(FOLDER)
    # -a given: only its own folder is looked in
    with pytest.raises(UserError, match="checkpoint/vgg16/digits/ckpt_best.pth"):
        run_main(["digits", "-a", "vgg", "-E", "--ckpt", "ckpt_best.pth"] + QUIET)
    # two models' folders hold the name: which one is the user's to say
    monkeypatch.chdir(tmp_path)
    for model in ("resnet20", "vgg16"):
        (tmp_path / f"checkpoint/{model}/digits").mkdir(parents=True)
        (tmp_path / f"checkpoint/{model}/digits/ckpt_best.pth").write_bytes(b"")
    with pytest.raises(UserError, match="is in 2 model folders .*give its path, or -a ARCH"):
        run_main(["digits", "-E", "--ckpt", "ckpt_best.pth"] + QUIET)
