"""Experiment records: every run of main.py and find_similar_kernel.py is a sacred run.

    python main.py digits -a resnet --layers 20 --epochs 8 -j 0                    # -> runs/<id>/
    python main.py digits -a resnet --layers 20 --mongo-url mongodb://127.0.0.1:27017 --mongo-db mess
    python main.py digits -a resnet --layers 20 --no-track                         # records nothing

A run's record holds its flags (config), the per-epoch metrics (train/val loss, top-1, top-5,
learning rate) or the compression figures (ratio, bits, mean residual per path), its files
(summary.csv, the per-layer report) and its result (best top-1, or the compression ratio).
It always goes to a sacred ``FileStorageObserver`` under ``runs/``; ``--mongo-url`` (or
``SACRED_MONGO_URL``) adds a ``MongoObserver`` for Omniboard. A database that cannot be
reached at the start is a user error (one line, exit 2) after a short server-selection
timeout; one that goes away mid-run costs a warning, never the run, and the files under
``runs/`` stay complete.

A CLI builds its ``Experiment`` itself, so that sacred records that script (and the local
modules it imports) as the run's sources, and hands it to ``tracked_run``::

    if __name__ == "__main__":
        from tracking import Experiment, tracked_run
        run_cli(lambda args: tracked_run(Experiment("mess-train"), main, args), get_args_parser())
"""
from __future__ import annotations

import csv
import inspect
import logging
import mimetypes
import os
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

from utils import UserError  # noqa: E402

__all__ = ["Experiment", "SacredTracker", "tracked_run", "RUNS_DIR", "MONGO_URL_ENV"]

RUNS_DIR = Path("runs")  # cwd-relative, as checkpoint/
MONGO_URL_ENV = "SACRED_MONGO_URL"
DEFAULT_MONGO_DB = "sacred"  # sacred's and Omniboard's default, so `omniboard` alone finds it locally
SERVER_TIMEOUT_S = 2.5  # server selection and connect: pymongo's default of 30 s is no way to fail fast
SOCKET_TIMEOUT_S = 20.0  # a server that hangs mid-run must not hang the run forever
FINAL_SAVE_ATTEMPTS = 2  # sacred tries 10 times, each after a full server-selection timeout
TRACK_DESTS = ("mongo_url", "mongo_db", "no_track")  # how a run is recorded, not what it does


# ---------------------------------------------------------------- the tracker main() talks to
class SacredTracker:
    """``main(args, tracker)``'s hook: per-epoch rows become sacred metrics, paths artifacts."""

    def __init__(self, run):
        self.run = run

    def log(self, metrics: dict, step: int) -> None:
        for name, value in metrics.items():
            if name in ("epoch", "step") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            self.run.log_scalar(name, float(value), int(step))

    def artifact(self, path, name: str | None = None) -> None:
        path = Path(path)
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        # an explicit content type also keeps MongoObserver from printing its guess
        self.run.add_artifact(str(path), name=name or path.name, content_type=content_type)


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
    """Metrics and files that a CLI's return value carries; returns the run's result.

    main.py training returns ``history``/``best_acc1`` (epochs were logged live), ``-E`` returns
    ``metrics``, find_similar_kernel.py returns ``account``/``ratio``/``rows``.
    """
    if not isinstance(out, dict):
        return None
    if "best_acc1" in out:
        return float(out["best_acc1"])
    if "metrics" in out:
        tracker.log(out["metrics"], 0)
        eval_csv = Path(out.get("ckpt_dir") or ".") / "eval.csv"
        if eval_csv.is_file():
            tracker.artifact(eval_csv)
        return float(out["metrics"]["val_top1"])
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


def tracked_run(ex, main, args):
    """Run ``main(args[, tracker])`` as a sacred run of ``ex`` and return what main returns.

    ``--no-track`` calls main alone. Use a fresh ``Experiment`` for every run.
    """
    if getattr(args, "no_track", False) or int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 records
        if getattr(args, "no_track", False) and getattr(args, "mongo_url", None):
            raise UserError("--no-track records nothing; it cannot be combined with --mongo-url")
        return _call(main, args, None)
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
    ex.captured_out_filter = apply_backspaces_and_linefeeds  # tqdm's \r redraws become their last state
    ex.logger = _logger()
    ex.add_config(run_config(args))
    _add_local_sources(ex)
    holder = {}

    def run_main(_run):
        where = f"{RUNS_DIR / str(_run._id)}"
        if mongo is not None:
            where += f" and MongoDB {db_name!r} (run {mongo.run_entry['_id']})"
        print(f"recording this run in {where}")
        tracker = SacredTracker(_run)
        holder["out"] = _call(main, args, tracker)
        return record_outcome(holder["out"], tracker)

    ex.main(run_main)
    try:
        ex.run(options={"--capture": "sys"})
    except ConnectionFailure as e:  # only the observers' start talks to the database unguarded
        raise UserError(f"lost MongoDB at the start of the run: {_reason(e)}") from None
    finally:
        if client is not None:
            client.close()
    return holder["out"]

