"""download.py, down_ckpt.py, down_imagenet.py against a local HTTP server on 127.0.0.1.

The server serves files the tests create (a real torchvision resnet18 state_dict, a
chenyaofo-layout resnet20, tiny ILSVRC2012-layout archives) and misbehaves on request:
404, 500, a connection cut mid-file, a stall, a server ignoring Range or answering the
wrong range. Nothing leaves this machine.
"""
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
import torchvision
from conftest import ROOT, assert_user_error

import down_ckpt
import down_imagenet
import download as dl
import pretrained
import torchvision_to_ours
import utils
from download import download

# ---------------------------------------------------------------- the server


class Server:
    """Serves ``files`` (name -> bytes); ``plan[name]`` lists how to misbehave on successive
    requests ("ok", "500", "cut", "stall", "ignore_range", "bad_range", "endless": a body with no
    length that never ends, "trickle": one byte every TRICKLE_S seconds); ``redirects[name]`` is a
    URL to send that name to; ``log`` records (name, Range header) of every request. With ``tls``
    (a certificate and key file) it is an https server."""

    TRICKLE_S = 0.5
    ENDLESS_BYTES = 64 << 20  # where an "endless" body does stop: a test of code without a cap ends too

    def __init__(self, tls=None):
        self.files, self.plan, self.redirects, self.log = {}, {}, {}, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                try:
                    server.handle(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client stopped reading (an endless body, a trickle): what it should do

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        scheme = "http"
        if tls:
            import ssl
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*tls)
            self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.httpd.server_address[1]}/"
        self.mirror = ["--mirror", self.url, "--allow-http"]  # a CLI's flags for it: it is plain http
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def requests_for(self, name):
        return [r for n, r in self.log if n == name]

    def handle(self, h):
        name = h.path.lstrip("/")
        rng = h.headers.get("Range")
        self.log.append((name, rng))
        if name in self.redirects:
            h.send_response(302)
            h.send_header("Location", self.redirects[name])
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        queue = self.plan.get(name) or []
        how = queue.pop(0) if queue else "ok"
        if name not in self.files:
            return h.send_error(404)
        if how == "500":
            return h.send_error(500)
        if how == "endless":
            h.send_response(200)
            h.end_headers()  # no Content-Length: HTTP/1.0 ends the body when the connection closes
            for _ in range(self.ENDLESS_BYTES >> 16):
                h.wfile.write(b"\0" * 65536)
            return
        data, start, status = self.files[name], 0, 200
        if rng and how != "ignore_range":
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{len(data)}")
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
            status = 206
        body = data[start:]
        h.send_response(status)
        h.send_header("Content-Length", str(len(body)))
        if status == 206:
            shown = start + 1 if how == "bad_range" else start
            h.send_header("Content-Range", f"bytes {shown}-{len(data) - 1}/{len(data)}")
        h.end_headers()
        if how in ("cut", "stall"):
            h.wfile.write(body[: len(body) // 2])
            h.wfile.flush()
            if how == "stall":
                time.sleep(1.5)
            return  # HTTP/1.0: the connection closes short of Content-Length
        if how == "trickle":
            for i in range(min(len(body), 40)):  # 20 s at most, then the connection closes short
                h.wfile.write(body[i:i + 1])
                h.wfile.flush()
                time.sleep(self.TRICKLE_S)
            return
        h.wfile.write(body)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


FAST = dict(retries=0, backoff=0.0, timeout=(2.0, 0.5), allow_http=True)  # the server is http


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


BLOB = os.urandom(300_000)


# ---------------------------------------------------------------- download()


def test_download_verifies_renames_and_never_fetches_twice(server, tmp_path):
    server.files["blob.bin"] = BLOB
    dest = tmp_path / "sub" / "blob.bin"
    digest = download(server.url + "blob.bin", dest, sha256=sha(BLOB)[:8], progress=True, **FAST)
    assert digest == sha(BLOB) and dest.read_bytes() == BLOB
    assert not dest.with_name("blob.bin.part").exists()
    download(server.url + "blob.bin", dest, sha256=sha(BLOB)[:8], **FAST)
    assert len(server.requests_for("blob.bin")) == 1


def test_md5_is_checked_too(server, tmp_path):
    server.files["a.tar"] = BLOB
    download(server.url + "a.tar", tmp_path / "a.tar", md5=hashlib.md5(BLOB).hexdigest(), **FAST)
    with pytest.raises(utils.UserError, match="md5"):
        download(server.url + "a.tar", tmp_path / "b.tar", md5="0" * 32, **FAST)


def test_404_is_final(server, tmp_path):
    with pytest.raises(utils.UserError, match="HTTP 404"):
        download(server.url + "missing.pth", tmp_path / "missing.pth", retries=3, backoff=0,
                 allow_http=True)
    assert len(server.requests_for("missing.pth")) == 1  # a 404 is not retried
    assert list(tmp_path.iterdir()) == []


def test_500_is_retried_with_backoff_then_reported(server, tmp_path):
    server.files["blob.bin"] = BLOB
    server.plan["blob.bin"] = ["500", "500"]
    download(server.url + "blob.bin", tmp_path / "blob.bin", retries=2, backoff=0.01, allow_http=True)
    assert len(server.requests_for("blob.bin")) == 3
    server.plan["blob.bin"] = ["500"] * 3
    with pytest.raises(utils.UserError, match="failed after 3 tries: HTTP 500"):
        download(server.url + "blob.bin", tmp_path / "other.bin", retries=2, backoff=0.01, allow_http=True)
    assert not (tmp_path / "other.bin").exists()


def test_cut_transfer_resumes_with_range_on_the_next_call(server, tmp_path):
    server.files["blob.bin"] = BLOB
    server.plan["blob.bin"] = ["cut"]
    dest = tmp_path / "blob.bin"
    with pytest.raises(utils.UserError, match="run again to resume"):
        download(server.url + "blob.bin", dest, sha256=sha(BLOB)[:10], **FAST)
    part = tmp_path / "blob.bin.part"
    assert not dest.exists() and 0 < part.stat().st_size < len(BLOB)
    half = part.stat().st_size
    download(server.url + "blob.bin", dest, sha256=sha(BLOB)[:10], **FAST)
    assert dest.read_bytes() == BLOB and not part.exists()
    assert server.requests_for("blob.bin")[-1] == f"bytes={half}-"


def test_cut_and_stall_are_retried_within_one_call(server, tmp_path):
    server.files["blob.bin"] = BLOB
    server.plan["blob.bin"] = ["cut", "stall"]  # the stall outlasts the 0.5 s read timeout
    dest = tmp_path / "blob.bin"
    download(server.url + "blob.bin", dest, sha256=sha(BLOB), **dict(FAST, retries=2))
    assert dest.read_bytes() == BLOB
    ranges = server.requests_for("blob.bin")
    assert ranges[0] is None and ranges[1].startswith("bytes=") and ranges[2].startswith("bytes=")


def test_wrong_checksum_deletes_the_download(server, tmp_path):
    server.files["blob.bin"] = BLOB
    dest = tmp_path / "blob.bin"
    with pytest.raises(utils.UserError, match="not the published file"):
        download(server.url + "blob.bin", dest, sha256="deadbeef", **FAST)
    assert list(tmp_path.iterdir()) == []


def test_a_file_in_place_is_checked_not_fetched(server, tmp_path):
    dest = tmp_path / "blob.bin"
    dest.write_bytes(b"not it")
    with pytest.raises(utils.UserError, match="delete it to download it again"):
        download(server.url + "blob.bin", dest, sha256=sha(BLOB)[:8], **FAST)
    assert server.log == []


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    server.files["blob.bin"] = BLOB
    (tmp_path / "blob.bin.part").write_bytes(BLOB[:1000])
    server.plan["blob.bin"] = ["ignore_range"]
    dest = tmp_path / "blob.bin"
    download(server.url + "blob.bin", dest, sha256=sha(BLOB)[:8], **FAST)
    assert dest.read_bytes() == BLOB  # the whole body replaced the partial file, not appended to it


def test_wrong_content_range_fails_and_discards_the_partial_file(server, tmp_path):
    server.files["blob.bin"] = BLOB
    part = tmp_path / "blob.bin.part"
    part.write_bytes(BLOB[:1000])
    server.plan["blob.bin"] = ["bad_range"]
    with pytest.raises(utils.UserError, match="asked for bytes 1000-"):
        download(server.url + "blob.bin", tmp_path / "blob.bin", **FAST)
    assert not part.exists() and not (tmp_path / "blob.bin").exists()


def test_a_whole_partial_file_is_finished_after_a_416(server, tmp_path):
    server.files["blob.bin"] = BLOB
    (tmp_path / "blob.bin.part").write_bytes(BLOB)  # a run stopped between the last byte and the rename
    download(server.url + "blob.bin", tmp_path / "blob.bin", sha256=sha(BLOB)[:8], **FAST)
    assert (tmp_path / "blob.bin").read_bytes() == BLOB


def test_disk_write_error_is_one_line_and_keeps_a_clean_partial(server, tmp_path):
    # A real write error: the file-size limit makes write() fail with EFBIG (Python ignores SIGXFSZ).
    server.files["blob.bin"] = BLOB
    script = (
        "import resource, sys\n"
        "from download import download\n"
        "from utils import UserError\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))\n"
        "try:\n"
        f"    download({server.url + 'blob.bin'!r}, 'blob.bin', retries=0, allow_http=True)\n"
        "except UserError as e:\n"
        "    print(f'error: {e}', file=sys.stderr); sys.exit(2)\n")
    p = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=60)
    assert_user_error(p.returncode, p.stderr, "cannot write", "blob.bin.part")
    assert not (tmp_path / "blob.bin").exists()
    part = (tmp_path / "blob.bin.part").read_bytes()
    assert BLOB.startswith(part)  # what is kept is a correct prefix: the next run resumes from it
    download(server.url + "blob.bin", tmp_path / "blob.bin", sha256=sha(BLOB), **FAST)
    assert server.requests_for("blob.bin")[-1] == f"bytes={len(part)}-"


# ---------------------------------------------------------------- down_ckpt.py


def cli(module, argv, capsys):
    """A CLI in-process, as the shell runs it: (exit code, stdout, stderr)."""
    try:
        utils.run_cli(module.main, module.get_args_parser(), [str(a) for a in argv])
        rc = 0
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    """A real torchvision resnet18 state_dict (random weights), as torchvision publishes it."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return model.eval(), buf.getvalue()


def serve_as(server, monkeypatch, key, data: bytes):
    """Serve ``data`` under the published file name of SOURCES[key], with the digest in its name."""
    src = pretrained.SOURCES[key]
    stem, ext = src.file.rsplit("-", 1)[0], src.file.rsplit(".", 1)[1]
    fake = replace(src, url=src.url.rsplit("/", 1)[0] + f"/{stem}-{sha(data)[:8]}.{ext}")
    monkeypatch.setitem(pretrained.SOURCES, key, fake)
    server.files[fake.file] = data
    return fake


def test_down_ckpt_imagenet_resnet18(server, in_tmp, monkeypatch, capsys, resnet18_file):
    tv_model, data = resnet18_file
    src = serve_as(server, monkeypatch, ("imagenet", "resnet18"), data)
    argv = ["imagenet", "-a", "resnet", "--layers", "18", *server.mirror, "--cache-dir", "cache"]
    rc, out, err = cli(down_ckpt, argv + ["-o", "pretrained_model.pth"], capsys)
    assert rc == 0, err
    path = in_tmp / "checkpoint/resnet18/imagenet/pretrained_model.pth"  # where main.py --ckpt looks
    ckpt = utils.load_checkpoint(path)
    assert ckpt["arch"] == {"arch": "resnet", "layers": 18, "width_mult": 1.0, "bn": False,
                            "dataset": "imagenet", "num_classes": 1000}
    assert ckpt["epoch"] == 0 and ckpt["best_acc1"] == pytest.approx(69.758)
    assert ckpt["source"] == {"url": src.url, "sha256": sha(data)}
    ours = pretrained.build(down_ckpt.get_args_parser().parse_args(
        ["imagenet", "-a", "resnet", "--layers", "18"]))
    utils.load_state_dict_checked(ours, ckpt["model"], path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ours.eval()(x), tv_model(x))
    # the default place, and a second call that neither downloads nor converts again
    assert cli(down_ckpt, argv, capsys)[0] == 0
    assert (in_tmp / "checkpoint/resnet18/imagenet/ckpt_best.pth").is_file()
    rc, out, _ = cli(down_ckpt, argv, capsys)
    assert rc == 0 and "nothing to do" in out
    # torchvision_to_ours.py without --src fetches the same file: from the cache here
    rc, _, err = cli(torchvision_to_ours, ["-a", "resnet", "--layers", "18", "--mirror", server.url,
                                           "--cache-dir", "cache", "-o", "t2o.pth"], capsys)
    assert rc == 0, err
    assert utils.load_checkpoint(path.with_name("t2o.pth"))["source"] == ckpt["source"]
    assert len(server.requests_for(src.file)) == 1  # one download served all three outputs


def test_down_ckpt_cifar10_chenyaofo_resnet20(server, in_tmp, monkeypatch, capsys):
    from test_convert import CifarResNet
    torch.manual_seed(0)
    theirs = CifarResNet([3, 3, 3], num_classes=10).eval()
    buf = io.BytesIO()
    torch.save(theirs.state_dict(), buf)
    serve_as(server, monkeypatch, ("cifar10", "resnet20"), buf.getvalue())
    rc, _, err = cli(down_ckpt, ["cifar10", "-a", "resnet", "--layers", "20", *server.mirror,
                                 "--cache-dir", "cache"], capsys)
    assert rc == 0, err
    ckpt = utils.load_checkpoint(in_tmp / "checkpoint/resnet20/cifar10/ckpt_best.pth")
    assert ckpt["best_acc1"] == pytest.approx(92.60)
    ours = pretrained.build(down_ckpt.get_args_parser().parse_args(
        ["cifar10", "-a", "resnet", "--layers", "20"]))
    ours.load_state_dict(ckpt["model"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ours.eval()(x), theirs(x))


def test_down_ckpt_failures_are_one_line_and_leave_no_checkpoint(server, in_tmp, monkeypatch, capsys,
                                                                  resnet18_file):
    base = ["imagenet", "-a", "resnet", "--layers", "18", *server.mirror, "--cache-dir", "cache"]
    out = in_tmp / "checkpoint/resnet18/imagenet/ckpt_best.pth"
    # 404: nothing is served yet
    rc, _, err = cli(down_ckpt, base, capsys)
    assert_user_error(rc, err, "HTTP 404", "resnet18-f37072fd.pth")
    # 500 every time
    src = serve_as(server, monkeypatch, ("imagenet", "resnet18"), resnet18_file[1])
    server.plan[src.file] = ["500"] * 10
    monkeypatch.setattr(dl, "BACKOFF", 0.0)
    rc, _, err = cli(down_ckpt, base, capsys)
    assert_user_error(rc, err, "HTTP 500")
    server.plan[src.file] = []
    # a different file under the published name: wrong checksum
    server.files[src.file] = resnet18_file[1][:-10] + b"0123456789"
    rc, _, err = cli(down_ckpt, base, capsys)
    assert_user_error(rc, err, "not the published file")
    assert not out.exists() and not any((in_tmp / "cache").iterdir())


def test_no_published_weights_is_one_line_listing_the_available_ones(capsys):
    rc, _, err = cli(down_ckpt, ["imagenet", "-a", "mobilenet"], capsys)
    assert_user_error(rc, err, "no published imagenet weights for mobilenet", "resnet18", "wideresnet50_w2")
    rc, _, err = cli(down_ckpt, ["cifar100", "-a", "vgg", "--layers", "16"], capsys)
    assert_user_error(rc, err, "vgg16 (add --bn)", "vgg16_bn")


def test_a_trained_checkpoint_is_never_overwritten(server, in_tmp, monkeypatch, capsys, resnet18_file):
    out = in_tmp / "checkpoint/resnet18/imagenet/ckpt_best.pth"
    out.parent.mkdir(parents=True)
    utils.save_checkpoint({"model": {}, "epoch": 90}, out)
    serve_as(server, monkeypatch, ("imagenet", "resnet18"), resnet18_file[1])
    argv = ["imagenet", "-a", "resnet", "--layers", "18", *server.mirror, "--cache-dir", "cache"]
    rc, _, err = cli(down_ckpt, argv, capsys)
    assert_user_error(rc, err, "already exists", "--force")
    assert server.log == []
    assert cli(down_ckpt, argv + ["--force"], capsys)[0] == 0


def test_down_ckpt_all_runs_every_listed_download(tmp_path):
    # a stand-in python records the calls; --list goes to the real one
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/bash\nif [ "$2" = --list ]; then exec {sys.executable} "$@"; fi\n'
                    f'echo "$@" >> {tmp_path}/calls\n[ "$2" != cifar100 ]\n')
    fake.chmod(0o755)
    p = subprocess.run(["bash", str(ROOT / "down_ckpt_all.sh"), "--mirror", "http://127.0.0.1:9/"],
                       env=dict(os.environ, PYTHON=str(fake), PYTHONPATH=str(ROOT)), capture_output=True,
                       text=True, timeout=120, cwd=tmp_path)
    calls = (tmp_path / "calls").read_text().splitlines()
    assert len(calls) == len(pretrained.SOURCES)
    assert all(c.endswith("--mirror http://127.0.0.1:9/") for c in calls)
    assert any("imagenet -a wideresnet --layers 50 --width-mult 2" in c for c in calls)
    assert p.returncode == 2 and "12 download(s) failed" in p.stderr  # the 12 cifar100 calls "failed"


# ---------------------------------------------------------------- down_imagenet.py

WNIDS = ["n01440764", "n01443537"]
VAL_LABELS = [1, 0, 1]  # ILSVRC2012_val_0000000{1,2,3}: ILSVRC ids 2, 1, 2 (1-based below)


def jpeg(color) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buf, "JPEG")
    return buf.getvalue()


def tar_bytes(members: dict, gz=False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def meta_mat() -> bytes:
    """A devkit meta.mat: leaf synsets 1..2 (our classes) and a parent synset 3 that is not one."""
    import scipy.io
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    rows = [(1, WNIDS[0], "tench", "a fish", 0, np.zeros(0), 0, 2),
            (2, WNIDS[1], "goldfish", "a fish", 0, np.zeros(0), 0, 2),
            (3, "n00000003", "fish", "parent", 2, np.array([1, 2]), 1, 0)]
    synsets = np.empty((len(rows), 1), dtype=[(f, object) for f in fields])
    for i, row in enumerate(rows):
        synsets[i, 0] = row
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"synsets": synsets})
    return buf.getvalue()


@pytest.fixture(scope="module")
def ilsvrc():
    """Tiny ILSVRC2012 archives in the real layout: name -> bytes."""
    inner = {w: tar_bytes({f"{w}_{i}.JPEG": jpeg((60 * k, 20 * i, 0)) for i in range(2)})
             for k, w in enumerate(WNIDS)}
    gt = "".join(f"{lab + 1}\n" for lab in VAL_LABELS).encode()
    return {
        "ILSVRC2012_img_train.tar": tar_bytes({f"{w}.tar": data for w, data in inner.items()}),
        "ILSVRC2012_img_val.tar": tar_bytes({f"ILSVRC2012_val_{i + 1:08d}.JPEG": jpeg((0, 0, 80 * i))
                                             for i in range(len(VAL_LABELS))}),
        "ILSVRC2012_devkit_t12.tar.gz": tar_bytes({
            "ILSVRC2012_devkit_t12/data/meta.mat": meta_mat(),
            "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt": gt}, gz=True),
    }


def md5_flags(files):
    return [a for name, data in files.items() for a in ("--md5", f"{name}={hashlib.md5(data).hexdigest()}")]


def test_down_imagenet_extracts_sorts_and_skips_what_is_complete(server, in_tmp, capsys, ilsvrc,
                                                                 monkeypatch, resnet18_file):
    tmp_path = in_tmp
    server.files.update(ilsvrc)
    server.plan["ILSVRC2012_img_val.tar"] = ["cut"]
    md5sums = tmp_path / "MD5SUMS"  # one checksum from a md5sum-style file, the others from --md5
    name = "ILSVRC2012_img_train.tar"
    md5sums.write_text(f"{hashlib.md5(ilsvrc[name]).hexdigest()}  {name}\n")
    rest = {k: v for k, v in ilsvrc.items() if k != name}
    argv = ["--datapath", tmp_path / "data", *server.mirror, "--md5-file", md5sums, *md5_flags(rest)]
    monkeypatch.setattr(dl, "RETRIES", 0)
    rc, _, err = cli(down_imagenet, argv, capsys)  # the val archive is cut: train done, val not
    assert_user_error(rc, err, "ILSVRC2012_img_val.tar", "run again to resume")
    base = tmp_path / "data/imagenet"
    assert sorted(p.name for p in (base / "train").iterdir()) == WNIDS
    assert not (base / "val").exists()
    rc, out, err = cli(down_imagenet, argv, capsys)
    assert rc == 0, err
    assert server.requests_for("ILSVRC2012_img_val.tar")[-1].startswith("bytes=")  # resumed
    assert len(server.requests_for("ILSVRC2012_img_train.tar")) == 1
    for w in WNIDS:
        assert sorted(p.name for p in (base / "train" / w).iterdir()) == [f"{w}_0.JPEG", f"{w}_1.JPEG"]
    for i, lab in enumerate(VAL_LABELS):
        assert (base / "val" / WNIDS[lab] / f"ILSVRC2012_val_{i + 1:08d}.JPEG").is_file()
    assert not (base / ".partial").exists()
    n_requests = len(server.log)
    rc, out, _ = cli(down_imagenet, argv, capsys)
    assert rc == 0 and out.count("skipped") == 2 and len(server.log) == n_requests
    # main.py reads the result as it is
    import data
    train, val = data.imagenet_datasets(tmp_path / "data")
    assert train.classes == WNIDS and [y for _, y in val.samples] == sorted(VAL_LABELS)
    # and torchvision_to_ours.py -E evaluates a converted torchvision file on it
    (tmp_path / "resnet18.pth").write_bytes(resnet18_file[1])
    rc, out, err = cli(torchvision_to_ours, ["-a", "resnet", "--layers", "18", "--src", "resnet18.pth", "-E",
                                             "--datapath", tmp_path / "data", "-j", "0", "-b", "4"], capsys)
    assert rc == 0, err
    assert "top-1" in out and (tmp_path / "checkpoint/resnet18/imagenet/eval.csv").is_file()


def test_down_imagenet_refuses_an_archive_with_the_wrong_md5(server, tmp_path, capsys, ilsvrc):
    server.files.update(ilsvrc)
    argv = ["--datapath", tmp_path, *server.mirror, "--splits", "train"]
    rc, _, err = cli(down_imagenet, argv, capsys)  # the published MD5 is not that of our tiny archive
    assert_user_error(rc, err, "ILSVRC2012_img_train.tar", "md5", "1d675b47d978889d74fa0da5fadfb00e")
    assert not (tmp_path / "imagenet/ILSVRC2012_img_train.tar").exists()
    assert not (tmp_path / "imagenet/train").exists() or not any((tmp_path / "imagenet/train").iterdir())
    rc, _, err = cli(down_imagenet, argv + ["--md5", "ILSVRC2012_img_train.tar=xyz"], capsys)
    assert_user_error(rc, err, "32 hex digits")
