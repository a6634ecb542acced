"""plot_summary.py: curves from summary CSVs and sacred run folders, written as a PNG of the asked size."""

import csv
import json
import struct
from pathlib import Path

import pytest

import plot_summary
from utils import UserError

COLS = ["epoch", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "seconds"]


def write_summary(path, epochs, offset=0.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLS)
        if new:
            w.writeheader()
        for e in epochs:
            w.writerow({"epoch": e, "lr": 0.1, "train_loss": 2.0 / e + offset, "train_top1": 50 + 5 * e,
                        "val_loss": 2.2 / e + offset, "val_top1": 45 + 5 * e, "val_top5": 90, "seconds": 1.0})
    return path


def write_sacred_run(run_dir, epochs, config):
    run_dir.mkdir(parents=True)
    metrics = {m: {"steps": list(epochs), "values": [1.0 / e for e in epochs], "timestamps": []}
               for m in ("train_loss", "val_loss", "train_top1", "val_top1", "lr")}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    (run_dir / "config.json").write_text(json.dumps(config))
    (run_dir / "run.json").write_text(json.dumps({"status": "COMPLETED"}))


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_png_of_several_runs_has_the_asked_size(in_tmp):
    a = write_summary(in_tmp / "checkpoint/resnet20/digits/summary.csv", range(1, 6))
    write_summary(in_tmp / "checkpoint/vgg16_bn/digits/summary.csv", range(1, 4), offset=0.3)
    write_sacred_run(in_tmp / "runs/1", range(1, 4), {"arch": "resnet", "layers": 20, "dataset": "digits"})
    write_sacred_run(in_tmp / "runs/2", [1], {"arch": "mobilenet", "dataset": "digits"})
    (in_tmp / "runs/3").mkdir()  # a compression run: no training metrics, skipped inside runs/
    (in_tmp / "runs/3/metrics.json").write_text(json.dumps({"ratio": {"steps": [0], "values": [9.1]}}))

    args = plot_summary.get_args_parser().parse_args(
        [str(a), "checkpoint/vgg16_bn/digits", "runs", "-o", "out/curves.png", "--width", "900",
         "--height", "400", "--title", "digits"])
    res = plot_summary.main(args)
    out = in_tmp / "out/curves.png"
    assert res["path"] == Path("out/curves.png") and out.is_file()
    assert res["labels"] == ["resnet20/digits", "vgg16_bn/digits", "run 1: resnet20 digits",
                             "run 2: mobilenet digits"]
    assert png_size(out) == (900, 400)
    import matplotlib.image
    img = matplotlib.image.imread(out)  # decodes: a valid image, not only a valid header
    assert img.shape[:2] == (400, 900)
    assert len({tuple(px) for px in img.reshape(-1, img.shape[-1])[::97]}) > 5  # lines were drawn


def test_a_summary_csv_with_a_restart_and_a_resume(in_tmp):
    p = write_summary(in_tmp / "ck/m/d/summary.csv", [1, 2, 3])
    write_summary(p, [3, 4])  # resumed from epoch 2: continues the same training, epoch 3 rewritten
    write_summary(p, [1, 2], offset=1.0)  # trained again from scratch
    curves = plot_summary.read_summary_csv(p)
    assert [c.label for c in curves] == ["m/d (1)", "m/d (2)"]
    assert sorted(curves[0].series["val_loss"]) == [1, 2, 3, 4]
    assert curves[1].series["train_loss"][1] == pytest.approx(3.0)


@pytest.mark.parametrize("argv, needle", [
    (["nowhere.csv"], "no such file or folder: nowhere.csv"),
    (["empty_dir"], "holds no summary.csv"),
    (["bad.csv"], "no 'epoch' column"),
    (["runs/7"], "without training curves"),
    (["good.csv", "-o", "x.jpg"], "must end in .png"),
    (["good.csv", "--width", "5"], "between 100 and 10000"),
])
def test_user_errors_are_one_line_and_exit_2(in_tmp, capsys, argv, needle):
    (in_tmp / "empty_dir").mkdir()
    (in_tmp / "bad.csv").write_text("a,b\n1,2\n")
    write_summary(in_tmp / "good.csv", [1, 2])
    (in_tmp / "runs/7").mkdir(parents=True)
    (in_tmp / "runs/7/metrics.json").write_text(json.dumps({"ratio": {"steps": [0], "values": [9.1]}}))
    from utils import run_cli
    with pytest.raises(SystemExit) as e:
        run_cli(plot_summary.main, plot_summary.get_args_parser(), argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and needle in err[0], err
    assert not (in_tmp / "curves.png").exists()


def test_no_curves_is_a_user_error(in_tmp):
    p = in_tmp / "summary.csv"
    p.write_text("epoch,lr\n")
    with pytest.raises(UserError, match="no training curves"):
        plot_summary.collect([p])
