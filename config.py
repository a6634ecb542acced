"""Command-line configuration shared by main.py and the compression tools.

    python main.py cifar10 -a mobilenet -C -g 0 1 -b 256
    python main.py -h
"""
from __future__ import annotations

import argparse
import math
import re
import sys

from mess.settings import VERSIONS
from models import DATASET_FAMILY, default_depth, list_models, supported_depths

DATASETS = tuple(DATASET_FAMILY)

class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr (no usage dump), exit code 2, and whose namespaces
    know which flags the command line gave (``given_flags``): -R takes the others from the run."""

    def error(self, message):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)

    def _add_action(self, action):
        # what argparse itself requires (a positional DATA, SOURCE) says so in -h, as mark_required's flags do
        if action.required:
            _say_required(action)
        return super()._add_action(action)

    def mark_required(self, *dests: str) -> OneLineParser:
        """-h says "(required)", in place of the shared help's default, for the flags a tool checks it was
        given itself (the compressors' --ckpt: their own message says what the file is for)."""
        for action in self._actions:
            if action.dest in dests:
                _say_required(action)
        return self

    def parse_known_args(self, args=None, namespace=None):
        ns, rest = super().parse_known_args(args, namespace)
        saved = {a.dest: a.default for a in self._actions}
        try:  # parsed again with no defaults: what is left was typed
            for a in self._actions:
                a.default = argparse.SUPPRESS
            typed, _ = super().parse_known_args(args, None)
        finally:
            for a in self._actions:
                a.default = saved[a.dest]
        setattr(ns, GIVEN, frozenset(vars(typed)))
        if getattr(ns, "layers", 0) is None and hasattr(ns, "arch"):  # the architecture's own depth
            ns.layers = default_depth(ns.arch, getattr(ns, "dataset", ""))
        return ns, rest


GIVEN = "_given_flags"
_DEFAULT = re.compile(r"\s*\(default: [^()]*\)$")


def _say_required(action) -> None:
    if action.help and action.help != argparse.SUPPRESS and "(required)" not in action.help:
        action.help = _DEFAULT.sub("", action.help) + " (required)"


def given_flags(args) -> frozenset | None:
    """The dests the command line gave explicitly; None for a namespace built otherwise (the API)."""
    return getattr(args, GIVEN, None)


def _flag(*names, **kw):
    return names, kw


def _number(kind, low=None, high=None, *, low_open=False, high_open=False):
    """An argparse ``type`` that takes finite numbers in [low, high] only (open ends where told):
    NaN or inf would train an all-NaN network, an out-of-range value fails deep inside torch."""
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            what_kind = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what_kind}") from None
        if kind is float and not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number")
        too_low = low is not None and (v <= low if low_open else v < low)
        too_high = high is not None and (v >= high if high_open else v > high)
        if too_low or too_high:
            lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
            hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
            raise argparse.ArgumentTypeError(f"{text} is out of range: it must be "
                                             f"{' and '.join(x for x in (lo, hi) if x)}")
        return v
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def _depth_defaults() -> str:
    """``resnet 20 (imagenet 18), ...``: each architecture's default depth, for --layers's help."""
    out = []
    for arch in list_models():
        cifar, imagenet = default_depth(arch, "cifar10"), default_depth(arch, "imagenet")
        if supported_depths(arch, "cifar10") or supported_depths(arch, "imagenet"):
            out.append(f"{arch} {cifar}" + (f" (imagenet {imagenet})" if imagenet != cifar
                                             and supported_depths(arch, "imagenet") else ""))
    return ", ".join(out)


POSITIVE, NONNEGATIVE = _number(float, 0, low_open=True), _number(float, 0)
FRACTION = _number(float, 0, 1, high_open=True)  # momentum
WIDTH = _number(float, 0, 64, low_open=True)  # --width-mult: beyond 64 no model of this suite fits in memory
SEED = _number(int, -2**63, 2**64 - 1)  # what torch.manual_seed takes


