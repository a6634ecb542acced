"""HTTP downloads that users can trust, shared by down_ckpt.py and down_imagenet.py.

    from download import download
    download("https://download.pytorch.org/models/resnet18-f37072fd.pth", "resnet18-f37072fd.pth",
             sha256="f37072fd")

A file streams into ``NAME.part`` beside its destination (with a byte progress bar when
stderr is a terminal), is resumed with an HTTP Range request after a cut, is checked
against its checksum, and only then renamed onto ``NAME``: the destination either does not
exist or holds the verified file. Every failure ends in one ``UserError`` line.
"""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from urllib.parse import urlsplit

import requests
import urllib3

from utils import UserError

CHUNK = 1 << 20         # bytes per read when hashing a file
NET_CHUNK = 1 << 16     # bytes per network read: a cut loses at most this much of what arrived
TIMEOUT = (10.0, 60.0)  # seconds to connect, seconds of silence while reading
RETRIES = 4             # further tries after a network error or an HTTP 5xx
BACKOFF = 2.0           # seconds before the first retry, doubled for each next one
HASH_ALGOS = ("sha256", "md5")


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


class _Retry(Exception):
    """A failure worth another try (network error, HTTP 5xx, a cut transfer)."""


def download(url: str, dest, *, sha256: str | None = None, md5: str | None = None,
             retries: int | None = None, timeout=None, backoff: float | None = None,
             progress: bool | None = None, session: requests.Session | None = None) -> str:
    """Fetch ``url`` into ``dest`` unless a verified file is already there; return its hex digest.

    ``sha256`` may be a prefix (at least 8 hex digits); ``md5`` is a full digest. A file
    already at ``dest`` is checked, never fetched again. ``progress=None`` shows the bar only
    when stderr is a terminal. ``retries``, ``timeout``, ``backoff`` default to the module's
    RETRIES, TIMEOUT, BACKOFF.
    """
    retries = RETRIES if retries is None else retries
    timeout = TIMEOUT if timeout is None else timeout
    backoff = BACKOFF if backoff is None else backoff
    dest = Path(dest)
    want = _expected(sha256, md5)
    algo = want[0] if want else "sha256"
    if dest.is_file():
        digest = file_digest(dest, algo)
        if want and not _matches(digest, want[1]):
            raise UserError(f"{dest} exists but its {algo} is {digest[:16]}..., not {want[1]}...; "
                            f"delete it to download it again")
        return digest
    part = dest.with_name(dest.name + ".part")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {dest.parent}: {e}") from None
    session = session or requests.Session()
    why = ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            digest = _fetch(session, url, part, algo, timeout, progress)
            break
        except _Retry as e:
            why = str(e)
    else:
        have = part.stat().st_size if part.exists() else 0
        kept = f"; {have} bytes kept in {part}, run again to resume" if have else ""
        raise UserError(f"download of {url} failed after {retries + 1} tries: {why}{kept}")
    if want and not _matches(digest, want[1]):
        part.unlink()
        raise UserError(f"{url} is corrupt or not the published file: its {algo} is {digest[:16]}..., "
                        f"expected {want[1]}...; the download was deleted")
    os.replace(part, dest)
    return digest


def _fetch(session, url: str, part: Path, algo: str, timeout, progress) -> str:
    """One HTTP request, resuming ``part``; returns the digest of the complete file."""
    offset = part.stat().st_size if part.exists() else 0
    # identity: Content-Length and Range count the bytes of the file itself, not of a gzip stream
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        r = session.get(url, headers=headers, stream=True, timeout=timeout)
    except (requests.ConnectionError, requests.Timeout) as e:
        raise _Retry(_short(e)) from None
    except requests.RequestException as e:  # a malformed URL and the like: no point retrying
        raise UserError(f"cannot fetch {url}: {_short(e)}") from None
    with r:
        if r.status_code == 416 and offset:
            # the part file is already whole (a run stopped before the rename) or longer than the file
            total = _total_from_content_range(r.headers.get("Content-Range", ""))
            if total == offset:
                return file_digest(part, algo)
            part.unlink()
            raise _Retry(f"the partial file did not fit the server's ({total} bytes); starting over")
        if r.status_code >= 500:
            raise _Retry(f"HTTP {r.status_code} {r.reason}")
        if r.status_code >= 400:
            raise UserError(f"cannot fetch {url}: HTTP {r.status_code} {r.reason}")
        if offset and r.status_code == 200:
            # the server ignored Range and sends the whole file: start over rather than append
            offset = 0
        elif offset and r.status_code == 206:
            start = _start_from_content_range(r.headers.get("Content-Range", ""))
            if start != offset:
                part.unlink()
                raise UserError(f"{url}: asked for bytes {offset}- but the server sent "
                                f"{r.headers.get('Content-Range') or 'no Content-Range'}; "
                                f"the partial file was deleted, run again to start over")
        length = r.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
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
        with f, _bar(total, offset, url_basename(url), progress) as bar:
            f.seek(offset)
            f.truncate()
            try:
                # read1 hands over what has arrived, so a cut keeps every byte received before it
                while chunk := r.raw.read1(NET_CHUNK, decode_content=False):
                    _write_all(f, part, chunk, got)
                    h.update(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
            except urllib3.exceptions.ReadTimeoutError:
                raise _Retry(f"read timed out after {got} of {total or '?'} bytes") from None
            except urllib3.exceptions.HTTPError:  # closed or reset short of Content-Length
                raise _Retry(f"connection lost after {got} of {total or '?'} bytes") from None
        if total is not None and got != total:
            raise _Retry(f"connection closed after {got} of {total} bytes")
        return h.hexdigest()


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


def _short(e: Exception) -> str:
    """The last, most specific line of a requests/urllib3 error chain."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[-1][:200]


def _bar(total, initial, desc, progress):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True,
                unit_divisor=1024, disable=None if progress is None else not progress)
