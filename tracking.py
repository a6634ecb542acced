"""Experiment records: every run of main.py, find_similar_kernel.py and quantize.py is a sacred run.

    python main.py digits -a resnet --layers 20 --epochs 8 -j 0                    # -> runs/<id>/
    python main.py digits -a resnet --layers 20 --mongo-url mongodb://127.0.0.1:27017 --mongo-db mess
    python main.py digits -a resnet --layers 20 --no-track                         # records nothing

A run is named by its tool (the experiment: ``main.py``, ``find_similar_kernel.py``,
``quantize.py``) and its mode (the command: ``train``, ``resume``, ``retrain``, ``evaluate``,
``compress``, ``quantize``), the two
columns Omniboard shows first. Its record holds its flags (config, each one a column in
Omniboard, with ``tags``: tool, mode, data set, architecture), the per-epoch metrics (train/val
loss, top-1, top-5, learning rate, seconds) or the compression figures (ratio, bits, mean
residual per path), its files (summary.csv, eval.csv, the per-layer report), its info (package
versions; what is constant over the run, such as ``train_samples``; the headline figures
``best_top1``, ``top1``, ``ratio``, ``mess_bits``) and one result per tool: the best
validation top-1 for training, the top-1 for ``evaluate``, the compression ratio for
``compress``. It always goes to a sacred ``FileStorageObserver`` under ``runs/``;
``--mongo-url`` (or ``SACRED_MONGO_URL``) adds a ``MongoObserver`` for Omniboard, and Omniboard
columns for the headline figures (``omniboard.custom.columns``; ones already there are kept).
A database that cannot be reached at the start is a user error (one line, exit 2) after a short
server-selection timeout; one that goes away mid-run costs a warning, never the run, and the
files under ``runs/`` stay complete. A command line refused before it recorded anything (a flag
error, a missing checkpoint, a refused folder) leaves no run behind.

A CLI builds its ``Experiment`` itself, so that sacred records that script (and the local
modules it imports) as the run's sources, and hands it to ``tracked_run``::

    if __name__ == "__main__":
        from tracking import Experiment, tracked_run
        run_cli(lambda args: tracked_run(Experiment("main.py"), main, args, command=train_command,
                                         check=check_args), get_args_parser())
"""
from __future__ import annotations

import csv
import importlib.metadata
import inspect
import logging
import mimetypes
import os
import re
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

# sacred 0.8.7 imports pkg_resources, whose deprecation warning would be a second line on every
# command's stderr (and break "one line per user error").
warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)

from sacred import Experiment  # noqa: E402  (re-exported for the CLIs)
from sacred.observers import FileStorageObserver, MongoObserver  # noqa: E402
from sacred.utils import apply_backspaces_and_linefeeds  # noqa: E402

from mess.checkpoint import atomic_write  # noqa: E402
from utils import UserError  # noqa: E402

__all__ = ["Experiment", "SacredTracker", "tracked_run", "train_command", "RUNS_DIR", "MONGO_URL_ENV"]

RUNS_DIR = Path("runs")  # cwd-relative, as checkpoint/
MONGO_URL_ENV = "SACRED_MONGO_URL"
DEFAULT_MONGO_DB = "sacred"  # sacred's and Omniboard's default, so `omniboard` alone finds it locally
SERVER_TIMEOUT_S = 2.5  # server selection and connect: pymongo's default of 30 s is no way to fail fast
SOCKET_TIMEOUT_S = 20.0  # a server that hangs mid-run must not hang the run forever
FINAL_SAVE_ATTEMPTS = 2  # sacred tries 10 times, each after a full server-selection timeout
TRACK_DESTS = ("mongo_url", "mongo_db", "no_track")  # how a run is recorded, not what it does
CONSTANTS = ("train_samples",)  # the same every epoch: info, not a metric series that flattens the plot
PACKAGES = ("torch", "torchvision", "numpy", "mess", "sacred")  # versions in every run's info
# Omniboard columns (name, path in the run) for the headline figures in info; config is a column already
OMNIBOARD_COLUMNS = (("best top-1", "info.best_top1"), ("top-1", "info.top1"), ("ratio", "info.ratio"),
                     ("bits", "info.mess_bits"))


