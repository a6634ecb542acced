"""Shared helpers: user errors, checkpoints, devices, meters and RNG state."""
from __future__ import annotations

import csv
import os
import random
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from mess.checkpoint import (  # noqa: F401  (the CLIs' one import of them)
    atomic_write,
    clean_state_dict,
    load_checkpoint,
    load_state_dict_checked,
    save_checkpoint,
    unwrap_model,
)
from mess.errors import UserError
from mess.packed_format import SUFFIX as PACKED_SUFFIX
from mess.packed_read import read_arch, read_mess

CKPT_ROOT = Path("checkpoint")


def run_cli(main, parser, argv=None):
    """Parse ``argv`` and run ``main(args)``: a ``UserError`` or a file-system error (disk full, read-only
    folder) is one line on stderr and exit code 2; Ctrl-C one line, then the process ends by SIGINT (exit
    130) so that a calling shell loop stops too. Files already written stay whole either way (each is
    written to a temporary file, then renamed)."""
    args = parser.parse_args(argv)
    # SIGTERM (kill, a scheduler's stop) unwinds like Ctrl-C, so that a file being written is removed
    # rather than left as a hidden temporary one
    signal.signal(signal.SIGTERM, _terminated)
    try:
        return main(args)
    except UserError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # after the up-front checks (check_output_folder): the disk filled up meanwhile
        print(f"{parser.prog}: error: {os_error_line(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted; the last checkpoint written is whole (-R resumes from it)",
              file=sys.stderr)
        sys.stdout.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        sys.exit(130)  # where the signal did not end the process


def _terminated(signum, frame):
    print("terminated (SIGTERM); the last checkpoint written is whole", file=sys.stderr)
    sys.exit(128 + signal.SIGTERM)


def os_error_line(e: OSError) -> str:
    """``[Errno 28] No space left on device: 'x'`` as ``x: no space left on device``."""
    what = (e.strerror or str(e)).rstrip(".")
    what = what[:1].lower() + what[1:]
    return f"{e.filename}: {what}" if e.filename else what


# ---------------------------------------------------------------- checkpoints
def arch_spec(args, num_classes: int) -> dict:
    """What rebuilds the model (docs/design.md §4)."""
    return {"arch": args.arch, "layers": int(args.layers), "width_mult": float(args.width_mult),
            "bn": bool(args.bn), "dataset": args.dataset, "num_classes": int(num_classes)}


def ckpt_dir_of(spec: dict) -> Path:
    """A run's checkpoint folder: ``checkpoint/<model>/<dataset>`` (the original's layout)."""
    from models import model_name
    name = model_name(spec["arch"], spec["layers"], spec["width_mult"], spec["bn"])
    return CKPT_ROOT / name / spec["dataset"]


def fill_depth(args):
    """``args`` with --layers the architecture's default depth where not set: a namespace built without
    the parser (which sets it)."""
    if args.layers is None:
        import models
        args.layers = models.default_depth(args.arch, args.dataset)
    return args


