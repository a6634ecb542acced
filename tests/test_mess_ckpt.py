"""find_similar_kernel.py end to end: the checkpoint contract (docs/design.md §4), file names,
the storage account against a hand count (section 5), and user errors."""
import hashlib

import pytest
import torch
from conftest import assert_user_error, run_cli
from mess_reference import kernel_bank, pointwise_bank

import find_similar_kernel as fsk
import models
from config import VERSIONS
from mess.account import storage_account, summarize
from mess.entry import Entry
from mess.settings import VERSION_SPECS
from utils import run_cli as run_cli_inprocess
from utils import save_checkpoint


def make_ckpt(arch, layers=16, width_mult=0.25, seed=0):
    torch.manual_seed(seed)
    model = models.build_model(arch, "cifar10", layers, width_mult)
    for m in model.modules():  # non-trivial BN statistics, so "unchanged" means something
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = f"checkpoint/{models.model_name(arch, layers, width_mult)}/cifar10/ckpt_best.pth"
    spec = {"arch": arch, "layers": layers, "width_mult": width_mult, "bn": False, "dataset": "cifar10",
            "num_classes": 10}
    save_checkpoint({"model": model.state_dict(), "arch": spec, "epoch": 3, "best_acc1": 12.5,
                     "optimizer": {"state": {}, "param_groups": []}, "args": {"lr": 0.1}}, path)
    return path


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def compress(argv):
    return fsk.main(fsk.get_args_parser().parse_args(argv))


MOBILENET = ["cifar10", "-a", "mobilenet", "--width-mult", "0.25", "--ckpt", "ckpt_best.pth"]
RESNET = ["cifar10", "-a", "resnet", "--layers", "20", "--width-mult", "0.25", "-pwd", "2",
          "--ckpt", "ckpt_best.pth"]

NAMES = {  # the original's names (its scripts call main.py -E with them)
    "v2": "ckpt_best_v2.pth", "v2q": "ckpt_best_v2q_q8.pth", "v2qq": "ckpt_best_v2qq_q888.pth",
    "v2qq-epsv1": "ckpt_best_v2qq-epsv1_q888_eps1e-08.pth",
    "v2qq-epsv2": "ckpt_best_v2qq-epsv2_q888_eps1e-08.pth",
    "v2qq-epsv3": "ckpt_best_v2qq-epsv3_q888_eps1e-08.pth",
    "v2f": "ckpt_best_v2f_q888.pth", "v2nb": "ckpt_best_v2nb_q88.pth", "v2.5": "ckpt_best_v2.5_d2_q888.pth",
    "v3": "ckpt_best_v3_q888.pth",
}


def on_grid(x, scale, bits):
    if scale == 0.0:
        return True
    q = (x / scale).round()  # what a packer stores; it must give back x exactly
    return bool(torch.equal(q * torch.tensor(scale), x) and q.min() >= -(2 ** (bits - 1))
                and q.max() <= 2 ** (bits - 1) - 1)


