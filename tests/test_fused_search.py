"""The fused MESS search against the plain one: the same k, alpha and beta for every version, on
random layers and on layers with constant kernels, kernel and pointwise paths, with both fused
kernels (the hand-written C++ one of the CPU, and torch.compile's, which CUDA runs); the choice
of path (fused=, MESS_SEARCH); the fallback when no kernel can be built.

torch.compile costs seconds per vector length L: the tests share find_similar_kernel's kernels,
built once per process (the module-scoped ``cpu`` fixture builds each first)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mess_reference import VERSION_SEARCH
from test_search import _layers, _vectors

from config import VERSIONS
from mess import fused
from mess.blocking import block_size
from mess.search import residual_argmin, search
from utils import UserError

ROOT = Path(__file__).resolve().parents[1]


# inductor is the CPU fallback kernel, not the default: its compile takes ~20 s, so it runs in the slow tier
@pytest.fixture(scope="module", params=["c++", pytest.param("inductor", marks=pytest.mark.slow)])
def cpu(request):
    """The CPU, with the fused kernel of the parameter built; skips where it cannot be (the
    fallback tests below still run)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fused, "FUSED_CPU_KERNEL", request.param)
        g = torch.Generator().manual_seed(0)
        search(torch.randn(4, 9, generator=g), torch.randn(3, 9, generator=g), fused=True)
        if fused._compiled.get(request.param if request.param == "c++" else "inductor-cpu") is None:
            pytest.skip(f"the {request.param} kernel cannot be built here (no C++ compiler?)")
        yield torch.device("cpu")


def assert_identical(plain, fused):
    assert torch.equal(plain.k, fused.k), (plain.k != fused.k).nonzero().flatten()
    assert torch.equal(plain.alpha, fused.alpha)
    assert (plain.beta is None) == (fused.beta is None)
    if plain.beta is not None:
        assert torch.equal(plain.beta, fused.beta)
    assert torch.equal(plain.residual, fused.residual)  # the same operations, rounded alike


def both(bank, tgt, device, **kw):
    return search(bank, tgt, device=device, fused=False, **kw), search(bank, tgt, device=device,
                                                                              fused=True, **kw)


def version_kwargs(version):
    cfg = VERSION_SEARCH[version]
    return {"beta": cfg.get("beta", True), "eps_mode": cfg.get("eps_mode")}


@pytest.mark.parametrize("data", ["random", "constant"])
@pytest.mark.parametrize("path", ["kernel", "pointwise"])
@pytest.mark.parametrize("version", VERSIONS)
def test_fused_equals_plain_for_every_version(cpu, version, path, data):
    bank_w, tgt_w = _layers(path, data)
    _, (bank, tgt) = _vectors(version, path, bank_w, tgt_w)  # L = 9, 18 (v2.5) or 8 (pointwise)
    plain, fused = both(bank, tgt, cpu, **version_kwargs(version))
    assert_identical(plain, fused)


@pytest.mark.parametrize("L,n,m,eps_mode", [(9, 192, 20000, None), (18, 96, 4000, "nan1"),
                                             (8, 1600, 3000, "add"), (4, 50, 500, "replace"),
                                             (36, 40, 300, None)])  # the C++ kernel's generic L too
def test_fused_equals_plain_on_larger_layers(cpu, L, n, m, eps_mode):
    g = torch.Generator().manual_seed(L)
    bank, tgt = torch.randn(n, L, generator=g) * 0.3, torch.randn(m, L, generator=g) * 0.1
    bank[::17] = 0.5  # constant rows: zero variance
    tgt[::13] = -0.2  # constant targets: every row fits exactly, k = 0
    plain, fused = both(bank, tgt, cpu, eps_mode=eps_mode)
    assert_identical(plain, fused)
    assert (fused.k[::13] == 0).all()


def test_ties_go_to_the_smallest_index(cpu):
    g = torch.Generator().manual_seed(3)
    bank = torch.randn(40, 9, generator=g)
    bank[[7, 21, 33]] = bank[5].clone()  # exact duplicates of row 5, later in the bank
    bank[[2, 30]] = 1.5  # two constant rows: for a constant target every row ties
    tgt = torch.cat([2 * bank[5:6] + 0.25 + 1e-3 * torch.randn(50, 9, generator=g), torch.full((3, 9), 0.7)])
    for beta, constant_k in ((True, 0), (False, 2)):  # a constant target: all rows fit (beta) or rows 2, 30
        plain, fused = both(bank, tgt, cpu, beta=beta)
        assert_identical(plain, fused)
        assert (fused.k[:50] == 5).all() and (fused.k[50:] == constant_k).all()


def test_blocks_padding_and_a_bank_of_one(cpu):
    g = torch.Generator().manual_seed(4)
    bank, tgt = torch.randn(30, 9, generator=g), torch.randn(50, 9, generator=g)
    assert block_size(30, cpu, 16 * 7, fused=True) == 7  # inductor: 7 blocks of 7, then a block of 1
    whole = search(bank, tgt, fused=False)
    assert_identical(whole, search(bank, tgt, fused=True, budget_bytes=16 * 7))
    assert_identical(search(bank[:1], tgt, fused=False), search(bank[:1], tgt, fused=True))
    assert_identical(search(bank, tgt[:1], fused=False), search(bank, tgt[:1], fused=True))
    empty = search(bank, tgt[:0], fused=True)
    assert empty.k.shape == (0,) and empty.alpha.shape == (0,)


