"""What a download may cost: bytes on disk, wall time, memory (download.py, down_ckpt.py, down_imagenet.py).

A local server on 127.0.0.1 sends a body that never ends, or one byte every half second; the
ImageNet devkit's ground truth comes as a gzip bomb built here. Limits are the CLIs' flags set
small, so that each test takes a few seconds.
"""
import gzip
import hashlib
import io
import tarfile
import time
import tracemalloc

import pytest
from conftest import assert_user_error
from test_download import BLOB, FAST, Server, cli, meta_mat, serve_as, sha

import down_ckpt
import down_imagenet
import pretrained
import utils
from download import download

pytestmark = pytest.mark.usefixtures("one_thread")

KEY = ("cifar10", "resnet20")  # chenyaofo's: no size known, so --max-bytes caps it


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


@pytest.fixture(scope="module")
def resnet20_file():
    import torch
    from test_convert import CifarResNet
    torch.manual_seed(0)
    buf = io.BytesIO()
    torch.save(CifarResNet([3, 3, 3], num_classes=10).state_dict(), buf)
    return buf.getvalue()


def no_part_files(folder):
    return not any(p.name.endswith(".part") for p in folder.rglob("*"))


# ---------------------------------------------------------------- size


def test_an_endless_body_stops_at_max_bytes_and_leaves_no_part(server, in_tmp, monkeypatch, capsys,
                                                               resnet20_file):
    src = serve_as(server, monkeypatch, KEY, resnet20_file)
    server.plan[src.file] = ["endless"]
    t0 = time.monotonic()
    rc, _, err = cli(down_ckpt, ["cifar10", "-a", "resnet", "--layers", "20", *server.mirror, "--cache-dir",
                                 "cache", "--max-bytes", "300K"], capsys)
    assert_user_error(rc, err, src.file, "sent more than 307200 bytes", "--max-bytes", "deleted")
    assert time.monotonic() - t0 < 10
    assert no_part_files(in_tmp) and not (in_tmp / "checkpoint").exists()
    assert len(server.requests_for(src.file)) == 1  # not retried: a resume would hit the cap again


def test_a_file_of_known_size_is_capped_at_it(server, in_tmp, capsys):
    # akamaster's ResNet-20 is 1,099,231 bytes: an endless body stops there, with no flag at all
    src = pretrained.SOURCES["cifar10", "resnet_a20"]
    assert src.size == 1_099_231
    server.files[src.file] = b"\0"
    server.plan[src.file] = ["endless"]
    rc, _, err = cli(down_ckpt, ["cifar10", "-a", "resnet_a", "--layers", "20", *server.mirror,
                                 "--cache-dir", "cache"], capsys)
    assert_user_error(rc, err, "sent more than 1099231 bytes")
    assert no_part_files(in_tmp)


def test_a_content_length_over_the_cap_is_refused_before_the_body(server, tmp_path):
    server.files["blob.bin"] = BLOB
    (tmp_path / "blob.bin.part").write_bytes(BLOB[:1000])  # a partial file can never become it either
    with pytest.raises(utils.UserError, match="is 300000 bytes, more than the limit of 100000 "):
        download(server.url + "blob.bin", tmp_path / "blob.bin", max_bytes=100_000, **FAST)
    assert list(tmp_path.iterdir()) == []
    assert download(server.url + "blob.bin", tmp_path / "blob.bin", max_bytes=len(BLOB), **FAST) == sha(BLOB)


def test_max_bytes_flag_reads_sizes(capsys):
    parse = down_ckpt.get_args_parser().parse_args
    assert parse([]).max_bytes == 4 << 30
    assert parse(["--max-bytes", "1.5M"]).max_bytes == 3 << 19
    assert parse(["--max-bytes", "123"]).max_bytes == 123
    assert down_imagenet.get_args_parser().parse_args([]).max_bytes == 200 << 30
    rc, _, err = cli(down_ckpt, ["--max-bytes", "lots"], capsys)
    assert_user_error(rc, err, "--max-bytes", "not a byte count")
    rc, _, err = cli(down_ckpt, ["--deadline", "0"], capsys)
    assert_user_error(rc, err, "--deadline", "not a positive number of seconds")


# ---------------------------------------------------------------- time


