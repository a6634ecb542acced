"""HTTP downloads that users can trust, shared by down_ckpt.py and down_imagenet.py.

    from download import download
    download("https://download.pytorch.org/models/resnet18-f37072fd.pth", "resnet18-f37072fd.pth",
             sha256="f37072fd")

A file streams into ``NAME.part`` beside its destination (with a byte progress bar when
stderr is a terminal), is resumed with an HTTP Range request after a cut, is checked
against its checksum, and only then renamed onto ``NAME``: the destination either does not
exist or holds the verified file. Every failure ends in one ``UserError`` line.

What reaches the disk is bounded: https only unless ``allow_http`` (the CLIs' ``--allow-http``),
every redirect checked by hand (https -> http refused without ``allow_http``, another host
followed with a note on stderr), at most ``max_bytes`` (``--max-bytes``) and ``deadline``
seconds (``--deadline``) per call, retries included. A SHA-256 given as a prefix (torchvision's
8 hex digits: 32 bits, which a made-up file can be ground to match) is checked with a warning
line saying so.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import requests
import urllib3

from utils import UserError

CHUNK = 1 << 20         # bytes per read when hashing a file
NET_CHUNK = 1 << 16     # bytes per network read: a cut loses at most this much of what arrived
TIMEOUT = (10.0, 60.0)  # seconds to connect, seconds of silence while reading
RETRIES = 4             # further tries after a network error or an HTTP 5xx
BACKOFF = 2.0           # seconds before the first retry, doubled for each next one
MAX_BYTES = 4 << 30     # cap on a file whose size is not known: 7x torchvision's largest (vgg19_bn, 548 MB)
DEADLINE = 6 * 3600.0   # seconds one download() may take, retries included
MAX_REDIRECTS = 10
FULL_SHA256 = 64        # hex digits


def mirror_url(url: str, mirror: str | None) -> str:
    """``url`` with its host and folder replaced by ``mirror``; the file name stays."""
    if not mirror:
        return url
    return mirror.rstrip("/") + "/" + url_basename(url)


def url_basename(url: str) -> str:
    return Path(urlsplit(url).path).name


def file_digest(path, algo: str = "sha256") -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _expected(sha256: str | None, md5: str | None) -> tuple[str, str] | None:
    if sha256 and md5:
        raise ValueError("give one checksum, sha256 or md5")
    if sha256:
        return "sha256", sha256.lower()
    if md5:
        return "md5", md5.lower()
    return None


def _matches(digest: str, expected: str) -> bool:
    # torchvision publishes the first 8 to 10 hex digits of the SHA-256 (torch.hub's check_hash)
    return len(expected) >= 8 and digest.startswith(expected)


def _warn_if_prefix_only(name: str, want: tuple[str, str] | None, digest: str) -> None:
    """The line a prefix-only check owes the user: it proves little against a forged file."""
    if want and want[0] == "sha256" and len(want[1]) < FULL_SHA256:
        print(f"warning: {name} was checked against a {4 * len(want[1])}-bit SHA-256 prefix only "
              f"({want[1]}), which a made-up file can match; its full SHA-256 is {digest}",
              file=sys.stderr)


def check_url(url: str, allow_http: bool) -> None:
    """https, or http with ``allow_http``; anything else is one ``UserError`` line."""
    scheme = urlsplit(url).scheme.lower()
    if scheme == "https" or (scheme == "http" and allow_http):
        return
    if scheme == "http":
        raise UserError(f"refusing plain http: {url} (anyone on the way can change it; use https, "
                        f"or pass --allow-http to accept it)")
    raise UserError(f"cannot fetch {url}: not an https URL")


def _check_hop(url: str, to: str, allow_http: bool, announced: set) -> None:
    """A redirect from ``url`` to ``to``: refused from https to http, said aloud to another host."""
    a, b = urlsplit(url), urlsplit(to)
    if a.scheme == "https" and b.scheme.lower() == "http" and not allow_http:
        raise UserError(f"{url} redirects to plain http ({to}); refused (pass --allow-http to accept it)")
    check_url(to, allow_http)
    if b.hostname != a.hostname and b.hostname not in announced:
        announced.add(b.hostname)
        print(f"note: {a.hostname} redirects to another host, {b.hostname}; following it "
              f"(the checksum decides what is kept)", file=sys.stderr)


class _Retry(Exception):
    """A failure worth another try (network error, HTTP 5xx, a cut transfer)."""


def _unreachable(url: str, e: Exception) -> str | None:
    """The one line for a host that cannot be reached at all (no route, refused, no such name,
    no answer to the connection), or None for other network errors. It is not retried: offline,
    each retry only added its backoff in silence (33 s) before the same failure."""
    reason = getattr(e.args[0], "reason", None) if e.args else None
    # urllib3's NewConnectionError is a ConnectTimeoutError too (for history's sake): test it first
    if isinstance(reason, urllib3.exceptions.NameResolutionError):
        why = "its name does not resolve"
    elif isinstance(reason, urllib3.exceptions.NewConnectionError):
        cause = reason.__cause__ or reason.__context__
        why = (cause.strerror if isinstance(cause, OSError) and cause.strerror else "no connection").lower()
    elif isinstance(e, requests.ConnectTimeout) or isinstance(reason, urllib3.exceptions.ConnectTimeoutError):
        why = "no answer to the connection"
    else:
        return None
    where = urlsplit(url)
    return (f"cannot download {url_basename(url) or url}: {where.hostname}"
            f"{f':{where.port}' if where.port else ''} cannot be reached ({why}); check the network "
            f"connection, or fetch the same file from a reachable server with --mirror URL")


class _Deadline(Exception):
    """The call's overall deadline passed; the message says how far it got."""


