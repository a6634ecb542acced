"""End to end on digits: train briefly, compress with every version, evaluate with main.py -E.

Slow (a minute or more per architecture); tests/test_tinyimagenet.py compresses and evaluates every
version of a model trained for three steps, tests/test_retrain.py retrains a compressed digits model."""
import pytest
from conftest import run_main

import find_similar_kernel as fsk
import quantize
from config import VERSIONS

ARCHS = {  # model flags, epochs: a few seconds of training each on 2 cores
    "resnet": (["-a", "resnet", "--layers", "20", "--width-mult", "0.25", "-pwd", "4"], 4),
    "mobilenet": (["-a", "mobilenet", "--width-mult", "0.25"], 2),
}


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(ARCHS))
def test_compress_and_evaluate_every_version(in_tmp, capsys, arch):
    flags, epochs = ARCHS[arch]
    model = ["digits", *flags]
    run_main(model + ["--epochs", str(epochs), "--sched", "cosine", "-j", "0", "-b", "32"])

    def evaluate(name):
        capsys.readouterr()
        top1 = run_main(model + ["-j", "0", "-E", "--ckpt", name])["metrics"]["val_top1"]
        return top1, capsys.readouterr().out

    base, _ = evaluate("ckpt_best.pth")
    assert base > 50.0, base  # trained enough for the comparisons to mean something
    acc, l1 = {}, {}
    for version in VERSIONS:
        res = fsk.main(fsk.get_args_parser().parse_args(model + ["-v", version, "--ckpt", "ckpt_best.pth"]))
        l1[version] = sum(r["mean_residual"] * r["targets"] for r in res["rows"] if r["targets"])
        acc[version], out = evaluate(res["path"].name)
        # main.py -E names the version and the ratio of what it evaluated
        assert f"MESS {version}" in out and f"compression ratio {res['ratio']:.2f}x" in out, out
    # quantize.py takes no search flags (-pwd): the checkpoint, by path, names its model
    q8, _ = evaluate(quantize.main(quantize.get_args_parser().parse_args(
        ["digits", "--qb", "8", "--ckpt", str(res["path"].with_name("ckpt_best.pth"))]))["path"].name)
    print(f"\n{arch} on digits: float {base:.2f}%, plain 8-bit {q8:.2f}%, "
          + ", ".join(f"{v} {a:.2f}%" for v, a in acc.items()))
    # float alphas and betas on float weights fit the float weights about as closely as their 8-bit
    # versions or better (the least-squares alpha is not the L1 optimum, and the mse grid refits
    # beta: v2qq came within 0.03 % once). Which of the two layer-bank networks, both near 55 %,
    # classifies better is not a property of the method: v2qq came out 3 points ahead of v2 once.
    assert l1["v2"] <= 1.001 * l1["v2qq"]
