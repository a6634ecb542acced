"""The packed .mess format (packed.py): round trips of every version, path and architecture with and
without --fc, the file size against the storage account, evaluation from a .mess file with main.py -E,
and a reader that turns truncated, corrupt or hostile files into one clear line."""
import json
import math
import struct

import numpy as np
import pytest
import torch
from conftest import run_main

import find_similar_kernel as fsk
import models
import packed
from config import VERSIONS
from mess import bits
from mess.account import storage_account
from mess.bits import BitWriter, read_bits
from mess.compress import compress
from mess.layers import bank_vectors, plan_layers, put_vectors, reconstruct
from mess.packed_read import read_mess, unpack
from mess.packed_write import pack, same, write_mess
from utils import UserError, build_declared, save_checkpoint

ARCHS = {  # arch: (layers, -pwd): small widths; -pwd 2 fits ResNet-20's 4-channel 1x1 shortcut at width 0.25
    "resnet": (20, 2), "mobilenet": (16, 8), "mobilenetv2": (16, 8), "vgg": (11, 8)}
HEADER_LIMIT = 64 * 2**10


def make_model(arch, width_mult=0.25, dataset="cifar10", seed=0):
    torch.manual_seed(seed)
    layers = ARCHS[arch][0]
    m = models.build_model(arch, dataset, layers, width_mult)
    for mod in m.modules():  # non-trivial BN statistics and biases, so that they must survive the trip
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
            mod.num_batches_tracked.fill_(7)
        if isinstance(mod, torch.nn.Linear):
            torch.nn.init.normal_(mod.bias, 0, 0.1)
    return m.eval()


def spec(arch, width_mult=0.25, dataset="cifar10"):
    return {"arch": arch, "layers": ARCHS[arch][0], "width_mult": width_mult, "bn": False, "dataset": dataset,
            "num_classes": 10}


_MODELS = {}


def compressed(arch, version, fc):
    """(float model, MESS checkpoint dict) of a tiny model, cached per arch."""
    if arch not in _MODELS:
        _MODELS[arch] = make_model(arch)
    m = _MODELS[arch]
    c = compress(m, version, arch=arch, pw_bind_size=ARCHS[arch][1], fc=fc)
    return m, {"model": c.state_dict, "mess": c.entry.to_dict(), "arch": spec(arch), "epoch": 3}


def logits(arch, sd, x):
    m = models.build_model(arch, "cifar10", ARCHS[arch][0], 0.25)
    m.load_state_dict(sd)
    with torch.no_grad():
        return m.eval()(x)


def decoded_bytes(back):
    """Bytes of what decoding a .mess file made: its tensors, each path's bank vectors and target codes."""
    n = sum(v.numel() * v.element_size() for v in back["model"].values())
    for kind in ("kernel", "pointwise"):
        p = back["mess"][kind]
        if p:
            n += 4 * p["bank_size"] * p["vector_length"]
            n += sum(sum(e[x].numel() * e[x].element_size() for x in ("k", "alpha", "beta") if x in e)
                     for e in p["layers"].values())
    return n


def assert_same_ckpt(back, ck):
    assert list(back["model"]) == list(ck["model"])
    for k, v in ck["model"].items():
        assert same(back["model"][k], v), k
    for kind in ("kernel", "pointwise"):
        a, b = ck["mess"][kind], back["mess"][kind]
        assert (a is None) == (b is None)
        if a is None:
            continue
        for key in ("bank", "kind", "bind", "transforms", "vector_length", "bank_size", "index_bits"):
            assert a[key] == b[key], key
        assert list(a["layers"]) == list(b["layers"])
        for t, e in a["layers"].items():
            f = b["layers"][t]
            assert torch.equal(e["k"], f["k"]) and torch.equal(e["alpha"], f["alpha"])
            assert ("beta" in e) == ("beta" in f) and (("beta" not in e) or torch.equal(e["beta"], f["beta"]))
    for key in ("version", "weight_bits", "alpha_bits", "beta_bits", "eps", "fc"):
        assert back["mess"][key] == ck["mess"][key], key


