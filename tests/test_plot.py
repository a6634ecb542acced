"""plot_summary.py: curves from summary CSVs and sacred run folders, written as a PNG whose legend fits,
whose labels tell the runs apart and whose loss axis is logarithmic, at 1 and at 20 runs."""

import contextlib
import json
import math
import os
import shutil
from pathlib import Path

import pytest
from conftest import ROOT
from png_checks import assert_apart, assert_inside, check_png

import plot_summary
from utils import UserError, append_csv
from utils import run_cli as run_cli_inprocess

ARCHS = [  # flags of main.py -> the checkpoint folder's model name
    (["-a", "resnet", "--layers", "20"], "resnet20"), (["-a", "resnet", "--layers", "56"], "resnet56"),
    (["-a", "vgg", "--layers", "16", "--bn"], "vgg16_bn"), (["-a", "mobilenet"], "mobilenet"),
    (["-a", "resnet", "--layers", "20", "--width-mult", "0.5"], "resnet20_w0.5")]
TAGS = ["", "rt1_v2qq_q888", "rt1_v2nb_q888", "rt1_v2qq_q444"]  # summary.csv, summary_<tag>.csv


def rows(epochs, k=0, run_id="20250101-120000-0000"):
    """Rows as main.py's epoch loop writes them (train_and_evaluate_epoch), run k's own curve."""
    return [{"epoch": e, "lr": 0.1, "train_loss": 2.3 * math.exp(-0.3 * e * (1 + k / 10)) + 1e-3,
             "train_top1": 100 - 90 * math.exp(-0.3 * e), "val_loss": 2.3 * math.exp(-0.2 * e) + 0.3 + k / 50,
             "val_top1": 90 - 80 * math.exp(-0.3 * e) - k / 3, "val_top5": 99.0, "seconds": 1.5,
             "run_id": run_id} for e in epochs]


def write_summary(path, rows_):
    append_csv(path, rows_)  # main.py's writer
    return path


@pytest.fixture(scope="module")
def sacred_run(tmp_path_factory):
    """One run recorded by tracking.tracked_run, main.py's own recorder, with main.py's flags: a
    training whose rows go to summary.csv, the tracker's metrics and its artifact, as in main.train."""
    import main
    import tracking

    def train(args, tracker):
        path = Path("checkpoint/resnet20/digits/summary.csv")
        for row in rows(range(1, 31)):
            append_csv(path, [row])
            tracker.log(row, row["epoch"])
        tracker.artifact(path)
        return {"best_acc1": 66.0}

    folder = tmp_path_factory.mktemp("recorded")
    with contextlib.chdir(folder):
        args = main.get_args_parser().parse_args(["digits", *ARCHS[0][0], "--epochs", "30"])
        tracking.tracked_run(tracking.Experiment("mess-train", base_dir=str(ROOT)), train, args)
    return folder / "runs/1"


def clone_run(real: Path, dest: Path, flags: list[str], tag: str, k: int) -> None:
    """``real`` with another run's flags (config.json as main.py records them), curves and summary table."""
    import main
    import tracking

    shutil.copytree(real, dest)
    args = main.get_args_parser().parse_args(["digits", *flags, "--epochs", "30"])
    (dest / "config.json").write_text(json.dumps(tracking.run_config(args)))
    metrics = json.loads((dest / "metrics.json").read_text())
    for m in ("train_loss", "val_loss", "train_top1", "val_top1"):
        metrics[m]["values"] = [x[m] for x in rows(range(1, 31), k)]
    (dest / "metrics.json").write_text(json.dumps(metrics))
    if tag:  # main.py names a retraining's table after its checkpoints
        info = json.loads((dest / "run.json").read_text())
        info["artifacts"] = [f"summary_{tag}.csv"]
        (dest / "run.json").write_text(json.dumps(info))
        os.replace(dest / "summary.csv", dest / f"summary_{tag}.csv")


