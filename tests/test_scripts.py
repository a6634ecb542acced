"""scripts/: the quickstart and the original's sweep scripts run end to end on digits and write their tables.

Tiny settings: one epoch, thin models, one bit width, CPU, one thread. The quickstart runs in the fast tier;
the six sweeps are marked slow (``-m 'not slow'`` skips them; the TRAIN=0 ones start from a baseline trained
here, in-process).
"""
import csv
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, run_main

RESNET = ["digits", "-a", "resnet", "--layers", "20", "--width-mult", "0.5"]
TINY_ENV = {"DATA": "digits", "EPOCHS": "1", "RT_EPOCHS": "1", "GPUS": "", "QBS": "4",
            "MAIN_FLAGS": "--no-track", "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """checkpoint/resnet20_w0.5/digits/ckpt_best.pth, trained one epoch (the TRAIN=0 scripts' input)."""
    d = tmp_path_factory.mktemp("baseline")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(d)
            run_main(RESNET + ["-j", "0", "-b", "256", "--epochs", "1"])
    finally:
        torch.set_num_threads(n)
    return d / "checkpoint"


def run_script(name, cwd, **env):
    p = subprocess.run(["bash", str(ROOT / "scripts" / f"{name}.sh")], cwd=cwd, capture_output=True,
                       text=True, env={**os.environ, **TINY_ENV, **env}, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    with open(cwd / "results" / f"{name}.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    bits_of_format = {}
    for r in rows:
        assert r["sweep"] == name and r["dataset"] == "digits"
        ck = torch.load(cwd / "checkpoint" / r["model"] / "digits" / r["ckpt"], map_location="cpu",
                        weights_only=True)
        floats = sum(v.numel() for v in ck["model"].values() if v.is_floating_point())
        assert int(r["fp32_bits"]) == 32 * floats  # the ratio is against the float32 state_dict
        if r["format"] == "float32":
            assert int(r["bits"]) == int(r["fp32_bits"]) and r["ratio"] == "1.0"
        else:
            assert int(r["bits"]) < int(r["fp32_bits"]) and float(r["ratio"]) > 1.0
        bits_of_format.setdefault(r["format"], set()).add(r["bits"])
        if r["stage"] in ("trained", "retrained"):  # the table's -E gives back what training measured
            assert float(r["top1"]) == pytest.approx(ck["best_acc1"], abs=0.006)
    assert all(len(b) == 1 for b in bits_of_format.values()), bits_of_format  # retraining keeps the size
    assert "compression" in p.stdout  # the table, printed at the end
    if name != "quickstart":  # the sweeps drop per-epoch files, as the original's did
        assert not list(cwd.glob("checkpoint/*/digits/ckpt_rt*_epoch_*.pth"))
    return rows, p.stdout


def table(rows):
    return [(r["ckpt"], r["stage"], r["format"]) for r in rows]


@pytest.mark.slow
def test_quickstart_prints_accuracy_and_ratio_side_by_side(tmp_path):
    rows, out = run_script("quickstart", tmp_path, MODEL_FLAGS="--width-mult 0.5", BATCH="256")
    assert table(rows) == [("ckpt_best.pth", "trained", "float32"),
                           ("ckpt_best_v2qq_q444.pth", "compressed", "v2qq q444"),
                           ("ckpt_rt1_v2qq_q444_best.pth", "retrained", "v2qq q444")]
    assert float(rows[1]["ratio"]) > 5 and rows[1]["ratio"] == rows[2]["ratio"]
    assert "ckpt_rt1_v2qq_q444_best.pth" in out


@pytest.mark.slow
def test_v2qq_cifar_run(tmp_path):
    rows, _ = run_script("sh_v2qq_cifar_run", tmp_path, ARCH="resnet", LAYERS="20", S="1",
                         MODEL_FLAGS="--width-mult 0.5")
    assert table(rows) == [("ckpt_new_v2qq_q488_s1_best.pth", "trained", "v2qq q488")]


@pytest.mark.slow
def test_v2qq_cifar_test(tmp_path, baseline):
    shutil.copytree(baseline, tmp_path / "checkpoint")
    rows, _ = run_script("sh_v2qq_cifar_test", tmp_path, LAYERS="20", QBS="4 3", TRAIN="0",
                         MODEL_FLAGS="--width-mult 0.5")
    assert table(rows) == [("ckpt_best.pth", "trained", "float32"),
                           ("ckpt_best_v2qq_q488.pth", "compressed", "v2qq q488"),
                           ("ckpt_rt1_v2qq_q488_s1_best.pth", "retrained", "v2qq q488"),
                           ("ckpt_best_v2qq_q388.pth", "compressed", "v2qq q388"),
                           ("ckpt_rt1_v2qq_q388_s1_best.pth", "retrained", "v2qq q388")]


@pytest.mark.slow
def test_resnet_imagenet_v2qq(tmp_path, baseline):
    shutil.copytree(baseline, tmp_path / "checkpoint")
    rows, _ = run_script("sh_resnet_imagenet_v2qq", tmp_path, LAYERS="20", TRAIN="0", NEW="0",
                         MODEL_FLAGS="--width-mult 0.5")
    assert table(rows) == [("ckpt_best.pth", "trained", "float32"),
                           ("ckpt_best_q4.pth", "quantized", "q4"),
                           ("ckpt_rt1_q4_best.pth", "retrained", "q4"),
                           ("ckpt_best_v2qq_q488.pth", "compressed", "v2qq q488"),
                           ("ckpt_rt1_v2qq_q488_best.pth", "retrained", "v2qq q488")]


@pytest.mark.slow
def test_v2nb_cifar_test(tmp_path):
    rows, _ = run_script("sh_v2nb_cifar_test", tmp_path, LAYERS="20", TRAIN="1",
                         MODEL_FLAGS="--width-mult 0.5")
    assert table(rows) == [("ckpt_best.pth", "trained", "float32"),
                           ("ckpt_best_v2nb_q48.pth", "compressed", "v2nb q48"),
                           ("ckpt_rt1_v2nb_q48_s1_best.pth", "retrained", "v2nb q48")]


QUANT_VS_V2QQ = [("ckpt_best.pth", "trained", "float32"), ("ckpt_best_q4.pth", "quantized", "q4"),
                 ("ckpt_rt1_q4_best.pth", "retrained", "q4"),
                 ("ckpt_best_v2qq_q488.pth", "compressed", "v2qq q488"),
                 ("ckpt_rt1_v2qq_q488_s5_best.pth", "retrained", "v2qq q488")]


@pytest.mark.slow
def test_vgg16_cifar_v2qq(tmp_path):
    rows, _ = run_script("sh_vgg16_cifar_v2qq", tmp_path, MODEL_FLAGS="--width-mult 0.125", PEERS="km2c vq4")
    assert table(rows) == QUANT_VS_V2QQ + [  # the palettization peers beside them (PEERS)
        ("ckpt_best_km2c.pth", "quantized", "km2c"), ("ckpt_rt1_km2c_best.pth", "retrained", "km2c"),
        ("ckpt_best_vq4.pth", "quantized", "vq4"), ("ckpt_rt1_vq4_best.pth", "retrained", "vq4")]
    assert {r["model"] for r in rows} == {"vgg16_w0.125"}


@pytest.mark.slow
def test_mobile_imagenet_v2qq(tmp_path):
    rows, _ = run_script("sh_mobile_imagenet_v2qq", tmp_path, ARCH="mobilenet", TRAIN="1",
                         MODEL_FLAGS="--width-mult 0.25")
    assert table(rows) == QUANT_VS_V2QQ and {r["model"] for r in rows} == {"mobilenet_w0.25"}