# ---------------------------------------------------------------- --fc: which layers
@pytest.mark.parametrize("arch,dataset,layers,flags,bank,targets", [
    # a pointwise bank (first 1x1 conv) exists: the FC layers join its targets
    ("resnet", "cifar10", 20, {"pw_bind": 2}, "layer2.0.downsample.0", ["layer3.0.downsample.0", "fc"]),
    ("mobilenetv2", "cifar10", 16, {}, "features.1.conv.1", ["features.18.0", "classifier.1"]),
    ("resnet", "imagenet", 50, {}, "layer1.0.conv1", ["layer4.2.conv3", "fc"]),
    # no 1x1 conv (or --np): the first FC layer's windows are the bank
    ("vgg", "cifar10", 11, {}, "classifier.0", ["classifier.3", "classifier.6"]),
    ("vgg", "imagenet", 16, {"pointwise": False}, "classifier.0", ["classifier.3", "classifier.6"]),
    ("mobilenet", "cifar10", 16, {"pointwise": False}, None, None),  # one FC layer: nothing to match
])
def test_fc_layers_join_the_pointwise_path(arch, dataset, layers, flags, bank, targets):
    model = models.build_model(arch, dataset, layers, 0.25)
    without = plan_layers(model, arch, **flags)["pointwise"]
    plan = plan_layers(model, arch, fc=True, **flags)["pointwise"]
    if bank is None:
        assert plan is None
        return
    assert plan.bank == bank and plan.kind == "pointwise"
    assert plan.targets[-len(targets):] == targets  # the FC layers come last
    assert plan.targets[:len(plan.targets) - sum(t.startswith(("fc", "classifier")) for t in targets)] == (
        without.targets if without else [])


def test_fc_bank_narrower_than_pwd_is_refused():
    model = models.build_model("vgg", "cifar10", 11, 0.25)  # classifier.0 takes 128 features
    with pytest.raises(UserError, match="-pwd 256 is wider than the 128 input features of the pointwise bank "
                                        "layer classifier.0; use -pwd 128 or less$"):
        plan_layers(model, "vgg", fc=True, pw_bind=256)


# ---------------------------------------------------------------- bit streams
def test_bit_streams_round_trip(monkeypatch):
    monkeypatch.setattr(bits, "CHUNK_BITS", 96)  # many chunks, each starting mid-byte
    rng = np.random.default_rng(0)
    w, ref = BitWriter(), []
    for width in [0, 1, 3, 4, 7, 8, 9, 12, 16, 23, 33, 5, 0, 2]:
        v = rng.integers(0, 2**width, int(rng.integers(0, 300)), dtype=np.uint64)
        w.write(v, width)
        ref.append((v, width))
    buf = w.getvalue()
    assert w.nbits == sum(len(v) * b for v, b in ref)
    assert buf.dtype == np.uint8 and len(buf) == (w.nbits + 7) // 8
    off = 0
    for v, width in ref:
        assert np.array_equal(read_bits(buf, off, len(v), width), v)
        off += len(v) * width


# ---------------------------------------------------------------- round trips
@pytest.mark.parametrize("fc", [False, True], ids=["nofc", "fc"])
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_round_trip_logits_and_size(one_thread, arch, version, fc):
    m, ck = compressed(arch, version, fc)
    mess = ck["mess"]
    paths = [k for k in ("kernel", "pointwise") if mess[k]]
    assert "kernel" in paths and ("pointwise" in paths) == (arch != "vgg" or fc)
    if fc:
        fcs = [n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)]
        p = mess["pointwise"]
        assert set(fcs) - {p["bank"]} <= set(p["layers"])
    buf = pack(ck)
    back = unpack(buf)
    assert_same_ckpt(back, ck)
    assert back["arch"] == ck["arch"] and back["epoch"] == 3
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert torch.equal(logits(arch, back["model"], x), logits(arch, ck["model"], x))
    assert back["packed"]["decoded_bytes"] == decoded_bytes(back)  # the bound counts what decoding makes
    # size: exactly the account's bits in whole bytes after a header that does not grow with the weights
    acc = storage_account(ck["model"], mess)
    header = back["packed"]["header_bytes"]
    assert len(buf) - header == math.ceil(acc.mess_bits / 8)
    assert header < HEADER_LIMIT