def check_contract(out, src, version, qb=8, qba=8, qbb=8):
    """Everything docs/design.md §4 promises about a MESS checkpoint ``out`` made from ``src``."""
    ck = torch.load(out, map_location="cpu", weights_only=True)
    src_ck = torch.load(src, map_location="cpu", weights_only=True)
    sd, mess, src_sd = ck["model"], ck["mess"], src_ck["model"]
    assert mess["version"] == version
    assert ck["arch"] == src_ck["arch"] and ck["epoch"] == src_ck["epoch"] == 3  # what rebuilds the model
    assert "optimizer" not in ck
    spec = VERSION_SPECS[version]
    covered = set()
    for kind in ("kernel", "pointwise"):
        path = mess[kind]
        if path is None:
            continue
        bank_w = sd[f"{path['bank']}.weight"]
        covered.add(f"{path['bank']}.weight")
        if kind == "kernel":
            bank = kernel_bank(bank_w, path["bind"], path["transforms"] == 8)
        else:
            bank = pointwise_bank(bank_w, path["bind"])
        assert path["bank_size"] == len(bank) and path["index_bits"] == (len(bank) - 1).bit_length()
        if spec.quant_weights:
            assert on_grid(bank_w, path["bank_scale"], qb)
        else:
            assert path["bank_scale"] is None and torch.equal(bank_w, src_sd[f"{path['bank']}.weight"])
        for name, e in path["layers"].items():
            key = f"{name}.weight"
            covered.add(key)
            k, alpha = e["k"], e["alpha"]
            assert k.dtype == torch.int64 and alpha.dtype == torch.float32
            assert (k >= 0).all() and (k < len(bank)).all()
            assert ("beta" in e) == spec.beta
            vec = alpha[:, None] * bank[k]
            if spec.beta:
                assert e["beta"].dtype == torch.float32
                vec = vec + e["beta"][:, None]
            w = sd[key].reshape(sd[key].shape[0], -1)
            if kind == "kernel":
                assert torch.equal(vec.reshape(-1), sd[key].reshape(-1))
            else:
                n = w.shape[1] // path["bind"] * path["bind"]
                assert torch.equal(vec.reshape(w.shape[0], n), w[:, :n])
            if spec.quant_ab:
                assert on_grid(alpha, e["alpha_scale"], qba)
                if spec.beta:
                    assert on_grid(e["beta"], e["beta_scale"], qbb)
            else:
                assert e["alpha_scale"] is None
    rebuilt = Entry.from_dict(mess).reconstruct(sd)
    assert all(torch.equal(rebuilt[k], sd[k]) for k in sd)
    for k, v in src_sd.items():  # what is not covered is untouched
        if k not in covered:
            assert torch.equal(sd[k], v), k
    m = models.build_model(ck["arch"]["arch"], "cifar10", ck["arch"]["layers"], ck["arch"]["width_mult"])
    m.load_state_dict(sd)  # strict: the same keys and shapes
    return ck


@pytest.mark.parametrize("version", VERSIONS)
def test_every_version_writes_a_valid_checkpoint(in_tmp, version):
    src = make_ckpt("mobilenet")
    before = digest(src)
    res = compress(MOBILENET + ["-v", version])
    assert res["path"].name == NAMES[version] and res["path"].resolve().parent == (in_tmp / src).parent
    ck = check_contract(res["path"], src, version)
    assert ck["mess"]["pointwise"] is not None
    assert digest(src) == before
    s = summarize(ck)
    assert version in s and f"{res['ratio']:.2f}x" in s and len(s.splitlines()) == 2


def test_np_and_pwd_and_bits_in_name(in_tmp):
    src = make_ckpt("mobilenet")
    r = compress(MOBILENET + ["-v", "v2qq", "--np", "--qb", "6", "--qba", "4", "--qbb", "5"])
    assert r["path"].name == "ckpt_best_v2qq_np_q645.pth"
    ck = check_contract(r["path"], src, "v2qq", 6, 4, 5)
    assert ck["mess"]["pointwise"] is None
    r = compress(MOBILENET + ["-v", "v2", "-pwd", "4"])
    assert r["path"].name == "ckpt_best_v2_pwd4.pth"
    assert r["mess"]["pointwise"]["bind"] == 4
    r = compress(MOBILENET + ["-v", "v2.5", "-d", "4"])
    assert r["path"].name == "ckpt_best_v2.5_d4_q888.pth"
    assert r["mess"]["kernel"]["vector_length"] == 36


# width 0.5 for ResNet-20 (at 0.25 its 4-channel 1x1 shortcut needs -pwd 2), 0.25 for the others
@pytest.mark.parametrize("arch,layers,width", [("resnet", 20, 0.5), ("mobilenetv2", 16, 0.25),
                                                ("vgg", 11, 0.25)])
def test_other_archs(in_tmp, arch, layers, width):
    src = make_ckpt(arch, layers, width_mult=width)
    argv = ["cifar10", "-a", arch, "--layers", str(layers), "--width-mult", str(width),
            "--ckpt", "ckpt_best.pth"]
    for version in ("v2qq", "v3", "v2nb"):
        r = compress(argv + ["-v", version])
        check_contract(r["path"], src, version)
        assert (r["mess"]["pointwise"] is None) == (arch == "vgg")


