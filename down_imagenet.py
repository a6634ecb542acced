"""Download ILSVRC2012 (ImageNet-1k) and lay it out as main.py reads it.

    python down_imagenet.py --datapath ../data
    python down_imagenet.py --datapath ../data --mirror https://lab-server/imagenet/ --md5-file MD5SUMS
    python down_imagenet.py --datapath ../data --mirror http://lab-server/imagenet/ --allow-http

The train, val and devkit archives are fetched into DATAPATH/imagenet/ (resumable, verified
against their published MD5s, https only unless --allow-http, capped at their published sizes
or --max-bytes, each within --deadline) and extracted into

    DATAPATH/imagenet/train/<wnid>/*.JPEG     (one inner tar per class in the train archive)
    DATAPATH/imagenet/val/<wnid>/*.JPEG       (sorted by the devkit's ground truth)

Each class folder, and the val folder as a whole, is built aside and renamed into place,
so an interrupted run leaves no half-filled folder that main.py would read, and the next
run continues where it stopped. A split that is complete is skipped. Archives already in
DATAPATH/imagenet/ (fetched with your own ImageNet account) are verified, not downloaded.
The devkit's ground truth is streamed line by line, with bounds on what may be decompressed.
"""
from __future__ import annotations

import gzip
import io
import os
import re
import shutil
import tarfile
import zlib
from pathlib import Path

from config import OneLineParser, add_flags
from download import add_download_flags, download, mirror_url
from utils import UserError, run_cli

# The official files need an ImageNet account (https://image-net.org/download-images);
# --mirror points at another host that serves the same file names.
BASE_URL = "https://image-net.org/data/ILSVRC/2012/"
# part -> (file, published MD5)
ARCHIVES = {
    "train": ("ILSVRC2012_img_train.tar", "1d675b47d978889d74fa0da5fadfb00e"),
    "val": ("ILSVRC2012_img_val.tar", "29b22e2961454d5413ddabcf34fc5622"),
    "devkit": ("ILSVRC2012_devkit_t12.tar.gz", "fa75699e90414af021442c21a62c3abf"),
}
# the published files' sizes, each one's download cap (the devkit's: --max-bytes)
SIZES = {"ILSVRC2012_img_train.tar": 147_897_477_120, "ILSVRC2012_img_val.tar": 6_744_924_160}
MAX_BYTES = 200 << 30  # --max-bytes default: an archive of unknown size (the devkit, or one --md5 replaced)
GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"  # ILSVRC ids 1..1000, one per val image
META = "data/meta.mat"  # synsets: ILSVRC2012_ID -> WNID
# What a real devkit can hold: 50,000 ids of at most 4 digits and a line end, a meta.mat of a few
# hundred KB, a few MB in all. Past these bounds it is not the devkit (a gzip bomb, say): one line.
VAL_IMAGES = 50_000
GROUND_TRUTH_MAX_BYTES = VAL_IMAGES * len("1000\r\n")
META_MAX_BYTES = 16 << 20
DEVKIT_MAX_UNPACKED = 256 << 20
WNID = re.compile(r"n\d{8}")
VAL_IMAGE = re.compile(r"ILSVRC2012_val_(\d{8})\.JPEG")


def md5_table(overrides: list[str], md5_file: str | None) -> dict[str, str]:
    """Published MD5s by file name, replaced by ``--md5-file`` lines and ``--md5 NAME=HEX``."""
    table = {name: md5 for name, md5 in ARCHIVES.values()}
    pairs = []
    if md5_file:
        try:
            text = Path(md5_file).read_text()
        except OSError as e:
            raise UserError(f"cannot read --md5-file {md5_file}: {e.strerror or e}") from None
        for line in text.splitlines():  # md5sum's format: "HEX  NAME" or "HEX *NAME"
            digest, _, name = line.strip().partition(" ")
            name = Path(name.strip().lstrip("*")).name
            if name in table:  # a checksum file may list other files too
                pairs.append((name, digest))
    for item in overrides:
        name, sep, digest = item.partition("=")
        if not sep or name not in table:
            raise UserError(f"--md5 wants NAME=HEX with NAME one of {', '.join(table)}; got {item!r}")
        pairs.append((name, digest))
    for name, digest in pairs:
        if not re.fullmatch(r"[0-9a-fA-F]{32}", digest):
            raise UserError(f"MD5 for {name} is not 32 hex digits: {digest!r}")
        table[name] = digest.lower()
    return table