def test_float_and_plain_quantized_checkpoints_pack_too():
    m = make_model("mobilenet")
    sd = m.state_dict()
    back = unpack(pack({"model": sd, "arch": spec("mobilenet")}))
    assert all(torch.equal(back["model"][k], v) for k, v in sd.items()) and "mess" not in back
    from quantize import conv_layers, quantize_layers
    q = {k: v.clone() for k, v in sd.items()}
    scales = quantize_layers(q, conv_layers(m), 6)
    ck = {"model": q, "quant": {"bits": 6, "scales": scales}}
    buf = pack(ck)
    back = unpack(buf)
    assert all(same(back["model"][k], v) for k, v in q.items())
    assert back["quant"]["bits"] == 6 and set(back["quant"]["scales"]) == set(scales)
    acc = storage_account(q, quant=ck["quant"])
    assert len(buf) - back["packed"]["header_bytes"] == math.ceil(acc.mess_bits / 8)


def test_constant_tensors_and_scale_zero():
    """A constant tensor has scale 0 (linear_quantize): it is stored as its value with q = 1."""
    m, ck = compressed("resnet", "v2qq", False)
    ck = {**ck, "model": dict(ck["model"])}
    e = ck["mess"]["kernel"]["layers"]["layer1.0.conv1"]
    alpha = torch.full_like(e["alpha"], -0.375)
    ck["mess"] = {**ck["mess"], "kernel": {**ck["mess"]["kernel"], "layers": {
        **ck["mess"]["kernel"]["layers"], "layer1.0.conv1": {**e, "alpha": alpha, "alpha_scale": 0.0}}}}
    vec = reconstruct(bank_vectors(ck["model"]["conv1.weight"], "kernel"), e["k"], alpha, e["beta"])
    key = "layer1.0.conv1.weight"
    ck["model"][key] = put_vectors(ck["model"][key], vec, "kernel")
    back = unpack(pack(ck))
    assert torch.equal(back["model"]["layer1.0.conv1.weight"], ck["model"]["layer1.0.conv1.weight"])
    assert back["mess"]["kernel"]["layers"]["layer1.0.conv1"]["alpha_scale"] == -0.375


def test_big_models_keep_a_small_header():
    # the header grows with the number of tensors, not with their size: ResNet-152 has ~930 of them
    for arch, dataset, layers in (("resnet", "imagenet", 152), ("resnet", "cifar10", 110)):
        m = models.build_model(arch, dataset, layers, 0.125)
        buf = pack({"model": m.state_dict(), "arch": None})
        (n,) = struct.unpack("<Q", buf[:8])
        assert n + 8 < HEADER_LIMIT, (arch, layers, n)


# ---------------------------------------------------------------- the writer refuses what it cannot keep
def test_writer_refuses_a_checkpoint_that_breaks_the_contract(tmp_path):
    _, ck = compressed("resnet", "v2qq", False)
    out = tmp_path / "x.mess"
    bad = {**ck, "model": {**ck["model"]}}
    bad["model"]["layer1.0.conv1.weight"] = bad["model"]["layer1.0.conv1.weight"] + 1e-3
    with pytest.raises(UserError, match="differs from what its MESS entry rebuilds"):
        write_mess(out, bad)
    e = ck["mess"]["kernel"]["layers"]["layer1.0.conv2"]
    off_grid = {**e, "alpha": e["alpha"] + 1e-4}
    bad = {**ck, "mess": {**ck["mess"], "kernel": {**ck["mess"]["kernel"], "layers": {
        **ck["mess"]["kernel"]["layers"], "layer1.0.conv2": off_grid}}}}
    with pytest.raises(UserError, match="not on the 8-bit grid"):
        write_mess(out, bad)
    bad_k = {**e, "k": e["k"] + 100}
    bad = {**ck, "mess": {**ck["mess"], "kernel": {**ck["mess"]["kernel"], "layers": {
        **ck["mess"]["kernel"]["layers"], "layer1.0.conv2": bad_k}}}}
    with pytest.raises(UserError, match="below the bank size 12"):
        write_mess(out, bad)
    with pytest.raises(UserError, match="float64"):
        write_mess(out, {"model": {"w": torch.zeros(3, dtype=torch.float64)}})
    with pytest.raises(UserError, match="cannot pack x.mess, the file would not read back: .* it declares a "
                                        r"resnet32_w0.25 for cifar10, not the model it is read into \(they "
                                        "differ in layer1.3.conv1.weight"):
        write_mess(out, {**ck, "arch": {**ck["arch"], "layers": 32}}, build=build_declared)  # no CLI reads it
    assert list(tmp_path.iterdir()) == []
    assert write_mess(out, ck) == out.stat().st_size


