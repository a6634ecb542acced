"""What a careless or hostile user finds (the reliability issue): nothing lost, nothing overwritten by
surprise, every bad input one line and exit code 2, and a killed run that resumes where it was."""
import csv
import errno
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, assert_user_error, run_main

import mess.checkpoint
from config import get_args_parser
from run_folder import LOCK_NAME, folder_lock
from utils import UserError, load_checkpoint

TINY = ["digits", "-a", "resnet", "--layers", "20", "--width-mult", "0.25", "-j", "0", "-b", "128",
        "--no-track"]
FOLDER = "checkpoint/resnet20_w0.25/digits"


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def best_is_consistent(folder):
    """ckpt_best.pth holds the epoch with the best validation top-1 of the summary (the last row of an
    epoch counts: a resumed epoch is run again), and the summary has every epoch once."""
    by_epoch = {int(r["epoch"]): float(r["val_top1"]) for r in rows(folder / "summary.csv")}
    best = load_checkpoint(folder / "ckpt_best.pth")
    want = max(by_epoch, key=lambda e: (by_epoch[e], -e))  # the first epoch of the highest score
    return sorted(by_epoch), best["epoch"], want, best["best_acc1"], by_epoch[want]


# ------------------------------------------------------------ 2. one run per folder, never over another
def test_a_fresh_run_refuses_a_folder_with_an_earlier_run(in_tmp):
    run_main(TINY + ["--epochs", "1"])
    folder = in_tmp / FOLDER
    best = (folder / "ckpt_best.pth").read_bytes()
    with pytest.raises(UserError, match=r"already holds a run's checkpoints .* -R --ckpt ckpt_epoch_1.pth"):
        run_main(TINY + ["--epochs", "2", "--seed", "3"])
    assert (folder / "ckpt_best.pth").read_bytes() == best
    assert sorted(p.name for p in folder.glob("*.pth")) == ["ckpt_best.pth", "ckpt_epoch_1.pth"]
    # told to: from scratch over it, the earlier epoch files gone so that the runs never mix
    run_main(TINY + ["--epochs", "1", "--seed", "3", "--overwrite"])
    new = load_checkpoint(folder / "ckpt_best.pth")
    assert new["args"]["seed"] == 3
    ids = [r["run_id"] for r in rows(folder / "summary.csv")]
    assert len(ids) == 2 and all(ids) and ids[0] != ids[1] and ids[1] == new["run_id"]


def test_two_runs_never_share_a_folder(in_tmp):
    with folder_lock(in_tmp / FOLDER, "other-run"):
        with pytest.raises(UserError, match="in use by another run .*other-run"):
            run_main(TINY + ["--epochs", "1"])
    assert not list((in_tmp / FOLDER).glob("*.pth"))
    run_main(TINY + ["--epochs", "1"])  # free again once the other run is gone
    assert (in_tmp / FOLDER / LOCK_NAME).exists()


# ------------------------------------------------------------ 4. one line and exit 2, never a traceback
@pytest.mark.parametrize("flags,needle", [
    (["--lr", "-1"], "--lr/--learning-rate: -1 is out of range"),
    (["--lr", "nan"], "not a finite number"), (["--lr", "inf"], "not a finite number"),
    (["--momentum", "-1"], "--momentum: -1 is out of range"), (["--wd", "-1"], "--wd/--weight-decay"),
    (["--width-mult", "inf"], "--width-mult: inf is not a finite number"),
    (["--seed", str(2**70)], "--seed"), (["--wclip", "nan"], "--wclip: nan"),
])
def test_bad_numbers_are_refused_before_anything_runs(flags, needle, capsys):
    with pytest.raises(SystemExit) as e:
        get_args_parser().parse_args(TINY + flags)
    assert_user_error(e.value.code, capsys.readouterr().err, needle)


def test_the_compressors_refuse_bad_numbers_too(capsys):
    import find_similar_kernel
    with pytest.raises(SystemExit) as e:
        find_similar_kernel.get_args_parser().parse_args(["digits", "--width-mult", "nan"])
    assert_user_error(e.value.code, capsys.readouterr().err, "--width-mult: nan")