def fetch(part: str, base: Path, args, md5s: dict[str, str]) -> Path:
    name, published_md5 = ARCHIVES[part]
    dest = base / name
    if dest.is_file():
        print(f"verifying {dest} (MD5 of {dest.stat().st_size / 2**30:.1f} GiB)")
    # the published size caps the published file; another one (--md5) gets --max-bytes
    cap = SIZES.get(name) if md5s[name] == published_md5 else None
    try:
        download(mirror_url(BASE_URL + name, args.mirror), dest, md5=md5s[name],
                 max_bytes=cap or args.max_bytes, deadline=args.deadline, allow_http=args.allow_http)
    except UserError as e:
        if args.mirror:
            raise
        raise UserError(f"{e} (the official archives need your ImageNet account: put them in {base} "
                        f"yourself, or use --mirror)") from None
    return dest


def _safe_name(name: str, archive: Path) -> str:
    """A member's file name without folders, so that nothing lands outside the target."""
    base = name.rsplit("/", 1)[-1]
    if base in ("", ".", "..") or "\\" in base:
        raise UserError(f"{archive} holds an unexpected member {name!r}")
    return base


def _members(tar: tarfile.TarFile):
    """The regular files of a streamed tar, without hidden ones (macOS' ._* and the like)."""
    for m in tar:
        if m.isfile() and not m.name.rsplit("/", 1)[-1].startswith("."):
            yield m


def _copy_member(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> None:
    with tar.extractfile(member) as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


def extract_train(archive: Path, train_dir: Path, tmp_root: Path) -> int:
    """One inner tar per class -> train/<wnid>/; classes already in place are skipped."""
    done = 0
    train_dir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r|") as outer:  # streamed: the archive is 138 GB
        for member in _members(outer):
            wnid = _safe_name(member.name, archive).removesuffix(".tar")
            if not WNID.fullmatch(wnid):
                raise UserError(f"{archive} holds {member.name!r}, not a <wnid>.tar class archive")
            final = train_dir / wnid
            if not final.is_dir():
                tmp = tmp_root / wnid
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                with tarfile.open(fileobj=outer.extractfile(member), mode="r|") as inner:
                    for m in _members(inner):
                        _copy_member(inner, m, tmp / _safe_name(m.name, archive))
                os.replace(tmp, final)
            done += 1
    return done


class _Capped(io.RawIOBase):
    """A readable stream that raises ``UserError`` once more than ``limit`` bytes came out of it."""

    def __init__(self, f, limit: int, what: str):
        self.f, self.left, self.limit, self.what = f, limit, limit, what

    def readable(self):
        return True

    def readinto(self, b):
        data = self.f.read(min(len(b), self.left + 1))
        if len(data) > self.left:
            raise UserError(f"{self.what} unpacks to more than {self.limit} bytes, more than a real one "
                            f"could; is it the ILSVRC2012 devkit?")
        self.left -= len(data)
        b[:len(data)] = data
        return len(data)


def _too_big(devkit: Path, name: str, size: int, limit: int) -> UserError:
    return UserError(f"{devkit}: {name} is {size} bytes, more than a real one could be ({limit}); "
                     f"is it the ILSVRC2012 devkit?")


def _read_ids(f, devkit: Path) -> list[int]:
    """The ground truth's ids, line by line: never more than VAL_IMAGES of them."""
    ids = []
    for n, line in enumerate(f, 1):
        for word in line.split():
            if len(ids) == VAL_IMAGES:
                raise UserError(f"{devkit}: {GROUND_TRUTH} holds more than {VAL_IMAGES} ids, "
                                f"the val images of a real one")
            if not word.isdigit():
                raise UserError(f"{devkit}: {GROUND_TRUTH} line {n} is not a class id: {word[:20]!r}")
            ids.append(int(word))
    return ids


def read_ground_truth(devkit: Path) -> list[str]:
    """The wnid of every val image, in image order (from the devkit's ids and meta.mat)."""
    import scipy.io
    ids = meta = None
    try:  # streamed, each member and the whole bounded: nothing is read whole into memory
        with gzip.open(devkit) as gz, tarfile.open(fileobj=_Capped(gz, DEVKIT_MAX_UNPACKED, devkit),
                                                   mode="r|") as t:
            for m in t:
                name = m.name.split("/", 1)[-1]
                if not m.isfile() or name not in (GROUND_TRUTH, META):
                    continue
                if name == GROUND_TRUTH:
                    if m.size > GROUND_TRUTH_MAX_BYTES:
                        raise _too_big(devkit, name, m.size, GROUND_TRUTH_MAX_BYTES)
                    ids = _read_ids(t.extractfile(m), devkit)
                else:
                    if m.size > META_MAX_BYTES:
                        raise _too_big(devkit, name, m.size, META_MAX_BYTES)
                    meta = t.extractfile(m).read()
                if ids is not None and meta is not None:
                    break
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise UserError(f"{devkit} could not be read ({e}); delete it and run again") from None
    if ids is None or meta is None:
        raise UserError(f"{devkit} lacks {GROUND_TRUTH} or {META}; is it the ILSVRC2012 devkit?")
    synsets = scipy.io.loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"]
    # the leaves of the synset tree (no children) are the 1000 classes
    id_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets.ravel()
                  if int(s["num_children"]) == 0}
    missing = sorted(set(ids) - set(id_to_wnid))
    if missing:
        raise UserError(f"{devkit}: ground-truth id {missing[0]} has no class in {META}")
    return [id_to_wnid[i] for i in ids]


