"""Readable logs: a training run's output, piped or on a terminal, and its captured cout.txt.

A pipe gets whole lines (no 80-column cuts, no progress bars); a terminal (a pseudo-terminal
here, python's pty module) gets the bars and colours; runs/<id>/cout.txt holds every line of
either as plain text, without the bars' frames.
"""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import DIGITS, ROOT

ARGV = DIGITS + ["--epochs", "2", "-j", "0", "-b", "64", "--ckpt-dir", "ck"]
# the whole epoch line, from its start to its end (a cut one matches neither end)
EPOCH_LINE = re.compile(r"^epoch (\d)/2 lr \S+ \| train .* \| best \S+% \| \S+s \| "
                        r"elapsed \d+:\d\d:\d\d ETA \d+:\d\d:\d\d( \*)?$")


def env():
    e = dict(os.environ)
    e.pop("COLUMNS", None)  # rich's width as a user's shell leaves it
    e.pop("LINES", None)
    return e


def epoch_lines(text):
    return [int(m.group(1)) for m in map(EPOCH_LINE.match, text.splitlines()) if m]


def cout(cwd):
    with open(Path(cwd) / "runs/1/cout.txt", newline="") as f:
        return f.read()


def assert_plain_and_complete(text):
    assert epoch_lines(text) == [1, 2], text
    assert "\x1b" not in text and "\r" not in text and "it/s" not in text, repr(text)


@pytest.mark.slow
def test_piped_output_has_whole_lines_and_cout_every_epoch(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "main.py"), *ARGV], cwd=tmp_path, env=env(),
                       capture_output=True, text=True, timeout=300)  # stdout a pipe, as in `| tee log`
    assert p.returncode == 0, p.stderr
    assert epoch_lines(p.stdout) == [1, 2], p.stdout
    assert max(len(ln) for ln in p.stdout.splitlines()) > 80  # longer than rich's pipe width, unbroken
    assert not any(ln.startswith(("best", "|", " ")) for ln in p.stdout.splitlines()), p.stdout
    assert "\x1b" not in p.stdout and p.stderr == ""  # no colours, no bars in a pipe (tqdm disable=None)
    assert_plain_and_complete(cout(tmp_path))


def run_in_pty(argv, cwd, columns=100):
    """``argv`` on a pseudo-terminal of ``columns``: (exit code, everything it wrote)."""
    import fcntl
    import pty
    import struct
    import termios
    pid, fd = pty.fork()
    if pid == 0:  # the child: its stdin, stdout and stderr are the terminal
        try:
            fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
            os.chdir(cwd)
            os.execve(argv[0], argv, env())
        finally:
            os._exit(127)
    out, deadline = bytearray(), time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the child has closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(fd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out.decode("utf-8", "replace")


@pytest.mark.slow
def test_terminal_run_shows_bars_and_cout_keeps_plain_lines(tmp_path):
    rc, screen = run_in_pty([sys.executable, str(ROOT / "main.py"), *ARGV], tmp_path)
    assert rc == 0, screen
    # the terminal path was taken: bars for training and validation, bold labels
    assert "epoch 1/2:" in screen and "validate:" in screen and "\x1b[1m" in screen, screen
    assert epoch_lines(screen) == [1, 2]  # each whole, though longer than the terminal's 100 columns
    assert_plain_and_complete(cout(tmp_path))
