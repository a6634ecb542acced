"""check_model_params.py: counts and bits per layer of a model spec, a checkpoint, a MESS checkpoint and
a .mess file, the pictures it draws, and its user errors."""
import pytest
import torch
from conftest import assert_user_error, run_cli
from png_checks import assert_apart, assert_inside, check_png
from test_packed import make_model

import check_model_params as cmp
import find_similar_kernel as fsk
import models
from mess.packed_read import read_mess
from utils import run_cli as run_cli_inprocess
from utils import save_checkpoint

ARGV = ["cifar10", "-a", "resnet", "--layers", "20", "--width-mult", "0.25"]
CKPT_DIR = "checkpoint/resnet20_w0.25/cifar10"


def run(argv):
    return cmp.main(cmp.get_args_parser().parse_args(ARGV + argv))


@pytest.fixture
def ckpts(in_tmp):
    """A float ckpt_best.pth and its v2qq compression (.pth and .mess) in checkpoint/resnet20_w0.25/."""
    m = make_model("resnet")
    spec = {"arch": "resnet", "layers": 20, "width_mult": 0.25, "bn": False, "dataset": "cifar10",
            "num_classes": 10}
    save_checkpoint({"model": m.state_dict(), "arch": spec}, f"{CKPT_DIR}/ckpt_best.pth")
    flags = ["--ckpt", "ckpt_best.pth", "-v", "v2qq", "-pwd", "2"]
    r = fsk.main(fsk.get_args_parser().parse_args(ARGV + flags))
    return m, r


def test_model_spec_counts_every_parameter(in_tmp, capsys):
    res = run([])
    model = models.build_model("resnet", "cifar10", 20, 0.25)
    assert res["params"] == sum(p.numel() for p in model.parameters())
    floats = sum(v.numel() for v in model.state_dict().values() if v.is_floating_point())
    assert res["account"].fp32_bits == res["account"].mess_bits == 32 * floats and res["ratio"] == 1.0
    rows = {r["layer"]: r for r in res["rows"]}
    assert rows["conv1"]["params"] == 3 * 4 * 9 and rows["conv1"]["type"] == "conv 3x3"
    assert rows["fc"]["type"] == "fc" and rows["fc"]["params"] == 16 * 10 + 10
    assert rows["bn1"]["params"] == 8 and rows["bn1"]["bits_before"] == 4 * 4 * 32  # weight, bias, mean, var
    out = capsys.readouterr().out
    assert "total" in out and f"{res['params']:,}" in out and "float32 checkpoint" in out


def test_mess_checkpoint_and_mess_file_agree_with_the_account(ckpts, capsys):
    _, r = ckpts
    a = run(["--ckpt", r["path"].name])
    b = run(["--ckpt", r["mess_path"].name])
    assert a["ratio"] == b["ratio"] == r["ratio"]
    assert a["rows"] == b["rows"]
    assert sum(x["bits_after"] for x in a["rows"]) == r["account"].mess_bits
    rows = {x["layer"]: x for x in a["rows"]}
    assert rows["layer1.0.conv1"]["stored"] == "k4 a8 b8" and rows["conv1"]["stored"] == "q8"
    assert rows["layer1.0.conv1"]["bits_after"] == 16 * (4 + 8 + 8) + 64
    out = capsys.readouterr().out
    assert f"{r['mess_bytes']:,} bytes on disk" in out and f"{r['ratio']:.2f}x" in out


def test_plot_and_analysis(ckpts):
    _, r = ckpts
    res = run(["--ckpt", r["mess_path"].name, "--plot", "bits.png", "--analysis", "stored.png",
               "--samples", "5"])
    check_png("bits.png", min_colors=20)
    check_png("stored.png", size=(1280, 660), min_colors=20)  # 4 panels a row, 2 rows, the legend below
    assert len(res["fits"]) == 5 and all(f["l1"] == 0.0 for f in res["fits"])  # stored weights are their fits
    res = run(["--ckpt", "ckpt_best.pth", "-v", "v2nb", "-pwd", "2", "--analysis", "fits.png", "--seed", "3"])
    assert len(res["fits"]) == 8 and res["account"].mess_bits < r["account"].mess_bits
    f = res["fits"][0]
    assert f["beta"] is None and f["l1"] > 0
    assert torch.allclose(f["fit"], f["alpha"] * f["bank"]) and f["l1"] == pytest.approx(
        float((f["fit"] - f["target"]).abs().sum()))
    check_png("fits.png", size=(1280, 660), min_colors=20)
    assert sorted(p.name for p in (r["path"].parent).iterdir()) == sorted(
        ["ckpt_best.pth", r["path"].name, r["mess_path"].name])  # -v writes no checkpoint