def extract_val(archive: Path, wnids: list[str], val_dir: Path, tmp_root: Path) -> int:
    """The flat val archive -> val/<wnid>/, built aside and renamed into place whole."""
    tmp = tmp_root / "val"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    n = 0
    with tarfile.open(archive, "r|") as t:
        for member in _members(t):
            name = _safe_name(member.name, archive)
            match = VAL_IMAGE.fullmatch(name)
            if not match or not 1 <= int(match.group(1)) <= len(wnids):
                raise UserError(f"{archive} holds {name!r}, which the devkit's ground truth "
                                f"({len(wnids)} images) does not label")
            folder = tmp / wnids[int(match.group(1)) - 1]
            folder.mkdir(exist_ok=True)
            _copy_member(t, member, folder / name)
            n += 1
    if n != len(wnids):
        raise UserError(f"{archive} holds {n} images but the devkit labels {len(wnids)}")
    os.replace(tmp, val_dir)
    return n


def get_args_parser():
    parser = OneLineParser(prog="down_imagenet.py", description="Download and extract ILSVRC2012.")
    add_flags(parser, ("datapath",))
    parser.add_argument("--mirror", metavar="URL", default=None,
                        help=f"fetch the same file names from this base URL; https unless --allow-http "
                             f"(default: {BASE_URL})")
    parser.add_argument("--md5", metavar="NAME=HEX", action="append", default=[],
                        help="expected MD5 of one archive, replacing the published one (repeatable)")
    parser.add_argument("--md5-file", dest="md5_file", metavar="FILE", default=None,
                        help="md5sum-style file (HEX  NAME per line) with the archives' MD5s")
    parser.add_argument("--splits", nargs="+", choices=("train", "val"), default=["train", "val"],
                        help="what to download and extract (default: train val)")
    parser.add_argument("--remove-archives", dest="remove_archives", action="store_true",
                        help="delete each archive once it is extracted (saves ~150 GB)")
    add_download_flags(parser, max_bytes=MAX_BYTES, deadline=24 * 3600.0,
                       max_bytes_for="an archive whose size is not known (the devkit, or one whose "
                                     "MD5 --md5/--md5-file replaced; the others: their published sizes)")
    return parser


def main(args) -> Path:
    base = Path(args.datapath) / "imagenet"
    md5s = md5_table(args.md5, args.md5_file)
    tmp_root = base / ".partial"  # beside train/ and val/, never inside them
    try:
        base.mkdir(parents=True, exist_ok=True)
        for split in args.splits:
            marker, target = base / f".{split}.complete", base / split
            if marker.exists():
                print(f"{target} is complete; skipped")
                continue
            if split == "val":
                if target.exists():
                    raise UserError(f"{target} exists but was not made by this tool; move it away first")
                wnids = read_ground_truth(fetch("devkit", base, args, md5s))
                n = extract_val(fetch("val", base, args, md5s), wnids, target, tmp_root)
            else:
                n = extract_train(fetch("train", base, args, md5s), target, tmp_root / "train")
            marker.touch()
            print(f"{target}: {n} {'images' if split == 'val' else 'classes'}")
            if args.remove_archives:
                for part in ("devkit", "val") if split == "val" else ("train",):
                    (base / ARCHIVES[part][0]).unlink(missing_ok=True)
    except (tarfile.TarError, EOFError) as e:
        raise UserError(f"a verified archive could not be read ({e}); delete it from {base} and run again") \
            from None
    except OSError as e:
        raise UserError(f"cannot write in {base}: {e.strerror or e} ({e.filename or ''})") from None
    shutil.rmtree(tmp_root, ignore_errors=True)
    return base


if __name__ == "__main__":
    run_cli(main, get_args_parser())