# Every flag once, with the original's spellings, defaults and help; tools pick what they need.
FLAGS = {
    "dataset": _flag("dataset", metavar="DATA",
                     help=f"dataset: {' | '.join(DATASETS)}"),
    "arch": _flag("-a", "--arch", metavar="ARCH", default="mobilenet",
                  help=f"model architecture: {' | '.join(list_models())} (default: mobilenet; with --ckpt "
                       f"the checkpoint's own, and -a, --layers, --width-mult, --bn, when given, must "
                       f"agree with it)"),
    "workers": _flag("-j", "--workers", type=int, default=8, metavar="N",
                     help="number of data loading workers (default: 8)"),
    "epochs": _flag("--epochs", type=int, default=200, metavar="N",
                    help="number of total epochs to run (default: 200)"),
    "batch_size": _flag("-b", "--batch-size", dest="batch_size", type=int, default=128, metavar="N",
                        help="mini-batch size (default: 128), this is the total batch size of all "
                             "GPUs on the current node when using Data Parallel"),
    # the original's help said "defualt: 0.1" here (its README copies it); the typo is fixed, nothing else
    "lr": _flag("--lr", "--learning-rate", dest="lr", type=POSITIVE, default=None, metavar="LR",
                help="initial learning rate (default: 0.1; with -T 0.001, a fine-tuning rate: 0.01 and "
                     "more undo what the compressed weights keep; a MESS bank trains at a tenth of it; "
                     "with -R the resumed run's)"),
    "momentum": _flag("--momentum", type=FRACTION, default=0.9, metavar="M", help="momentum (default: 0.9)"),
    "weight_decay": _flag("--wd", "--weight-decay", dest="weight_decay", type=NONNEGATIVE, default=5e-4,
                          metavar="W", help="weight decay (default: 5e-4)"),
    "layers": _flag("--layers", type=int, default=None, metavar="N",
                    help=f"number of layers in VGG/ResNet/WideResNet (default: {_depth_defaults()}; "
                         f"mobilenet and mobilenetv2 have no depth)"),
    "bn": _flag("--bn", "--batch-norm", dest="bn", action="store_true", help="Use batch norm in VGG?"),
    "width_mult": _flag("--width-mult", dest="width_mult", type=WIDTH, default=1.0, metavar="WM",
                        help="width multiplier to thin a network uniformly at each layer (default: 1.0)"),
    "groups": _flag("--groups", type=int, default=1, metavar="N",
                    help="number of groups for ShuffleNet (kept for compatibility; only 1) (default: 1)"),
    "print_freq": _flag("-p", "--print-freq", dest="print_freq", type=int, default=100, metavar="N",
                        help="print frequency (default: 100)"),
    "ckpt": _flag("--ckpt", default="", metavar="PATH",
                  help="checkpoint (.pth) or packed file (.mess) to resume, test or retrain from: a path "
                       "from anywhere, or a file name looked up in the run's checkpoint folder; the model "
                       "is the one it holds (default: none)"),
    "resume": _flag("-R", "--resume", action="store_true", help="Resume model?"),
    "evaluate": _flag("-E", "--evaluate", action="store_true", help="Test model?"),
    "cuda": _flag("-C", "--cuda", action="store_true", help="Use cuda?"),
    "retrain": _flag("-T", "--retrain", action="store_true", help="Retraining?"),
    "gpuids": _flag("-g", "--gpuids", type=int, nargs="+", default=[0], metavar="GPUIDS",
                    help="GPU IDs for using (default: 0)"),
    "datapath": _flag("--datapath", default="../data", metavar="PATH",
                      help="where you want to load/save your dataset? (default: ../data)"),
    "version": _flag("-v", "--version", default=None, metavar="V",
                     help=f"version: {' | '.join(VERSIONS)} (find kernel version (default: none))"),
    "bind_size": _flag("-d", "--bind-size", dest="bind_size", type=int, default=2, metavar="N",
                       help="the number of binding channels in convolution (subvector size) "
                            "on version 2.5 (v2.5) (default: 2)"),
    "pw_bind_size": _flag("-pwd", "--pw-bind-size", dest="pw_bind_size", type=int, default=8, metavar="N",
                          help="the number of binding channels in pointwise convolution "
                               "(subvector size) (default: 8)"),
    "new": _flag("-N", "--new", action="store_true", help="new method?"),
    "save_epoch": _flag("-s", "--save-epoch", dest="save_epoch", type=int, default=1, metavar="N",
                        help="number of epochs to save checkpoint and to apply new method (default: 1)"),
    "nuc_loss": _flag("--nl", "--nuc-loss", dest="nuc_loss", action="store_true", help="nuclear norm loss?"),
    "nl_scale": _flag("--nls", "--nl-scale", dest="nl_scale", type=NONNEGATIVE, default=1.0, metavar="NLS",
                      help="scale factor of nuc_loss (default: 1.0)"),
    "pcc_loss": _flag("--pl", "--pcc-loss", dest="pcc_loss", action="store_true",
                      help="pearson correlation coefficient loss?"),
    "pl_scale": _flag("--pls", "--pl-scale", dest="pl_scale", type=NONNEGATIVE, default=1.0, metavar="PLS",
                      help="scale factor of pcc_loss (default: 1.0)"),
    "quant": _flag("-Q", "--quant", action="store_true", help="use quantization?"),
    "np": _flag("--np", action="store_true", help="no v2-like method in pointwise convolutional layer?"),
    "fc": _flag("--fc", action="store_true",
                help="also cover fully connected layers on the pointwise path: rows cut in chunks of -pwd, "
                     "matched against the pointwise bank, or the first FC layer's windows when there is no "
                     "1x1 conv (or with --np) (default: off)"),
    "qb": _flag("--qb", "--quant-bit", dest="qb", type=int, default=8, metavar="N",
                help="number of bits for quantization (default: 8)"),
    "qba": _flag("--qba", "--quant_bit_a", dest="qba", type=int, default=8, metavar="N",
                 help="number of bits for quantizing alphas (default: 8)"),
    "qbb": _flag("--qbb", "--quant_bit_b", dest="qbb", type=int, default=8, metavar="N",
                 help="number of bits for quantizing betas (default: 8)"),
    # ---- new in this suite
    "bank": _flag("--bank", default="layer", choices=("layer", "learned"),
                  help="where the bank comes from: layer (the bank layer's own vectors, the original's) | "
                       "learned (--bank-size vectors fitted to the covered kernels, stored once at --qb "
                       "bits) (default: layer)"),
    "bank_size": _flag("--bank-size", dest="bank_size", type=int, default=256, metavar="N",
                       help="rows of a learned bank, before v3's 8 transforms (default: 256)"),
    "grid": _flag("--grid", default="mse", choices=("mse", "minmax"),
                  help="grid of alphas and betas (and of a learned bank): mse (symmetric, clipped where the "
                       "squared error is least; betas refitted to the quantized alphas) | minmax (the "
                       "original's max - min grid) (default: mse)"),
    "method": _flag("--method", default="linear", choices=("linear", "kmeans", "vq"),
                    help="quantize.py: linear (every conv on a --qb-bit grid, the original's baseline) | "
                         "kmeans (a LUT of 2^qb float16 values fitted by k-means, see --granularity) | vq "
                         "(per 3x3 layer a codebook of 2^qb float16 3x3 kernels) (default: linear)"),
    "granularity": _flag("--granularity", default="tensor", choices=("tensor", "channel"),
                         help="quantize.py --method kmeans: one LUT per layer (tensor) or per output channel "
                              "(default: tensor)"),
    "bn_calib": _flag("--bn-calib", dest="bn_calib", default="correct",
                      choices=("correct", "reestimate", "off"),
                      help="after compressing, bring the BatchNorm running statistics up to date on "
                           "--bn-images augmented training images: correct (shift and scale them by what "
                           "the compression changed against the float network) | reestimate (recompute "
                           "them from the compressed network) | off (default: correct)"),
    "bn_images": _flag("--bn-images", dest="bn_images", type=int, default=1024, metavar="N",
                       help="training images for --bn-calib (default: 1024)"),
    "wclip": _flag("--wclip", dest="wclip", type=POSITIVE, default=None, metavar="K",
                   help="after each optimizer step clamp each covered layer's weights to their mean +- K "
                        "standard deviations (the original's TODO; default: off)"),
    "seed": _flag("--seed", type=SEED, default=0, metavar="N",
                  help="random seed; a fixed seed makes a CPU run repeatable (default: 0)"),
    "sched": _flag("--sched", default="step", metavar="S",
                   help="learning-rate schedule: step (x0.1 at 50%% and 75%% of --epochs, the "
                        "original's) | cosine (default: step)"),
    "amp": _flag("--amp", default="off", choices=("off", "bf16", "fp16"),
                 help="mixed precision on CUDA: off | bf16 | fp16 (with a GradScaler); no effect on "
                      "CPU (default: off)"),
    "channels_last": _flag("--channels-last", dest="channels_last", action="store_true",
                           help="channels-last memory format on CUDA; no effect on CPU"),
    "pin_memory": _flag("--pin-memory", dest="pin_memory", action="store_true",
                        help="pinned host memory and non-blocking copies on CUDA; no effect on CPU"),
    "persistent_workers": _flag("--persistent-workers", dest="persistent_workers", action="store_true",
                                help="keep data-loading workers alive between epochs (with -j > 0)"),
    # ---- the run's folder (run_folder.py) and -R (resume.py)
    "ckpt_dir": _flag("--ckpt-dir", dest="ckpt_dir", default=None, metavar="DIR",
                      help="where the run writes its checkpoints and summary, and where a bare --ckpt name "
                           "is looked up (default: checkpoint/<model>/<dataset>)"),
    "overwrite": _flag("--overwrite", action="store_true",
                       help="train from scratch into a folder that holds an earlier run of the same names: "
                            "its epoch files are removed, its best file replaced (default: such a run is "
                            "refused)"),
    "change_flags": _flag("--change-flags", dest="change_flags", action="store_true",
                          help="with -R: resume with flags that differ from the run's own (each is named); "
                               "without it -R refuses them and takes the run's own for flags not given"),
    # ---- experiment records (tracking.py)
    "mongo_url": _flag("--mongo-url", dest="mongo_url", default=None, metavar="URL",
                       help="also record the run in MongoDB for Omniboard, e.g. mongodb://127.0.0.1:27017 "
                            "(default: $SACRED_MONGO_URL, else runs/ only)"),
    "mongo_db": _flag("--mongo-db", dest="mongo_db", default=None, metavar="NAME",
                      help="MongoDB database of --mongo-url (default: sacred)"),
    "no_track": _flag("--no-track", dest="no_track", action="store_true",
                      help="record nothing (default: every run is recorded under runs/<id>/)"),
}

