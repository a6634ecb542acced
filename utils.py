"""Shared helpers: user errors, checkpoints, devices, meters and RNG state."""
from __future__ import annotations

import csv
import os
import random
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

CKPT_ROOT = Path("checkpoint")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class UserError(Exception):
    """A mistake of the user's (bad flag, missing file): one line on stderr, exit code 2."""


def run_cli(main, parser, argv=None):
    """Parse ``argv`` and run ``main(args)``, turning a ``UserError`` into exit code 2."""
    args = parser.parse_args(argv)
    try:
        return main(args)
    except UserError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        sys.exit(2)


# ---------------------------------------------------------------- checkpoints
def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model under DataParallel / DDP / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def clean_state_dict(state_dict: dict) -> dict:
    """Strip the ``module.`` / ``_orig_mod.`` prefixes wrappers add to keys."""
    out = {}
    for k, v in state_dict.items():
        changed = True
        while changed:
            changed = False
            for p in _WRAPPER_PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def atomic_write(path, write_fn):
    """Call ``write_fn(tmp_path)`` then rename onto ``path``: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write_fn(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(obj: dict, path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_checkpoint(path) -> dict:
    """Load a checkpoint safely (``weights_only=True``) onto the CPU, or raise ``UserError``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, or not a torch file at all
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Weights only load failed" in str(e):
            # torch's own hint (reload with weights_only=False) is unsafe advice for a file from elsewhere
            first = "it holds Python objects besides tensors and is not loaded, for safety"
        raise UserError(f"cannot read checkpoint {path}: {first}") from None
    if isinstance(ckpt, dict) and "model" not in ckpt and ckpt and all(
            isinstance(v, torch.Tensor) for v in ckpt.values()):
        ckpt = {"model": ckpt}  # a bare state_dict
    if isinstance(ckpt, dict) and "model" not in ckpt and isinstance(ckpt.get("state_dict"), dict):
        ckpt["model"] = ckpt.pop("state_dict")  # {"state_dict", "best_prec1"}: akamaster's .th files
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise UserError(f"{path} is not a model checkpoint (no 'model' state_dict)")
    ckpt["model"] = clean_state_dict(ckpt["model"])
    return ckpt


def arch_spec(args, num_classes: int) -> dict:
    """What rebuilds the model (DESIGN.md section 4)."""
    return {"arch": args.arch, "layers": int(args.layers), "width_mult": float(args.width_mult),
            "bn": bool(args.bn), "dataset": args.dataset, "num_classes": int(num_classes)}


def ckpt_dir_of(spec: dict) -> Path:
    """A run's checkpoint folder: ``checkpoint/<model>/<dataset>`` (the original's layout)."""
    from models import model_name
    name = model_name(spec["arch"], spec["layers"], spec["width_mult"], spec["bn"])
    return CKPT_ROOT / name / spec["dataset"]


def build_model_from_args(args):
    """``(model, spec, ckpt_dir)`` for the model the flags describe; a bad spec is a ``UserError``."""
    import models
    try:
        model = models.build_model(args.arch, args.dataset, args.layers, args.width_mult, args.bn)
    except models.ModelError as e:
        raise UserError(str(e)) from None
    num_classes = [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features
    spec = arch_spec(args, num_classes)
    return model, spec, ckpt_dir_of(spec)


def check_arch(ckpt: dict, spec: dict, path) -> None:
    """Refuse a checkpoint of another architecture, naming both."""
    theirs = ckpt.get("arch")
    if not theirs:
        return
    keys = ("arch", "layers", "width_mult", "bn", "num_classes")
    from models import model_name

    def name(d):
        arch = model_name(d["arch"], d["layers"], d["width_mult"], d["bn"])
        return f"{arch} with {d['num_classes']} classes"

    if any(theirs.get(k) != spec.get(k) for k in keys if k in theirs):
        raise UserError(f"{path} holds a {name(theirs)}, but this run builds a {name(spec)}")


def load_state_dict_checked(model: nn.Module, state_dict: dict, path) -> None:
    """Load weights, turning a key or shape mismatch into a one-line ``UserError``."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    bad_shape = [k for k in own if k in state_dict and own[k].shape != state_dict[k].shape]
    if missing or unexpected or bad_shape:
        what = []
        if missing:
            what.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            what.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if bad_shape:
            k = bad_shape[0]
            what.append(f"{len(bad_shape)} shape mismatches (e.g. {k}: "
                        f"{tuple(state_dict[k].shape)} vs {tuple(own[k].shape)})")
        raise UserError(f"{path} does not fit this model: {'; '.join(what)}")
    model.load_state_dict(state_dict)


def resolve_ckpt(ckpt: str, ckpt_dir: Path) -> Path:
    """``--ckpt`` as given if that file exists, else inside the run's checkpoint folder."""
    p = Path(ckpt)
    if p.is_file() or p.is_absolute() or len(p.parts) > 1:
        return p
    return ckpt_dir / p


def append_csv(path, rows: list[dict], fieldnames=None) -> None:
    """Append rows to a CSV table, writing its header when the file is new."""
    path = Path(path)
    new = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fieldnames or list(rows[0]))
        if new:
            w.writeheader()
        w.writerows(rows)


