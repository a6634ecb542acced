"""What a downloaded file is checked against, and where it may come from (download.py, pretrained.py).

A forged file that shares the 32-bit SHA-256 prefix in a published name is made here for real:
two files whose hashes share 32 bits take a birthday search of about 2^16 hashes (a second file
for a given prefix takes about 2^32, two minutes of one core). Plain http and redirects are
checked against local servers on 127.0.0.1, one of them https with a certificate made here.
"""
import datetime
import hashlib
import ipaddress
import itertools
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, assert_user_error
from test_download import BLOB, FAST, Server, cli, serve_as, sha

import down_ckpt
import down_imagenet
import pretrained
import torchvision_to_ours
import utils
from download import download

pytestmark = pytest.mark.usefixtures("one_thread")

KEY = ("cifar10", "resnet20")  # chenyaofo's: only the 8 hex digits in its name are published
ARGV = ["cifar10", "-a", "resnet", "--layers", "20", "--cache-dir", "cache"]


def prefix_collision(base: bytes) -> tuple[bytes, bytes]:
    """Two different files, ``base`` and a few bytes, whose SHA-256s share their first 32 bits."""
    start = hashlib.sha256(base)
    seen = {}
    for i in itertools.count():
        tail = b"%d" % i
        h = start.copy()
        h.update(tail)
        prefix = h.digest()[:4]
        if prefix in seen:
            return base + seen[prefix], base + tail
        seen[prefix] = tail


