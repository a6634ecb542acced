"""Offline: a download whose host cannot be reached fails at once, in one complete line.

Before, a refused connection was retried four times with a 2, 4, 8, 16 s backoff: 33 s of
silence, then a line cut at 200 characters mid-word.
"""

import socket
import time

import pytest
from conftest import assert_user_error, run_cli

import download as dl
import utils


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_host_is_one_line_at_once_with_the_default_retries(tmp_path):
    port = closed_port()
    url = f"http://127.0.0.1:{port}/models/resnet18-f37072fd.pth"
    t0 = time.monotonic()
    with pytest.raises(utils.UserError) as e:
        dl.download(url, tmp_path / "resnet18-f37072fd.pth", sha256="f37072fd", allow_http=True)
    assert time.monotonic() - t0 < 3  # not RETRIES tries with their backoff
    line = str(e.value)
    assert "\n" not in line and len(line) < 300
    assert line == (f"cannot download resnet18-f37072fd.pth: 127.0.0.1:{port} cannot be reached (connection "
                    f"refused); check the network connection, or fetch the same file from a reachable server "
                    f"with --mirror URL")
    assert not list(tmp_path.iterdir())  # nothing left behind


def test_a_host_name_that_does_not_resolve_says_so(tmp_path, monkeypatch):
    import requests
    import urllib3

    def no_dns(self, url, **kw):  # what requests raises offline, without asking a resolver
        reason = urllib3.exceptions.NameResolutionError("github.com", None, OSError(-2, "Name or service not "
                                                                                       "known"))
        raise requests.ConnectionError(urllib3.exceptions.MaxRetryError(None, url, reason))

    monkeypatch.setattr(requests.Session, "get", no_dns)
    with pytest.raises(utils.UserError, match=r"^cannot download x\.th: github\.com cannot be reached \(its "
                                              r"name does not resolve\); check the network"):
        dl.download("https://github.com/a/b/x.th", tmp_path / "x.th", retries=3, backoff=5.0)


def test_a_long_reason_is_cut_at_a_word():
    text = "word " * 100
    short = dl._short(Exception(text))
    assert len(short) <= 204 and short.endswith("word ...")


def test_down_ckpt_offline_fails_fast_in_one_line(tmp_path):
    port = closed_port()
    t0 = time.monotonic()
    rc, out, err = run_cli("down_ckpt.py", "cifar10", "-a", "resnet", "--layers", "20", "--cache-dir",
                           tmp_path / "cache", "--mirror", f"http://127.0.0.1:{port}/", "--allow-http",
                           "-o", tmp_path / "out.pth", cwd=tmp_path)
    seconds = time.monotonic() - t0
    assert_user_error(rc, err, "down_ckpt.py: error: cannot download cifar10_resnet20-4118986f.pt: "
                               f"127.0.0.1:{port} cannot be reached (connection refused)", "--mirror URL")
    assert err.strip().endswith("with --mirror URL")  # whole, not cut
    assert seconds < 15, seconds  # python and torch start-up; before, 33 s more of retries
    assert not (tmp_path / "out.pth").exists()
