"""tracking.py: sacred records under runs/, in a MongoDB-wire server, and through Omniboard.

The server is SecantusDB (a MongoDB-compatible server in Python, a test dependency), started
in-process on 127.0.0.1; Omniboard is the one pinned in scripts/omniboard (`npm ci` there).
The tests of a real `python main.py` run (two epochs in a subprocess) are marked slow; the tracking
layer alone and an in-process compression run are the fast tier's.
"""

import argparse
import csv
import json
import shutil
import socket
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT, assert_user_error, run_cli

import tracking

TINY = ["digits", "-a", "resnet", "--layers", "20", "--width-mult", "0.5", "-j", "0", "-b", "64",
        "--epochs", "2"]
EPOCH_METRICS = ("lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5")
OMNIBOARD_DIR = ROOT / "scripts" / "omniboard"
OMNIBOARD = OMNIBOARD_DIR / "node_modules" / "omniboard" / "dist" / "start.js"


def start_server(storage):
    secantus = pytest.importorskip("secantus", reason="SecantusDB (requirements-dev.txt) is not installed")
    server = secantus.SecantusDBServer(host="127.0.0.1", port=0, storage_path=str(storage),
                                       replica_set_name=None)
    server.start()
    return server


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_json(path):
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """One `python main.py digits ...` with --mongo-url: its file records, database and stdout."""
    server = start_server(tmp_path_factory.mktemp("mongo"))
    cwd = tmp_path_factory.mktemp("cwd")
    try:
        rc, out, err = run_cli("main.py", *TINY, "--mongo-url", server.uri, "--mongo-db", "mess", cwd=cwd)
        assert rc == 0, err
        yield {"cwd": cwd, "server": server, "out": out, "err": err}
    finally:
        server.stop()