# ---------------------------------------------------------------- the tracker main() talks to
class SacredTracker:
    """``main(args, tracker)``'s hook: per-epoch rows become sacred metrics, paths artifacts."""

    def __init__(self, run):
        self.run = run
        self.recorded = False  # any metric or file yet: a run refused before that leaves no record

    def log(self, metrics: dict, step: int) -> None:
        for name, value in metrics.items():
            if name in ("epoch", "step") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            self.recorded = True
            if name in CONSTANTS:
                self.run.info[name] = value
            else:
                self.run.log_scalar(name, float(value), int(step))

    def artifact(self, path, name: str | None = None) -> None:
        path = Path(path)
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        # an explicit content type also keeps MongoObserver from printing its guess
        self.run.add_artifact(str(path), name=name or path.name, content_type=content_type)
        self.recorded = True


# ---------------------------------------------------------------- observers
class _OwnIds:
    """Each store numbers its runs itself.

    sacred hands the first observer's id to the others; ``runs/`` ids are per folder and MongoDB
    ids per database, so a shared id clashes (runs/3 exists, the database is new) and fails the run.
    """

    def started_event(self, **kwargs):
        kwargs["_id"] = None
        return super().started_event(**kwargs)


class RunsDirObserver(_OwnIds, FileStorageObserver):
    """``runs/<id>/{config,run,metrics}.json``, ``cout.txt`` and the artifacts."""

    def save_cout(self):
        # sacred appends what follows the length written last time, but the captured-output filter
        # rewrites the text's last line (a progress bar's redraw, then the epoch line over it), so the
        # appended slice was shifted and lines were lost: the whole text is written each time instead
        def write(tmp):
            with open(tmp, "w", encoding="utf-8", newline="") as f:
                f.write(self.cout)
        atomic_write(Path(self.dir) / "cout.txt", write)


class ForgivingMongoObserver(_OwnIds, MongoObserver):
    """A MongoObserver that gives up its final save quickly when the database has gone away
    (the entry is pickled into ``failure_dir``); sacred already turns its other errors mid-run into
    warnings. It runs after the file observer (lower priority), so ``runs/`` is complete first."""

    def final_save(self, attempts):
        super().final_save(min(attempts, FINAL_SAVE_ATTEMPTS))

    def __str__(self):  # how sacred's warnings name it
        return f"MongoDB database {self.runs.database.name}"


def mongo_url(args) -> tuple[str | None, str]:
    """The MongoDB URL of this run and where it came from (the flag wins over the variable)."""
    if getattr(args, "mongo_url", None):
        return args.mongo_url, "--mongo-url"
    return os.environ.get(MONGO_URL_ENV) or None, MONGO_URL_ENV


def connect(url: str, source: str = "--mongo-url"):
    """A ``pymongo.MongoClient`` that answered a ping, or a one-line ``UserError``."""
    import pymongo
    from pymongo.errors import ConfigurationError, PyMongoError
    from pymongo.uri_parser import parse_uri

    try:
        where = ",".join(f"{h}:{p}" for h, p in parse_uri(url)["nodelist"])  # no credentials shown
    except (ConfigurationError, ValueError) as e:
        raise UserError(f"invalid MongoDB URL in {source}: {_first_line(e)}") from None
    ms = int(SERVER_TIMEOUT_S * 1000)
    client = pymongo.MongoClient(url, serverSelectionTimeoutMS=ms, connectTimeoutMS=ms,
                                 socketTimeoutMS=int(SOCKET_TIMEOUT_S * 1000), appname="mess")
    try:
        client.admin.command("ping")
    except PyMongoError as e:
        client.close()
        drop = "drop --mongo-url" if source == "--mongo-url" else f"unset {source}"
        raise UserError(f"cannot reach MongoDB at {where} ({source}) within {SERVER_TIMEOUT_S:g} s: "
                        f"{_reason(e)}; start the server, fix the URL, or record to runs/ only "
                        f"({drop})") from None
    return client


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _reason(e: BaseException) -> str:
    # pymongo's text: "host:port: [Errno 111] Connection refused (configured timeouts: ...), Timeout: ..."
    text = _first_line(e).split(" (configured timeouts")[0].split(", Timeout:")[0]
    return text[:200]


