"""scripts/: the quickstart and the original's sweep scripts run end to end on digits and write their tables.

Tiny settings: one epoch, thin models, one bit width, CPU, one thread. The scripts' runs are marked slow
(``-m 'not slow'`` skips them; the TRAIN=0 ones start from a baseline trained here, in-process); the fast tier
checks the sweeps' cleanup on one training run of common.sh's helper.
"""
import csv
import os
import re
import shlex
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


FOREIGN = "resnet20"  # another model of the dataset, whose files no sweep of a thinned model may touch


def plant_decoys(cwd, model, prefixes, same_names=False):
    """Per-epoch files a sweep must leave alone: under another model's folder, the names this run writes
    (``<prefix>_epoch_1.pth``); under the run's own folder, another run's (``<prefix>_other_epoch_99``)
    or, with ``same_names``, an earlier, longer run's (``<prefix>_epoch_99``: main.py refuses to train
    from scratch beside that one, run_folder.py). ``{path: content}``."""
    assert model != FOREIGN
    decoys = {}
    for folder, epoch, tag in ((FOREIGN, 1, ""), (model, 99, "" if same_names else "_other")):
        d = cwd / "checkpoint" / folder / "digits"
        d.mkdir(parents=True, exist_ok=True)
        for prefix in prefixes:
            path = d / f"{prefix}{tag}_epoch_{epoch}.pth"
            path.write_bytes(f"decoy {folder} {prefix} {epoch}".encode())
            decoys[path] = path.read_bytes()
    return decoys


def assert_cleaned(cwd, model, decoys):
    """The decoys (every per-epoch file there before the run) as they were; the run's own per-epoch files
    gone, its _best kept."""
    for path, content in decoys.items():
        assert path.read_bytes() == content, path
    own = cwd / "checkpoint" / model / "digits"
    assert set(own.glob("*_epoch_*.pth")) == {p for p in decoys if p.parent == own}
    assert list(own.glob("*_best.pth"))


def run_script(name, cwd, expected=None, model="resnet20_w0.5", **env):
    """Run scripts/NAME.sh in cwd, check its table (rows EXPECTED when given) and return (rows, stdout).
    A sweep runs beside decoys named after the runs of EXPECTED (plant_decoys) and must spare them."""
    prefixes = [c[:-len("_best.pth")] for c, stage, _ in expected or [] if stage in ("trained", "retrained")]
    decoys = plant_decoys(cwd, model, prefixes) if name != "quickstart" else {}
    # the per-epoch files already there (the TRAIN=0 baseline's) are no more the sweep's than the decoys
    decoys.update({f: f.read_bytes() for f in cwd.glob(f"checkpoint/{model}/digits/*_epoch_*.pth")})
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
    if expected is not None:
        assert table(rows) == expected
        assert {r["model"] for r in rows} == {model}
    if name != "quickstart":  # the sweeps drop their runs' per-epoch files, as the original's did
        assert_cleaned(cwd, model, decoys)
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


def usage_example(script):
    """The environment of docs/usage.md's digits example of scripts/SCRIPT.sh (``VAR=VALUE ... bash ...``)."""
    text = (ROOT / "docs" / "usage.md").read_text()
    m = re.search(r"```shell\n((?:[A-Z_]+=\S*\s+)+.*?bash scripts/" + re.escape(script) + r"\.sh)\n```", text,
                  re.S)
    assert m, f"no digits example of {script}.sh in docs/usage.md"
    words = shlex.split(m[1].replace("\\\n", " "))
    return dict(w.split("=", 1) for w in words[:words.index("bash")])


# main.py's writes as atomic_write makes them (a temporary file renamed into place), at once: the run of
# run_clean below, so that the fast tier checks the cleanup rule without training
WRITE_LIKE_MAIN = """run_main() {
    local f
    for f in ckpt_epoch_1.pth ckpt_epoch_2.pth ckpt_best.pth; do
        echo "$*" > "$dir/.$f.tmp" && mv "$dir/.$f.tmp" "$dir/$f"
    done
}"""


def test_sweep_cleanup_spares_other_models_and_runs(tmp_path):
    """common.sh's run_clean in the folder of ckpt_dir (resnet20_w0.5): the run's ckpt_epoch_1.pth (over
    an earlier one) and ckpt_epoch_2.pth go, its ckpt_best.pth stays; another model's ckpt_epoch_1.pth,
    an earlier run's ckpt_epoch_99.pth and another run's ckpt_rt1_q4_epoch_1.pth stay."""
    decoys = plant_decoys(tmp_path, "resnet20_w0.5", ["ckpt", "ckpt_rt1_q4"], same_names=True)
    own = tmp_path / "checkpoint/resnet20_w0.5/digits"
    (own / "ckpt_epoch_1.pth").write_text("an earlier run's, written again by this one")
    script = f'source "$0"; dir="$(ckpt_dir "$@")"; {WRITE_LIKE_MAIN}; run_clean "$dir" ckpt "$@"'
    p = subprocess.run(["bash", "-c", script, ROOT / "scripts" / "common.sh", *RESNET], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120, env={**os.environ, **TINY_ENV})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert_cleaned(tmp_path, "resnet20_w0.5", decoys)
    assert (own / "ckpt_best.pth").read_text() == " ".join(RESNET) + "\n"