def test_datapath_that_is_a_file(in_tmp):
    (in_tmp / "afile").write_text("x")
    with pytest.raises(UserError, match="--datapath afile is a file"):
        run_main(["cifar10", "-a", "resnet", "--layers", "20", "--datapath", "afile", "--no-track"])


@pytest.fixture
def one_epoch(in_tmp):
    run_main(TINY + ["--epochs", "1"])
    return in_tmp / FOLDER / "ckpt_epoch_1.pth"


@pytest.mark.parametrize("damage,needle", [
    (lambda c: c.update(epoch="three"), "epoch 'three' is not a whole number"),
    (lambda c: c["optimizer"].update(param_groups=[]), "optimizer state has no parameter groups"),
    (lambda c: c["rng"].update(torch=torch.zeros(3, dtype=torch.uint8)),
     "random-number state of torch has 3 bytes"),
])
def test_damaged_resume_fields(one_epoch, damage, needle):
    ckpt = torch.load(one_epoch, weights_only=True)
    damage(ckpt)
    bad = one_epoch.with_name("damaged.pth")
    torch.save(ckpt, bad)
    with pytest.raises(UserError, match=needle):
        run_main(TINY + ["--epochs", "2", "-R", "--ckpt", str(bad)])
    assert not (one_epoch.parent / "ckpt_epoch_2.pth").exists()


def refuse_writes_in(monkeypatch, folder):
    """The folder turns read-only (a chmod does not stop root, who runs the CI: refuse its mkstemp)."""
    real = mess.checkpoint.tempfile.mkstemp

    def mkstemp(*a, dir=None, **kw):
        if dir is not None and os.path.samefile(dir, folder):
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))
        return real(*a, dir=dir, **kw)
    monkeypatch.setattr(mess.checkpoint.tempfile, "mkstemp", mkstemp)


def test_read_only_folder_is_found_before_the_work(one_epoch, monkeypatch, capsys):
    folder = one_epoch.parent
    refuse_writes_in(monkeypatch, folder)
    with pytest.raises(UserError, match="cannot write eval.csv in .*: Permission denied"):
        run_main(TINY + ["-E", "--ckpt", "ckpt_best.pth"])
    assert "test " not in capsys.readouterr().out  # refused before evaluating, not after
    with pytest.raises(UserError, match="cannot write this run's checkpoints"):
        run_main(TINY + ["--epochs", "2", "-R", "--ckpt", "ckpt_epoch_1.pth"])
    assert not (folder / "ckpt_epoch_2.pth").exists()


def test_no_room_is_found_before_the_work(in_tmp, monkeypatch):
    import shutil
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 4096, 4096))
    with pytest.raises(UserError, match="not enough free space for this run's checkpoints .* 0.0 MiB free"):
        run_main(TINY + ["--epochs", "1"])
    assert not list(in_tmp.rglob("*.pth"))