# ---------------------------------------------------------------- devices
@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 when not launched by torchrun)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(cuda: bool) -> Dist:
    """Join the process group torchrun describes in the environment (nccl on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist
    d = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if cuda and torch.cuda.is_available():
            torch.cuda.set_device(d.local_rank)
        dist.init_process_group(backend="nccl" if cuda and torch.cuda.is_available() else "gloo")
    return d


def all_reduce_sum(values: list, device, d: Dist) -> list:
    """Sum numbers across ranks (identity in a single process)."""
    if not d.enabled:
        return list(values)
    import torch.distributed as dist
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def select_device(cuda: bool, gpuids, d: Dist = Dist()) -> torch.device:
    if not cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("-C/--cuda asked for, but no CUDA device is available (drop -C to run on CPU)")
    n = torch.cuda.device_count()
    if d.enabled:  # torchrun: one GPU per process, chosen by LOCAL_RANK
        torch.cuda.set_device(d.local_rank)
        return torch.device(f"cuda:{d.local_rank}")
    bad = [g for g in gpuids if g < 0 or g >= n]
    if bad:
        raise UserError(f"GPU id(s) {bad} do not exist; this machine has {n} GPU(s): 0..{n - 1}")
    torch.cuda.set_device(gpuids[0])
    return torch.device(f"cuda:{gpuids[0]}")


def wrap_model(model: nn.Module, device: torch.device, gpuids, d: Dist = Dist()) -> nn.Module:
    """Move to ``device``; DDP under torchrun, DataParallel for several ``-g`` ids (the original's)."""
    model = model.to(device)
    if d.enabled:
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if device.type == "cuda" and len(gpuids) > 1:
        model = nn.DataParallel(model, device_ids=list(gpuids), output_device=gpuids[0])
    return model


# ---------------------------------------------------------------- RNG
def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": _np_state_to_tensors(np.random.get_state()),
             "python": _py_state_to_tensor(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(_np_state_from_tensors(state["numpy"]))
    random.setstate(_py_state_from_tensor(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"][: torch.cuda.device_count()]
        for i, s in enumerate(cuda_states):
            torch.cuda.set_rng_state(s, i)


# weights_only loading accepts tensors and plain containers, so RNG states are stored as tensors.
def _np_state_to_tensors(st):
    return {"keys": torch.from_numpy(st[1].astype(np.int64)), "pos": int(st[2]),
            "has_gauss": int(st[3]), "gauss": float(st[4])}


def _np_state_from_tensors(d):
    return ("MT19937", d["keys"].numpy().astype(np.uint32), d["pos"], d["has_gauss"], d["gauss"])


def _py_state_to_tensor(st):
    return {"version": st[0], "state": torch.tensor(st[1], dtype=torch.int64),
            "gauss": st[2] if st[2] is not None else None}


def _py_state_from_tensor(d):
    return (d["version"], tuple(int(x) for x in d["state"].tolist()), d["gauss"])


# ---------------------------------------------------------------- metrics
def accuracy(output: torch.Tensor, target: torch.Tensor, topk=(1,)) -> list[float]:
    """Number of correct predictions among the top-k, for each k."""
    maxk = min(max(topk), output.size(1))
    pred = output.topk(maxk, 1, True, True).indices
    correct = pred.eq(target.view(-1, 1))
    return [correct[:, :min(k, maxk)].any(1).sum().item() for k in topk]