def summary_rows(cwd):
    with open(cwd / "checkpoint/resnet20_w0.5/digits/summary.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_file_records_hold_flags_metrics_files_and_result(digits_run):
    cwd = digits_run["cwd"]
    run = cwd / "runs" / "1"
    config = read_json(run / "config.json")
    assert (config["dataset"], config["arch"], config["layers"], config["width_mult"], config["epochs"],
            config["batch_size"]) == ("digits", "resnet", 20, 0.5, 2, 64)
    assert not {"mongo_url", "mongo_db", "no_track"} & set(config)  # how it is recorded: not the run's flags

    rows = summary_rows(cwd)
    metrics = read_json(run / "metrics.json")
    for m in EPOCH_METRICS:
        assert metrics[m]["steps"] == [1, 2], m
        assert metrics[m]["values"] == pytest.approx([float(r[m]) for r in rows]), m

    info = read_json(run / "run.json")
    assert info["status"] == "COMPLETED"
    assert info["result"] == pytest.approx(max(float(r["val_top1"]) for r in rows))
    assert info["experiment"]["name"] == "main.py" and info["experiment"]["mainfile"] == "main.py"
    assert info["command"] == "train"  # Omniboard's Command column: the mode, not sacred's "run_main"
    extra = read_json(run / "info.json")
    assert extra["best_top1"] == info["result"] and extra["train_samples"] == 1438  # once, not per epoch
    assert "train_samples" not in metrics and extra["versions"]["torch"]
    sources = {s for s, _ in info["experiment"]["sources"]}
    assert {"main.py", "config.py", "tracking.py", "models/resnet.py"} <= sources
    assert info["artifacts"] == ["summary.csv"] and (run / "summary.csv").is_file()

    cout = (run / "cout.txt").read_text()
    assert "epoch 2/2" in cout and "\r" not in cout and "\x1b" not in cout  # plain text (tests/test_logs.py)
    assert "recording this run in runs/1 and MongoDB 'mess'" in digits_run["out"]
    err = digits_run["err"]
    assert "WARNING" not in err and "Traceback" not in err and "INFO" not in err, err  # no sacred chatter


@pytest.mark.slow
def test_mongodb_holds_the_run_its_metrics_and_files(digits_run):
    import pymongo
    rows = summary_rows(digits_run["cwd"])
    with pymongo.MongoClient(digits_run["server"].uri, serverSelectionTimeoutMS=3000) as client:
        db = client["mess"]
        run = db.runs.find_one({})
        assert run["status"] == "COMPLETED" and run["config"]["arch"] == "resnet"
        assert run["result"] == pytest.approx(max(float(r["val_top1"]) for r in rows))
        by_name = {m["name"]: m for m in db.metrics.find({"run_id": run["_id"]})}
        assert set(EPOCH_METRICS) <= set(by_name)
        for m in EPOCH_METRICS:
            assert by_name[m]["steps"] == [1, 2], m
            assert by_name[m]["values"] == pytest.approx([float(r[m]) for r in rows]), m
        files = {f["filename"] for f in db["fs.files"].find({})}
        assert f"artifact://runs/{run['_id']}/summary.csv" in files
        assert any(f.endswith("main.py") for f in files)  # the sources
        assert [a["name"] for a in run["artifacts"]] == ["summary.csv"]
        assert run["command"] == "train" and run["info"]["best_top1"] == run["result"]
        assert "train_samples" not in by_name and run["info"]["train_samples"] == 1438
        columns = {c["name"]: c["config_path"] for c in db["omniboard.custom.columns"].find({})}
        assert columns["best top-1"] == "info.best_top1" and columns["ratio"] == "info.ratio"


def _screenshot_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("omniboard_screenshot", OMNIBOARD_DIR / "screenshot.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
@pytest.mark.skipif(not OMNIBOARD.is_file() or not shutil.which("node"),
                    reason="Omniboard is not installed: cd scripts/omniboard && npm ci")
def test_omniboard_lists_the_run_and_its_metrics(digits_run):
    # Omniboard started as scripts/omniboard/screenshot.py starts it (127.0.0.1 only, on a free port)
    with _screenshot_module().omniboard(f"127.0.0.1:{digits_run['server'].port}:mess") as base:

        def get(path):
            for _ in range(20):  # bounded: Omniboard connects to the database just after listening
                try:
                    with urllib.request.urlopen(f"{base}sacred/api/v1/{path}", timeout=5) as r:
                        return json.loads(r.read())
                except OSError:
                    time.sleep(0.5)
            raise AssertionError(f"Omniboard did not answer {path}")

        runs = get("Runs")
        assert len(runs) == 1 and runs[0]["status"] == "COMPLETED"
        assert runs[0]["config"]["arch"] == "resnet" and runs[0]["experiment"]["name"] == "main.py"
        assert runs[0]["command"] == "train" and runs[0]["config"]["tags"] == ["main.py", "train", "digits",
                                                                               "resnet"]
        metrics = get(f"Metrics?query={urllib.parse.quote(json.dumps({'run_id': runs[0]['_id']}))}")
        assert set(EPOCH_METRICS) <= {m["name"] for m in metrics}
        assert all(m["steps"] == [1, 2] for m in metrics if m["name"] in EPOCH_METRICS)


@pytest.mark.slow
@pytest.mark.skipif(not OMNIBOARD.is_file() or not shutil.which("node"),
                    reason="Omniboard is not installed: cd scripts/omniboard && npm ci")
def test_omniboard_screenshot_shows_the_run(digits_run, tmp_path):
    """A real browser: headless Chromium draws Omniboard's table with the run in it."""
    shot = _screenshot_module()
    browser = shot.find_browser()
    if browser is None:
        pytest.skip("no Chromium: apt-get install chromium-headless-shell")
    from PIL import Image
    with shot.omniboard(f"127.0.0.1:{digits_run['server'].port}:mess") as url:
        png = shot.take(url, tmp_path / "omniboard.png", browser, size=(1600, 400))
    img = Image.open(png).convert("RGB")
    assert img.size == (1600, 400)
    # the run's row (y 200 to 280 at this size) holds text: Omniboard drew the run, not only its frame
    row = img.crop((0, 200, 1600, 280)).convert("L")
    assert row.getextrema()[0] < 100 and len(img.getcolors(maxcolors=1 << 20) or []) > 50


@pytest.mark.slow
def test_evaluation_is_recorded_with_its_metrics_and_eval_csv(digits_run, monkeypatch):
    import main
    monkeypatch.chdir(digits_run["cwd"])
    args = main.get_args_parser().parse_args(TINY + ["-E", "--ckpt", "ckpt_best.pth"])
    out = tracking.tracked_run(tracking.Experiment("main.py", base_dir=str(ROOT)), main.main, args,
                               command=tracking.train_command)
    run = max((d for d in Path("runs").iterdir() if d.name.isdigit()), key=lambda d: int(d.name))
    top1 = read_json(run / "metrics.json")["val_top1"]
    assert (top1["steps"], top1["values"]) == ([0], [out["metrics"]["val_top1"]])
    info = read_json(run / "run.json")
    assert info["result"] == out["metrics"]["val_top1"] and info["artifacts"] == ["eval.csv"]
    assert info["command"] == "evaluate" and read_json(run / "info.json")["top1"] == info["result"]


@pytest.mark.slow
def test_unreachable_database_fails_fast_with_one_line(in_tmp):
    port = closed_port()
    t0 = time.monotonic()
    rc, out, err = run_cli("main.py", *TINY, "--mongo-url", f"mongodb://127.0.0.1:{port}", cwd=in_tmp)
    assert_user_error(rc, err, f"cannot reach MongoDB at 127.0.0.1:{port} (--mongo-url)")
    assert time.monotonic() - t0 < 25  # python + torch start-up, then 2.5 s: not pymongo's 30 s
    assert not (in_tmp / "runs").exists() and not (in_tmp / "checkpoint").exists()


# ---------------------------------------------------------------- the tracking layer alone, fast
class NullTracker:
    def log(self, metrics, step):
        pass

    def artifact(self, path):
        pass


def fake_main(args, tracker=None, on_epoch=None):
    """What main.py does for the records: per-epoch rows, summary.csv, result."""
    tracker = tracker or NullTracker()
    path = Path("checkpoint/fake/summary.csv")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("epoch,val_top1\n")
    rows = []
    for epoch in range(1, args.epochs + 1):
        row = {"epoch": epoch, "lr": 0.1, "train_loss": 1.0 / epoch, "val_top1": 50.0 + epoch}
        rows.append(row)
        with open(path, "a") as f:
            f.write(f"{epoch},{row['val_top1']}\n")
        tracker.log(row, epoch)
        if on_epoch:
            on_epoch(epoch)
    tracker.artifact(path)
    return {"best_acc1": max(r["val_top1"] for r in rows), "history": rows, "ckpt_dir": path.parent}


def fake_args(**kw):
    base = {"epochs": 3, "seed": 0, "datapath": Path("../data"), "gpuids": (0,), "mongo_url": None,
            "mongo_db": None, "no_track": False}
    return argparse.Namespace(**{**base, **kw})


def experiment():
    return tracking.Experiment("test", base_dir=str(ROOT))


def test_no_track_records_nothing(in_tmp):
    out = tracking.tracked_run(experiment(), fake_main, fake_args(no_track=True))
    assert out["best_acc1"] == 53.0 and not (in_tmp / "runs").exists()


def test_plain_config_and_one_value_per_epoch(in_tmp):
    tracking.tracked_run(experiment(), fake_main, fake_args())
    run = in_tmp / "runs/1"
    config = read_json(run / "config.json")
    assert config["datapath"] == "../data" and config["gpuids"] == [0]  # Path and tuple made JSON-plain
    metrics = read_json(run / "metrics.json")
    assert set(metrics) == {"lr", "train_loss", "val_top1"}
    assert metrics["val_top1"]["steps"] == [1, 2, 3] and metrics["val_top1"]["values"] == [51.0, 52.0, 53.0]
    assert read_json(run / "run.json")["result"] == 53.0
    tracking.tracked_run(experiment(), fake_main, fake_args())
    assert (in_tmp / "runs/2/metrics.json").is_file()  # the next run, numbered on


@pytest.mark.parametrize("kw, env, needle", [
    ({"mongo_url": "mongodb://127.0.0.1:PORT"}, None, "cannot reach MongoDB at 127.0.0.1:PORT (--mongo-url)"),
    ({}, "mongodb://127.0.0.1:PORT", f"({tracking.MONGO_URL_ENV}) within 0.5 s"),
    ({"mongo_url": "http://x"}, None, "invalid MongoDB URL in --mongo-url"),
    ({"mongo_url": "mongodb://127.0.0.1:1", "no_track": True}, None, "cannot be combined"),
    ({"mongo_db": "mess"}, None, "--mongo-db mess needs a server"),
])
def test_database_user_errors(in_tmp, monkeypatch, kw, env, needle):
    port = str(closed_port())
    monkeypatch.setattr(tracking, "SERVER_TIMEOUT_S", 0.5)
    if env:
        monkeypatch.setenv(tracking.MONGO_URL_ENV, env.replace("PORT", port))
    else:
        monkeypatch.delenv(tracking.MONGO_URL_ENV, raising=False)
    kw = {k: v.replace("PORT", port) if isinstance(v, str) else v for k, v in kw.items()}
    with pytest.raises(tracking.UserError) as e:
        tracking.tracked_run(experiment(), fake_main, fake_args(**kw))
    assert needle.replace("PORT", port) in str(e.value) and "\n" not in str(e.value)
    assert not (in_tmp / "runs").exists() and not (in_tmp / "checkpoint").exists()


@pytest.mark.slow
def test_database_lost_mid_run_costs_a_warning_not_the_run(in_tmp, tmp_path_factory, monkeypatch, capsys):
    monkeypatch.setattr(tracking, "SERVER_TIMEOUT_S", 0.5)
    server = start_server(tmp_path_factory.mktemp("mongo"))
    stopped = []
    try:
        def stop_after_first(epoch):
            if epoch == 1:
                server.stop()
                stopped.append(True)

        t0 = time.monotonic()
        out = tracking.tracked_run(experiment(), lambda a, tracker: fake_main(a, tracker, stop_after_first),
                                   fake_args(mongo_url=server.uri))
        assert time.monotonic() - t0 < 20
    finally:
        if not stopped:
            server.stop()
    assert out["best_acc1"] == 53.0
    run = in_tmp / "runs/1"
    info = read_json(run / "run.json")
    assert info["status"] == "COMPLETED" and info["result"] == 53.0
    assert read_json(run / "metrics.json")["val_top1"]["steps"] == [1, 2, 3]
    assert (run / "summary.csv").is_file()
    assert list((in_tmp / "runs/mongo-failed").glob("*.pickle"))  # what MongoDB missed, kept on disk
    assert "WARNING" in capsys.readouterr().err


def test_compression_run_records_ratio_bits_residuals_and_report(in_tmp):
    import find_similar_kernel as fsk
    import models
    from utils import save_checkpoint
    model = models.build_model("resnet", "digits", 20, 0.5, False)
    save_checkpoint({"model": model.state_dict()}, in_tmp / "tiny.pth")
    args = fsk.get_args_parser().parse_args(["digits", "-a", "resnet", "--layers", "20", "--width-mult",
                                             "0.5", "-v", "v2qq", "--ckpt", str(in_tmp / "tiny.pth")])
    out = tracking.tracked_run(tracking.Experiment("compress", base_dir=str(ROOT)), fsk.main, args)
    run = in_tmp / "runs/1"
    metrics = {k: v["values"] for k, v in read_json(run / "metrics.json").items()}
    assert metrics["ratio"] == [pytest.approx(out["ratio"])]
    assert metrics["mess_bits"] == [out["account"].mess_bits]
    assert metrics["fp32_bits"] == [out["account"].fp32_bits]
    assert metrics["kernel_mean_residual"][0] > 0 and metrics["kernel_bits"][0] > 0
    info = read_json(run / "run.json")
    assert info["result"] == pytest.approx(out["ratio"])  # compress: the result is the compression ratio
    assert read_json(run / "info.json")["ratio"] == info["result"]
    assert info["artifacts"] == ["tiny_v2qq_q888_layers.csv"]
    with open(run / "tiny_v2qq_q888_layers.csv", newline="") as f:
        report = list(csv.DictReader(f))
    assert {r["layer"] for r in report} == {r["layer"] for r in out["rows"]}


@pytest.mark.slow
def test_quantize_cli_is_a_recorded_run_of_the_files_model(digits_run):
    # no architecture flags: the record's config names the model the checkpoint holds
    cwd = digits_run["cwd"]
    ckpt = cwd / "checkpoint/resnet20_w0.5/digits/ckpt_best.pth"
    rc, out, err = run_cli("quantize.py", "digits", "--ckpt", ckpt, "--method", "kmeans", "--qb", "2",
                           "--bn-calib", "off", cwd=cwd)
    assert rc == 0, err
    runs = sorted((cwd / "runs").glob("[0-9]*"), key=lambda p: int(p.name))
    info = read_json(runs[-1] / "run.json")
    assert info["experiment"]["name"] == "quantize.py" and info["command"] == "quantize"
    assert f"compression ratio {info['result']:.2f}x" in out
    config = read_json(runs[-1] / "config.json")
    assert (config["arch"], config["layers"], config["width_mult"]) == ("resnet", 20, 0.5)
    assert "torch" in read_json(runs[-1] / "info.json")["versions"]


@pytest.mark.slow
def test_find_similar_kernel_cli_is_a_recorded_run(digits_run):
    cwd = digits_run["cwd"]
    rc, out, err = run_cli("find_similar_kernel.py", *TINY[:7], "-v", "v2nb", "--ckpt", "ckpt_best.pth",
                           cwd=cwd)
    assert rc == 0, err
    runs = sorted((cwd / "runs").glob("[0-9]*"), key=lambda p: int(p.name))
    info = read_json(runs[-1] / "run.json")
    assert info["experiment"]["name"] == "find_similar_kernel.py" and info["command"] == "compress"
    assert info["status"] == "COMPLETED"
    assert f"compression ratio {info['result']:.2f}x" in out  # the recorded result is the printed ratio
    assert read_json(runs[-1] / "config.json")["version"] == "v2nb"


def test_modules_with_a_bare_relative_file_name_are_not_sources(in_tmp, monkeypatch):
    # torch registers a module whose __file__ is the bare "_ops.py"; run from the project
    # folder, it resolved into that folder and sacred refused the missing file
    import types
    fake = types.ModuleType("fake_ops")
    fake.__file__ = "_ops.py"
    monkeypatch.setitem(sys.modules, "fake_ops", fake)
    (in_tmp / "mine.py").write_text("x = 1\n")
    mine = types.ModuleType("mine")
    mine.__file__ = str(in_tmp / "mine.py")
    monkeypatch.setitem(sys.modules, "mine", mine)
    ex = tracking.Experiment("sources", base_dir=str(in_tmp))
    tracking._add_local_sources(ex)
    names = [Path(s.filename).name for s in ex.sources]
    assert "mine.py" in names and "_ops.py" not in names


# ---------------------------------------------------------------- names, versions, constants, refusals
def test_records_name_tool_and_mode_and_carry_package_versions(in_tmp):
    import numpy
    import torch
    import torchvision  # noqa: F401  (its version is read whether it is loaded or not)

    def main_with_constant(args, tracker=None):
        tracker.log({"train_samples": 1438, "val_top1": 50.0}, 1)
        tracker.log({"train_samples": 1438, "val_top1": 60.0}, 2)
        return {"best_acc1": 60.0, "history": [{"val_top1": 50.0}, {"val_top1": 60.0}], "mode": "train"}

    tracking.tracked_run(tracking.Experiment("main.py", base_dir=str(ROOT)), main_with_constant,
                         fake_args(retrain=True), command=tracking.train_command)
    run, info = read_json(in_tmp / "runs/1/run.json"), read_json(in_tmp / "runs/1/info.json")
    assert (run["experiment"]["name"], run["command"]) == ("main.py", "retrain")
    assert (info["tool"], info["command"], info["mode"]) == ("main.py", "retrain", "train")
    versions = info["versions"]
    assert versions["torch"] == torch.__version__ and versions["numpy"] == numpy.__version__
    assert versions["torchvision"].split("+")[0] == torchvision.__version__.split("+")[0]
    assert versions["mess"] and versions["python"] == sys.version.split()[0]
    assert f"torch=={torch.__version__.split('+')[0]}" in run["experiment"]["dependencies"]
    assert read_json(in_tmp / "runs/1/config.json")["tags"] == ["main.py", "retrain"]
    # a constant is recorded once, in info; a metric series of it would flatten Omniboard's plot
    assert info["train_samples"] == 1438 and set(read_json(in_tmp / "runs/1/metrics.json")) == {"val_top1"}
    assert run["result"] == info["best_top1"] == 60.0 and info["last_top1"] == 60.0


@pytest.mark.parametrize("flags, command", [([], "train"), (["-E"], "evaluate"), (["-R"], "resume"),
                                            (["-T"], "retrain")])
def test_main_py_modes_are_commands(flags, command):
    import main
    assert tracking.train_command(main.get_args_parser().parse_args(["digits", *flags])) == command


def test_a_flag_refused_up_front_records_no_run(in_tmp):
    import main
    args = main.get_args_parser().parse_args(["digits", "-a", "resnet", "--layers", "20",
                                             "--sched", "linear"])
    with pytest.raises(tracking.UserError, match="unknown --sched 'linear'"):
        tracking.tracked_run(tracking.Experiment("main.py", base_dir=str(ROOT)), main.main, args,
                             command=tracking.train_command, check=main.check_args)
    assert not (in_tmp / "runs").exists()


def test_a_missing_checkpoint_records_no_run(in_tmp, capsys):
    # refused inside the run (the checkpoint is looked up there): its records are removed again
    import main
    args = main.get_args_parser().parse_args(TINY + ["-E", "--ckpt", str(in_tmp / "nothere.pth")])
    with pytest.raises(tracking.UserError, match="nothere.pth"):
        tracking.tracked_run(tracking.Experiment("main.py", base_dir=str(ROOT)), main.main, args,
                             command=tracking.train_command, check=main.validate_args)
    assert [p.name for p in (in_tmp / "runs").iterdir()] == ["_sources"]  # no run folder
    tracking.tracked_run(experiment(), fake_main, fake_args())
    assert (in_tmp / "runs/1/run.json").is_file()  # the next run takes the number


def test_a_user_error_after_the_first_records_keeps_the_run(in_tmp):
    def fails_late(args, tracker=None):
        tracker.log({"val_top1": 1.0}, 1)
        raise tracking.UserError("disk full")

    with pytest.raises(tracking.UserError):
        tracking.tracked_run(experiment(), fails_late, fake_args())
    assert read_json(in_tmp / "runs/1/run.json")["status"] == "FAILED"


def test_rejected_flag_on_the_command_line_records_no_run(in_tmp):
    rc, out, err = run_cli("main.py", "digits", "--epochz", "2", cwd=in_tmp)
    assert rc == 2 and "--epochz" in err and not (in_tmp / "runs").exists()
    rc, out, err = run_cli("main.py", "digits", "-a", "resnet", "--layers", "20", "-b", "0", cwd=in_tmp)
    assert_user_error(rc, err, "--batch-size")
    assert not (in_tmp / "runs").exists() and "recording this run" not in out


# ---------------------------------------------------------------- captured output
def test_captured_output_is_plain_text_with_every_line(in_tmp):
    """Progress-bar redraws and colour codes around heartbeats: cout.txt holds every line, as text."""
    def noisy(args, tracker=None):
        for epoch in (1, 2, 3):
            for i in range(3):
                sys.stderr.write(f"\repoch {epoch}: {i}/3 |{'#' * i}{' ' * (3 - i)}| 12.3it/s")
                tracker.run._emit_heartbeat()  # sacred's 10 s timer, here between any two writes
            sys.stderr.write("\r" + " " * 40 + "\r")  # tqdm's leave=False
            print(f"\x1b[1mepoch {epoch}/3\x1b[0m val {50 + epoch:.2f}% | a line longer than eighty columns, "
                  f"which no one cuts in two")
            tracker.run._emit_heartbeat()
        return {"best_acc1": 53.0}

    tracking.tracked_run(experiment(), noisy, fake_args())
    with open(in_tmp / "runs/1/cout.txt", newline="") as f:
        cout = f.read()
    lines = cout.splitlines()
    assert lines[0] == "recording this run in runs/1"
    assert lines[1:] == [f"epoch {e}/3 val {50 + e:.2f}% | a line longer than eighty columns, which no one "
                         f"cuts in two" for e in (1, 2, 3)]


def test_plain_text_keeps_an_open_bar_to_continue():
    assert tracking.plain_text("a\x1b[31mb\x1b[0m\n\rx 1\rx 2") == "ab\nx 2"
    assert tracking.plain_text("done   \n\r50%\r") == "done\n50%\r"  # the next chunk overwrites it