MODEL_FLAGS = ("dataset", "arch", "layers", "bn", "width_mult", "datapath", "ckpt", "cuda", "gpuids")
MESS_FLAGS = ("version", "bind_size", "pw_bind_size", "quant", "np", "qb", "qba", "qbb")
BANK_FLAGS = ("bank", "bank_size", "grid")  # the search's new options (find_similar_kernel.py, -N)
BN_FLAGS = ("bn_calib", "bn_images")  # BatchNorm calibration after compressing (mess.bn)
TRACK_FLAGS = ("mongo_url", "mongo_db", "no_track")  # experiment records (tracking.py)


def add_flags(parser: argparse.ArgumentParser, names) -> argparse.ArgumentParser:
    for name in names:
        flags, kw = FLAGS[name]
        parser.add_argument(*flags, **kw)
    return parser


def get_args_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="main.py", description="Train, resume, test or retrain a network.")
    # the original's order, so that the usage text reads the same
    return add_flags(parser, (
        "dataset", "arch", "workers", "epochs", "batch_size", "lr", "momentum", "weight_decay",
        "layers", "bn", "width_mult", "groups", "print_freq", "ckpt", "resume", "evaluate", "cuda",
        "retrain", "gpuids", "datapath", "version", "bind_size", "pw_bind_size", "new", "save_epoch",
        "nuc_loss", "nl_scale", "pcc_loss", "pl_scale", "quant", "np", "qb", "qba", "qbb", "wclip",
        "seed", "sched", "amp", "channels_last", "pin_memory", "persistent_workers") + BANK_FLAGS + BN_FLAGS
        + ("ckpt_dir", "overwrite", "change_flags") + TRACK_FLAGS)
