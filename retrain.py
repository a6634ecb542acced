"""Retraining in compressed form (docs/design.md §6): what main.py's training loop runs besides plain SGD.

    python main.py digits -a resnet --layers 20 -T --ckpt ckpt_best_v2qq_q488.pth --epochs 2 --lr 0.01
    python main.py digits -a resnet --layers 20 -T --ckpt ckpt_best_v2qq_q488.pth -N -s 1 --epochs 2 --lr 0.01
    python main.py digits -a resnet --layers 20 -N -s 2 -v v2qq --epochs 8   # the "new method", from scratch
    python main.py digits -a resnet --layers 20 -T -Q --qb 4 --ckpt ckpt_best_q4.pth --epochs 2
    python main.py digits -a resnet --layers 20 --nl --nls 0.01 --wclip 3 --epochs 8

A run is one of five modes, decided by ``decide`` from the flags and the checkpoint:

* ``mess`` (``-T`` on a MESS checkpoint): every covered target conv's weight is a function of
  trainable tensors through ``torch.nn.utils.parametrize``: the bank layer's (latent) weight,
  per-vector alpha and beta, with k a fixed buffer. In q versions the forward pass sees
  ``linear_quantize`` values and the backward pass is straight-through (``ste_quantize``).
* ``free`` (``-N -s S``): covered weights train as dense floats and every S epochs (and at the
  last) the search of the version projects them into MESS form; v2f keeps k and refits only
  alpha and beta. Checkpoints are written right after each projection.
* ``quant`` (``-Q --qb B``): every conv weight on the B-bit grid through the same STE.
* ``finetune`` (``-T`` on a float checkpoint) and ``train``: plain SGD.

Every mode can add the regularizers ``--nl`` and ``--pl`` and the weight clipping ``--wclip``.
Saved checkpoints are plain state_dicts (docs/design.md §4); ``mess.validate`` checks one. The
parametrization itself is the library's (``mess/parametrize.py``); this file is the run around it.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from mess import names
from mess.bn import calibrate_bn
from mess.compress import compress, refit_fixed_k
from mess.entry import Entry
from mess.layers import plan_layers
from mess.palette import PaletteWeight, export_palette, parametrize_palette
from mess.parametrize import (
    Covered,
    MessWeight,
    clip_weights_,
    export_entry,
    latent,
    nuclear_loss,
    parametrize,
    parametrize_quant,
    pcc_loss,
    plain_state_dict,
)
from mess.quant import conv_layers, linear_quantize
from mess.settings import VERSION_SPECS, Settings, check_bits
from utils import Dist, UserError

# ---------------------------------------------------------------- what a run is, and its file names
BANK_LR_SCALE = 0.1  # bank rows' learning rate against the rest, in mess mode (param_groups)


@dataclass
class RunSpec:
    mode: str  # train | finetune | quant | palette | mess | free
    version: str | None
    prefix: str  # checkpoint names: <prefix>_epoch_N.pth, <prefix>_best.pth
    n_retrain: int = 0
    entry: Entry | None = None  # the MESS entry to start from


def _extras(args, free: bool) -> str:
    return names.extras(nl_scale=args.nl_scale if args.nuc_loss else None,
                        pl_scale=args.pl_scale if args.pcc_loss else None, wclip=args.wclip,
                        save_epoch=args.save_epoch if free else None)


def decide(args, ckpt: dict | None, path: Path | None) -> RunSpec:
    """The run's mode, version and checkpoint names from the flags and the loaded checkpoint;
    every bad combination is a one-line ``UserError``."""
    if args.wclip is not None and args.wclip <= 0:
        raise UserError(f"--wclip K clamps weights to mean +- K standard deviations; K must be positive, "
                        f"got {args.wclip:g}")
    if args.save_epoch < 1:
        raise UserError(f"-s/--save-epoch must be at least 1, got {args.save_epoch}")
    if args.retrain and not args.ckpt:
        raise UserError("-T/--retrain needs --ckpt PATH: the checkpoint to retrain")
    if args.version is not None:
        Settings.from_args(args)  # bad settings fail now, not at the first search, epochs later
    if args.quant:
        check_bits(args.qb, "--qb")
        if args.version:
            raise UserError(f"-Q (plain quantization of every conv) and -v {args.version} (MESS) exclude "
                            f"each other")
    name = path.name if path is not None else ""
    info = (ckpt or {}).get("retrain")
    if args.resume and isinstance(info, dict) and "mode" in info:
        version = info.get("version")
        if args.version and version and args.version != version:
            raise UserError(f"{name} is a {version} retraining run; it resumes with -v {version}, "
                            f"not -v {args.version}")
        entry = Entry.from_dict(ckpt["mess"]) if ckpt.get("mess") else None
        return RunSpec(info["mode"], version, info["prefix"], int(info.get("n_retrain", 0)), entry)

    if args.retrain and not args.resume:
        entry = Entry.from_dict(ckpt["mess"]) if ckpt.get("mess") else None
        if ckpt.get("palette"):
            if args.version or args.quant or args.new:
                raise UserError(f"{name} is a palettized checkpoint (quantize.py --method "
                                f"{ckpt['palette'].get('method')}); it fine-tunes its palettes with -T "
                                f"alone, without -v, -Q or -N")
            n, prefix = names.retrain_prefix(path.stem, n_prior=int(ckpt.get("n_retrain", 0)),
                                             suffix=_extras(args, False))
            return RunSpec("palette", None, prefix, n, None)
        if entry:
            version = entry.version
            if args.version and args.version != version:
                raise UserError(f"{name} is a MESS {version} checkpoint, but -v {args.version} was asked; "
                                f"retrain it with -v {version} (or without -v)")
            if args.quant:
                raise UserError(f"{name} is a MESS {version} checkpoint; it retrains in MESS form, "
                                f"without -Q")
            mode = "free" if args.new else "mess"
        else:
            if args.version:
                raise UserError(f"{name} is not a MESS checkpoint (no 'mess' entry), but -v {args.version} "
                                f"asks to retrain one; compress it first with find_similar_kernel.py -v "
                                f"{args.version}, or drop -v for plain fine-tuning")
            if args.new:
                raise UserError("-N/--new needs -v VERSION, the MESS version to search with")
            version, mode = None, "quant" if args.quant else "finetune"
        n, prefix = names.retrain_prefix(path.stem, n_prior=int(ckpt.get("n_retrain", 0)),
                                         quant_bits=args.qb if args.quant else None,
                                         suffix=_extras(args, mode == "free"))
        return RunSpec(mode, version, prefix, n, entry)

    # training from scratch (or resuming a run that has no retraining record)
    if args.new:
        if not args.version:
            raise UserError("-N/--new needs -v VERSION, the MESS version to search with every -s epochs")
        return RunSpec("free", args.version, names.new_prefix(Settings.from_args(args), _extras(args, True)))
    if args.version and not (args.nuc_loss or args.pcc_loss or args.wclip):
        raise UserError(f"-v {args.version} during training applies with -N (search every -s epochs) or "
                        f"-T (retrain a MESS checkpoint); add one of them")
    if args.quant:
        return RunSpec("quant", None, f"ckpt_q{args.qb}" + _extras(args, False))
    return RunSpec("train", args.version, "ckpt" + _extras(args, False))


# ---------------------------------------------------------------- one run's retraining state
def broadcast_from_main(make, d: Dist):
    """``make()`` on rank 0 only, its result sent to every rank (a search runs once under DDP)."""
    if not d.enabled:
        return make()
    import torch.distributed as dist
    box = [make() if d.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@dataclass
class Retrainer:
    """What the loop of main.py asks of a run besides SGD: parameter groups, the extra loss, the
    searches at epoch boundaries, which epochs save, and what a checkpoint holds."""
    args: object
    model: nn.Module  # the unwrapped model, parametrized in mess and quant modes
    spec: RunSpec
    device: torch.device
    dist: Dist = Dist()
    keys: list[str] = field(default_factory=list)  # the plain state_dict's keys, in order
    entry: Entry | None = None  # current MESS entry (mess and free modes)
    pcc_index: dict | None = None  # layer -> k for --pl
    searches: list[int] = field(default_factory=list)  # epochs after which a projection search ran
    paths: list[Covered] = field(default_factory=list)  # covered layers (regularizers, clipping)
    shadow: nn.Module | None = None  # a plain CPU copy that searches run on
    quant_layers: list[str] = field(default_factory=list)
    quant_bits: int | None = None  # -Q: the grid's bits
    palette: dict | None = None  # the palette entry (palette mode)
    bn_images: torch.Tensor | None = None  # -N: images the BatchNorms are corrected on after a projection
    bn_method: str = "correct"

    @property
    def mode(self) -> str:
        return self.spec.mode

    @property
    def version(self) -> str | None:
        return self.spec.version

    # ---- set-up
    @classmethod
    def create(cls, args, model: nn.Module, spec: RunSpec, ckpt: dict | None, device, d: Dist = Dist()):
        r = cls(args, model, spec, device, d, keys=list(model.state_dict()))
        if spec.entry is not None:
            r.entry = copy.deepcopy(spec.entry)
        info = (ckpt or {}).get("retrain") if args.resume else None
        info = info if isinstance(info, dict) else None
        if info:
            r.searches = list(info.get("searches", []))
            if info.get("pcc_index") is not None:
                r.pcc_index = dict(info["pcc_index"])
        needs_paths = args.nuc_loss or args.pcc_loss or args.wclip or spec.mode == "free"
        if spec.mode == "free" or args.pcc_loss:
            r.shadow = copy.deepcopy(model).cpu()
        if needs_paths:
            r.paths = r._covered_paths()
        if spec.mode == "mess":
            parametrize(model, r.entry)
        elif spec.mode == "palette":
            r.palette = (ckpt or {}).get("palette")
            parametrize_palette(model, r.palette)
        elif spec.mode == "quant":
            r.quant_layers = conv_layers(model)
            q = (ckpt or {}).get("quant") if args.retrain or args.resume else None
            r.quant_bits = q["bits"] if info and q else args.qb  # a resumed run keeps its grid
            scales = q["scales"] if q and q.get("bits") == r.quant_bits else None
            parametrize_quant(model, r.quant_layers, r.quant_bits, scales)
        if info and info.get("latent") is not None:
            r._load_latent(info["latent"])
        return r

    def _covered_paths(self) -> list[Covered]:
        if self.entry:
            return [Covered(p.kind, p.bank, list(p.layers), p.bind, p.transforms) for p in self.entry.paths()]
        a = self.args
        s = Settings.from_args(a, self.version or "v2")
        plans = plan_layers(self.model, a.arch, bind=s.bind, transforms=s.spec.transforms,
                            pointwise=s.pointwise, pw_bind=s.pw_bind_size, fc=s.fc)
        paths = [Covered(p.kind, p.bank, list(p.targets), p.bind, p.transforms) for p in plans.values() if p]
        if not paths:
            raise UserError(f"{a.arch} has no layer MESS covers, so --nl, --pl, --wclip and -N have nothing "
                            f"to act on")
        return paths

    def _load_latent(self, latent: dict) -> None:
        own = dict(self.model.named_parameters())
        if set(own) != set(latent):
            missing = sorted(set(own) ^ set(latent))
            raise UserError(f"the retraining state in --ckpt does not fit this run (e.g. {missing[0]})")
        with torch.no_grad():
            for name, p in own.items():
                p.copy_(latent[name])

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Trainable tensors; alpha and beta are scales of their vectors, so they get no weight decay.
        A shared bank row collects the gradients of every vector fitted to it (hundreds), so in mess
        mode the banks train at ``BANK_LR_SCALE`` of the learning rate."""
        mws = [m for m in self.model.modules() if isinstance(m, MessWeight)]
        ab = [p for m in mws for p in (m.alpha, m.beta) if p is not None]
        ab += [m.lut for m in self.model.modules() if isinstance(m, PaletteWeight)]  # values, not weights
        banks = list({id(p): p for m in mws for p in ([m.bank.weight] if m.learned else [latent(m.bank)])
                      }.values()) if self.mode == "mess" else []
        ids = {id(p) for p in ab + banks}
        rest = [p for p in self.model.parameters() if p.requires_grad and id(p) not in ids]
        groups = [{"params": rest}]
        if ab:
            groups.append({"params": ab, "weight_decay": 0.0})
        if banks:
            groups.append({"params": banks, "lr_scale": BANK_LR_SCALE})
        return groups

    def attach(self, optimizer) -> None:
        """Weight clipping after every optimizer step (``--wclip``)."""
        if self.args.wclip:
            tensors = self.clip_tensors()
            optimizer.register_step_post_hook(lambda opt, a, kw: clip_weights_(tensors, self.args.wclip))

    def clip_tensors(self) -> list[torch.Tensor]:
        """The trainable weights of the covered layers: the bank's latent weight when the targets are
        functions of it (mess mode), every conv's latent weight with -Q, else the layers themselves."""
        if self.mode == "quant":
            layers = self.quant_layers
        elif self.mode == "mess":
            layers = [p.bank for p in self.paths]
        else:
            layers = [n for p in self.paths for n in (p.bank, *p.targets)]
        return [latent(self.model.get_submodule(n)) for n in layers]

    # ---- training
    @property
    def extra_loss(self):
        a = self.args
        if not (a.nuc_loss or a.pcc_loss):
            return None
        beta = VERSION_SPECS[self.version].beta if self.version else True

        def loss():
            total = 0.0
            if a.nuc_loss:
                total = total + a.nl_scale * nuclear_loss(self.model, self.paths)
            if a.pcc_loss:
                total = total + a.pl_scale * pcc_loss(self.model, self.paths, self.index(), beta)
            return total
        return loss

    def index(self) -> dict:
        """k of every covered target vector: fixed in mess mode, from the latest search otherwise."""
        if self.entry is not None:
            return {t: code.k for _, t, code in self.entry.targets()}
        return self.pcc_index

    def boundary(self, epoch: int) -> bool:
        return epoch % self.args.save_epoch == 0 or epoch == self.args.epochs

    def start(self) -> None:
        """A search for --pl's k at training start when no checkpoint provides one."""
        if self.args.pcc_loss and self.entry is None and self.pcc_index is None:
            self.pcc_index = self._search_index()

    def end_of_epoch(self, epoch: int) -> bool:
        """At an -s boundary: the projection of -N (returns True), or a fresh k for --pl."""
        if not self.boundary(epoch):
            return False
        if self.mode == "free":
            self._project()
            self.searches.append(epoch)
            return True
        if self.args.pcc_loss and self.mode != "mess":
            self.pcc_index = self._search_index()
        return False

    def saves(self, epoch: int) -> bool:
        """-N writes checkpoints only right after a projection, so each one is in MESS form."""
        return self.mode != "free" or self.boundary(epoch)

    def _settings(self, version: str) -> Settings:
        """The search's settings: the flags', or, for a retrained checkpoint, the structure and bit
        widths it was compressed with."""
        s = Settings.from_args(self.args, version)
        return Settings.from_entry(self.entry, s).with_version(version) if self.entry else s

    def _shadow_with_weights(self) -> nn.Module:
        self.shadow.load_state_dict(plain_state_dict(self.model, self.keys))
        return self.shadow

    def _search_index(self) -> dict:
        version = self.version or "v2"

        def make():
            c = compress(self._shadow_with_weights(), self._settings(version), arch=self.args.arch,
                         device=self.device)
            return {t: code.k for _, t, code in c.entry.targets()}
        return broadcast_from_main(make, self.dist)

    def _project(self) -> None:
        """-N: the covered weights become their MESS reconstruction (on rank 0, then broadcast)."""
        def make():
            model = self._shadow_with_weights()
            if self.version == "v2f" and self.entry is not None:
                sd, entry = refit_fixed_k(model.state_dict(), self.entry)
            else:
                c = compress(model, self._settings(self.version), arch=self.args.arch, device=self.device)
                sd, entry = c.state_dict, c.entry
            out = {f"{n}.weight": sd[f"{n}.weight"] for n in entry.covered()}
            if self.bn_images is not None:  # statistics of the projected network, not of the float one
                projected = copy.deepcopy(model)
                projected.load_state_dict(sd)
                calibrate_bn(projected, self.bn_images, method=self.bn_method, reference=model)
                out.update({k: v for k, v in projected.state_dict().items() if "running_" in k})
            return out, entry

        weights, entry = broadcast_from_main(make, self.dist)
        with torch.no_grad():
            for key, value in weights.items():
                mod_name, _, attr = key.rpartition(".")
                getattr(self.model.get_submodule(mod_name), attr).copy_(value)
        if self.entry is not None and self.entry.args is not None:
            entry.args = self.entry.args
        self.entry = entry

    # ---- checkpoints
    def summary_name(self) -> str:
        return names.summary_file(self.spec.prefix)

    def file_names(self, epoch: int) -> tuple[str, str]:
        return names.epoch_file(self.spec.prefix, epoch), names.best_file(self.spec.prefix)

    def state(self) -> dict:
        """What a checkpoint holds besides epoch, optimizer, schedule, flags and RNG: the plain
        weights, the ``mess``/``quant`` entry, and under ``retrain`` what an exact resume needs."""
        parametrized = self.mode in ("mess", "quant", "palette")
        out = {"model": plain_state_dict(self.model, self.keys) if parametrized else self.model.state_dict()}
        if self.mode == "palette":
            out["palette"] = export_palette(self.model)
        if self.mode == "mess":
            out["mess"] = export_entry(self.model, self.entry).to_dict()
        elif self.mode == "free":
            out["mess"] = self.entry.to_dict()
        elif self.mode == "quant":
            out["quant"] = {"bits": self.quant_bits, "scales": {
                n: linear_quantize(latent(self.model.get_submodule(n)), self.quant_bits)[1]
                for n in self.quant_layers}}
        if self.mode == "train" and self.spec.prefix == "ckpt":
            return out  # plain training: the checkpoint of the foundation, unchanged
        out["n_retrain"] = self.spec.n_retrain
        out["retrain"] = {
            "mode": self.mode, "version": self.version, "prefix": self.spec.prefix,
            "n_retrain": self.spec.n_retrain, "searches": list(self.searches),
            "pcc_index": None if self.pcc_index is None else dict(self.pcc_index),
            # the float tensors behind quantized or reconstructed weights, for -R
            "latent": {n: p.detach().to("cpu", copy=True) for n, p in self.model.named_parameters()}
            if parametrized else None,
        }
        return out