# ---------------------------------------------------------------- storage account, by hand
# ResNet-20 at width 0.25 (channels 4, 8, 16), -pwd 2:
#   kernel bank conv1: 4x3 = 12 kernels (108 weights) -> 4-bit index (v3: 96 -> 7; v2.5 -d 2: 6 -> 3)
#   3x3 targets: layer1 6 x 16 + layer2 (32 + 64 + 4 x 64) + layer3 (128 + 256 + 4 x 256) = 1856 kernels
#   in 18 layers; pointwise bank layer2.0.downsample.0 (8, 4): 8 x 3 = 24 windows -> 5-bit index,
#   32 weights; target layer3.0.downsample.0 (16, 8): 64 vectors of 2, no remainder.
#   Everything else: BN 196 channels x 4 tensors = 784 floats, fc 16 x 10 + 10 = 170.
KERNELS, KLAYERS, PW, BANKS, OTHER = 1856, 18, 64, 108 + 32, 784 + 170
FP32 = 32 * (BANKS + 9 * KERNELS + 2 * PW + OTHER)
Q = 8 * BANKS + 2 * 32  # two banks at 8 bits with one scale each
HAND = {
    "v2": KERNELS * (4 + 32 + 32) + PW * (5 + 32 + 32) + 32 * BANKS + 32 * OTHER,
    "v2q": KERNELS * (4 + 32 + 32) + PW * (5 + 32 + 32) + Q + 32 * OTHER,
    "v2qq": KERNELS * (4 + 8 + 8) + KLAYERS * 64 + PW * (5 + 8 + 8) + 64 + Q + 32 * OTHER,
    "v2nb": KERNELS * (4 + 8) + KLAYERS * 32 + PW * (5 + 8) + 32 + Q + 32 * OTHER,
    "v2.5": KERNELS // 2 * (3 + 8 + 8) + KLAYERS * 64 + PW * (5 + 8 + 8) + 64 + Q + 32 * OTHER,
    "v3": KERNELS * (7 + 8 + 8) + KLAYERS * 64 + PW * (5 + 8 + 8) + 64 + Q + 32 * OTHER,
}
for _v in ("v2qq-epsv1", "v2qq-epsv2", "v2qq-epsv3", "v2f"):
    HAND[_v] = HAND["v2qq"]


@pytest.mark.parametrize("version", VERSIONS)
def test_storage_account_matches_hand_count(in_tmp, version):
    make_ckpt("resnet", 20)
    r = compress(RESNET + ["-v", version])
    acc = r["account"]
    assert acc.fp32_bits == FP32 == 17926 * 32
    assert acc.mess_bits == HAND[version], (acc.mess_bits, HAND[version])
    assert r["ratio"] == pytest.approx(FP32 / HAND[version])
    ck = torch.load(r["path"], weights_only=True)
    assert storage_account(ck["model"], ck["mess"]).mess_bits == HAND[version]
    # what main.py -E prints under the accuracy: the hand-counted sizes and their ratio
    assert summarize(ck).splitlines()[1] == (f"size {HAND[version]:,} bits vs {FP32:,} bits float32: "
                                                 f"compression ratio {FP32 / HAND[version]:.2f}x")


def test_account_parts_are_per_tensor(in_tmp):
    make_ckpt("resnet", 20)
    acc = compress(RESNET + ["-v", "v2qq"])["account"]
    by_name = {t.name: t for t in acc.tensors}
    assert by_name["layer1.0.conv1.weight:k"].count == 16 and by_name["layer1.0.conv1.weight:k"].bits == 4
    assert by_name["conv1.weight"].part == "quantized" and by_name["conv1.weight"].bits == 8
    assert by_name["fc.bias"].bits == 32 and "bn1.num_batches_tracked" not in by_name
    assert acc.layer_bits("layer1.0.conv1") == (16 * 9 * 32, 16 * 20 + 64)


