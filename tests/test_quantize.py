"""quantize.py: the linear quantization of docs/design.md §3 and the plain-quantization baseline CLI."""
import hashlib

import pytest
import torch
from conftest import assert_user_error
from mess_reference import linear_quantize as loop_quantize
from test_mess_ckpt import make_ckpt

import find_similar_kernel as fsk
import quantize
from mess.account import summarize
from mess.quant import linear_quantize, quantize_alpha_beta
from utils import UserError
from utils import run_cli as run_cli_inprocess

MOBILENET = ["cifar10", "-a", "mobilenet", "--width-mult", "0.25"]


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 16])
def test_linear_quantize_matches_the_formula(bits):
    torch.manual_seed(bits)  # repeatable whatever ran before
    x = torch.randn(500) * 0.3 + 0.05
    xq, scale = linear_quantize(x, bits)
    ref, ref_scale = loop_quantize(x, bits)
    assert scale == ref_scale == pytest.approx((x.max() - x.min()).item() / (2**bits - 1), rel=1e-6)
    assert torch.equal(xq, ref)
    q = (xq / scale).round()
    assert torch.equal(q * torch.tensor(scale), xq)  # on the grid: a packer gets x' back from q
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    assert q.min() >= lo and q.max() <= hi
    # each value goes to its nearest grid point: at most half a step away inside the grid, an end outside it
    inside = (x >= lo * scale) & (x <= hi * scale)
    assert ((xq - x)[inside].abs() <= scale / 2 * (1 + 1e-5)).all()
    assert (q[x > (hi + 0.5) * scale] == hi).all() and (q[x < (lo - 0.5) * scale] == lo).all()


def test_grid_is_centred_on_zero_and_clips():
    # the original's scheme: the grid spans (max - min), centred on 0, so an all-positive tensor clips
    x = torch.linspace(1.0, 2.0, 11)
    xq, scale = linear_quantize(x, 4)
    assert scale == pytest.approx(1.0 / 15)
    assert xq.max().item() == pytest.approx(7 * scale)


def test_constant_tensor_is_kept():
    x = torch.full((3, 3), 0.7)
    xq, scale = linear_quantize(x, 8)
    assert scale == 0.0 and torch.equal(xq, x)


@pytest.mark.parametrize("bits", [0, 1, 17, 32])
def test_bits_outside_2_to_16_are_refused(bits):
    with pytest.raises(UserError, match="between 2 and 16"):
        linear_quantize(torch.randn(4), bits)


def test_alpha_beta_quantization_per_layer():
    a, b = torch.randn(50), torch.randn(50) * 0.01
    aq, sa, bq, sb = quantize_alpha_beta(a, b, 6, 4)
    assert sa == pytest.approx((a.max() - a.min()).item() / 63, rel=1e-6)
    assert sb == pytest.approx((b.max() - b.min()).item() / 15, rel=1e-6)
    assert len(aq.unique()) <= 64 and len(bq.unique()) <= 16
    aq, sa, bq, sb = quantize_alpha_beta(a, None, 6, 4)
    assert bq is None and sb is None
    aq, sa, bq, sb = quantize_alpha_beta(a, b, None, None)
    assert aq is a and sa is None and sb is None


def test_quantize_cli_writes_q_checkpoint(in_tmp):
    src = make_ckpt("mobilenet")
    before = hashlib.sha256(open(src, "rb").read()).digest()
    src_sd = torch.load(src, weights_only=True)["model"]
    args = quantize.get_args_parser().parse_args(
        ["cifar10", "-a", "mobilenet", "--width-mult", "0.25", "--ckpt", "ckpt_best.pth", "-Q", "--qb", "4"])
    res = quantize.main(args)
    assert res["path"].name == "ckpt_best_q4.pth"
    ck = torch.load(res["path"], weights_only=True)
    sd = ck["model"]
    convs = [k for k in sd if k.endswith(".weight") and sd[k].dim() == 4]
    assert set(ck["quant"]["scales"]) == {k[:-len(".weight")] for k in convs}
    for k, v in sd.items():
        if k in convs:
            scale = ck["quant"]["scales"][k[:-len(".weight")]]
            assert torch.equal(v, linear_quantize(src_sd[k], 4)[0])
            assert len((v / scale).round().unique()) <= 16
        else:
            assert torch.equal(v, src_sd[k])
    # 4-bit convs plus one 32-bit scale each; everything else float32
    n_conv = sum(sd[k].numel() for k in convs)
    n_float = sum(v.numel() for v in sd.values() if v.is_floating_point())
    assert res["account"].mess_bits == 4 * n_conv + 32 * len(convs) + 32 * (n_float - n_conv)
    assert res["account"].fp32_bits == 32 * n_float
    assert "4-bit quantization" in summarize(ck) and f"{res['ratio']:.2f}x" in summarize(ck)
    assert hashlib.sha256(open(src, "rb").read()).digest() == before


@pytest.mark.parametrize("argv,needle", [(["--qb", "1"], "--qb must be between 2 and 16"),
                                         (["--qb", "20"], "--qb must be between 2 and 16"),
                                         (["-v", "v2qq"], "belongs to find_similar_kernel.py")])
def test_quantize_cli_errors(in_tmp, capsys, argv, needle):
    src = make_ckpt("mobilenet")
    with pytest.raises(SystemExit) as e:
        run_cli_inprocess(quantize.main, quantize.get_args_parser(),
                          [*MOBILENET, "--ckpt", "ckpt_best.pth", *argv])
    assert_user_error(e.value.code, capsys.readouterr().err, needle)
    assert sorted(p.name for p in (in_tmp / src).parent.iterdir()) == ["ckpt_best.pth"]


def test_quantize_refuses_a_mess_checkpoint(in_tmp, capsys):
    make_ckpt("mobilenet")
    fsk.main(fsk.get_args_parser().parse_args(
        ["cifar10", "-a", "mobilenet", "--width-mult", "0.25", "--ckpt", "ckpt_best.pth", "-v", "v2"]))
    capsys.readouterr()  # its own notes (no CIFAR-10 images here for BatchNorm calibration)
    with pytest.raises(SystemExit) as e:
        run_cli_inprocess(quantize.main, quantize.get_args_parser(),
                          [*MOBILENET, "--ckpt", "ckpt_best_v2.pth"])
    assert_user_error(e.value.code, capsys.readouterr().err, "is a MESS checkpoint")
