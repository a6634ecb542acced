"""torchrun with gloo on CPU: one writer, the same samples, and checkpoints that move.

Slow (two processes train for two epochs); tests/test_data.py checks the sharding in one process."""
import csv
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, run_main

from run_folder import LOCK_NAME

pytestmark = pytest.mark.slow

BASE = ["digits", "-a", "resnet", "--layers", "20", "--width-mult", "0.5", "-j", "0", "-b", "64",
        "--sched", "cosine", "--lr", "0.05"]
ARGS = BASE + ["--epochs", "2"]
CKPT_DIR = "checkpoint/resnet20_w0.5/digits"


def rows(folder):
    with open(folder / CKPT_DIR / "summary.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(ROOT / "main.py"), *ARGS], cwd=d, capture_output=True, text=True, env=env,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return d, p.stdout


def test_two_processes_see_every_sample_once_and_rank0_alone_writes(ddp_run, in_tmp):
    d, stdout = ddp_run
    ddp_rows = rows(d)
    assert [r["epoch"] for r in ddp_rows] == ["1", "2"]  # one writer: one row per epoch
    assert stdout.count("epoch 2/2 ") == 1  # one printer
    assert "DistributedDataParallel" in stdout
    assert [int(r["train_samples"]) for r in ddp_rows] == [1438, 1438]  # the train split, summed over ranks
    files = sorted(p.name for p in (d / CKPT_DIR).iterdir() if p.name != LOCK_NAME)  # rank 0's lock
    assert files == ["ckpt_best.pth", "ckpt_epoch_1.pth", "ckpt_epoch_2.pth", "summary.csv"]
    assert float(ddp_rows[1]["train_loss"]) < float(ddp_rows[0]["train_loss"])  # it trains
    # One model, not two: the checkpoint rank 0 wrote, evaluated in one process on the whole validation
    # set, gives what the two ranks measured on their halves of it. Replicas whose gradients were not
    # averaged would differ by far more than rounding. (Two-epoch accuracies of a DDP and a one-process
    # run are no test: their shuffles differ, and their accuracies were seen 16.7 points apart.)
    ev = run_main(BASE + ["-E", "--ckpt", str(d / CKPT_DIR / "ckpt_epoch_2.pth")])["metrics"]
    assert ev["val_loss"] == pytest.approx(float(ddp_rows[-1]["val_loss"]), rel=1e-4)
    # top-1 counts whole samples: one near-tie may round the other way at another batch size
    assert ev["val_top1"] == pytest.approx(float(ddp_rows[-1]["val_top1"]), abs=100 / 359 + 1e-9)


def test_ddp_checkpoint_resumes_in_one_plain_process(ddp_run, monkeypatch):
    d, _ = ddp_run
    ckpt = torch.load(d / CKPT_DIR / "ckpt_epoch_2.pth", map_location="cpu", weights_only=True)
    assert not any(k.startswith("module.") for k in ckpt["model"])
    monkeypatch.chdir(d)
    res = run_main(BASE + ["--epochs", "3", "-R", "--ckpt", "ckpt_epoch_2.pth"])
    assert [r["epoch"] for r in res["history"]] == [3]