def _kept(part: Path) -> str:
    have = part.stat().st_size if part.exists() else 0
    return f"; {have} bytes kept in {part}, run again to resume" if have else ""


def download(url: str, dest, *, sha256: str | None = None, md5: str | None = None,
             max_bytes: int | None = None, deadline: float | None = None, allow_http: bool = False,
             checksum_from: str = "", retries: int | None = None, timeout=None, backoff: float | None = None,
             progress: bool | None = None, session: requests.Session | None = None) -> str:
    """Fetch ``url`` into ``dest`` unless a verified file is already there; return its hex digest.

    ``sha256`` may be a prefix (at least 8 hex digits: checked with a warning line); ``md5`` is a
    full digest; ``checksum_from`` says where the expected one comes from, in the error lines. A
    file already at ``dest`` is checked, never fetched again. Nothing longer than ``max_bytes``
    (default MAX_BYTES; callers pass a file's known size) is kept, and the call gives up after
    ``deadline`` seconds (default DEADLINE), keeping the partial file to resume. Plain http, first
    or after a redirect, needs ``allow_http``. ``progress=None`` shows the bar only when stderr is
    a terminal. ``retries``, ``timeout``, ``backoff`` default to RETRIES, TIMEOUT, BACKOFF.
    """
    retries = RETRIES if retries is None else retries
    timeout = TIMEOUT if timeout is None else timeout
    backoff = BACKOFF if backoff is None else backoff
    max_bytes = MAX_BYTES if max_bytes is None else max_bytes
    deadline = DEADLINE if deadline is None else deadline
    dest = Path(dest)
    want = _expected(sha256, md5)
    algo = want[0] if want else "sha256"
    origin = f" ({checksum_from})" if checksum_from else ""
    if dest.is_file():
        digest = file_digest(dest, algo)
        if want and not _matches(digest, want[1]):
            raise UserError(f"{dest} exists but its {algo} is {digest[:16]}..., not "
                            f"{want[1]}...{origin}; delete it to download it again")
        _warn_if_prefix_only(dest.name, want, digest)
        return digest
    check_url(url, allow_http)
    part = dest.with_name(dest.name + ".part")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        if part.exists() and part.stat().st_size > max_bytes:
            part.unlink()  # it can never become the file: start over
    except OSError as e:
        raise UserError(f"cannot create {dest.parent}: {e}") from None
    session = session or requests.Session()
    end = time.monotonic() + deadline
    announced: set = set()  # hosts a redirect went to, each said once
    why = ""
    try:
        for attempt in range(retries + 1):
            if attempt:
                pause = backoff * 2 ** (attempt - 1)
                if time.monotonic() + pause >= end:
                    raise _Deadline(f"{attempt} tries, the last: {why}")
                time.sleep(pause)
            try:
                digest = _fetch(session, url, part, algo, timeout, progress, max_bytes, end,
                                allow_http, announced)
                break
            except _Retry as e:
                why = str(e)
        else:
            raise UserError(f"download of {url} failed after {retries + 1} tries: {why}{_kept(part)}")
    except _Deadline as e:
        raise UserError(f"download of {url} stopped at its {deadline:g} s deadline (--deadline) after "
                        f"{e}{_kept(part)}") from None
    if want and not _matches(digest, want[1]):
        part.unlink()
        raise UserError(f"{url} is corrupt or not the published file: its {algo} is {digest[:16]}..., "
                        f"expected {want[1]}...{origin}; the download was deleted")
    _warn_if_prefix_only(dest.name, want, digest)
    os.replace(part, dest)
    return digest