def test_interoperable_safetensors(tmp_path):
    from safetensors import safe_open
    _, ck = compressed("mobilenet", "v2nb", True)
    write_mess(tmp_path / "m.mess", ck)
    with safe_open(tmp_path / "m.mess", framework="numpy") as f:
        assert set(f.keys()) == {"f32", "bits"}
        meta = json.loads(f.metadata()["mess"])
    assert meta["format"] == "mess-packed" and meta["format_version"] == 1
    assert meta["arch"] == spec("mobilenet") and meta["mess"]["version"] == "v2nb"
    assert meta["mess"]["alpha_bits"] == 8 and meta["mess"]["beta_bits"] is None
    assert meta["mess"]["pointwise"]["bank_size"] == ck["mess"]["pointwise"]["bank_size"]


# ---------------------------------------------------------------- the CLIs: compress, main.py -E, packed.py
def make_digits_ckpt(arch="resnet"):
    m = make_model(arch, dataset="digits")
    path = f"checkpoint/{models.model_name(arch, ARCHS[arch][0], 0.25)}/digits/ckpt_best.pth"
    save_checkpoint({"model": m.state_dict(), "arch": spec(arch, dataset="digits"), "epoch": 2,
                     "best_acc1": 50.0, "optimizer": {"state": {}, "param_groups": []}}, path)
    return path


def test_compress_writes_mess_and_main_evaluates_it(in_tmp, capsys):
    make_digits_ckpt()
    argv = ["digits", "-a", "resnet", "--layers", "20", "--width-mult", "0.25"]
    flags = ["--ckpt", "ckpt_best.pth", "-v", "v2qq", "-pwd", "2", "--fc"]
    r = fsk.main(fsk.get_args_parser().parse_args(argv + flags))
    assert r["path"].name == "ckpt_best_v2qq_pwd2_q888_fc.pth"
    assert r["mess_path"] == r["path"].with_suffix(".mess")
    assert r["mess_path"].stat().st_size == r["mess_bytes"]
    out = capsys.readouterr().out
    assert "ckpt_best_v2qq_pwd2_q888_fc.mess" in out and "sizes on disk: float32 state_dict" in out
    assert "fc" in r["mess"]["pointwise"]["layers"]
    ev = ["-E", "-j", "0", "-b", "128"]
    a = run_main(argv + ev + ["--ckpt", r["path"].name])["metrics"]
    b = run_main(argv + ev + ["--ckpt", r["mess_path"].name])["metrics"]
    assert a == b
    assert "ckpt_best_v2qq_pwd2_q888_fc.mess" in capsys.readouterr().out


def test_packed_cli_packs_any_checkpoint(in_tmp, capsys):
    src = make_digits_ckpt("mobilenet")
    argv = ["digits", "-a", "mobilenet", "--width-mult", "0.25", "--ckpt"]
    r = packed.main(packed.get_args_parser().parse_args(argv + ["ckpt_best.pth"]))
    assert r["path"].resolve() == (in_tmp / src).with_suffix(".mess")
    back = read_mess(r["path"])
    sd = torch.load(src, weights_only=True)["model"]
    assert all(torch.equal(back["model"][k], v) for k, v in sd.items())
    assert back["epoch"] == 2 and back["best_acc1"] == 50.0 and "optimizer" not in back
    with pytest.raises(UserError, match="must end in .mess"):
        packed.main(packed.get_args_parser().parse_args(argv + ["ckpt_best.pth", "-o", "x.pth"]))
    capsys.readouterr()
    again = packed.main(packed.get_args_parser().parse_args(argv + ["ckpt_best.mess"]))  # checks only
    assert again == r and "wrote" not in capsys.readouterr().out
    with pytest.raises(UserError, match="packed already"):
        packed.main(packed.get_args_parser().parse_args(argv + ["ckpt_best.mess", "-o", "y.mess"]))
