"""The vectorized MESS search against a plain per-kernel loop, for every version and both paths."""
import pytest
import torch
from mess_reference import (
    VERSION_SEARCH,
    kernel_bank,
    kernel_targets,
    loop_search,
    pointwise_bank,
    pointwise_targets,
)

import models
from config import VERSIONS
from mess.blocking import BUDGET_BYTES, CPU_BLOCK_PAIRS, block_size
from mess.layers import _conv_list, bank_vectors, plan_layers, put_vectors, reconstruct, target_vectors
from mess.search import SearchResult, search
from mess.settings import EPS, index_bits
from utils import UserError


def _layers(path: str, data: str, seed: int = 0):
    """(bank weight, target weight) of a small random layer pair, optionally with constant kernels."""
    g = torch.Generator().manual_seed(seed)
    if path == "kernel":
        bank = torch.randn(16, 1, 3, 3, generator=g) * 0.3  # depthwise, as in MobileNet
        tgt = torch.randn(12, 8, 3, 3, generator=g) * 0.1
    else:
        bank = torch.randn(8, 12, 1, 1, generator=g) * 0.3
        tgt = torch.randn(10, 20, 1, 1, generator=g) * 0.1  # 20 = 2 chunks of 8 + a remainder of 4
    if data == "constant":
        flat_b, flat_t = bank.view(bank.shape[0], -1), tgt.view(tgt.shape[0], -1)
        if path == "kernel":
            bank[0] = 0.0
            bank[3] = 0.25
            bank[5] = -1.7
            tgt[0, :4] = 0.0
            tgt[1, 2] = 0.3
            tgt[2] = 0.1  # a whole bound (v2.5) vector constant too
        else:
            flat_b[0] = 0.0
            flat_b[2, 3:11] = 0.4  # one constant window in the middle of a row
            flat_t[0] = 0.0
            flat_t[1, :8] = -0.2
    return bank, tgt


def _vectors(version: str, path: str, bank_w, tgt_w):
    cfg = VERSION_SEARCH[version]
    if path == "kernel":
        bind = cfg.get("bind", 1)
        ref = kernel_bank(bank_w, bind, cfg.get("transforms", False)), kernel_targets(tgt_w, bind)
        ours = (bank_vectors(bank_w, "kernel", bind, 8 if cfg.get("transforms") else 1),
                target_vectors(tgt_w, "kernel", bind))
    else:
        ref = pointwise_bank(bank_w, 8), pointwise_targets(tgt_w, 8)
        ours = bank_vectors(bank_w, "pointwise", 8), target_vectors(tgt_w, "pointwise", 8)
    return ref, ours


def assert_matches_loop(res, ref, targets, tol=1e-5):
    k_ref, a_ref, b_ref, residuals = ref
    same = res.k == k_ref
    rows = torch.arange(len(k_ref))
    # a different k only where it ties: its loop residual equals the loop's best
    best = residuals[rows, k_ref]
    theirs = residuals[rows, res.k]
    slack = tol * (best + targets.abs().sum(1)) + 1e-7
    assert (same | (theirs <= best + slack)).all(), (res.k[~same], k_ref[~same])
    assert same.float().mean() > 0.9
    torch.testing.assert_close(res.alpha[same], a_ref[same], rtol=tol, atol=1e-6)
    if res.beta is not None:
        torch.testing.assert_close(res.beta[same], b_ref[same], rtol=tol, atol=1e-6)
    for t in (res.alpha, res.residual) + ((res.beta,) if res.beta is not None else ()):
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("data", ["random", "constant"])
@pytest.mark.parametrize("path", ["kernel", "pointwise"])
@pytest.mark.parametrize("version", VERSIONS)
def test_search_matches_per_kernel_loop(version, path, data):
    bank_w, tgt_w = _layers(path, data)
    (ref_bank, ref_tgt), (bank, tgt) = _vectors(version, path, bank_w, tgt_w)
    assert torch.equal(bank, ref_bank) and torch.equal(tgt, ref_tgt)
    cfg = VERSION_SEARCH[version]
    beta, eps_mode = cfg.get("beta", True), cfg.get("eps_mode")
    ref = loop_search(ref_bank, ref_tgt, beta=beta, eps_mode=eps_mode)
    res = search(bank, tgt, beta=beta, eps_mode=eps_mode)
    assert res.k.dtype == torch.int64 and res.alpha.dtype == torch.float32
    assert (res.k >= 0).all() and (res.k < len(bank)).all()
    assert (res.beta is None) == (not beta)
    assert_matches_loop(res, ref, tgt)