def _open(session, url: str, headers: dict, timeout, allow_http: bool, announced: set):
    """GET ``url``, following redirects by hand so that each hop is checked; the final response."""
    for _ in range(MAX_REDIRECTS + 1):
        r = session.get(url, headers=headers, stream=True, timeout=timeout, allow_redirects=False)
        if not r.is_redirect:
            return r
        to = urljoin(url, r.headers["Location"])
        r.close()
        _check_hop(url, to, allow_http, announced)
        url = to
    raise UserError(f"cannot fetch {url}: more than {MAX_REDIRECTS} redirects")


def _fetch(session, url: str, part: Path, algo: str, timeout, progress, max_bytes: int, end: float,
           allow_http: bool, announced: set) -> str:
    """One HTTP request, resuming ``part``; returns the digest of the complete file."""
    offset = part.stat().st_size if part.exists() else 0
    # identity: Content-Length and Range count the bytes of the file itself, not of a gzip stream
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    connect, read = timeout if isinstance(timeout, tuple) else (timeout, timeout)
    left = end - time.monotonic()
    if left <= 0:
        raise _Deadline(f"{offset} bytes")
    try:  # never wait on the network past the deadline
        r = _open(session, url, headers, (min(connect, left), min(read, left)), allow_http, announced)
    except (requests.ConnectionError, requests.Timeout) as e:
        if (line := _unreachable(url, e)) is not None:
            raise UserError(line + _kept(part)) from None
        if time.monotonic() >= end:
            raise _Deadline(f"{offset} bytes: {_short(e)}") from None
        raise _Retry(_short(e)) from None
    except requests.RequestException as e:  # a malformed URL and the like: no point retrying
        raise UserError(f"cannot fetch {url}: {_short(e)}") from None
    with r:
        offset = _resume_offset(r, url, part, offset)
        if offset is None:  # the part file is already whole (a run stopped before the rename)
            return file_digest(part, algo)
        length = r.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        if total is not None and total > max_bytes:
            part.unlink(missing_ok=True)
            raise UserError(f"{url} is {total} bytes, more than the limit of {max_bytes} (--max-bytes); "
                            f"nothing was kept")
        h = hashlib.new(algo)
        if offset:
            with open(part, "rb") as f:
                while chunk := f.read(CHUNK):
                    h.update(chunk)
        got = offset
        try:
            f = open(part, "r+b" if offset else "wb", buffering=0)
        except OSError as e:
            raise UserError(f"cannot write {part}: {e}") from None
        too_long = False
        with f, _bar(total, offset, url_basename(url), progress) as bar:
            f.seek(offset)
            f.truncate()
            try:
                # read1 hands over what has arrived, so a cut keeps every byte received before it;
                # one byte past the cap is enough to know the body is too long
                while chunk := r.raw.read1(min(NET_CHUNK, max_bytes - got + 1), decode_content=False):
                    if got + len(chunk) > max_bytes:
                        too_long = True
                        break
                    _write_all(f, part, chunk, got)
                    h.update(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
                    if time.monotonic() >= end:  # a trickle never trips the read timeout
                        raise _Deadline(f"{got} of {total or '?'} bytes")
            except urllib3.exceptions.ReadTimeoutError:
                if time.monotonic() >= end:
                    raise _Deadline(f"{got} of {total or '?'} bytes") from None
                raise _Retry(f"read timed out after {got} of {total or '?'} bytes") from None
            except urllib3.exceptions.HTTPError:  # closed or reset short of Content-Length
                raise _Retry(f"connection lost after {got} of {total or '?'} bytes") from None
        if too_long:  # it can never become the file: a resume would run into the cap again
            part.unlink()
            raise UserError(f"{url} sent more than {max_bytes} bytes, the limit (--max-bytes); "
                            f"the partial file was deleted")
        if total is not None and got != total:
            raise _Retry(f"connection closed after {got} of {total} bytes")
        return h.hexdigest()


def _resume_offset(r, url: str, part: Path, offset: int) -> int | None:
    """Where the response's body goes in ``part``, from its status; None when ``part`` is whole."""
    if r.status_code == 416 and offset:
        # the part file is already whole or longer than the file
        total = _total_from_content_range(r.headers.get("Content-Range", ""))
        if total == offset:
            return None
        part.unlink()
        raise _Retry(f"the partial file did not fit the server's ({total} bytes); starting over")
    if r.status_code >= 500:
        raise _Retry(f"HTTP {r.status_code} {r.reason}")
    if r.status_code >= 300:
        raise UserError(f"cannot fetch {url}: HTTP {r.status_code} {r.reason}")
    if offset and r.status_code == 200:
        return 0  # the server ignored Range and sends the whole file: start over rather than append
    if offset and r.status_code == 206:
        start = _start_from_content_range(r.headers.get("Content-Range", ""))
        if start != offset:
            part.unlink()
            raise UserError(f"{url}: asked for bytes {offset}- but the server sent "
                            f"{r.headers.get('Content-Range') or 'no Content-Range'}; "
                            f"the partial file was deleted, run again to start over")
    return offset


def _write_all(f, part: Path, chunk: bytes, good: int) -> None:
    """Write ``chunk`` at ``good``; on a disk error cut the file back to the last good byte."""
    view = memoryview(chunk)
    try:
        while view:
            view = view[f.write(view):]
    except OSError as e:
        try:
            os.truncate(part, good)
        except OSError:
            part.unlink(missing_ok=True)
        raise UserError(f"cannot write {part}: {e.strerror or e}") from None


def _start_from_content_range(value: str) -> int | None:
    # "bytes 100-199/200"
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def _total_from_content_range(value: str) -> int | None:
    # "bytes */200" (a 416) or "bytes 100-199/200"
    try:
        return int(value.rsplit("/", 1)[1])
    except (IndexError, ValueError):
        return None


def _short(e: Exception, limit: int = 200) -> str:
    """The last, most specific line of a requests/urllib3 error chain, cut at a word if long."""
    text = (str(e).strip() or type(e).__name__).splitlines()[-1]
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0] + " ..."