def test_a_trickle_trips_the_deadline_and_the_part_resumes(server, in_tmp, monkeypatch, capsys,
                                                           resnet20_file):
    src = serve_as(server, monkeypatch, KEY, resnet20_file)
    server.plan[src.file] = ["trickle"]  # one byte every 0.5 s: never a 60 s silence
    argv = ["cifar10", "-a", "resnet", "--layers", "20", *server.mirror, "--cache-dir", "cache"]
    t0 = time.monotonic()
    rc, _, err = cli(down_ckpt, argv + ["--deadline", "1.5"], capsys)
    assert time.monotonic() - t0 < 4
    assert_user_error(rc, err, src.file, "1.5 s deadline (--deadline)", "run again to resume")
    part = in_tmp / "cache" / (src.file + ".part")
    kept = part.read_bytes()
    assert 1 <= len(kept) <= 5 and resnet20_file.startswith(kept)  # what arrived, kept to resume from
    rc, _, err = cli(down_ckpt, argv, capsys)  # the server behaves now
    assert rc == 0, err
    assert server.requests_for(src.file)[-1] == f"bytes={len(kept)}-"
    assert not part.exists() and (in_tmp / "checkpoint/resnet20/cifar10/ckpt_best.pth").is_file()


def test_the_deadline_bounds_retries_and_their_backoff(server, tmp_path):
    server.files["blob.bin"] = BLOB
    server.plan["blob.bin"] = ["500"] * 10
    t0 = time.monotonic()
    why = r"1 s deadline \(--deadline\) after 2 tries, the last: HTTP 500"
    with pytest.raises(utils.UserError, match=why):
        download(server.url + "blob.bin", tmp_path / "blob.bin", retries=5, backoff=0.6, deadline=1.0,
                 allow_http=True)
    assert time.monotonic() - t0 < 1.5  # the 2.4 s pause of a third try is not waited out
    assert len(server.requests_for("blob.bin")) == 2


# ---------------------------------------------------------------- the devkit's ground truth


def devkit(members: dict) -> bytes:
    """A devkit .tar.gz holding ``members`` (name under ILSVRC2012_devkit_t12/ -> bytes), in order."""
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9, mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w|") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(f"ILSVRC2012_devkit_t12/{name}")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_a_gzip_bomb_ground_truth_is_refused_in_bounded_memory(tmp_path, capsys):
    bomb = devkit({"data/meta.mat": meta_mat(),
                   "data/ILSVRC2012_validation_ground_truth.txt": b"1\n" * 4_000_000})
    assert len(bomb) < 40_000  # 8 MB of ids in a few KB
    path = tmp_path / "ILSVRC2012_devkit_t12.tar.gz"
    path.write_bytes(bomb)
    tracemalloc.start()
    try:
        with pytest.raises(utils.UserError, match="ground_truth.txt is 8000000 bytes, more than a real one"):
            down_imagenet.read_ground_truth(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50e6, peak  # 862 MB when it was read whole and split
    # down_imagenet.py says so in one line, and leaves the verified archive where it was
    base = tmp_path / "data/imagenet"
    base.mkdir(parents=True)
    (base / path.name).write_bytes(bomb)
    rc, _, err = cli(down_imagenet, ["--datapath", tmp_path / "data", "--splits", "val",
                                     "--md5", f"{path.name}={hashlib.md5(bomb).hexdigest()}"], capsys)
    assert_user_error(rc, err, "more than a real one could be", "is it the ILSVRC2012 devkit?")
    assert (base / path.name).read_bytes() == bomb and not (base / "val").exists()


def test_a_ground_truth_with_more_ids_than_val_images_is_refused(tmp_path):
    path = tmp_path / "devkit.tar.gz"
    path.write_bytes(devkit({"data/meta.mat": meta_mat(),
                             "data/ILSVRC2012_validation_ground_truth.txt": b"1\n" * 50_001}))
    with pytest.raises(utils.UserError, match="holds more than 50000 ids"):
        down_imagenet.read_ground_truth(path)
    path.write_bytes(devkit({"data/meta.mat": meta_mat(),
                             "data/ILSVRC2012_validation_ground_truth.txt": b"2\n1\nx\n"}))
    with pytest.raises(utils.UserError, match="line 3 is not a class id"):
        down_imagenet.read_ground_truth(path)


def test_what_the_devkit_unpacks_to_is_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(down_imagenet, "DEVKIT_MAX_UNPACKED", 1 << 20)
    path = tmp_path / "devkit.tar.gz"
    path.write_bytes(devkit({"evaluation/filler.bin": b"\0" * (2 << 20), "data/meta.mat": meta_mat(),
                             "data/ILSVRC2012_validation_ground_truth.txt": b"2\n1\n"}))
    with pytest.raises(utils.UserError, match="unpacks to more than 1048576 bytes"):
        down_imagenet.read_ground_truth(path)
    monkeypatch.setattr(down_imagenet, "DEVKIT_MAX_UNPACKED", 4 << 20)
    assert down_imagenet.read_ground_truth(path) == ["n01443537", "n01440764"]  # ids 2, 1