@pytest.fixture(scope="module")
def forged():
    """(the published file, a forged one under the same name): chenyaofo-layout resnet20s that
    both load (torch.load ignores bytes after the archive) and share the 32-bit prefix."""
    import io

    from test_convert import CifarResNet
    torch.manual_seed(0)
    buf = io.BytesIO()
    torch.save(CifarResNet([3, 3, 3], num_classes=10).state_dict(), buf)
    a, b = prefix_collision(buf.getvalue())
    assert a != b and sha(a)[:8] == sha(b)[:8] and sha(a) != sha(b)
    return a, b


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 and localhost: (cert file, key file)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    alt = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                       x509.DNSName("localhost")])
    c = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(alt, critical=False)
         .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
         .sign(key, hashes.SHA256()))
    folder = tmp_path_factory.mktemp("tls")
    certfile, keyfile = folder / "cert.pem", folder / "key.pem"
    certfile.write_bytes(c.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return certfile, keyfile


@pytest.fixture
def tls_server(cert, monkeypatch):
    """An https server that requests trusts (REQUESTS_CA_BUNDLE, which wins over a session's verify)."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert[0]))
    s = Server(tls=cert)
    yield s
    s.close()


# ---------------------------------------------------------------- full hashes


def test_first_use_pins_the_full_hash_and_a_forged_file_is_refused_later(server, in_tmp, monkeypatch,
                                                                           capsys, forged):
    published, fake = forged
    src = serve_as(server, monkeypatch, KEY, published)
    argv = ARGV + server.mirror
    rc, _, err = cli(down_ckpt, argv, capsys)
    assert rc == 0, err
    # first use: only the name's 32 bits could be checked, and the full hash is pinned; both said
    assert "checked against a 32-bit SHA-256 prefix only" in err and sha(published) in err
    assert f"pinned {src.file}'s SHA-256" in err and len(err.strip().splitlines()) == 2
    pins = in_tmp / "cache" / pretrained.PINS_FILE
    assert pins.read_text() == f"{sha(published)}  {src.file}\n"  # sha256sum's format
    # the pinned file in the cache: checked in full, nothing to say
    rc, _, err = cli(down_ckpt, argv + ["-o", "again.pth"], capsys)
    assert rc == 0 and err == ""
    # the mirror now serves a forged file with the same name (and so the same 32-bit prefix)
    (in_tmp / "cache" / src.file).unlink()
    server.files[src.file] = fake
    rc, _, err = cli(down_ckpt, argv + ["--force"], capsys)
    assert_user_error(rc, err, src.file, "not the published file", "pinned on first use",
                      f"cache/{pretrained.PINS_FILE}")
    assert sorted(p.name for p in (in_tmp / "cache").iterdir()) == [pretrained.PINS_FILE]
    out = in_tmp / "checkpoint/resnet20/cifar10/ckpt_best.pth"
    assert utils.load_checkpoint(out)["source"]["sha256"] == sha(published)  # left as it was


def test_sha256_flag_pins_one_file_by_hand(server, in_tmp, monkeypatch, capsys, forged):
    published, fake = forged
    src = serve_as(server, monkeypatch, KEY, published)
    server.files[src.file] = fake  # the forged file is all the mirror has
    argv = ARGV + server.mirror
    rc, _, err = cli(down_ckpt, argv + ["--sha256", sha(published)], capsys)
    assert_user_error(rc, err, src.file, "not the published file", "the download was deleted")
    assert not any((in_tmp / "cache").iterdir()) and not (in_tmp / "checkpoint").exists()
    # the hash given is that of the file served: checked in full, no prefix warning, pinned
    rc, _, err = cli(down_ckpt, argv + ["--sha256", sha(fake).upper()], capsys)
    assert rc == 0 and err == ""
    assert utils.load_checkpoint(in_tmp / "checkpoint/resnet20/cifar10/ckpt_best.pth")["source"] == {
        "url": src.url, "sha256": sha(fake)}
    assert (in_tmp / "cache" / pretrained.PINS_FILE).read_text() == f"{sha(fake)}  {src.file}\n"
    n = len(server.log)
    # what --sha256 cannot be: a short one, another file's, another pin's
    rc, _, err = cli(down_ckpt, argv + ["--sha256", src.name_sha256], capsys)
    assert_user_error(rc, err, "--sha256", "64 hex digits")
    rc, _, err = cli(down_ckpt, argv + ["--sha256", sha(b"another file")], capsys)
    assert_user_error(rc, err, "--sha256", f"its name says the SHA-256 starts with {src.name_sha256}")
    rc, _, err = cli(down_ckpt, argv + ["--force", "--sha256", sha(published)], capsys)
    assert_user_error(rc, err, "differs from the SHA-256 pinned", "on first use")
    aka = pretrained.SOURCES["cifar10", "resnet_a20"]
    other = aka.name_sha256 + "0" * 56
    rc, _, err = cli(down_ckpt, ["cifar10", "-a", "resnet_a", "--layers", "20", *server.mirror,
                                 "--sha256", other], capsys)
    assert_user_error(rc, err, "differs from resnet20-12fca82f.th's published SHA-256")
    assert len(server.log) == n  # none of them fetched anything


def test_a_prefix_only_check_says_so_in_one_line(server, tmp_path, capsys):
    server.files["blob.bin"] = BLOB
    url = server.url + "blob.bin"
    download(url, tmp_path / "a.bin", sha256=sha(BLOB)[:8], **FAST)
    err = capsys.readouterr().err
    assert err == (f"warning: a.bin was checked against a 32-bit SHA-256 prefix only ({sha(BLOB)[:8]}), "
                   f"which a made-up file can match; its full SHA-256 is {sha(BLOB)}\n")
    download(url, tmp_path / "a.bin", sha256=sha(BLOB)[:8], **FAST)  # the file in place: the same
    assert "a.bin was checked against a 32-bit SHA-256 prefix only" in capsys.readouterr().err
    download(url, tmp_path / "b.bin", sha256=sha(BLOB)[:10], **FAST)
    assert "40-bit SHA-256 prefix only" in capsys.readouterr().err
    download(url, tmp_path / "c.bin", sha256=sha(BLOB), **FAST)
    download(url, tmp_path / "d.bin", md5=hashlib.md5(BLOB).hexdigest(), **FAST)
    assert capsys.readouterr().err == ""


def test_a_src_file_known_by_its_name_prefix_only_says_so(server, in_tmp, monkeypatch, capsys, forged):
    src = serve_as(server, monkeypatch, KEY, forged[0])
    (in_tmp / "mine.pt").write_bytes(forged[1])  # not the published file, but it has the same 32 bits
    rc, _, err = cli(torchvision_to_ours, ["-a", "resnet", "--layers", "20", "--src", "mine.pt"], capsys)
    assert rc == 0, err
    assert err == (f"warning: taken for {src.file} by a 32-bit SHA-256 prefix only ({src.name_sha256}), "
                   f"which a made-up file can match\n")


def test_down_ckpt_all_refuses_one_sha256_for_every_file(tmp_path):
    p = subprocess.run(["bash", str(ROOT / "down_ckpt_all.sh"), "--sha256", "0" * 64],
                       env=dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(ROOT)), capture_output=True,
                       text=True, timeout=60, cwd=tmp_path)
    assert_user_error(p.returncode, p.stderr, "--sha256 pins one file")
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------- https, redirects


def test_plain_http_is_refused_unless_allowed(server, in_tmp, monkeypatch, capsys, forged):
    server.files["blob.bin"] = BLOB
    with pytest.raises(utils.UserError, match="refusing plain http: .*--allow-http"):
        download(server.url + "blob.bin", in_tmp / "blob.bin", retries=0)
    serve_as(server, monkeypatch, KEY, forged[0])
    rc, _, err = cli(down_ckpt, ARGV + ["--mirror", server.url], capsys)  # 127.0.0.1 is no exception
    assert_user_error(rc, err, "refusing plain http", "--allow-http")
    argv = ["--datapath", in_tmp / "data", "--mirror", server.url, "--splits", "val"]
    rc, _, err = cli(down_imagenet, argv, capsys)
    assert_user_error(rc, err, "refusing plain http", "ILSVRC2012_devkit_t12.tar.gz", "--allow-http")
    assert server.log == [] and not (in_tmp / "checkpoint").exists() and not (in_tmp / "blob.bin").exists()


def test_https_to_http_redirect_is_refused_unless_allowed(server, tls_server, in_tmp, monkeypatch,
                                                          capsys, forged):
    tls_server.files["blob.bin"] = BLOB
    assert download(tls_server.url + "blob.bin", in_tmp / "direct.bin", retries=0) == sha(BLOB)
    server.files["blob.bin"] = BLOB
    tls_server.redirects["moved.bin"] = server.url + "blob.bin"
    with pytest.raises(utils.UserError, match=r"moved.bin redirects to plain http \(http://127.*--allow-http"):
        download(tls_server.url + "moved.bin", in_tmp / "moved.bin", retries=0)
    assert server.log == [] and not (in_tmp / "moved.bin.part").exists()
    assert download(tls_server.url + "moved.bin", in_tmp / "moved.bin", retries=0,
                    allow_http=True) == sha(BLOB)
    # the https mirror a user names sends down_ckpt.py to plain http
    src = serve_as(server, monkeypatch, KEY, forged[0])
    tls_server.redirects[src.file] = server.url + src.file
    rc, _, err = cli(down_ckpt, ARGV + ["--mirror", tls_server.url], capsys)
    assert_user_error(rc, err, "redirects to plain http", "--allow-http")
    assert server.requests_for(src.file) == [] and not (in_tmp / "checkpoint").exists()


def test_a_redirect_to_another_host_is_followed_with_a_note(server, tls_server, tmp_path, capsys):
    tls_server.files["blob.bin"] = BLOB
    tls_server.redirects["moved.bin"] = f"https://localhost:{tls_server.httpd.server_address[1]}/blob.bin"
    assert download(tls_server.url + "moved.bin", tmp_path / "a.bin", sha256=sha(BLOB),
                    retries=0) == sha(BLOB)
    assert capsys.readouterr().err == ("note: 127.0.0.1 redirects to another host, localhost; following it "
                                       "(the checksum decides what is kept)\n")
    tls_server.redirects["same.bin"] = tls_server.url + "blob.bin"  # the same host: nothing to say
    download(tls_server.url + "same.bin", tmp_path / "b.bin", sha256=sha(BLOB), retries=0)
    assert capsys.readouterr().err == ""
    server.redirects["loop.bin"] = server.url + "loop.bin"
    with pytest.raises(utils.UserError, match="more than 10 redirects"):
        download(server.url + "loop.bin", tmp_path / "c.bin", **FAST)
    assert len(server.requests_for("loop.bin")) == 11