def build_model_from_args(args):
    """``(model, spec, ckpt_dir)`` for the model the flags describe; a bad spec is a ``UserError``."""
    import models
    fill_depth(args)
    try:
        model = models.build_model(args.arch, args.dataset, args.layers, args.width_mult, args.bn)
    except models.ModelError as e:
        raise UserError(str(e)) from None
    num_classes = [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features
    spec = arch_spec(args, num_classes)
    return model, spec, ckpt_dir_of(spec)


ARCH_DESTS = ("arch", "layers", "width_mult", "bn")  # the flags a checkpoint's ``arch`` entry answers


def arch_flags(spec: dict) -> str:
    """The command-line flags that build ``spec``'s network: ``-a resnet --layers 20 --width-mult 0.5``."""
    import models
    out = f"-a {spec['arch']}"
    if models.uses_depth(spec["arch"]):
        out += f" --layers {spec['layers']}"
    if spec.get("width_mult", 1.0) != 1.0:
        out += f" --width-mult {spec['width_mult']:g}"
    if spec.get("bn") and models.uses_bn_flag(spec["arch"]):
        out += " --bn"
    return out


def _differs(dest: str, ours, theirs: dict) -> bool:
    """Whether a model flag builds another network than the checkpoint's (a depth or --bn that the
    architecture ignores builds the same)."""
    import models
    if dest == "layers" and not models.uses_depth(theirs["arch"]):
        return False
    if dest == "bn" and not models.uses_bn_flag(theirs["arch"]):
        return False
    if dest == "width_mult":
        return float(ours) != float(theirs[dest])
    return ours != theirs[dest]


def adopt_arch(args, ckpt: dict, path) -> None:
    """The model flags become the network ``ckpt`` declares (its ``arch`` entry), so that a checkpoint or
    .mess file given by path rebuilds its own model; a model flag the command line gave must agree, and a
    disagreement names the flags that would. A checkpoint that declares nothing (a published file) is
    left to the flags."""
    theirs = ckpt.get("arch")
    if not isinstance(theirs, dict) or any(k not in theirs for k in ARCH_DESTS):
        return
    from config import given_flags
    given = given_flags(args)
    given = set(ARCH_DESTS) if given is None else given  # a namespace of the API: every flag counts
    wrong = [d for d in ARCH_DESTS if d in given and _differs(d, getattr(args, d), theirs)]
    if wrong:
        from models import model_name
        ours = {d: getattr(args, d) for d in ARCH_DESTS}
        raise UserError(f"{path} holds a {model_name(**{k: theirs[k] for k in ARCH_DESTS})}, but "
                        f"{arch_flags(ours)} builds a {model_name(**ours)}; give {arch_flags(theirs)}, or "
                        f"no architecture flags: the checkpoint names its own")
    for d in ARCH_DESTS:
        setattr(args, d, theirs[d])


def check_arch(ckpt: dict, spec: dict, path) -> None:
    """Refuse a checkpoint of another architecture, naming both and the flags that build its own."""
    theirs = ckpt.get("arch")
    if not theirs:
        return
    keys = ("arch", "layers", "width_mult", "bn", "num_classes")
    from models import model_name

    def name(d):
        arch = model_name(d["arch"], d["layers"], d["width_mult"], d["bn"])
        return f"{arch} with {d['num_classes']} classes"

    if any(theirs.get(k) != spec.get(k) for k in keys if k in theirs):
        hint = f"; give {arch_flags(theirs)}" if all(k in theirs for k in ARCH_DESTS) else ""
        raise UserError(f"{path} holds a {name(theirs)}, but this run builds a {name(spec)}{hint}")
    # equal shapes, other classes: a network of one data set scores by chance on another's labels
    if theirs.get("dataset") and spec.get("dataset") and theirs["dataset"] != spec["dataset"]:
        raise UserError(f"{path} was trained on {theirs['dataset']}, but this run is on {spec['dataset']}; "
                        f"give {theirs['dataset']} as the data set")


def resolve_ckpt(ckpt: str, ckpt_dir: Path) -> Path:
    """``--ckpt`` as given if that file exists (a path from anywhere), else inside the run's checkpoint
    folder; a file in neither place is a ``UserError`` that names the paths looked at."""
    p = Path(ckpt).expanduser()
    if p.is_file():
        return p
    if p.is_absolute() or len(p.parts) > 1:
        tried = [p]
    else:
        tried = [p, ckpt_dir / p]
        if tried[1].is_file():
            return tried[1]
    where = " nor ".join(str(t.absolute()) for t in tried)
    raise UserError(f"checkpoint not found: {ckpt} (neither {where} exists)" if len(tried) > 1 else
                    f"checkpoint not found: {p.absolute()}")


def find_ckpt(args, folder: Path | None = None) -> Path:
    """``--ckpt`` as ``resolve_ckpt`` finds it, a bare name in ``folder`` (--ckpt-dir) or else the model
    flags' folder; there, a bare name the command line gave no architecture for is also looked for in
    every model's folder of the data set (``checkpoint/*/<dataset>/NAME``), so that the checkpoint can
    name its model: one match is taken, several are a ``UserError`` listing them."""
    search = folder is None
    try:
        return resolve_ckpt(args.ckpt, folder or ckpt_dir_of(vars(fill_depth(args))))
    except UserError:
        from config import given_flags
        given = given_flags(args)
        if not search or len(Path(args.ckpt).parts) > 1 or given is None or "arch" in given:
            raise
        found = sorted(CKPT_ROOT.glob(f"*/{args.dataset}/{Path(args.ckpt).name}"))
        if len(found) == 1:
            return found[0]
        if found:
            raise UserError(f"{args.ckpt} is in {len(found)} model folders ({', '.join(map(str, found))}); "
                            f"give its path, or -a ARCH (--layers N) for its folder") from None
        raise


def declared_arch(path) -> dict | None:
    """The ``arch`` entry a checkpoint or .mess file declares, without reading its weights (a .mess
    header; a .pth memory-mapped), or None where it declares none or cannot be read so (the full read
    then says why)."""
    if str(path).endswith(PACKED_SUFFIX):
        return read_arch(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # an old-format or damaged file: load_checkpoint gives its reason
        return None
    return ckpt.get("arch") if isinstance(ckpt, dict) else None


def adopt_declared_arch(args, folder: Path | None = None) -> Path | None:
    """``--ckpt`` found (in ``folder``, by default the flags' checkpoint folder, for a bare name) and the
    model flags made the network it declares (``adopt_arch``), before any work: what the run's records
    say of its model is then the file's. The path, or None without ``--ckpt``."""
    if not args.ckpt:
        return None
    path = find_ckpt(args, folder)
    adopt_arch(args, {"arch": declared_arch(path)}, path)
    return path


def read_checkpoint(args, path) -> dict:
    """The checkpoint or .mess file at ``path`` read before its model is built, and the model flags made
    its own (``adopt_arch``). A .mess file is checked against the network it declares before anything
    of it is decoded; one that declares none, against the model the flags build."""
    if str(path).endswith(PACKED_SUFFIX):
        arch = read_arch(path)
        model = None if arch is not None else build_model_from_args(args)[0]
        ckpt = read_mess(path, model=model, build=build_declared)
    else:
        ckpt = load_checkpoint(path)
    adopt_arch(args, ckpt, path)
    return ckpt


def build_declared(arch: dict):
    """``(model, name)`` of a checkpoint's ``arch`` entry: the ``build`` of ``mess.packed_read.read_mess``
    and ``write_mess``, so that a .mess file's tensors are checked against the network it declares."""
    import models
    m = models.build_model(arch["arch"], arch["dataset"], arch["layers"], arch["width_mult"], arch["bn"],
                           arch["num_classes"])
    name = models.model_name(arch["arch"], arch["layers"], arch["width_mult"], arch["bn"])
    return m, f"{name} for {arch['dataset']}"


def load_any_checkpoint(path, model=None) -> dict:
    """``read_mess`` for a ``.mess`` file (against ``model``'s tensors where given, and the network its
    ``arch`` declares, so that a file declaring others is refused before anything of it is decoded),
    ``load_checkpoint`` for anything else."""
    if str(path).endswith(PACKED_SUFFIX):
        return read_mess(path, model=model, build=build_declared)
    return load_checkpoint(path)


def load_model(args):
    """``(model, ckpt, path)``: the model ``--ckpt`` holds (any checkpoint or .mess file, a path or a bare
    name looked up as main.py does; the flags, where given, must agree with it) with its weights loaded;
    without ``--ckpt`` the model the flags describe, freshly initialised, and ``path`` None."""
    if not args.ckpt:
        model, spec, _ = build_model_from_args(args)
        return model, {"model": model.state_dict(), "arch": spec}, None
    path = find_ckpt(args)
    ckpt = read_checkpoint(args, path)
    model, spec, _ = build_model_from_args(args)
    check_arch(ckpt, spec, path)
    load_state_dict_checked(model, ckpt["model"], path)
    return model, ckpt, path


def load_model_checkpoint(args):
    """``load_model`` for the compressors: ``--ckpt`` required, and finite weights."""
    if not args.ckpt:
        raise UserError("--ckpt PATH is required: the checkpoint to compress")
    model, ckpt, path = load_model(args)
    for k, v in model.state_dict().items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise UserError(f"{path} holds NaN or inf in {k}; it cannot be compressed")
    return model, ckpt, Path(path)


def append_csv(path, rows: list[dict], fieldnames=None) -> None:
    """Append rows to a CSV table, writing its header when the file is new. Rows with columns the header
    lacks (a table of an earlier version, before run_id) rewrite the table with the wider header, atomically;
    earlier rows get those columns empty."""
    path = Path(path)
    fields = list(fieldnames or rows[0])
    for r in rows:
        fields += [k for k in r if k not in fields]
    path.parent.mkdir(parents=True, exist_ok=True)
    header = _csv_header(path)
    if header is not None and not set(fields) <= set(header):
        with open(path, newline="") as f:
            old = list(csv.DictReader(f))
        wide = header + [k for k in fields if k not in header]

        def write(tmp):
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=wide, restval="")
                w.writeheader()
                w.writerows(old + rows)
        atomic_write(path, write)
        return
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header or fields, restval="")
        if header is None:
            w.writeheader()
        w.writerows(rows)


def _csv_header(path: Path) -> list[str] | None:
    try:
        with open(path, newline="") as f:
            return next(csv.reader(f), None) or None
    except FileNotFoundError:
        return None


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