def test_many_small_blocks_give_the_same_answer():
    g = torch.Generator().manual_seed(1)
    bank, tgt = torch.randn(40, 9, generator=g), torch.randn(1000, 9, generator=g)
    whole = search(bank, tgt)
    tiny = search(bank, tgt, budget_bytes=16 * 40 * 7)  # 7 targets per block
    assert block_size(40, torch.device("cpu"), 16 * 40 * 7) == 7
    assert torch.equal(whole.k, tiny.k) and torch.equal(whole.alpha, tiny.alpha)


def test_block_size_bounds_memory():
    for n in (1, 192, 5000, 10**6, 10**8):
        b = block_size(n, torch.device("cuda"))
        assert b >= 1 and (b == 1 or b * n * 16 <= BUDGET_BYTES)
        assert block_size(n, torch.device("cpu")) * n <= max(n, CPU_BLOCK_PAIRS)


@pytest.mark.parametrize("version", VERSIONS)
def test_zero_variance_bank_never_gives_nan(version):
    cfg = VERSION_SEARCH[version]
    bank = torch.zeros(6, 9)
    bank[1] = 3.0
    bank[2, 0] = 1e-30  # not constant, but its squared norm underflows to 0 in float32
    bank[3] = torch.arange(9.0)
    tgt = torch.randn(50, 9)
    tgt[0] = 0.0
    tgt[1] = 2.0
    res = search(bank, tgt, beta=cfg.get("beta", True), eps_mode=cfg.get("eps_mode"))
    for t in (res.alpha, res.residual, res.beta if res.beta is not None else res.alpha):
        assert torch.isfinite(t).all()
    rec = reconstruct(bank, res.k, res.alpha, res.beta)
    assert torch.isfinite(rec).all()
    if cfg.get("beta", True):  # a constant target is fitted exactly (offset only)
        assert torch.equal(rec[1], tgt[1])


def test_eps_variants_do_what_their_names_say():
    bank = torch.stack([torch.zeros(9), torch.arange(9.0)])  # row 0: zero variance
    tgt = torch.randn(5, 9)
    c = tgt - tgt.mean(1, keepdim=True)
    r = torch.arange(9.0) - 4.0
    denom = (r * r).sum()
    for mode, expect_zero_row in (("add", 0.0), ("replace", 0.0), ("nan1", 1.0), (None, 0.0)):
        # alpha against both rows, read back by forcing each row to be the only bank entry
        a0 = search(bank[:1], tgt, eps_mode=mode).alpha
        a1 = search(bank[1:], tgt, eps_mode=mode).alpha
        assert torch.equal(a0, torch.full_like(a0, expect_zero_row))
        want = (c @ r) / (denom + EPS if mode == "add" else denom)
        torch.testing.assert_close(a1, want, rtol=1e-6, atol=1e-7)


def test_v3_bank_is_the_dihedral_group():
    k = torch.arange(9.0).reshape(1, 1, 3, 3)
    v = bank_vectors(k, "kernel", transforms=8)
    assert v.shape == (8, 9)
    assert len({tuple(x.tolist()) for x in v}) == 8  # all distinct for an asymmetric kernel
    assert torch.equal(v[0], k.reshape(9))
    assert torch.equal(v[2], k.reshape(3, 3).flip(0).flip(1).reshape(9))  # rot180
    assert torch.equal(v[4], k.reshape(3, 3).flip(1).reshape(9))  # left-right mirror
    assert index_bits(8 * 16) == index_bits(16) + 3


