"""Every CLI's -h: one spelling of "default:", required flags said to be required, and quantize.py's
help only with the flags quantize.py reads (docs/usage.md, "Compressing")."""
import importlib
import re

import pytest
from conftest import run_cli

import config

CLIS = ("main.py", "find_similar_kernel.py", "quantize.py", "packed.py", "check_model_params.py",
        "plot_summary.py", "down_ckpt.py", "down_imagenet.py", "torchvision_to_ours.py")
# what each tool refuses to run without, though argparse does not (the tool says why in its own message)
CHECKED_BY_THE_TOOL = {"find_similar_kernel.py": {"ckpt"}, "quantize.py": {"ckpt"}, "packed.py": {"ckpt"}}
# the flags of the MESS search that plain quantization has no use for
MESS_ONLY = ("--qba", "--qbb", "-d N", "--bind-size", "-pwd", "--pw-bind-size", "--np", "-v V", "--version",
             "-Q", "--quant ", "--fc", "--bank", "--grid")


def parser_of(script):
    module = importlib.import_module("config" if script == "main.py" else script.removesuffix(".py"))
    return module.get_args_parser()


@pytest.mark.parametrize("script", CLIS)
def test_help_runs_and_spells_default_one_way(script):
    rc, out, err = run_cli(script, "-h")
    assert rc == 0 and err == "", err
    assert out.startswith(f"usage: {script}")
    assert "Default:" not in out and "defualt" not in out.lower()
    assert "(default:" in out or script == "plot_summary.py" and "default: curves.png" in out


@pytest.mark.parametrize("script", CLIS)
def test_required_flags_say_so_and_only_they(script):
    must = CHECKED_BY_THE_TOOL.get(script, set())
    for action in parser_of(script)._actions:
        if not action.help or action.dest == "help":
            continue
        required = action.required or action.dest in must
        says = "(required)" in action.help
        assert says == required, (script, action.dest, action.help)
        if says:  # a required flag has no default to name
            assert "default" not in action.help.lower(), (script, action.dest, action.help)


def test_positional_data_is_required_where_argparse_requires_it():
    main_help = " ".join(config.get_args_parser().format_help().split())
    assert "DATA dataset: cifar10 | cifar100 | digits | imagenet | tinyimagenet (required)" in main_help
    down = " ".join(parser_of("down_ckpt.py").format_help().split())
    assert "[DATA]" in down and "(required)" not in down  # down_ckpt.py --list needs no DATA


def test_quantize_help_lists_only_its_flags():
    text = parser_of("quantize.py").format_help()
    for flag in MESS_ONLY:
        assert flag not in text, flag
    for flag in ("--ckpt PATH", "--qb N", "--method", "--granularity", "--bn-calib", "--bn-images",
                 "-a ARCH", "--layers", "--width-mult", "--datapath", "-C", "-g GPUIDS"):
        assert flag in text, flag
    assert re.search(r"--ckpt PATH [^-]*\(required\)", " ".join(text.split()))


def test_quantize_refuses_the_search_flags(tmp_path):
    # dropped flags are an argparse error (one line, exit 2); -v keeps its pointer to the right tool
    rc, _, err = run_cli("quantize.py", "digits", "--ckpt", "x.pth", "--qba", "4", cwd=tmp_path)
    assert rc == 2 and err.strip() == "quantize.py: error: unrecognized arguments: --qba 4"
    args = parser_of("quantize.py").parse_args(["digits", "--ckpt", "x.pth", "-Q", "-v", "v2qq"])
    assert args.quant and args.version == "v2qq"  # parsed, so main can name find_similar_kernel.py