def test_disk_full_during_training_keeps_the_last_checkpoint(one_epoch, monkeypatch):
    folder = one_epoch.parent
    before = {p.name: p.read_bytes() for p in folder.glob("*.pth")}

    def full(obj, f):
        f.write(b"PK\x03\x04" + b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(UserError, match=r"cannot write .*_(best|epoch_2).pth: no space left on device; "
                                        r"ckpt_(best|epoch_2).pth (is as it was|was not written)"):
        run_main(TINY + ["--epochs", "2", "-R", "--ckpt", "ckpt_epoch_1.pth"])
    assert {p.name: p.read_bytes() for p in folder.glob("*.pth")} == before
    assert not list(folder.glob(".*.tmp"))


def test_plot_summary_on_a_damaged_epoch(tmp_path):
    import plot_summary
    p = tmp_path / "summary.csv"
    p.write_text("epoch,train_loss,val_loss,train_top1,val_top1\n1,1,1,50,50\n1e400,1,1,50,50\n")
    with pytest.raises(UserError, match="bad epoch '1e400'"):
        plot_summary.read_summary_csv(p)


@pytest.mark.parametrize("sig,rc,word", [
    (signal.SIGINT, -signal.SIGINT, "interrupted"),  # ended by the signal, as a shell loop expects of Ctrl-C
    pytest.param(signal.SIGTERM, 128 + signal.SIGTERM, "terminated", marks=pytest.mark.slow),
])
def test_ctrl_c_and_sigterm_are_one_line_and_leave_no_temporary_file(tmp_path, sig, rc, word):
    env = dict(os.environ, COLUMNS="200", OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, str(ROOT / "main.py"), *TINY, "--epochs", "50"], cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while not (tmp_path / FOLDER / "ckpt_epoch_1.pth").exists() and time.time() < deadline:
        time.sleep(0.1)
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == rc
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and word in lines[0] and "Traceback" not in err, err
    assert not list((tmp_path / FOLDER).glob(".*.tmp"))
    latest = max((tmp_path / FOLDER).glob("ckpt_epoch_*.pth"), key=os.path.getmtime)
    assert load_checkpoint(latest)["epoch"] >= 1


# ------------------------------------------------------------ 5. a kill between the two saves
@pytest.mark.slow  # over 6 s: the slow tier (CI runs it)
def test_kill_between_the_epoch_save_and_the_best_save(in_tmp, monkeypatch):
    import main
    real, calls = main.save_checkpoint, []

    def killed_at_epoch_2(state, path):
        if state["epoch"] == 2:
            calls.append(path.name)
            if len(calls) == 2:
                raise KeyboardInterrupt  # the second write of epoch 2: the process dies here
        real(state, path)
    monkeypatch.setattr(main, "save_checkpoint", killed_at_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        run_main(TINY + ["--epochs", "3", "--lr", "0.05"])
    monkeypatch.setattr(main, "save_checkpoint", real)
    folder = in_tmp / FOLDER
    assert sorted(calls) == ["ckpt_best.pth", "ckpt_epoch_2.pth"]  # epoch 2 was the best so far
    latest = max(folder.glob("ckpt_epoch_*.pth"), key=lambda p: load_checkpoint(p)["epoch"])
    run_main(TINY + ["--epochs", "3", "-R", "--ckpt", latest.name])
    epochs, best_epoch, want, best_acc, want_acc = best_is_consistent(folder)
    assert epochs == [1, 2, 3] and best_epoch == want and best_acc == want_acc


def test_resume_repairs_a_stale_best_and_missing_rows(in_tmp):
    run_main(TINY + ["--epochs", "2", "--lr", "0.05"])
    folder = in_tmp / FOLDER
    epochs, best_epoch, *_ = best_is_consistent(folder)
    assert best_epoch == 2  # the test needs the second epoch to be the best
    # what a kill between the saves of an earlier version left: the best file one epoch behind, the
    # second epoch's summary row missing
    (folder / "ckpt_best.pth").write_bytes((folder / "ckpt_epoch_1.pth").read_bytes())
    lines = (folder / "summary.csv").read_text().splitlines()
    (folder / "summary.csv").write_text("\n".join(lines[:-1]) + "\n")
    run_main(TINY + ["--epochs", "3", "-R", "--ckpt", "ckpt_epoch_2.pth"])
    epochs, best_epoch, want, best_acc, want_acc = best_is_consistent(folder)
    assert epochs == [1, 2, 3] and best_epoch == want and best_acc == want_acc


# ------------------------------------------------------------ 7. -R takes the run's own flags
@pytest.mark.slow  # over 6 s: the slow tier (CI runs it)
def test_resume_takes_the_runs_flags_and_refuses_changes(in_tmp, tmp_path_factory, capsys):
    flags = ["--seed", "1", "--sched", "cosine", "--lr", "0.05"]
    run_main(TINY + flags + ["--epochs", "2"])
    straight = tmp_path_factory.mktemp("straight")
    os.chdir(straight)
    run_main(TINY + flags + ["--epochs", "2"])
    os.chdir(in_tmp)
    with pytest.raises(UserError, match=r"--seed 2 \(the run's: --seed 1\).* --change-flags"):
        run_main(TINY + ["--epochs", "2", "-R", "--ckpt", "ckpt_epoch_1.pth", "--seed", "2"])
    capsys.readouterr()
    # without repeating --seed 1 --sched cosine --lr 0.05: the same run, bit for bit
    run_main(["digits", "--epochs", "2", "-R", "--ckpt", f"{FOLDER}/ckpt_epoch_1.pth", "-j", "0",
              "--no-track"])
    assert "--seed 1" in capsys.readouterr().out
    a = load_checkpoint(in_tmp / FOLDER / "ckpt_epoch_2.pth")
    b = load_checkpoint(straight / FOLDER / "ckpt_epoch_2.pth")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])
    run_main(TINY + ["--epochs", "3", "-R", "--ckpt", "ckpt_epoch_2.pth", "--seed", "2", "--change-flags"])
    assert load_checkpoint(in_tmp / FOLDER / "ckpt_epoch_3.pth")["args"]["seed"] == 2


