"""Learned banks, the mse grid and BatchNorm calibration (docs/design.md §2, §3, §7; issue: accuracy).

Library level on small models; the CLI end to end on digits. Accuracy on real networks is measured in
bench/bench_accuracy.py, not here.
"""
import copy

import pytest
import torch
import torch.nn as nn
from conftest import DIGITS, assert_user_error, run_cli, run_main

import find_similar_kernel as fsk
import mess
from mess.account import storage_account
from mess.bank import fit_bank
from mess.bn import calibrate_bn
from mess.entry import check_representable
from mess.grids import grid_quantize
from mess.packed_read import read_mess, unpack
from mess.packed_write import pack, write_mess
from mess.quant import linear_quantize

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    """A user's own model: 3x3 convs with BatchNorm, a 1x1 conv, a linear head."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.c3, self.b3 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.p1 = nn.Conv2d(16, 16, 1)
        self.p2 = nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        x = torch.relu(self.b3(self.c3(x)))
        x = self.p2(torch.relu(self.p1(x)))
        return self.fc(x.mean((2, 3)))


def net(seed=0):
    torch.manual_seed(seed)
    m = Net()
    with torch.no_grad():  # statistics of a "trained" network, not the defaults
        for b in (m.b1, m.b2, m.b3):
            b.running_mean.uniform_(-0.5, 0.5)
            b.running_var.uniform_(0.5, 2.0)
    return m.eval()


# ---------------------------------------------------------------- the bank fit
def test_fit_bank_recovers_the_shapes_kernels_are_made_of():
    g = torch.Generator().manual_seed(0)
    true = torch.randn(16, 9, generator=g)
    true = true - true.mean(1, keepdim=True)
    true = true / true.norm(dim=1, keepdim=True)
    k = torch.randint(0, 16, (4000,), generator=g)
    # each kernel: a true shape at a random scale and sign, plus an offset and a little noise
    scale = torch.randn(4000, generator=g).mul(2)
    noise = 0.01 * torch.randn(4000, 9, generator=g)
    W = scale[:, None] * true[k] + torch.randn(4000, 1, generator=g) + noise
    rows = fit_bank(W, 16)
    assert rows.shape == (16, 9)
    assert torch.allclose(rows.mean(1), torch.zeros(16), atol=1e-6)
    assert torch.allclose(rows.norm(dim=1), torch.ones(16), atol=1e-5)
    cos = (true @ rows.T).abs().max(1).values  # sign-invariant: -s is the same shape
    assert cos.min() > 0.99, cos


def test_fit_bank_with_fewer_shapes_than_rows_keeps_them_all():
    W = torch.randn(5, 9)
    rows = fit_bank(W, 8)
    c = W - W.mean(1, keepdim=True)
    s = c / c.norm(dim=1, keepdim=True)
    assert rows.shape == (8, 9)
    assert ((s @ rows.T).abs().max(1).values > 1 - 1e-5).all()


# ---------------------------------------------------------------- the mse grid
def test_mse_grid_keeps_alphas_that_minmax_rounds_to_zero():
    g = torch.Generator().manual_seed(0)
    alpha = torch.randn(2000, generator=g) * 0.5
    # targets fitted to near-constant bank rows (centred norm 0.01 against about 1) get huge alphas,
    # which matter little in weight space: the mse grid weighs each alpha by ||c_r||^2 of its row
    alpha[:5] = torch.tensor([99.0, -80.0, 60.0, 75.0, -99.0])
    weight = torch.ones(2000)
    weight[:5] = 1e-4
    q_minmax, _ = linear_quantize(alpha, 8)
    q_mse, scale = grid_quantize(alpha, 8, "mse", weight=weight)
    zero_minmax = (q_minmax[5:] == 0).float().mean()
    zero_mse = (q_mse[5:] == 0).float().mean()
    assert zero_minmax > 0.5 and zero_mse < 0.05, (zero_minmax, zero_mse)
    assert (weight * (q_mse - alpha).square()).sum() < (weight * (q_minmax - alpha).square()).sum()
    q = torch.round(q_mse / scale)  # on a signed 8-bit grid, as every check and the packer expect
    assert torch.equal(q * scale, q_mse) and q.min() >= -128 and q.max() <= 127


# ---------------------------------------------------------------- compress with a learned bank
@pytest.mark.parametrize("version", ["v2qq", "v3", "v2nb", "v2"])
def test_learned_bank_is_exact_counted_and_packed(version):
    model = net()
    c = mess.compress(model, version, bank="learned", bank_size=32, qba=5, qbb=4)
    ckpt = c.checkpoint()
    check_representable(ckpt)  # every covered weight is alpha * bank[k] + beta, bit for bit
    kp, pp = c.entry.kernel, c.entry.pointwise
    transforms = 8 if version == "v3" else 1
    assert kp.learned.shape == (32, 9) and kp.bank_size == 32 * transforms
    assert pp.learned.shape == (32, 8) and pp.bank_size == 32
    assert int(c.entry.kernel.layers["c2"].k.max()) < 32 * transforms
    # the account: the learned bank costs rows x length at the weight bits (+ one scale) per path
    acc = storage_account(c.state_dict, c.entry)
    learned = [t for t in acc.tensors if t.part == "learned bank"]
    wb = 8 if version != "v2" else 32
    assert sorted((t.count, t.bits) for t in learned) == [(32 * 8, wb), (32 * 9, wb)]
    kernel_bits = {t.part: t.total for t in acc.tensors if t.layer == "c2"}
    idx = (32 * transforms - 1).bit_length()
    assert kernel_bits["k"] == 16 * 8 * idx
    # the .mess file: the same network back, and the learned bank with it
    back = unpack(pack(ckpt))
    for key, v in c.state_dict.items():
        assert torch.equal(back["model"][key], v), key
    assert torch.equal(mess.Entry.from_dict(back["mess"]).kernel.learned, kp.learned)


def test_learned_bank_fits_better_than_the_first_layer():
    model = net()
    layer = mess.compress(model, "v2qq")
    learned = mess.compress(model, "v2qq", bank="learned", bank_size=64)
    err = {n: [r["rel_error"] for r in c.rows if r["path"] == "kernel"] for n, c in
           (("layer", layer), ("learned", learned))}
    # 64 shapes fitted to the targets against the 24 kernels of c1
    assert sum(err["learned"]) < 0.8 * sum(err["layer"]), err


def test_mess_file_size_follows_the_account(tmp_path):
    model = net()
    c = mess.compress(model, "v2qq", bank="learned", bank_size=32)
    n = write_mess(tmp_path / "m.mess", c.checkpoint())
    bits = storage_account(c.state_dict, c.entry).mess_bits
    assert bits / 8 <= n <= bits / 8 + 8192  # the header is JSON of a few KiB
    assert torch.equal(read_mess(tmp_path / "m.mess")["model"]["c3.weight"], c.state_dict["c3.weight"])


# ---------------------------------------------------------------- retraining a learned bank
@pytest.mark.parametrize("grid", ["mse", "minmax"])
def test_parametrized_learned_bank_starts_exact_and_trains_representable(grid):
    model = net()
    x = torch.randn(4, 3, 8, 8)
    c = mess.compress(model, "v2qq", bank="learned", bank_size=32, grid=grid)
    model.load_state_dict(c.state_dict)
    ref = model(x)
    mess.parametrize(model, c.entry)
    assert torch.equal(model(x), ref)  # the first forward pass is the compressed network, bit for bit
    opt = torch.optim.SGD(model.parameters(), lr=100.0)  # steps wider than the 8-bit grids
    model.train()
    model(x).square().mean().backward()
    opt.step()
    out = mess.export(model)
    check_representable(out.checkpoint())
    assert not torch.equal(out.entry.kernel.learned, c.entry.kernel.learned)  # the bank itself trained
    assert out.entry.grid == grid


# ---------------------------------------------------------------- BatchNorm calibration
def test_correction_is_a_no_op_on_an_unchanged_network():
    model = net()
    copy_ = copy.deepcopy(model)
    calibrate_bn(copy_, torch.randn(64, 3, 8, 8), reference=model)
    for (k, a), b in zip(model.state_dict().items(), copy_.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), k


def test_correction_brings_the_compressed_network_back_to_the_float_one():
    model = net()
    x = torch.randn(256, 3, 8, 8)
    calibrate_bn(model, x, method="reestimate")  # a trained network's statistics are its data's

    def features(m):
        h = torch.relu(m.b2(m.c2(torch.relu(m.b1(m.c1(x))))))
        return m.b3(m.c3(h))

    small = copy.deepcopy(model)
    with torch.no_grad():  # a change of weights BatchNorm can take out exactly: per-layer scale
        small.c1.weight *= 0.5
        small.c2.weight *= 1.7
        small.c3.weight *= 0.8
        ref = features(model)
        before = (features(small) - ref).square().mean()
        calibrate_bn(small, x, reference=model)
        after = (features(small) - ref).square().mean()
    assert after < 1e-4 * before, (before, after)


def test_reestimate_takes_the_statistics_of_the_images():
    model = net()
    x = torch.randn(100, 3, 8, 8) * 3 + 1
    calibrate_bn(model, x, method="reestimate", batch_size=25)  # the average of four batches' statistics
    with torch.no_grad():
        h = model.c1(x)
    assert torch.allclose(model.b1.running_mean, h.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(model.b1.running_var, h.var((0, 2, 3)), rtol=0.05)
    assert not model.training


# ---------------------------------------------------------------- the CLI, on digits (conftest.digits_run)
def test_cli_learned_bank_with_bn_correction(digits_run, monkeypatch):
    monkeypatch.chdir(digits_run)
    args = ["-v", "v2qq", "--np", "--bank", "learned", "--bank-size", "64", "--qba", "4", "--qbb", "4",
            "--ckpt", "ckpt_best.pth", "--no-track"]
    res = fsk.main(fsk.get_args_parser().parse_args(DIGITS + args))
    assert res["path"].name == "ckpt_best_v2qq_np_q844_L64.pth"
    ckpt = torch.load(res["path"], weights_only=True)
    assert ckpt["bn_calib"] == {"method": "correct", "images": 1024, "layers": 21}  # 19 + 2 shortcuts
    key = "layer3.2.bn2.running_mean"
    # the .mess file holds the calibrated statistics too, and evaluates as the checkpoint does
    back = read_mess(res["mess_path"])
    assert torch.equal(back["model"][key], ckpt["model"][key])
    top1 = run_main(DIGITS + ["-j", "0", "-E", "--ckpt", res["path"].name,
                              "--no-track"])["metrics"]["val_top1"]
    top1_mess = run_main(DIGITS + ["-j", "0", "-E", "--ckpt", res["mess_path"].name,
                                   "--no-track"])["metrics"]["val_top1"]
    assert top1 == top1_mess
    off = fsk.main(fsk.get_args_parser().parse_args(DIGITS + args + ["--bn-calib", "off"]))
    plain = torch.load(off["path"], weights_only=True)
    assert "bn_calib" not in plain
    assert not torch.equal(ckpt["model"][key], plain["model"][key])  # calibrated statistics are stored
    assert torch.equal(ckpt["model"]["layer3.2.conv2.weight"], plain["model"]["layer3.2.conv2.weight"])
    top1_off = run_main(DIGITS + ["-j", "0", "-E", "--ckpt", off["path"].name,
                                  "--no-track"])["metrics"]["val_top1"]
    assert top1 > top1_off, (top1, top1_off)  # 4-bit alphas and betas: stale statistics cost accuracy



@pytest.mark.parametrize("flags, needle", [
    (["--bank-size", "0", "--bank", "learned"], "--bank-size"),
    (["--bn-images", "0"], "--bn-images"),
    (["--bank", "kmeans"], "--bank"),
    (["--grid", "log"], "--grid"),
])
def test_cli_bad_bank_flags(digits_run, flags, needle):
    rc, _, err = run_cli("find_similar_kernel.py", *DIGITS, "-v", "v2qq", "--ckpt", "ckpt_best.pth",
                         "--no-track", *flags, cwd=digits_run)
    assert_user_error(rc, err, needle)


# ---------------------------------------------------------------- bench/bench_accuracy.py, on the real files
@pytest.mark.slow
def test_accuracy_benchmark_rows_and_own_eval_images(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    import numpy as np
    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not (shared / "akamaster" / "resnet20-12fca82f.th").is_file():
        pytest.skip(f"the real akamaster files live in {shared} (CI has them)")
    spec = importlib.util.spec_from_file_location("bench_accuracy", Path(__file__).parents[1] / "bench" /
                                                  "bench_accuracy.py")
    bench = importlib.util.module_from_spec(spec)
    import sys
    sys.modules["bench_accuracy"] = bench  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    sub = np.load(shared / "cifar10-train-subset.npz")
    np.savez(tmp_path / "own.npz", x_test=sub["x_train"][-300:], y_test=sub["y_train"][-300:])
    out = tmp_path / "rows.json"
    rows = bench.main(["--models", "20", "--only", "N=64 q844", "k-means 2-bit per output",
                       "--bn-images", "128", "--eval-data", str(tmp_path / "own.npz"), "--json", str(out),
                       "--png", str(tmp_path / "p.png"), "--threads", "1"])
    back = json.loads(out.read_text())
    assert back == rows and [r["method"] for r in rows] == ["MESS v2qq learned N=64 q844",
                                                             "k-means 2-bit per output channel (coremltools)"]
    for r in rows:
        assert set(r) >= {"model", "method", "ratio", "top1_float", "top1_post", "top1_post_bn", "top1_ft",
                          "ft_epochs"}
        assert r["model"] == "resnet20" and r["top1_ft"] is None and r["ft_epochs"] == 0
    assert rows[0]["mess_file"] is True  # the .mess file gives the same logits
    assert 16 < rows[0]["ratio"] < 16.5 and 12 < rows[1]["ratio"] < 13
    assert rows[0]["top1_post_bn"] > rows[0]["top1_post"]  # calibrated statistics help
    from PIL import Image
    img = Image.open(tmp_path / "p.png")
    grey = np.asarray(img.convert("L"))
    assert img.size[0] > 400 and len(np.unique(grey)) > 10  # a drawn figure, not blank


def test_retraining_fine_tunes_at_a_fine_tuning_rate():
    import main
    from config import get_args_parser
    parse = get_args_parser().parse_args
    scratch, tune, given = parse(["digits"]), parse(["digits", "-T", "--ckpt", "x.pth"]), parse(
        ["digits", "-T", "--ckpt", "x.pth", "--lr", "0.02"])
    for a in (scratch, tune, given):
        main.validate_args(a)
    assert (scratch.lr, tune.lr, given.lr) == (0.1, 0.001, 0.02)
    assert "with -T 0.001" in get_args_parser().format_help().replace("\n", " ").replace("  ", " ")


def test_retraining_an_uncalibrated_checkpoint_re_estimates_bn_first(digits_run, monkeypatch, capsys):
    monkeypatch.chdir(digits_run)
    args = ["-v", "v2qq", "--np", "--bank", "learned", "--bank-size", "32", "--bn-calib", "off",
            "--ckpt", "ckpt_best.pth", "--no-track"]
    res = fsk.main(fsk.get_args_parser().parse_args(DIGITS + args))
    capsys.readouterr()
    run_main(DIGITS + ["-j", "0", "-T", "--ckpt", res["path"].name, "--epochs", "1", "--no-track"])
    out = capsys.readouterr().out
    assert "BatchNorm statistics re-estimated on 1024 augmented training images" in out
    assert "lr 0.001" in out  # -T without --lr: the fine-tuning rate