def test_sweep_ckpt_dir_refuses_a_bad_model(tmp_path):
    """ckpt_dir, as main.py would: one line on stderr, exit 2, and no folder made."""
    p = subprocess.run(["bash", "-c", 'source "$0"; ckpt_dir "$@"', ROOT / "scripts" / "common.sh",
                        "digits", "-a", "resnet", "--layers", "21"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120, env={**os.environ, **TINY_ENV})
    assert p.returncode == 2 and p.stdout == "" and len(p.stderr.splitlines()) == 1
    assert p.stderr.startswith("main.py: error: resnet has no depth 21 for digits")
    assert not (tmp_path / "checkpoint").exists()


@pytest.mark.slow
def test_usage_digits_example_spares_other_models(tmp_path):
    """docs/usage.md's digits example, as written (it trains resnet20_w0.5), beside checkpoint/resnet20/:
    the example once removed that model's ckpt_epoch_*.pth."""
    env = usage_example("sh_v2qq_cifar_test")
    assert env["MODEL_FLAGS"] == "--width-mult 0.5" and env["TRAIN"] == "1"
    run_script("sh_v2qq_cifar_test", tmp_path, [
        ("ckpt_best.pth", "trained", "float32"), ("ckpt_best_v2qq_q488.pth", "compressed", "v2qq q488"),
        ("ckpt_rt1_v2qq_q488_s1_best.pth", "retrained", "v2qq q488")], WORKERS="0", **env)


@pytest.mark.slow
def test_v2qq_cifar_run(tmp_path):
    run_script("sh_v2qq_cifar_run", tmp_path, [("ckpt_new_v2qq_q488_s1_best.pth", "trained", "v2qq q488")],
               ARCH="resnet", LAYERS="20", S="1", MODEL_FLAGS="--width-mult 0.5")


@pytest.mark.slow
def test_v2qq_cifar_test(tmp_path, baseline):
    shutil.copytree(baseline, tmp_path / "checkpoint")
    run_script("sh_v2qq_cifar_test", tmp_path, [
        ("ckpt_best.pth", "trained", "float32"), ("ckpt_best_v2qq_q488.pth", "compressed", "v2qq q488"),
        ("ckpt_rt1_v2qq_q488_s1_best.pth", "retrained", "v2qq q488"),
        ("ckpt_best_v2qq_q388.pth", "compressed", "v2qq q388"),
        ("ckpt_rt1_v2qq_q388_s1_best.pth", "retrained", "v2qq q388")],
        LAYERS="20", QBS="4 3", TRAIN="0", MODEL_FLAGS="--width-mult 0.5")


@pytest.mark.slow
def test_resnet_imagenet_v2qq(tmp_path, baseline):
    shutil.copytree(baseline, tmp_path / "checkpoint")
    run_script("sh_resnet_imagenet_v2qq", tmp_path, [
        ("ckpt_best.pth", "trained", "float32"), ("ckpt_best_q4.pth", "quantized", "q4"),
        ("ckpt_rt1_q4_best.pth", "retrained", "q4"), ("ckpt_best_v2qq_q488.pth", "compressed", "v2qq q488"),
        ("ckpt_rt1_v2qq_q488_best.pth", "retrained", "v2qq q488")],
        LAYERS="20", TRAIN="0", NEW="0", MODEL_FLAGS="--width-mult 0.5")


@pytest.mark.slow
def test_v2nb_cifar_test(tmp_path):
    run_script("sh_v2nb_cifar_test", tmp_path, [
        ("ckpt_best.pth", "trained", "float32"), ("ckpt_best_v2nb_q48.pth", "compressed", "v2nb q48"),
        ("ckpt_rt1_v2nb_q48_s1_best.pth", "retrained", "v2nb q48")],
        LAYERS="20", TRAIN="1", MODEL_FLAGS="--width-mult 0.5")


QUANT_VS_V2QQ = [("ckpt_best.pth", "trained", "float32"), ("ckpt_best_q4.pth", "quantized", "q4"),
                 ("ckpt_rt1_q4_best.pth", "retrained", "q4"),
                 ("ckpt_best_v2qq_q488.pth", "compressed", "v2qq q488"),
                 ("ckpt_rt1_v2qq_q488_s5_best.pth", "retrained", "v2qq q488")]


@pytest.mark.slow
def test_vgg16_cifar_v2qq(tmp_path):
    run_script("sh_vgg16_cifar_v2qq", tmp_path, QUANT_VS_V2QQ + [  # the palettization peers beside them
        ("ckpt_best_km2c.pth", "quantized", "km2c"), ("ckpt_rt1_km2c_best.pth", "retrained", "km2c"),
        ("ckpt_best_vq4.pth", "quantized", "vq4"), ("ckpt_rt1_vq4_best.pth", "retrained", "vq4")],
        model="vgg16_w0.125", MODEL_FLAGS="--width-mult 0.125", PEERS="km2c vq4")


@pytest.mark.slow
def test_mobile_imagenet_v2qq(tmp_path):
    run_script("sh_mobile_imagenet_v2qq", tmp_path, QUANT_VS_V2QQ, model="mobilenet_w0.25", ARCH="mobilenet",
               TRAIN="1", MODEL_FLAGS="--width-mult 0.25")