# ------------------------------------------------------------ 9. the small ones
def test_stale_temporary_files_are_cleaned_and_live_ones_kept(in_tmp):
    folder = in_tmp / FOLDER
    folder.mkdir(parents=True)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead_tmp = folder / f".ckpt_epoch_7.pth.{gone}.abcd_123.tmp"
        old_tmp = folder / ".ckpt_best.pth.k2j3h4g5.tmp"  # before the pid was in the name
        live_tmp = folder / f".ckpt_epoch_7.pth.{live.pid}.zzzz9999.tmp"
        for p in (dead_tmp, old_tmp, live_tmp):
            p.write_bytes(b"\0" * 1000)
        os.utime(old_tmp, (time.time() - 7200, time.time() - 7200))
        run_main(TINY + ["--epochs", "1"])
        assert not dead_tmp.exists() and not old_tmp.exists() and live_tmp.exists()
    finally:
        live.kill()


def test_files_follow_the_umask(in_tmp):
    old = os.umask(0o002)
    try:
        run_main(TINY + ["--epochs", "1"])
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (in_tmp / FOLDER).glob("*.pth")}
    assert modes and set(modes.values()) == {0o664}, modes


def fresh_checkpoint(folder, dataset="digits"):
    import models
    from utils import arch_spec
    args = get_args_parser().parse_args(TINY)
    torch.manual_seed(0)
    model = models.build_model("resnet", "digits", 20, 0.25, False)
    spec = arch_spec(args, 10) | {"dataset": dataset}
    path = folder / "ckpt_best.pth"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "arch": spec}, path)
    return path


def test_compressor_writes_both_files_or_neither(in_tmp, monkeypatch):
    import find_similar_kernel
    path = fresh_checkpoint(in_tmp / FOLDER)
    argv = TINY[:7] + ["-v", "v2qq", "--np", "--ckpt", str(path), "--bn-calib", "off", "--no-track"]

    def full(tmp, ckpt, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(find_similar_kernel, "write_mess", full)
    name = "ckpt_best_v2qq_np_q888"
    with pytest.raises(UserError, match=f"{name}.mess: no space left on device; none of {name}.pth, "
                                        f"{name}.mess was written"):
        find_similar_kernel.main(find_similar_kernel.get_args_parser().parse_args(argv))
    assert sorted(p.name for p in (in_tmp / FOLDER).iterdir()) == ["ckpt_best.pth"]


def test_checkpoint_of_another_dataset_is_refused(in_tmp):
    path = fresh_checkpoint(in_tmp / "elsewhere", dataset="cifar10")
    with pytest.raises(UserError, match="was trained on cifar10, but this run is on digits"):
        run_main(TINY + ["-E", "--ckpt", str(path)])


def test_packed_cli_checks_room_and_a_full_disk_keeps_the_old_file(in_tmp, monkeypatch):
    import shutil

    import packed
    path = fresh_checkpoint(in_tmp / FOLDER)
    argv = TINY[:7] + ["--ckpt", str(path)]
    packed.main(packed.get_args_parser().parse_args(argv))
    out = path.with_suffix(".mess")
    before = out.read_bytes()
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(UserError, match="not enough free space for ckpt_best.mess"):
        packed.main(packed.get_args_parser().parse_args(argv))
    monkeypatch.setattr(shutil, "disk_usage", real)

    def full(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(UserError, match="no space left on device; ckpt_best.mess is as it was"):
        mess.checkpoint.atomic_write(out, full)  # what write_mess, save_checkpoint and the CSVs go through
    assert out.read_bytes() == before and not list(out.parent.glob(".*.tmp"))
