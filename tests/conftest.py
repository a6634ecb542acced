import os
import subprocess
import sys
from pathlib import Path

import pytest

# the repository; its modules import as installed by `pip install -e .`
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def one_thread():
    """Torch on one thread: tiny forward passes gain nothing from a second one, and on a
    busy shared CPU its synchronisation costs up to 100x."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run inside an empty folder: checkpoints land in ./checkpoint there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_main(argv, tracker=None):
    """main.py in-process, as the shell would call it."""
    import main
    return main.main(main.get_args_parser().parse_args(argv), tracker)


def run_cli(script, *argv, cwd=None, timeout=300):
    """A CLI in a subprocess: (exit code, stdout, stderr)."""
    # rich fits its tables to COLUMNS, or to 80 columns in a pipe, where it cuts layer names short:
    # one fixed width, whatever the terminal pytest was started from
    env = dict(os.environ, COLUMNS="200")
    p = subprocess.run([sys.executable, str(ROOT / script), *map(str, argv)], cwd=cwd,
                       capture_output=True, text=True, timeout=timeout, env=env)
    return p.returncode, p.stdout, p.stderr


def assert_user_error(rc, err, *needles):
    """Exit code 2 and one clear line on stderr naming the problem."""
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert rc == 2, (rc, err)
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert "Traceback" not in err


# a small ResNet on digits, trained for two epochs once per test module (each module its own folder)
DIGITS = ["digits", "-a", "resnet", "--layers", "20", "--width-mult", "0.25"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    import torch
    cwd = os.getcwd()
    folder = tmp_path_factory.mktemp("digits")
    os.chdir(folder)
    try:
        torch.set_num_threads(1)
        run_main(DIGITS + ["--epochs", "2", "-j", "0", "-b", "64", "--no-track"])
    finally:
        os.chdir(cwd)
    return folder