def test_residual_fn_still_runs_the_plain_path(cpu):
    g = torch.Generator().manual_seed(5)
    bank, tgt = torch.randn(20, 9, generator=g), torch.randn(100, 9, generator=g)
    calls = []

    def spy(alpha, c_r_t, c_w):
        calls.append(alpha.shape)
        return residual_argmin(alpha, c_r_t, c_w)

    assert_identical(search(bank, tgt, fused=False), search(bank, tgt, fused=True, residual_fn=spy))
    assert calls


def test_path_choice(monkeypatch):
    monkeypatch.setattr(fused, "_compiled", {})
    monkeypatch.setattr(fused, "FUSED_CPU_KERNEL", "c++")
    monkeypatch.delenv(fused.SEARCH_ENV, raising=False)
    dev = torch.device("cpu")
    assert fused.use_fused(None, fused.FUSED_MIN_PAIRS["cpu"], dev)  # auto: large searches fuse
    assert not fused.use_fused(None, fused.FUSED_MIN_PAIRS["cpu"] - 1, dev)  # small: compiling costs more
    assert fused.use_fused(True, 1, dev) and not fused.use_fused(False, 10**12, dev)
    monkeypatch.setenv(fused.SEARCH_ENV, "plain")
    assert not fused.use_fused(None, 10**12, dev)
    assert fused.use_fused(True, 1, dev)  # the argument wins over the environment
    monkeypatch.setenv(fused.SEARCH_ENV, "fused")
    assert fused.use_fused(None, 1, dev)
    monkeypatch.setenv(fused.SEARCH_ENV, "fast")
    with pytest.raises(UserError, match="MESS_SEARCH=fast: choose auto, fused or plain"):
        fused.use_fused(None, 1, dev)
    fused._compiled["c++"] = None  # building the kernel failed before: never again in this process
    monkeypatch.setenv(fused.SEARCH_ENV, "fused")
    assert not fused.use_fused(True, 10**12, dev) and not fused.use_fused(None, 10**12, dev)


def test_fallback_when_the_cpu_kernel_cannot_be_built(monkeypatch, capsys):
    def no_compiler():
        raise RuntimeError("no C++ compiler found (g++, c++, clang++)\nmore detail")

    monkeypatch.setattr(fused, "_compiled", {})
    monkeypatch.setattr(fused, "FUSED_CPU_KERNEL", "c++")
    monkeypatch.setattr(fused, "_build_cpu_kernel", no_compiler)
    g = torch.Generator().manual_seed(6)
    bank, tgt = torch.randn(24, 9, generator=g), torch.randn(200, 9, generator=g)
    plain = search(bank, tgt, fused=False)
    assert_identical(plain, search(bank, tgt, fused=True))
    assert_identical(plain, search(bank, tgt, fused=True))
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["warning: fused search unavailable (c++ kernel: RuntimeError: no C++ compiler found (g++, "
                   "c++, clang++)); using the plain search"]  # once
    assert fused._compiled["c++"] is None


def test_fallback_when_torch_compile_fails(monkeypatch, capsys):
    def broken_compile(fn, **kwargs):
        def compiled(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")
        return compiled

    monkeypatch.setattr(fused, "_compiled", {})
    monkeypatch.setattr(fused, "FUSED_CPU_KERNEL", "inductor")
    monkeypatch.setattr(torch, "compile", broken_compile)  # fails at the first call, as Inductor does
    g = torch.Generator().manual_seed(6)
    bank, tgt = torch.randn(24, 9, generator=g), torch.randn(200, 9, generator=g)
    plain = search(bank, tgt, fused=False)
    assert_identical(plain, search(bank, tgt, fused=True))
    assert_identical(plain, search(bank, tgt, fused=True))
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["warning: fused search unavailable (inductor-cpu kernel: RuntimeError: "
                   "InvalidCxxCompiler: No working C++ compiler found); using the plain search"]
    assert fused._compiled["inductor-cpu"] is None


def test_no_compiler_never_breaks_the_search(tmp_path):
    """A machine without a C++ compiler, for real: the search answers anyway, plain."""
    script = ("import torch\nfrom mess.search import search\n"
              "g = torch.Generator().manual_seed(7)\n"
              "bank, tgt = torch.randn(24, 9, generator=g), torch.randn(200, 9, generator=g)\n"
              "a, b = search(bank, tgt, fused=False), search(bank, tgt, fused=True)\n"
              "print('same' if torch.equal(a.k, b.k) and torch.equal(a.alpha, b.alpha) else 'different')\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), CXX="no-such-c++-compiler",
               TORCHINDUCTOR_CACHE_DIR=str(tmp_path))
    env.pop(fused.SEARCH_ENV, None)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "same"
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert lines == ["warning: fused search unavailable (c++ kernel: RuntimeError: no C++ compiler found "
                     "(CXX=no-such-c++-compiler)); using the plain search"], p.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("data", ["random", "constant"])
@pytest.mark.parametrize("version", ["v2", "v2nb", "v2qq-epsv3", "v2.5"])
def test_cuda_fused_equals_plain(version, data):
    dev = torch.device("cuda")
    bank_w, tgt_w = _layers("kernel", data)
    _, (bank, tgt) = _vectors(version, "kernel", bank_w, tgt_w)
    plain, fused = both(bank, tgt, dev, **version_kwargs(version))
    assert fused._compiled.get("inductor-cuda") is not None, "the fused kernel did not compile on CUDA"
    assert_identical(plain, fused)
    g = torch.Generator().manual_seed(8)
    bank, tgt = torch.randn(192, 9, generator=g), torch.randn(50000, 9, generator=g)
    plain, fused = both(bank, tgt, dev)
    assert_identical(plain, fused)