def test_pointwise_vectors_round_trip():
    w = torch.randn(6, 20, 1, 1)
    t = target_vectors(w, "pointwise", 8)
    assert t.shape == (12, 8)
    back = put_vectors(w, t * 2, "pointwise", 8)
    assert torch.equal(back.view(6, 20)[:, :16], w.view(6, 20)[:, :16] * 2)
    assert torch.equal(back.view(6, 20)[:, 16:], w.view(6, 20)[:, 16:])
    assert bank_vectors(w, "pointwise", 8).shape == (6 * 13, 8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(2)
    bank, tgt = torch.randn(192, 9, generator=g), torch.randn(20000, 9, generator=g)
    cpu = search(bank, tgt)
    gpu = search(bank, tgt, device=torch.device("cuda"))
    ref = loop_search(bank, tgt[:500])
    assert_matches_loop(SearchResult(gpu.k[:500], gpu.alpha[:500], gpu.beta[:500], gpu.residual[:500]),
                        ref, tgt[:500])
    assert (cpu.k == gpu.k).float().mean() > 0.99


# ---------------------------------------------------------------- layers of each architecture
@pytest.mark.parametrize("arch,dataset,layers,kernel_bank,pw_bank", [
    ("mobilenet", "cifar10", 16, "layers.0.conv1", "layers.0.conv2"),
    ("mobilenetv2", "cifar10", 16, "features.1.conv.0.0", "features.1.conv.1"),
    ("resnet", "cifar10", 20, "conv1", "layer2.0.downsample.0"),
    ("vgg", "cifar10", 11, "features.0", None),
    ("resnet", "imagenet", 18, "layer1.0.conv1", "layer2.0.downsample.0"),  # 7x7 stem not covered
    ("resnet", "imagenet", 50, "layer1.0.conv2", "layer1.0.conv1"),
    ("mobilenet", "imagenet", 16, "layers.0.conv1", "layers.0.conv2"),
])
def test_plan_layers(arch, dataset, layers, kernel_bank, pw_bank):
    model = models.build_model(arch, dataset, layers, width_mult=0.25 if arch != "resnet" else 0.5)
    plans = plan_layers(model, arch, pw_bind=4)
    assert plans["kernel"].bank == kernel_bank
    convs = dict(_conv_list(model))
    order = list(convs)
    for t in plans["kernel"].targets:
        assert convs[t].kernel_size == (3, 3) and order.index(t) > order.index(kernel_bank)
    n3 = sum(m.kernel_size == (3, 3) for m in convs.values())
    assert len(plans["kernel"].targets) == n3 - 1 - (1 if arch.startswith("mobilenet") else 0)
    assert all(m.kernel_size != (7, 7) or n not in plans["kernel"].targets for n, m in convs.items())
    if pw_bank is None:
        assert plans["pointwise"] is None
    else:
        assert plans["pointwise"].bank == pw_bank
        assert all(convs[t].kernel_size == (1, 1) for t in plans["pointwise"].targets)
    assert plan_layers(model, arch, pointwise=False)["pointwise"] is None


def test_bind_size_must_divide_channels():
    model = models.build_model("mobilenet", "cifar10", width_mult=0.25)  # channels 8, 16, 32, ...
    assert plan_layers(model, "mobilenet", bind=4)["kernel"].bind == 4
    with pytest.raises(UserError, match="-d 3 does not divide"):
        plan_layers(model, "mobilenet", bind=3)
    with pytest.raises(UserError, match="-pwd 16 is wider"):
        plan_layers(model, "mobilenet", pw_bind=16)