def test_bits_figure_has_labelled_axes_and_a_legend_off_the_bars(ckpts):
    _, r = ckpts
    res = run(["--ckpt", r["mess_path"].name])
    fig = cmp.bits_figure(res["rows"], res["account"], r["mess_path"].name)
    ax, = fig.axes
    assert ax.get_ylabel() == "bits per layer (log scale)" and ax.get_yscale() == "log"
    assert ax.get_xlabel() == "layer (state_dict order)" and r["mess_path"].name in ax.get_title()
    assert [t.get_text() for t in ax.get_xticklabels()][:2] == ["conv1", "bn1"]
    legend, = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["float32", "stored"]
    assert_inside(fig, legend, ax, ax.title)
    assert_apart(fig, legend, [ax])


@pytest.mark.parametrize("samples", [1, 8])
def test_fits_figure_has_labelled_axes_a_title_and_a_legend_off_the_data(ckpts, samples):
    res = run(["--ckpt", "ckpt_best.pth", "-v", "v2qq", "-pwd", "2", "--analysis", "f.png",
               "--samples", str(samples)])
    check_png("f.png", min_colors=20)
    # the longest title main writes: a MESS checkpoint's note, on the narrowest figure (one sample)
    title = ("ckpt_best_v2qq_pwd2_q888.mess: 1 sampled vectors (targets: the stored weights, which are their "
             "fits; give the float checkpoint and -v to see the search's residuals)")
    fig = cmp.fits_figure(res["fits"], title)
    panels = [a for a in fig.axes if a.get_visible()]
    assert len(panels) == samples
    assert panels[0].get_ylabel() == "weight value"
    assert {a.get_xlabel() for a in panels[-min(samples, 4):]} <= {"element of the kernel vector",
                                                                  "element of the pointwise vector"}
    assert all(f"k={f['k']}" in a.get_title() for a, f in zip(panels, res["fits"]))
    legend, = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["target (the layer's weights)", "bank[k]",
                                                          "fit: alpha * bank[k] + beta"]
    assert fig.get_suptitle().replace("\n", " ") == title
    assert_inside(fig, legend, fig._suptitle, *panels)
    assert_apart(fig, legend, panels)
    fig.savefig("g.png", format="png", dpi=cmp.DPI)
    check_png("g.png", size=(640 if samples == 1 else 1280, round(fig.bbox.height)))


def test_fc_in_memory(ckpts):
    res = run(["--ckpt", "ckpt_best.pth", "-v", "v2qq", "-pwd", "2", "--fc"])
    rows = {x["layer"]: x for x in res["rows"]}
    assert rows["fc"]["stored"] == "k5 a8 b8 f32"  # the weight as a target, the bias float
    assert rows["fc"]["bits_after"] < rows["fc"]["bits_before"]


@pytest.mark.parametrize("extra,needle", [
    (["--analysis", "a.png"], "--analysis draws covered vectors"),
    (["--plot", "bits.jpg"], "--plot must end in .png"),
    (["--ckpt", "missing.mess"], "checkpoint not found"),
    (["-v", "v9"], "unknown version 'v9'"),
    (["--analysis", "a.png", "-v", "v2", "--samples", "0"], "--samples must be between 1 and 64"),
])
def test_user_errors(in_tmp, capsys, extra, needle):
    with pytest.raises(SystemExit) as e:
        run_cli_inprocess(cmp.main, cmp.get_args_parser(), ARGV + extra)
    assert_user_error(e.value.code, capsys.readouterr().err, needle)


def test_compressed_input_refuses_v_and_corrupt_mess(ckpts, capsys):
    _, r = ckpts
    with pytest.raises(SystemExit) as e:
        run_cli_inprocess(cmp.main, cmp.get_args_parser(), ARGV + ["--ckpt", r["path"].name, "-v", "v2"])
    assert_user_error(e.value.code, capsys.readouterr().err, "already compressed")
    data = bytearray(r["mess_path"].read_bytes())
    data[-1] ^= 1
    r["mess_path"].write_bytes(bytes(data))
    with pytest.raises(SystemExit) as e:
        run_cli_inprocess(cmp.main, cmp.get_args_parser(), ARGV + ["--ckpt", r["mess_path"].name])
    assert_user_error(e.value.code, capsys.readouterr().err, "checksum mismatch")


def test_cli_subprocess(ckpts):
    _, r = ckpts
    rc, out, err = run_cli("check_model_params.py", *ARGV, "--ckpt", r["mess_path"].name, cwd=".")
    assert rc == 0, err
    assert "layer3.2.conv2" in out and "k4 a8 b8" in out and "compression ratio" in out
    assert read_mess(r["mess_path"])["mess"]["version"] == "v2qq"