# ---------------------------------------------------------------- what a record says
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")


def plain_text(text: str) -> str:
    """Captured output as it last stood on a terminal, without colour codes: a progress bar's
    redraws become their last state (a bar closed with ``leave=False`` becomes nothing) and the
    blanks a bar left at the end of a line go."""
    text = apply_backspaces_and_linefeeds(_ESCAPES.sub("", text))
    return re.sub(r"[ \t]+$", "", text, flags=re.MULTILINE)


def train_command(args) -> str:
    """main.py's mode, the run's command: evaluate (-E), retrain (-T), resume (-R) or train."""
    for flag, name in (("evaluate", "evaluate"), ("retrain", "retrain"), ("resume", "resume")):
        if getattr(args, flag, False):
            return name
    return "train"


def package_versions() -> dict:
    import torch  # noqa: F401  (the CLIs have loaded it; its version as it reports itself)
    out = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        mod = sys.modules.get(name)
        version = getattr(mod, "__version__", None)
        if version is None:
            try:
                version = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                continue
        out[name] = str(version)
    return out


def _add_dependencies(ex, versions: dict) -> None:
    """The packages as sacred dependencies too (Omniboard's experiment view); sacred wants PEP 440,
    so torch's ``2.5.1+cpu`` is given as 2.5.1 there (info keeps the whole string)."""
    for name, version in versions.items():
        if name in PACKAGES:
            base = version.split("+")[0]
            try:
                ex.add_package_dependency(name, base)
            except ValueError:
                pass


# ---------------------------------------------------------------- running
def run_config(args) -> dict:
    """The flags as sacred config: JSON-plain values only, without the recording flags."""
    out = {}
    for k, v in vars(args).items():
        if k in TRACK_DESTS:
            continue
        if isinstance(v, Path):
            v = str(v)
        elif isinstance(v, tuple):
            v = list(v)
        if v is None or isinstance(v, (str, int, float, bool)) or (
                isinstance(v, list) and all(isinstance(x, (str, int, float, bool)) for x in v)):
            out[k] = v
    return out


def _call(main, args, tracker):
    if tracker is not None and "tracker" in inspect.signature(main).parameters:
        return main(args, tracker=tracker)
    return main(args)


def _add_local_sources(ex) -> None:
    """Record every loaded module of the project (models/*.py too, not only what the script names)."""
    base = Path(ex.base_dir).resolve()
    for mod in list(sys.modules.values()):
        f = getattr(mod, "__file__", None)
        # some modules carry a bare, relative name (torch's "_ops.py"): not a file of ours
        if not f or not f.endswith(".py") or not os.path.isabs(f) or not os.path.isfile(f):
            continue
        p = Path(f).resolve()
        if base in p.parents and not any(part in ("site-packages", "dist-packages", ".venv", "venv")
                                         or part.startswith(".") for part in p.relative_to(base).parts):
            ex.add_source_file(str(p))


class _TidyRecords(logging.Filter):
    """sacred's 'Failed after ...' repeats the error the CLI prints anyway (as one line for a user
    error); pymongo's errors end in a topology dump that says nothing more to a user."""

    def filter(self, record):
        msg = record.getMessage()
        if msg.startswith("Failed after"):
            return False
        record.msg, record.args = msg.split(" (configured timeouts")[0].split(", Timeout:")[0], ()
        return True


