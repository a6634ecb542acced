"""Retraining in compressed form (retrain.py through main.py): -T, -N/-s, v2f, -Q, --nl, --pl, --wclip, -R."""
import csv
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from conftest import ROOT, assert_user_error, run_cli, run_main
from test_train import StopAfter
from torch.nn.utils import parametrize

import find_similar_kernel as fsk
import main
import models
import quantize
from config import VERSIONS
from mess.compress import compress, refit_fixed_k
from mess.entry import LayerCode, NotRepresentable, PathEntry, check_representable
from mess.layers import bank_vectors, plan_layers, target_vectors
from mess.names import parse_name
from mess.parametrize import (
    Covered,
    MessWeight,
    clip_weights_,
    export_entry,
    nuclear_loss,
    pcc_loss,
    plain_state_dict,
)
from mess.parametrize import parametrize as mess_parametrize
from mess.quant import conv_layers, latent_init, linear_quantize, ste_quantize
from utils import run_cli as run_cli_inprocess

MODEL = ["digits", "-a", "resnet", "--layers", "20", "--width-mult", "0.5"]
TINY = MODEL + ["-j", "0", "-b", "64"]
CKPT_DIR = "checkpoint/resnet20_w0.5/digits"
LOW = ["--qb", "3", "--qba", "4", "--qbb", "4"]  # where v2qq visibly loses accuracy on this model
V2QQ, V2F, Q4 = "ckpt_best_v2qq_q344.pth", "ckpt_best_v2f_q344.pth", "ckpt_best_q4.pth"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # the CPU is shared: intra-op threads that meet at barriers stall (seen 6x slower than one thread)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A ResNet-20 (width 0.5) trained 3 epochs on digits, compressed with v2qq and v2f at low bits and
    quantized to 4 bits: {name: top-1}."""
    d = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(d)
        run_main(TINY + ["--epochs", "3", "--sched", "cosine", "--lr", "0.05"])
        for v in ("v2qq", "v2f"):
            fsk.main(fsk.get_args_parser().parse_args(MODEL + ["-v", v, *LOW, "--ckpt", "ckpt_best.pth"]))
        quantize.main(quantize.get_args_parser().parse_args(MODEL + ["--qb", "4", "--ckpt", "ckpt_best.pth"]))
        acc = {n: run_main(TINY + ["-E", "--ckpt", n])["metrics"]["val_top1"]
               for n in ("ckpt_best.pth", V2QQ, V2F, Q4)}
    return d, acc


@pytest.fixture
def work(trained, tmp_path, monkeypatch):
    """A fresh copy of the trained checkpoints, as the current folder."""
    src, acc = trained
    shutil.copytree(src / "checkpoint", tmp_path / "checkpoint")
    monkeypatch.chdir(tmp_path)
    return acc


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_all_representable(res):
    assert res["saved"]
    for p in res["saved"]:
        ck = load(p)
        check_representable(ck)
        assert not any("parametrizations" in k for k in ck["model"])


# ------------------------------------------------------------------ the acceptance tests
@pytest.mark.slow
def test_retraining_wins_accuracy_back_in_mess_form(work, capsys):
    compressed = work[V2QQ]
    assert compressed < work["ckpt_best.pth"] - 20, work  # the low bit widths visibly hurt
    res = run_main(TINY + ["-T", "--ckpt", V2QQ, "--epochs", "2", "--lr", "0.01"])
    print(f"\nv2qq q344: float {work['ckpt_best.pth']:.2f}%, compressed {compressed:.2f}%, "
          f"retrained {res['best_acc1']:.2f}%")
    assert res["best_acc1"] > compressed + 10
    names = sorted({p.name for p in res["saved"]})
    assert names == ["ckpt_rt1_v2qq_q344_best.pth", "ckpt_rt1_v2qq_q344_epoch_1.pth",
                     "ckpt_rt1_v2qq_q344_epoch_2.pth"]
    assert_all_representable(res)
    ck = load(f"{CKPT_DIR}/ckpt_rt1_v2qq_q344_best.pth")
    src = load(f"{CKPT_DIR}/{V2QQ}")
    assert ck["mess"]["version"] == "v2qq" and ck["n_retrain"] == 1
    for kind in ("kernel", "pointwise"):  # k is fixed in MESS-form retraining; alpha and beta moved
        for t, e in src["mess"][kind]["layers"].items():
            assert torch.equal(ck["mess"][kind]["layers"][t]["k"], e["k"])
    # alpha and beta train on their fixed mse grids (docs/design.md §6): steps this short move some of
    # them across a grid point, and every layer's latent alphas
    kernel, new = src["mess"]["kernel"]["layers"], ck["mess"]["kernel"]["layers"]
    assert any(not torch.equal(new[t][p], e[p]) for t, e in kernel.items() for p in ("alpha", "beta"))
    latent = ck["retrain"]["latent"]
    assert all(not torch.equal(latent[f"{t}.parametrizations.weight.0.alpha"], e["alpha"])
               for t, e in kernel.items())
    # main.py -E evaluates the compressed network the file describes, and reports it as MESS
    capsys.readouterr()
    ev = run_main(TINY + ["-E", "--ckpt", "ckpt_rt1_v2qq_q344_best.pth"])
    assert ev["metrics"]["val_top1"] == pytest.approx(res["best_acc1"])
    assert "MESS v2qq" in capsys.readouterr().out
    # a second retraining is rt2
    res2 = run_main(TINY + ["-T", "--ckpt", "ckpt_rt1_v2qq_q344_best.pth", "-v", "v2qq", "--epochs", "1",
                            "--lr", "0.001"])
    assert [p.name for p in res2["saved"]] == ["ckpt_rt2_v2qq_q344_epoch_1.pth",
                                               "ckpt_rt2_v2qq_q344_best.pth"]
    assert_all_representable(res2)


def test_first_forward_is_the_compressed_network(work):
    # re-quantizing an already quantized tensor would shrink its grid; latent_init keeps it
    ck = load(f"{CKPT_DIR}/{V2QQ}")
    model = models.build_model("resnet", "digits", 20, 0.5)
    model.load_state_dict(ck["model"])
    keys = list(model.state_dict())
    mess_parametrize(model, ck["mess"])
    sd = plain_state_dict(model, keys)
    assert list(sd) == keys
    for k in keys:
        assert torch.equal(sd[k], ck["model"][k]), k


def test_v2f_keeps_k(work):
    res = run_main(TINY + ["-T", "--ckpt", V2F, "-N", "-s", "1", "--epochs", "1", "--lr", "0.01"])
    assert res["searches"] == [1]
    assert_all_representable(res)
    before, after = load(f"{CKPT_DIR}/{V2F}")["mess"], load(res["saved"][0])["mess"]
    for kind in ("kernel", "pointwise"):
        for t, e in before[kind]["layers"].items():
            assert torch.equal(after[kind]["layers"][t]["k"], e["k"]), t
            assert after[kind]["layers"][t]["alpha_scale"] is not None


@pytest.mark.slow  # over 6 s: the slow tier (CI runs it)
def test_new_method_searches_at_every_boundary(work):
    res = run_main(TINY + ["-T", "--ckpt", V2QQ, "-N", "-s", "1", "--epochs", "2", "--lr", "0.01"])
    assert res["searches"] == [1, 2]
    assert [p.name for p in res["saved"] if "epoch" in p.name] == [
        "ckpt_rt1_v2qq_q344_s1_epoch_1.pth", "ckpt_rt1_v2qq_q344_s1_epoch_2.pth"]
    assert_all_representable(res)
    with open(f"{CKPT_DIR}/summary_rt1_v2qq_q344_s1.csv") as f:
        assert [r["searches"] for r in csv.DictReader(f)] == ["1", "2"]
    # k came from a new search on the trained weights, not from the input checkpoint
    src, out = load(f"{CKPT_DIR}/{V2QQ}")["mess"], load(res["saved"][-1])["mess"]
    assert any(not torch.equal(out["kernel"]["layers"][t]["k"], e["k"])
               for t, e in src["kernel"]["layers"].items())


@pytest.mark.slow
def test_new_method_from_scratch_saves_only_projected_networks(work):
    res = run_main(TINY + ["-N", "-s", "2", "-v", "v2qq", "--epochs", "3", "--lr", "0.05"])
    assert res["searches"] == [2, 3]  # every -s epochs, and at the last
    assert [p.name for p in res["saved"] if "epoch" in p.name] == [
        "ckpt_new_v2qq_q888_s2_epoch_2.pth", "ckpt_new_v2qq_q888_s2_epoch_3.pth"]
    assert_all_representable(res)
    best = load(f"{CKPT_DIR}/ckpt_new_v2qq_q888_s2_best.pth")
    assert best["best_acc1"] == res["best_acc1"] == max(r["val_top1"] for r in res["history"][1:])


@pytest.mark.parametrize("kind,bind,transforms,bank_shape,target_shape", [
    ("kernel", 1, 1, (2, 2, 3, 3), (3, 2, 3, 3)),
    ("kernel", 1, 8, (2, 2, 3, 3), (3, 2, 3, 3)),  # v3: the bank grows by its 8 dihedral transforms
    ("kernel", 2, 1, (2, 2, 3, 3), (3, 4, 3, 3)),  # v2.5: two input channels bound into one vector
    ("pointwise", 2, 1, (4, 5, 1, 1), (3, 5, 1, 1)),  # windows of 2; one remainder column stays float
])
def test_gradients_match_finite_differences(kind, bind, transforms, bank_shape, target_shape):
    torch.manual_seed(0)
    dd = dict(dtype=torch.float64)
    bank = nn.Conv2d(bank_shape[1], bank_shape[0], bank_shape[2], bias=False, **dd)
    target = nn.Conv2d(target_shape[1], target_shape[0], target_shape[2], bias=False, **dd)
    n, length = bank_vectors(bank.weight, kind, bind, transforms).shape
    m = target_vectors(target.weight, kind, bind).shape[0]
    k = torch.randint(0, n, (m,))
    k[1] = k[0]  # two vectors share a bank row: their gradients must add up in it
    code = LayerCode(k, torch.randn(m, **dd), torch.randn(m, **dd))
    path = PathEntry(kind, "bank", bind, transforms, length, n)
    parametrize.register_parametrization(target, "weight", MessWeight(bank, path, code, None, None))
    mw = target.parametrizations.weight[0]
    x1, x2 = torch.randn(2, bank_shape[1], 5, 5, **dd), torch.randn(2, target_shape[1], 5, 5, **dd)

    def loss():  # the bank layer serves both as a conv and as the targets' bank
        return torch.tanh(bank(x1)).square().sum() + (torch.tanh(target(x2)) * x2.sum()).sum()

    original = target.parametrizations.weight.original
    tensors = {"bank": bank.weight, "alpha": mw.alpha, "beta": mw.beta, "X": original}
    loss().backward()
    for name, p in tensors.items():
        g = torch.zeros_like(p) if p.grad is None else p.grad
        fd = torch.zeros_like(p)
        flat, h = p.data.view(-1), 1e-6
        for i in range(flat.numel()):
            old = flat[i].item()
            flat[i] = old + h
            up = loss().item()
            flat[i] = old - h
            down = loss().item()
            flat[i] = old
            fd.view(-1)[i] = (up - down) / (2 * h)
        torch.testing.assert_close(g, fd, rtol=1e-5, atol=1e-7, msg=name)
    # only the pointwise remainder column of X reaches the weight
    assert (original.grad is not None and original.grad.abs().sum() > 0) == (kind == "pointwise")


@pytest.mark.parametrize("arch,layers,width,fc", [("resnet", 20, 0.5, False), ("mobilenet", 16, 0.25, False),
                                                  ("resnet", 20, 0.5, True)])  # --fc: Linear targets
@pytest.mark.parametrize("version", VERSIONS)
def test_every_version_stays_representable_while_training(version, arch, layers, width, fc):
    torch.manual_seed(0)
    model = models.build_model(arch, "digits", layers, width)
    c = compress(model, version, arch=arch, qb=4, qba=4, qbb=4, pw_bind_size=4 if fc else 8, fc=fc)
    model.load_state_dict(c.state_dict)
    keys = list(model.state_dict())
    mess_parametrize(model, c.entry)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for _ in range(2):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    ck = {"model": plain_state_dict(model, keys), "mess": export_entry(model, c.entry).to_dict()}
    check_representable(ck)
    moved = [t for _, t, _ in c.entry.targets()
             if not torch.equal(ck["model"][f"{t}.weight"], c.state_dict[f"{t}.weight"])]
    assert moved  # the covered weights trained


def test_v2f_refit_agrees_with_the_search():
    torch.manual_seed(0)
    model = models.build_model("resnet", "digits", 20, 0.5)
    c = compress(model, "v2f", arch="resnet", qb=4)
    sd, entry = refit_fixed_k(model.state_dict(), c.entry)  # k given: alpha and beta as the search's
    for k in sd:
        assert torch.equal(sd[k], c.state_dict[k]), k
    for t, code in c.entry.kernel.layers.items():
        for part in ("k", "alpha", "beta"):
            assert torch.equal(getattr(entry.kernel.layers[t], part), getattr(code, part)), (t, part)
    check_representable({"model": sd, "mess": entry.to_dict()})


def test_straight_through_quantizer_is_bit_exact():
    x = (torch.randn(200) * 0.3 + 0.1).requires_grad_()
    y = ste_quantize(x, 3)
    assert torch.equal(y, linear_quantize(x, 3)[0])  # what the forward sees is what is saved
    g = torch.randn(200)
    y.backward(g)
    assert torch.equal(x.grad, g)  # straight through


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shift", [0.0, 0.2, -0.3, 1.5])
def test_latent_init_gives_back_the_quantized_tensor(bits, shift):
    torch.manual_seed(bits)
    xq, s = linear_quantize(torch.randn(300) * 0.2 + shift, bits)
    again, s2 = linear_quantize(latent_init(xq, s, bits), bits)
    assert s2 == pytest.approx(s, rel=1e-6) and torch.allclose(again, xq, rtol=1e-6, atol=0)


def covered(model):
    plans = plan_layers(model, "resnet")
    return [Covered(p.kind, p.bank, list(p.targets), p.bind, p.transforms)
            for p in plans.values() if p]


def nuclear_and_correlation(path):
    """Summed nuclear norm of the covered layers, and mean pcc^2 of each target vector with its bank
    row (k from a fresh search)."""
    model = models.build_model("resnet", "digits", 20, 0.5)
    model.load_state_dict(load(path)["model"])
    paths = covered(model)
    c = compress(model, "v2", arch="resnet")
    index = {t: code.k for _, t, code in c.entry.targets()}
    with torch.no_grad():
        return nuclear_loss(model, paths).item(), 1 - pcc_loss(model, paths, index).item()


@pytest.mark.slow
def test_nl_lowers_the_nuclear_norm_and_pl_raises_the_correlation(work):
    # a folder of their own: the module's trained run (work) stays as the other tests expect it
    scratch = TINY + ["--epochs", "1", "--lr", "0.05", "--ckpt-dir", "scratch"]
    base = nuclear_and_correlation(run_main(scratch)["saved"][0])
    nl = run_main(scratch + ["--nl", "--nls", "0.01"])
    pl = run_main(scratch + ["--pl", "--pls", "1"])
    assert nl["saved"][0].name == "ckpt_nl0.01_epoch_1.pth" and pl["saved"][0].name == "ckpt_pl1_epoch_1.pth"
    nuc, corr = nuclear_and_correlation(nl["saved"][0])[0], nuclear_and_correlation(pl["saved"][0])[1]
    print(f"\nnuclear norm {base[0]:.1f} -> {nuc:.1f} with --nl; "
          f"mean pcc^2 {base[1]:.3f} -> {corr:.3f} with --pl")
    assert nuc < base[0] * 0.99
    assert corr > base[1] + 0.02


def test_wclip_clamps_covered_weights(work):
    res = run_main(TINY + ["-T", "--ckpt", "ckpt_best.pth", "--wclip", "1", "--epochs", "1", "--lr", "0.01"])
    assert res["saved"][0].name == "ckpt_rt1_wclip1_epoch_1.pth"

    def worst_z(path):  # the largest |w - mean| / std over the covered layers
        model = models.build_model("resnet", "digits", 20, 0.5)
        model.load_state_dict(load(path)["model"])
        ws = [model.get_submodule(n).weight for p in covered(model) for n in (p.bank, *p.targets)]
        return max(((w - w.mean()).abs().max() / w.std()).item() for w in ws)

    # clamped at mean +- 1 std after the last step; the clamp itself narrows the std a little
    assert worst_z(res["saved"][0]) < 2.0 < worst_z(f"{CKPT_DIR}/ckpt_best.pth")
    w = torch.randn(1000)
    m, s = w.mean(), w.std()
    clip_weights_([w], 1.5)
    assert w.max() <= m + 1.5 * s + 1e-6 and w.min() >= m - 1.5 * s - 1e-6


def test_quantized_finetuning_stays_on_the_grid(work, capsys):
    res = run_main(TINY + ["-T", "-Q", "--qb", "4", "--ckpt", Q4, "--epochs", "1", "--lr", "0.01"])
    assert [p.name for p in res["saved"]] == ["ckpt_rt1_q4_epoch_1.pth", "ckpt_rt1_q4_best.pth"]
    assert_all_representable(res)
    ck = load(res["saved"][0])
    assert ck["quant"]["bits"] == 4 and set(ck["quant"]["scales"]) == set(conv_layers(
        models.build_model("resnet", "digits", 20, 0.5)))
    capsys.readouterr()
    run_main(TINY + ["-E", "--ckpt", "ckpt_rt1_q4_best.pth"])
    assert "plain 4-bit quantization" in capsys.readouterr().out


@pytest.mark.parametrize("extra,prefix", [
    # MESS form: latent bank, alpha, beta (slow: the fast tier resumes the -N run below)
    pytest.param(["--pl", "--wclip", "2"], "ckpt_rt1_v2qq_q344_pl1_wclip2", marks=pytest.mark.slow),
    (["-N", "-s", "1"], "ckpt_rt1_v2qq_q344_s1"),  # free training with a search at each epoch
])
@pytest.mark.slow
def test_resume_of_a_retraining_run_is_exact(work, tmp_path_factory, monkeypatch, extra, prefix):
    argv = TINY + ["-T", "--ckpt", V2QQ, "--epochs", "2", "--lr", "0.01", *extra]
    straight = run_main(argv)
    a = load(f"{CKPT_DIR}/{prefix}_epoch_2.pth")

    other = tmp_path_factory.mktemp("interrupted")
    shutil.copytree("checkpoint", other / "checkpoint")
    monkeypatch.chdir(other)
    for p in (other / CKPT_DIR).glob(f"{prefix}_*"):
        p.unlink()
    with pytest.raises(KeyboardInterrupt):
        run_main(argv, tracker=StopAfter(1))
    assert not (other / CKPT_DIR / f"{prefix}_epoch_2.pth").exists()
    resumed = run_main(TINY + ["-R", "--ckpt", f"{prefix}_epoch_1.pth", "--epochs", "2", "--lr", "0.01",
                               *extra])
    b = load(f"{CKPT_DIR}/{prefix}_epoch_2.pth")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for kind in ("kernel", "pointwise"):
        for t, e in a["mess"][kind]["layers"].items():
            for part in ("k", "alpha", "beta"):
                assert torch.equal(e[part], b["mess"][kind]["layers"][t][part]), (t, part)
    assert a["retrain"]["searches"] == b["retrain"]["searches"] == straight["searches"]
    assert resumed["history"][-1]["val_top1"] == straight["history"][-1]["val_top1"]
    check_representable(b)


def test_checkpoint_names():
    assert parse_name("ckpt_best_v2qq_q888") == (0, "v2qq_q888")
    assert parse_name("ckpt_rt1_v2qq_q888_best") == (1, "v2qq_q888")
    assert parse_name("ckpt_rt12_v2qq_q888_s5_epoch_7") == (12, "v2qq_q888_s5")
    assert parse_name("ckpt_epoch_50") == (0, "")
    assert parse_name("ckpt_best_q8") == (0, "q8")
    assert parse_name("ckpt_best_v2qq-epsv1_q888_eps1e-08") == (0, "v2qq-epsv1_q888_eps1e-08")


def test_check_representable_catches_a_tampered_checkpoint(work):
    ck = load(f"{CKPT_DIR}/{V2QQ}")
    check_representable(ck)
    t = next(iter(ck["mess"]["kernel"]["layers"]))
    bad = dict(ck, model=dict(ck["model"]))
    bad["model"][f"{t}.weight"] = ck["model"][f"{t}.weight"] * (1 + 1e-6)
    with pytest.raises(NotRepresentable, match="differs"):
        check_representable(bad)
    bad = dict(ck, mess=dict(ck["mess"], kernel=dict(ck["mess"]["kernel"])))
    bad["mess"]["kernel"]["bank_scale"] *= 1.01
    with pytest.raises(NotRepresentable, match="grid"):
        check_representable(bad)


# ------------------------------------------------------------------ user errors
@pytest.mark.parametrize("extra,needles", [
    (["-T", "--ckpt", "ckpt_best.pth", "-v", "v2qq"], ["not a MESS checkpoint", "-v v2qq"]),
    (["-T", "--ckpt", V2QQ, "-v", "v2nb"], ["MESS v2qq checkpoint", "-v v2nb"]),
    (["--wclip", "0"], ["--wclip", "must be > 0"]),
    (["--wclip", "-2"], ["--wclip", "must be > 0"]),
    (["-N"], ["-N/--new needs -v"]),
    (["-T"], ["-T/--retrain needs --ckpt"]),
    (["-T", "-Q", "--ckpt", V2QQ], ["without -Q"]),
    (["-v", "v2qq"], ["-N", "-T"]),
    (["-R", "--ckpt", "ckpt_rt1_v2qq_q344_epoch_1.pth", "-v", "v2nb"], ["-v v2nb", "--change-flags"]),
])
def test_bad_input_is_one_line_and_exit_2(work, capsys, extra, needles):
    if "-R" in extra:
        with pytest.raises(KeyboardInterrupt):
            run_main(TINY + ["-T", "--ckpt", V2QQ, "--epochs", "2"], tracker=StopAfter(1))
        capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_cli_inprocess(main.main, main.get_args_parser(), TINY + ["--epochs", "1", *extra])
    assert_user_error(e.value.code, capsys.readouterr().err, *needles)


def test_bad_input_from_the_shell(tmp_path):
    rc, _, err = run_cli("main.py", *TINY, "--wclip", "0", "--no-track", cwd=tmp_path)
    assert_user_error(rc, err, "--wclip")


@pytest.mark.slow
def test_two_processes_search_once_and_write_once(work, tmp_path):
    # torchrun with gloo: the -N search and --pl's run on rank 0 and are broadcast; rank 0 alone writes
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(ROOT / "main.py"), *TINY, "-T", "--ckpt", V2QQ, "-N", "-s", "1", "--pl",
                        "--epochs", "2", "--lr", "0.01", "--no-track"],
                       cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("| searched") == 2  # one printer, one search per boundary
    files = sorted(f.name for f in (tmp_path / CKPT_DIR).glob("ckpt_rt1_*"))
    assert files == ["ckpt_rt1_v2qq_q344_pl1_s1_best.pth", "ckpt_rt1_v2qq_q344_pl1_s1_epoch_1.pth",
                     "ckpt_rt1_v2qq_q344_pl1_s1_epoch_2.pth"]
    for f in files:
        check_representable(load(tmp_path / CKPT_DIR / f))