def twenty_runs(real: Path, runs: Path) -> None:
    for i in range(1, 21):
        flags, _ = ARCHS[i % 5]
        clone_run(real, runs / str(i), flags, TAGS[i // 5 % 4], i)


def test_the_recorded_run_reads_as_main_py_wrote_it(sacred_run):
    c = plot_summary.read_sacred_run(sacred_run)
    assert c.facts == {"model": "resnet20", "dataset": "digits", "run": "run 1", "tag": ""}
    assert sorted(c.series["val_loss"]) == list(range(1, 31))
    assert c.series["train_loss"][30] == pytest.approx(rows([30])[0]["train_loss"])


def test_twenty_runs_fit_are_told_apart_and_loss_is_logarithmic(sacred_run, in_tmp):
    twenty_runs(sacred_run, in_tmp / "runs")
    (in_tmp / "runs/21").mkdir()  # an evaluation (-E): validation figures once, no curve
    (in_tmp / "runs/21/metrics.json").write_text(json.dumps(
        {m: {"steps": [0], "values": [v], "timestamps": [""]} for m, v in (("val_loss", 0.3),
                                                                           ("val_top1", 91.0))}))
    args = plot_summary.get_args_parser().parse_args(["runs", "-o", "out/curves.png"])
    res = plot_summary.main(args)
    labels = res["labels"]
    assert len(labels) == 20 and len(set(labels)) == 20
    assert labels[0] == "resnet56 run 1" and labels[4] == "resnet20 rt1 v2qq q888 run 5"
    assert labels[9] == "resnet20 rt1 v2nb q888 run 10" and labels[19] == "resnet20 run 20"
    assert all("digits" not in lb for lb in labels)  # what all share is said once, in the legend's title

    fig = res["figure"]  # the one written
    legend = fig.legends[0]
    assert legend.get_title().get_text() == "digits"
    assert [t.get_text() for t in legend.get_texts()] == labels
    styles = {(h.get_color(), h.get_linestyle()) for h in legend.legend_handles}
    assert len(styles) == 20  # 10 colours, then each again dashed: no two runs look alike
    axes = fig.axes
    assert [a.get_yscale() for a in axes] == ["log", "log", "linear", "linear"]
    assert axes[0].get_ylabel() == "loss (log scale)" and axes[2].get_xlabel() == "epoch"
    assert_inside(fig, legend, *axes)
    w, h = fig.bbox.width, fig.bbox.height
    assert h == 680 and w > 1000 + 150  # the panels' width, and the legend's beside them
    check_png(in_tmp / "out/curves.png", size=(round(w), round(h)), min_colors=30)


def test_one_run_shows_train_against_validation(sacred_run, in_tmp):
    (in_tmp / "runs").mkdir()
    shutil.copytree(sacred_run, in_tmp / "runs/1")
    res = plot_summary.main(plot_summary.get_args_parser().parse_args(["runs/1", "-o", "one.png"]))
    assert res["labels"] == ["resnet20 digits run 1"]
    fig = res["figure"]
    legend = fig.legends[0]
    assert legend.get_title().get_text() == "resnet20 digits run 1"
    assert [t.get_text() for t in legend.get_texts()] == ["train", "validation"]
    assert [a.get_yscale() for a in fig.axes] == ["log", "linear"]
    assert [a.get_ylabel() for a in fig.axes] == ["loss (log scale)", "top-1 accuracy (%)"]
    assert_inside(fig, legend, *fig.axes)
    check_png(in_tmp / "one.png", size=(round(fig.bbox.width), 420))


def test_an_asked_size_is_exact_or_refused(sacred_run, in_tmp, capsys):
    twenty_runs(sacred_run, in_tmp / "runs")
    fig = plot_summary.main(plot_summary.get_args_parser().parse_args(
        ["runs", "-o", "c.png", "--width", "1200", "--height", "480", "--title", "twenty runs"]))["figure"]
    check_png(in_tmp / "c.png", size=(1200, 480), min_colors=30)
    assert_inside(fig, fig.legends[0], fig._suptitle, *fig.axes)
    assert_apart(fig, fig.legends[0], [fig._suptitle, *fig.axes])
    with pytest.raises(SystemExit) as e:
        run_cli_inprocess(plot_summary.main, plot_summary.get_args_parser(),
                          ["runs", "-o", "small.png", "--width", "500", "--height", "300"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "500 x 300 pixels is too small" in err[0], err
    assert not (in_tmp / "small.png").exists()


def test_checkpoint_folders_and_their_labels(in_tmp):
    ck = in_tmp / "checkpoint/resnet20/digits"
    write_summary(ck / "summary.csv", rows([1, 2, 3], 0, "20250101-120000-aaaa"))
    write_summary(ck / "summary_rt1_v2qq_q888.csv", rows([1, 2], 1, "20250102-090000-bbbb"))
    write_summary(in_tmp / "checkpoint/vgg16_bn/digits/summary.csv", rows([1, 2, 3, 4], 2))
    res = plot_summary.main(plot_summary.get_args_parser().parse_args(
        ["checkpoint/resnet20/digits", "checkpoint/vgg16_bn/digits", "-o", "c.png"]))
    assert res["labels"] == ["resnet20", "resnet20 rt1 v2qq q888", "vgg16_bn"]
    check_png(in_tmp / "c.png")
    # one folder: the model is the legend's title, the tables are told apart by what they trained
    curves = plot_summary.collect([ck])
    assert plot_summary.label_curves(curves) == "resnet20 digits"
    assert [c.label for c in curves] == ["float training", "rt1 v2qq q888"]


def test_equal_labels_get_what_differs(in_tmp):
    p = write_summary(in_tmp / "ck/m/d/summary.csv", rows([1, 2], 0, "20250101-120000-aaaa"))
    q = write_summary(in_tmp / "ck2/m/d/summary.csv", rows([1, 2], 1, "20250101-130000-bbbb"))
    curves = plot_summary.collect([p, q])
    plot_summary.label_curves(curves)
    assert [c.label for c in curves] == ["float training 20250101-120000-aaaa",
                                         "float training 20250101-130000-bbbb"]
    curves = plot_summary.collect([p, p])  # the very same table twice
    plot_summary.label_curves(curves)
    assert [c.label for c in curves] == ["float training 20250101-120000-aaaa",
                                         "float training 20250101-120000-aaaa #2"]


def test_a_summary_csv_with_a_restart_and_a_resume(in_tmp):
    p = write_summary(in_tmp / "ck/m/d/summary.csv", rows([1, 2, 3], run_id=""))
    write_summary(p, rows([3, 4], run_id=""))  # resumed from epoch 2: the same training, epoch 3 rewritten
    write_summary(p, rows([1, 2], k=5, run_id=""))  # trained again from scratch (a table without run ids)
    curves = plot_summary.read_summary_csv(p)
    assert plot_summary.label_curves(curves) == "m d"
    assert [c.label for c in curves] == ["training 1", "training 2"]
    assert sorted(curves[0].series["val_loss"]) == [1, 2, 3, 4]
    assert curves[1].series["train_loss"][1] == pytest.approx(rows([1], k=5)[0]["train_loss"])
    plot_summary.plot(curves, in_tmp / "restart.png", 1000, 600)
    check_png(in_tmp / "restart.png", size=(1000, 600))


def test_a_loss_at_zero_keeps_a_linear_axis(in_tmp):
    r = rows([1, 2, 3])
    r[-1]["train_loss"] = 0.0  # no log of it: the axis stays linear rather than lose the point
    curves = plot_summary.read_summary_csv(write_summary(in_tmp / "ck/m/d/summary.csv", r))
    fig = plot_summary.figure(curves)
    assert [a.get_yscale() for a in fig.axes] == ["linear", "linear"] and fig.axes[0].get_ylabel() == "loss"


@pytest.mark.parametrize("argv, needle", [
    (["nowhere.csv"], "no such file or folder: nowhere.csv"),
    (["empty_dir"], "holds no summary.csv"),
    (["bad.csv"], "no 'epoch' column"),
    (["runs/7"], "without training curves"),
    (["good.csv", "-o", "x.jpg"], "must end in .png"),
    (["good.csv", "--width", "5"], "--width must be between 100 and 10000"),
    (["good.csv", "--height", "20000"], "--height must be between 100 and 10000"),
])
def test_user_errors_are_one_line_and_exit_2(in_tmp, capsys, argv, needle):
    (in_tmp / "empty_dir").mkdir()
    (in_tmp / "bad.csv").write_text("a,b\n1,2\n")
    write_summary(in_tmp / "good.csv", rows([1, 2]))
    (in_tmp / "runs/7").mkdir(parents=True)
    (in_tmp / "runs/7/metrics.json").write_text(json.dumps({"ratio": {"steps": [0], "values": [9.1]}}))
    with pytest.raises(SystemExit) as e:
        run_cli_inprocess(plot_summary.main, plot_summary.get_args_parser(), argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and needle in err[0], err
    assert not (in_tmp / "curves.png").exists()


def test_no_curves_is_a_user_error(in_tmp):
    p = in_tmp / "summary.csv"
    p.write_text("epoch,lr\n")
    with pytest.raises(UserError, match="no training curves"):
        plot_summary.collect([p])
