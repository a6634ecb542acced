"""The public Python API on a network the suite knows nothing of: compress, account, save, load, retrain.

The model is defined here, not in models/: what works for it works for any nn.Module with 3x3 / 1x1
convs (and linears with fc=True).
"""
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import ROOT

import mess
from mess.packed_read import read_mess


class OwnNet(nn.Module):
    """Layer names nothing in the suite uses; a grouped 3x3 conv, 1x1 convs, BN, a linear head."""

    def __init__(self):
        super().__init__()
        self.entry_conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(8)
        self.blocks = nn.ModuleDict({
            "a": nn.Conv2d(8, 16, 3, padding=1, stride=2, bias=False),
            "b": nn.Conv2d(16, 16, 3, padding=1, groups=2, bias=False),
            "squeeze": nn.Conv2d(16, 8, 1, bias=False),
            "expand": nn.Conv2d(8, 24, 1, bias=True)})
        self.classifier = nn.Linear(24, 5)

    def forward(self, x):
        x = F.relu(self.norm(self.entry_conv(x)))
        for layer in self.blocks.values():
            x = F.relu(layer(x))
        return self.classifier(x.mean((2, 3)))


def own_net(seed: int = 0) -> OwnNet:
    torch.manual_seed(seed)
    net = OwnNet()
    with torch.no_grad():  # non-trivial BN statistics, as a trained net has
        net.norm.running_mean.uniform_(-0.2, 0.2)
        net.norm.running_var.uniform_(0.5, 2.0)
    return net.eval()


X = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("version,kw", [("v2qq", dict(qb=4, qba=4, qbb=4)), ("v2", {}), ("v3", {}),
                                        ("v2nb", dict(qba=6)), ("v2qq", dict(fc=True, pw_bind_size=4))])
def test_compress_save_load_gives_the_compressed_logits(tmp_path, version, kw):
    net = own_net()
    c = mess.compress(net, version, **kw)
    assert c.entry.kernel.bank == "entry_conv"  # the first 3x3 conv, found by traversal
    assert list(c.entry.kernel.layers) == ["blocks.a", "blocks.b"]
    assert c.entry.pointwise.bank == "blocks.squeeze"
    assert ("classifier" in c.entry.pointwise.layers) == kw.get("fc", False)
    net.load_state_dict(c.state_dict)
    want = net(X)
    n = mess.save(c, tmp_path / "own.mess")
    assert (tmp_path / "own.mess").stat().st_size == n
    acc = mess.account(c)
    assert n < acc.fp32_bits / 8  # smaller on disk than the float weights alone
    assert n - read_mess(tmp_path / "own.mess")["packed"]["header_bytes"] == -(-acc.mess_bits // 8)
    fresh = own_net(seed=5)  # other weights: everything must come from the file
    back = mess.load(tmp_path / "own.mess", fresh)
    assert torch.equal(fresh(X), want)
    assert back.entry.to_dict()["version"] == version
    mess.validate(back)


def test_a_model_without_coverable_layers_is_one_clear_error():
    with pytest.raises(mess.UserError, match="no layer MESS can cover"):
        mess.compress(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), "v2qq")


def test_load_refuses_a_file_of_another_model(tmp_path):
    c = mess.compress(own_net(), "v2qq")
    mess.save(c, tmp_path / "own.mess")
    other = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3))
    with pytest.raises(mess.UserError, match="is no tensor of the model it is read into"):
        mess.load(tmp_path / "own.mess", other)


def test_save_refuses_weights_that_are_not_their_reconstruction(tmp_path):
    c = mess.compress(own_net(), "v2qq")
    c.state_dict["blocks.b.weight"] = c.state_dict["blocks.b.weight"] + 1e-3
    with pytest.raises(mess.UserError, match="blocks.b.weight"):
        mess.save(c, tmp_path / "bad.mess")
    assert not (tmp_path / "bad.mess").exists()
    with pytest.raises(mess.NotRepresentable, match="blocks.b"):
        mess.validate(c)


@pytest.mark.parametrize("version", ["v2qq", "v2", "v3", "v2nb"])
def test_retraining_in_the_callers_loop_keeps_every_state_representable(tmp_path, version):
    net = own_net()
    c = mess.compress(net, version, qb=5, qba=5, qbb=5)
    net.load_state_dict(c.state_dict)
    targets = mess.parametrize(net, c.entry)
    assert targets == ["blocks.a", "blocks.b", "blocks.expand"]
    first = mess.export(net)
    for t in targets:  # the first forward pass computes the compressed weights
        assert torch.allclose(first.state_dict[f"{t}.weight"], c.state_dict[f"{t}.weight"], atol=1e-6)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.05)
    y = torch.arange(6) % 5
    net.train()
    for step in range(4):
        loss = F.cross_entropy(net(X), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        state = mess.export(net)  # raises NotRepresentable if the weights left MESS form
        mess.validate(state)
        mess.save(state, tmp_path / f"step{step}.mess")  # refuses a state that is not exactly its entry
        back = read_mess(tmp_path / f"step{step}.mess")["model"]
        assert all(torch.equal(back[k], v) for k, v in state.state_dict.items())
    moved = [t for t in targets
             if not torch.equal(state.state_dict[f"{t}.weight"], c.state_dict[f"{t}.weight"])]
    assert moved == targets  # every covered layer trained
    now, then = state.entry.kernel.layers["blocks.a"], c.entry.kernel.layers["blocks.a"]
    mw = net.get_submodule("blocks.a").parametrizations.weight[0]
    assert not torch.equal(mw.alpha.detach(), then.alpha)  # alpha trains (its latent; the grid's scale
    assert now.alpha_scale == then.alpha_scale  # stays fixed, so steps this small round back to it)
    assert torch.equal(now.k, then.k)  # k stays fixed
    fresh = own_net(seed=3)
    mess.load(tmp_path / "step3.mess", fresh)
    net.eval()
    assert torch.equal(fresh(X), net(X))


@pytest.mark.slow
def test_the_example_script_runs_end_to_end(tmp_path):
    out = tmp_path / "own.mess"
    p = subprocess.run([sys.executable, str(ROOT / "examples" / "own_model.py"), "--epochs", "1",
                        "--retrain-steps", "5", "--out", str(out)], capture_output=True, text=True,
                       timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "logits identical: True" in p.stdout
    assert out.stat().st_size > 0