class _StderrHandler(logging.StreamHandler):
    """Writes to the current ``sys.stderr`` (pytest and sacred's capture swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


def _logger() -> logging.Logger:
    log = logging.getLogger("mess.records")
    if not log.handlers:
        h = _StderrHandler()
        h.setFormatter(logging.Formatter("%(levelname)s - records: %(message)s"))
        h.addFilter(_TidyRecords())
        log.addHandler(h)
        log.setLevel(logging.WARNING)  # warnings (a lost database) show; sacred's progress chatter doesn't
        log.propagate = False
    return log


def record_outcome(out, tracker: SacredTracker):
    """Metrics, files and headline figures (info) that a CLI's return value carries; returns the
    run's result, one meaning per tool: best validation top-1 (training), top-1 (evaluate),
    compression ratio (compress).

    main.py training returns ``history``/``best_acc1`` (epochs were logged live), ``-E`` returns
    ``metrics``, find_similar_kernel.py returns ``account``/``ratio``/``rows``.
    """
    if not isinstance(out, dict):
        return None
    info = tracker.run.info
    if "best_acc1" in out:
        info["best_top1"] = float(out["best_acc1"])
        if out.get("history"):
            info["last_top1"] = float(out["history"][-1]["val_top1"])
        if out.get("mode"):
            info["mode"] = out["mode"]  # retrain.py's: train, finetune, mess, quant, palette, free
        return info["best_top1"]
    if "metrics" in out:
        tracker.log(out["metrics"], 0)
        eval_csv = Path(out.get("ckpt_dir") or ".") / "eval.csv"
        if eval_csv.is_file():
            tracker.artifact(eval_csv)
        info["top1"], info["top5"] = float(out["metrics"]["val_top1"]), float(out["metrics"]["val_top5"])
        return info["top1"]
    if "account" in out:
        return _record_compression(out, tracker)
    return None


def _record_compression(out, tracker: SacredTracker) -> float:
    account, rows = out["account"], out.get("rows") or []
    figures = {"ratio": float(out.get("ratio", account.ratio)), "mess_bits": account.mess_bits,
               "fp32_bits": account.fp32_bits}
    if "seconds" in out:
        figures["seconds"] = out["seconds"]
    for kind in ("kernel", "pointwise"):
        targets = [r for r in rows if r.get("path") == kind and r.get("targets")]
        if targets:
            n = sum(r["targets"] for r in targets)
            figures[f"{kind}_mean_residual"] = sum(r["mean_residual"] * r["targets"] for r in targets) / n
            figures[f"{kind}_targets"] = n
            layers = {r["layer"] for r in rows if r.get("path", "").split()[0] == kind}
            figures[f"{kind}_bits"] = sum(account.layer_bits(layer)[1] for layer in layers)
    tracker.log(figures, 0)
    tracker.run.info.update({k: figures[k] for k in ("ratio", "mess_bits", "fp32_bits")})
    if rows:
        name = f"{Path(out['path']).stem}_layers.csv" if out.get("path") else "layers.csv"
        with tempfile.TemporaryDirectory() as tmp:
            report = Path(tmp) / name
            cols = ["layer", "path", "targets", "bank", "index_bits", "mean_residual", "rel_error",
                    "bits_before", "bits_after"]
            with open(report, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
                w.writeheader()
                for r in rows:
                    before, after = account.layer_bits(r["layer"])
                    w.writerow({**r, "bits_before": before, "bits_after": after})
            tracker.artifact(report)  # both observers copy it at once
    return figures["ratio"]


def tracked_run(ex, main, args, command=None, check=None):
    """Run ``main(args[, tracker])`` as a sacred run of ``ex`` and return what main returns.

    ``command`` names the run's mode (a string, or a function of ``args``); ``check(args)`` runs the
    flag checks that need no work first, so that a command line they refuse creates no run.
    ``--no-track`` calls main alone. Use a fresh ``Experiment`` for every run.
    """
    if getattr(args, "no_track", False) or int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 records
        if getattr(args, "no_track", False) and getattr(args, "mongo_url", None):
            raise UserError("--no-track records nothing; it cannot be combined with --mongo-url")
        return _call(main, args, None)
    if check is not None:
        check(args)
    url, source = mongo_url(args)
    db_name = getattr(args, "mongo_db", None)
    if db_name and not url:
        raise UserError(f"--mongo-db {db_name} needs a server: give --mongo-url URL (or set {MONGO_URL_ENV})")
    db_name = db_name or DEFAULT_MONGO_DB
    client = connect(url, source) if url else None  # before anything is written or trained

    from pymongo.errors import ConnectionFailure

    files = RunsDirObserver(RUNS_DIR, priority=30)
    ex.observers = [files]
    mongo = None
    if client is not None:
        mongo = ForgivingMongoObserver(client=client, db_name=db_name, failure_dir=RUNS_DIR / "mongo-failed",
                                       priority=10)
        ex.observers.append(mongo)
        add_omniboard_columns(client[db_name])
    ex.captured_out_filter = plain_text
    ex.logger = _logger()
    name = (command(args) if callable(command) else command) or "run"
    versions = package_versions()
    _add_dependencies(ex, versions)
    tags = [ex.path, name] + [str(getattr(args, k)) for k in ("dataset", "arch") if getattr(args, k, None)]
    ex.add_config({**run_config(args), "tags": tags})  # Omniboard's Tags column
    _add_local_sources(ex)
    holder = {}

    def run_main(_run):
        _run.info.update({"tool": ex.path, "command": name, "versions": versions})
        where = f"{RUNS_DIR / str(_run._id)}"
        if mongo is not None:
            where += f" and MongoDB {db_name!r} (run {mongo.run_entry['_id']})"
        print(f"recording this run in {where}")
        holder["tracker"] = tracker = SacredTracker(_run)
        holder["out"] = _call(main, args, tracker)
        return record_outcome(holder["out"], tracker)

    run_main.__name__ = run_main.__qualname__ = name  # sacred's command, Omniboard's Command column
    ex.main(run_main)
    try:
        ex.run(options={"--capture": "sys"})
    except ConnectionFailure as e:  # only the observers' start talks to the database unguarded
        raise UserError(f"lost MongoDB at the start of the run: {_reason(e)}") from None
    except UserError:
        if not getattr(holder.get("tracker"), "recorded", False):
            _forget(files, mongo)  # refused before it did anything: no run to keep
        raise
    finally:
        if client is not None:
            client.close()
    return holder["out"]


def _forget(files: RunsDirObserver, mongo) -> None:
    """Remove the records of a run that never started its work."""
    if getattr(files, "dir", None) and os.path.isdir(files.dir):
        shutil.rmtree(files.dir, ignore_errors=True)
    if mongo is not None and mongo.run_entry is not None:
        from pymongo.errors import PyMongoError
        try:
            mongo.runs.delete_one({"_id": mongo.run_entry["_id"]})
            mongo.metrics.delete_many({"run_id": mongo.run_entry["_id"]})
        except PyMongoError as e:
            _logger().warning(f"could not remove the refused run from MongoDB: {_reason(e)}")


def add_omniboard_columns(db) -> None:
    """Omniboard columns for the headline figures in a run's info (Omniboard shows config as columns
    by itself, info only through these); a column of the same name already there is left alone."""
    from pymongo.errors import PyMongoError
    try:
        columns = db["omniboard.custom.columns"]
        for name, path in OMNIBOARD_COLUMNS:
            if columns.find_one({"name": name}) is None:
                columns.insert_one({"name": name, "config_path": path})
    except PyMongoError as e:
        _logger().warning(f"could not add the Omniboard columns: {_reason(e)}")