def test_pointwise_remainder_counts_at_32_bits(in_tmp):
    make_ckpt("mobilenet")
    r = compress(MOBILENET + ["-v", "v2", "-pwd", "3"])  # 16 / 3 leaves a remainder of 1 per row
    t = {x.name: x for x in r["account"].tensors}
    rem = t["layers.1.conv2.weight:remainder"]
    assert rem.bits == 32 and rem.count == 32 * (16 % 3)  # layers.1.conv2 is (32, 16)
    assert t["layers.1.conv2.weight:k"].count == 32 * (16 // 3)


# ---------------------------------------------------------------- user errors
BAD = [
    (["-v", "v9"], "unknown version 'v9'"),
    ([], "-v/--version is required"),
    (["-v", "v2qq", "--qb", "1"], "--qb must be between 2 and 16"),
    (["-v", "v2qq", "--qba", "17"], "--qba must be between 2 and 16"),
    (["-v", "v2", "--qbb", "0"], "--qbb must be between 2 and 16"),
    (["-v", "v2.5", "-d", "3"], "-d 3 does not divide"),
    (["-v", "v2", "-pwd", "64"], "-pwd 64 is wider"),
]


@pytest.mark.parametrize("extra,needle", BAD)
def test_bad_flags_exit_2_and_touch_nothing(in_tmp, capsys, extra, needle):
    src = make_ckpt("mobilenet")
    before = digest(src)
    with pytest.raises(SystemExit) as e:
        run_cli_inprocess(fsk.main, fsk.get_args_parser(), MOBILENET + extra)
    assert_user_error(e.value.code, capsys.readouterr().err, needle)
    assert digest(src) == before
    assert sorted(p.name for p in (in_tmp / src).parent.iterdir()) == ["ckpt_best.pth"]


def test_not_a_model_checkpoint(in_tmp, capsys):
    d = in_tmp / "checkpoint/mobilenet_w0.25/cifar10"
    d.mkdir(parents=True)
    torch.save({"epoch": 3, "note": "no weights"}, d / "ckpt_best.pth")
    (d / "notes.pth").write_text("hello")
    for name, needle in (("ckpt_best.pth", "not a model checkpoint"), ("notes.pth", "cannot read checkpoint"),
                         ("missing.pth", "checkpoint not found")):
        argv = MOBILENET[:-1] + [name, "-v", "v2qq"]
        with pytest.raises(SystemExit) as e:
            run_cli_inprocess(fsk.main, fsk.get_args_parser(), argv)
        assert_user_error(e.value.code, capsys.readouterr().err, needle)
    assert sorted(p.name for p in d.iterdir()) == ["ckpt_best.pth", "notes.pth"]


def test_checkpoint_of_another_model(in_tmp, capsys):
    make_ckpt("resnet", 20)
    src = in_tmp / "checkpoint/resnet20_w0.25/cifar10/ckpt_best.pth"
    argv = ["cifar10", "-a", "mobilenet", "--width-mult", "0.25", "--ckpt", str(src), "-v", "v2"]
    with pytest.raises(SystemExit) as e:
        run_cli_inprocess(fsk.main, fsk.get_args_parser(), argv)
    assert_user_error(e.value.code, capsys.readouterr().err, "holds a resnet20_w0.25")


@pytest.mark.slow
def test_cli_subprocess(in_tmp):
    src = make_ckpt("mobilenet")
    rc, out, err = run_cli("find_similar_kernel.py", *MOBILENET, "-v", "v2qq", cwd=in_tmp)
    assert rc == 0, err
    assert "compression ratio" in out and "layers.12.conv2" in out and "ckpt_best_v2qq_q888.pth" in out
    rc, out, err = run_cli("find_similar_kernel.py", *MOBILENET, "-v", "v4", cwd=in_tmp)
    assert_user_error(rc, err, "unknown version 'v4'", "v2qq-epsv3")
    assert (in_tmp / src).exists()