def _bar(total, initial, desc, progress):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True,
                unit_divisor=1024, disable=None if progress is None else not progress)


# ---------------------------------------------------------------- the CLIs' flags


def byte_count(text: str) -> int:
    """``--max-bytes``: a byte count, with an optional K, M, G or T suffix (powers of 1024)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    digits, unit = (t[:-1], t[-1]) if t[-1:] in units else (t, "")
    try:
        n = float(digits) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a byte count: {text!r} (e.g. 500M, 4G)") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least one byte: {text!r}")
    return int(n)


def seconds(text: str) -> float:
    try:
        s = float(text)
    except ValueError:
        s = 0.0
    if not s > 0:
        raise argparse.ArgumentTypeError(f"not a positive number of seconds: {text!r}")
    return s


def add_download_flags(parser, *, max_bytes_for: str, max_bytes: int = MAX_BYTES,
                       deadline: float = DEADLINE) -> None:
    """--allow-http, --max-bytes, --deadline: the limits of download(), with these defaults."""
    parser.add_argument("--allow-http", dest="allow_http", action="store_true",
                        help="accept plain http URLs (a --mirror) and redirects from https to http; "
                             "only the checksum then protects a file (default: https only)")
    parser.add_argument("--max-bytes", dest="max_bytes", metavar="N", type=byte_count, default=max_bytes,
                        help=f"largest download accepted for {max_bytes_for}; suffix K, M, G, T "
                             f"(default: {max_bytes >> 30}G)")
    parser.add_argument("--deadline", metavar="SECONDS", type=seconds, default=deadline,
                        help=f"give up on a file after this long, retries included (the partial file is "
                             f"kept: run again to resume) (default: {deadline:g})")
