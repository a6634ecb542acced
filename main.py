"""Train, resume, test and retrain a network on CPU, one GPU or several.

    python main.py cifar10 -a mobilenet -C -g 0 1 -b 256                   # train
    python main.py cifar10 -a mobilenet -C -g 0 1 -b 256 -R --ckpt ckpt_epoch_50.pth
    python main.py cifar10 -a mobilenet -E --ckpt ckpt_best.pth            # test
    python main.py cifar10 -a mobilenet -T --ckpt ckpt_best_v2qq_q888.pth --epochs 20 --lr 0.01  # retrain
    python main.py digits -a resnet --layers 20 --epochs 8 --sched cosine  # offline quickstart

Retraining (-T, -N/-s, -Q, --nl, --pl, --wclip) is retrain.py's; this file runs the loop.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from rich.console import Console
from tqdm import tqdm

import models
import resume
import retrain
import run_folder
from config import TRACK_FLAGS, get_args_parser
from data import calibration_images, get_loaders, set_epoch
from mess.account import summarize
from mess.bn import calibrate_bn
from utils import (
    Dist,
    UserError,
    accuracy,
    adopt_declared_arch,
    all_reduce_sum,
    append_csv,
    build_model_from_args,
    check_arch,
    find_ckpt,
    init_distributed,
    load_state_dict_checked,
    read_checkpoint,
    rng_state,
    run_cli,
    save_checkpoint,
    select_device,
    set_rng_state,
    set_seed,
    wrap_model,
)

# soft_wrap: a line is never cut into two (a pipe, a file or sacred's cout.txt would keep the cut); a
# terminal wraps long lines itself, and rich still sizes tables to it
console = Console(highlight=False, soft_wrap=True)


SCRATCH_LR, FINETUNE_LR = 0.1, 0.001  # --lr without the flag (config.py's help says so)


class NullTracker:
    """Where per-epoch metrics and files go besides the CSVs (experiment records hook)."""

    def log(self, metrics: dict, step: int) -> None:
        pass

    def artifact(self, path) -> None:
        pass


def validate_args(args) -> None:
    if args.lr is None and not args.resume:  # from scratch the original's 0.1; -T fine-tunes trained
        args.lr = FINETUNE_LR if args.retrain else SCRATCH_LR  # weights (-R: the run's own, resumed_lr)
    if args.resume and args.evaluate:
        raise UserError("-R/--resume and -E/--evaluate exclude each other")
    if (args.resume or args.evaluate) and not args.ckpt:
        raise UserError("-R/--resume and -E/--evaluate need --ckpt PATH")
    if args.epochs < 1 or args.batch_size < 1 or args.print_freq < 1:
        raise UserError("--epochs, --batch-size and --print-freq must be at least 1")
    if args.workers < 0:
        raise UserError(f"-j/--workers must be 0 or more, got {args.workers}")
    if args.sched not in ("step", "cosine"):
        raise UserError(f"unknown --sched {args.sched!r}; choose step or cosine")
    if args.groups != 1:
        raise UserError("--groups other than 1 applies to ShuffleNet, which this suite does not build")
    if args.overwrite and (args.resume or args.evaluate):
        raise UserError("--overwrite starts a run from scratch over an earlier one; -R and -E write no run")


def check_args(args) -> None:
    """The checks that need no work (the flags, and the model --ckpt names, utils.adopt_declared_arch),
    run before the run is recorded: a command line they refuse records nothing."""
    validate_args(args)
    if args.resume or args.evaluate or args.retrain:
        adopt_declared_arch(args, Path(args.ckpt_dir) if args.ckpt_dir else None)


def lr_at(args, epoch: int) -> float:
    """Learning rate for 1-based ``epoch``; a pure function of it, so resume needs no state."""
    if args.sched == "cosine":
        return 0.5 * args.lr * (1 + math.cos(math.pi * (epoch - 1) / args.epochs))
    # the original's step schedule: x0.1 at half and at three quarters of the run
    return args.lr * 0.1 ** sum(epoch > max(1, m) for m in (args.epochs // 2, args.epochs * 3 // 4))


@dataclass
class Runtime:
    """Where and how the loop runs: device, process group, and the GPU fast paths."""
    device: torch.device
    dist: Dist = Dist()
    amp_dtype: torch.dtype | None = None  # autocast on CUDA, None for full precision
    scaler: torch.amp.GradScaler | None = None  # fp16 only
    channels_last: bool = False

    def batch(self, x, y):
        x = x.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(self.device, non_blocking=True)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)


def make_runtime(args, device, d: Dist) -> Runtime:
    if device.type != "cuda":  # the fast paths are GPU features; on CPU they change nothing
        return Runtime(device, d)
    dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    scaler = torch.amp.GradScaler("cuda") if dtype is torch.float16 else None
    return Runtime(device, d, dtype, scaler, args.channels_last)


def train_one_epoch(model, loader, criterion, optimizer, rt: Runtime, epoch, args, extra_loss=None):
    model.train()
    # running sums stay on the device; syncing only every print_freq batches keeps the loop fast
    loss_sum = torch.zeros((), device=rt.device)
    correct = torch.zeros((), device=rt.device, dtype=torch.int64)
    seen = 0
    bar = tqdm(loader, desc=f"epoch {epoch}/{args.epochs}", leave=False, dynamic_ncols=True,
               disable=None if rt.dist.is_main else True, mininterval=0.5)
    for i, (x, y) in enumerate(bar):
        x, y = rt.batch(x, y)
        with rt.autocast():
            out = model(x)
            loss = criterion(out, y)
        if extra_loss is not None:
            loss = loss + extra_loss()
        optimizer.zero_grad(set_to_none=True)
        if rt.scaler is not None:
            rt.scaler.scale(loss).backward()
            rt.scaler.step(optimizer)
            rt.scaler.update()
        else:
            loss.backward()
            optimizer.step()
        loss_sum += loss.detach() * x.size(0)
        correct += (out.detach().argmax(1) == y).sum()
        seen += x.size(0)
        if (i + 1) % args.print_freq == 0:
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", acc=f"{100.0 * correct.item() / seen:.2f}")
    loss_sum, correct, seen = all_reduce_sum([loss_sum.item(), correct.item(), seen], rt.device, rt.dist)
    return {"train_loss": loss_sum / max(seen, 1), "train_top1": 100.0 * correct / max(seen, 1),
            "train_samples": int(seen)}


@torch.inference_mode()
def evaluate(model, loader, criterion, rt: Runtime, desc: str = "validate") -> dict:
    model.eval()
    loss_sum, correct1, correct5, n = 0.0, 0, 0, 0
    # a bar with its ETA on a terminal (rank 0), nothing in a pipe or a log file
    for x, y in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True,
                     disable=None if rt.dist.is_main else True, mininterval=0.5):
        x, y = rt.batch(x, y)
        with rt.autocast():
            out = model(x)
        loss_sum += criterion(out.float(), y).item() * x.size(0)
        c1, c5 = accuracy(out, y, topk=(1, 5))
        correct1, correct5, n = correct1 + c1, correct5 + c5, n + x.size(0)
    loss_sum, correct1, correct5, n = all_reduce_sum([loss_sum, correct1, correct5, n], rt.device, rt.dist)
    return {"val_loss": loss_sum / max(n, 1), "val_top1": 100.0 * correct1 / max(n, 1),
            "val_top5": 100.0 * correct5 / max(n, 1)}


def plain_args(args) -> dict:
    """The flags as a plain dict for checkpoints; never the recording flags (a database URL may
    hold a password)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()
            if isinstance(v, (str, int, float, bool, list, tuple, type(None))) and k not in TRACK_FLAGS}


def describe_devices(args, device, d: Dist) -> str:
    if d.enabled:
        return f"{device.type} x{d.world_size} processes (DistributedDataParallel)"
    if device.type == "cuda" and len(args.gpuids) > 1:
        return f"{device} x{len(args.gpuids)} (DataParallel)"
    return str(device)


def describe_run(run, path) -> str:
    """One line on what a retraining (or regularized) run does and where it writes."""
    what = {"finetune": "plain fine-tuning", "quant": f"training on the {run.quant_bits}-bit grid (-Q, STE)",
            "mess": f"retraining in MESS {run.version} form (k fixed; alpha, beta, bank trained)",
            "free": f"the new method: free training, {run.version} search every {run.args.save_epoch} epochs",
            "palette": "fine-tuning the palettes (indices fixed; each LUT entry gets its members' mean "
                       "gradient)",
            "train": "training"}[run.mode]
    src = f" from {path.name}" if path is not None and run.args.retrain else ""
    return f"{what}{src} -> {run.file_names('N')[0]}"


def run_header(args, model, device, ckpt_dir, d: Dist):
    from rich.table import Table
    n_params = sum(p.numel() for p in model.parameters())
    t = Table(show_header=False, box=None, pad_edge=False)
    for k, v in (("model", models.model_name(args.arch, args.layers, args.width_mult, args.bn)),
                 ("data", args.dataset), ("params", f"{n_params:,}"),
                 ("device", describe_devices(args, device, d)),
                 ("checkpoints", str(ckpt_dir))):
        t.add_row(f"[bold]{k}[/bold]", v)
    console.print(t)


def main(args, tracker=None):
    tracker = tracker or NullTracker()
    validate_args(args)
    d = init_distributed(args.cuda)
    if not d.enabled:
        return _run(args, tracker, d)
    import torch.distributed as dist
    try:
        result = _run(args, tracker, d)
        # every rank done before any tears its connections down: a rank that leaves while rank 0
        # still writes its checkpoint can abort gloo's threads ("terminate called ...")
        dist.barrier()
        return result
    finally:
        dist.destroy_process_group()


def _run(args, tracker, d: Dist):
    console.quiet = not d.is_main  # under torchrun only rank 0 prints
    if args.batch_size % d.world_size:
        raise UserError(f"-b {args.batch_size} is the total batch size; it must divide by the "
                        f"{d.world_size} processes")
    ckpt, path = read_input_checkpoint(args)  # before the model is built: the checkpoint names its own
    if args.resume:  # and the run's own flags rebuild the run
        resume.apply_recorded_flags(args, ckpt, path, console)
        resume.check_resume_state(ckpt, path)
    if args.lr is None:  # -R of a run that recorded no flags
        args.lr = resumed_lr(ckpt)
    device = select_device(args.cuda, args.gpuids, d)
    rt = make_runtime(args, device, d)
    set_seed(args.seed)  # before the model is built: its initial weights come from this seed
    model, spec, ckpt_dir = build_model_from_args(args)
    ckpt_dir = Path(args.ckpt_dir) if args.ckpt_dir else ckpt_dir
    if ckpt is not None:
        load_into(model, ckpt, spec, path)
    criterion = nn.CrossEntropyLoss()
    run = None
    if not args.evaluate:
        # mode, names and parametrizations (retrain.py), with every flag error before data is read
        run = retrain.Retrainer.create(args, model, retrain.decide(args, ckpt, path), ckpt, device, d)
    run_id = (ckpt or {}).get("run_id") if args.resume else None
    run_id = run_id if isinstance(run_id, str) else run_folder.new_run_id()
    with contextlib.ExitStack() as held:
        def claim():  # the folder: writable, with room, this run's alone, before data is read
            run_folder.check_room(ckpt_dir, model, args.evaluate)
            if not args.evaluate:
                held.enter_context(run_folder.folder_lock(ckpt_dir, run_id))
                if not args.resume:
                    run_folder.refuse_or_clear(ckpt_dir, run.spec.prefix, args.overwrite, console)
        run_folder.on_main(claim, d)
        if args.evaluate:
            return _evaluate(args, rt, model, criterion, ckpt, ckpt_dir, run_id)
        return _train(args, rt, model, criterion, run, ckpt, path, ckpt_dir, spec, tracker, run_id)


def _loaders(args, rt: Runtime):
    d = rt.dist
    return get_loaders(
        args.dataset, args.datapath, args.batch_size // d.world_size, args.workers,
        pin_memory=args.pin_memory and rt.device.type == "cuda",
        persistent_workers=args.persistent_workers, rank=d.rank, world_size=d.world_size,
        arch=args.arch)  # the normalisation the architecture's weights expect (models.input_stats)


def _evaluate(args, rt: Runtime, model, criterion, ckpt, ckpt_dir, run_id):
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    _, val_loader, _ = _loaders(args, rt)
    net = wrap_model(model, rt.device, args.gpuids, rt.dist)
    return evaluate_checkpoint(args, net, val_loader, criterion, rt, ckpt, ckpt_dir, run_id)


def _train(args, rt: Runtime, model, criterion, run, ckpt, path, ckpt_dir, spec, tracker, run_id):
    d = rt.dist
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_loader, val_loader, shuffler = _loaders(args, rt)
    calibrate_start(args, run, ckpt, rt.device)
    net = wrap_model(model, rt.device, args.gpuids, d)
    optimizer = torch.optim.SGD(run.param_groups(args.weight_decay), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay, nesterov=args.momentum > 0)
    run.attach(optimizer)
    start_epoch, best_acc1, best_epoch, history = 1, -1.0, None, []  # -1: the first epoch writes the best
    if args.resume:
        start_epoch, best_acc1 = resume_training_state(args, ckpt, path, optimizer, rt)
        best_epoch, history = ckpt.get("best_epoch"), list(ckpt.get("history") or [])
        if d.is_main:
            resume.repair(ckpt_dir, run.spec.prefix, ckpt_dir / run.summary_name(), ckpt, console)
    run_header(args, model, rt.device, ckpt_dir, d)
    if run.mode != "train":
        console.print(describe_run(run, path))
    loop = Loop(args, rt, run, net, criterion, optimizer, train_loader, val_loader, shuffler, ckpt_dir, spec,
                tracker, run_id, best_epoch, history)
    return train(loop, start_epoch, best_acc1)


def calibrate_start(args, run, ckpt, device) -> None:
    """BatchNorm statistics of a compressed network before retraining (-T) starts, so that its first
    evaluation is not of stale statistics: re-estimated on augmented training images unless the
    checkpoint's were already calibrated (find_similar_kernel.py's default). -N corrects them after
    every projection (retrain.Retrainer._project); both follow --bn-calib and --bn-images."""
    if args.bn_calib == "off" or run.mode not in ("mess", "quant", "palette", "free"):
        return
    if args.bn_images < 1:
        raise UserError(f"--bn-images must be at least 1, got {args.bn_images} (--bn-calib off switches "
                        f"the calibration off)")
    images = calibration_images(args.dataset, args.datapath, args.bn_images, args.arch)  # retraining reads
    if run.mode == "free":  # them anyway
        run.bn_images, run.bn_method = images, args.bn_calib
    elif args.retrain and not args.resume and not (ckpt or {}).get("bn_calib"):
        layers = calibrate_bn(run.model.to(device), images.to(device), method="reestimate")
        if layers:
            console.print(f"BatchNorm statistics re-estimated on {len(images)} augmented training images "
                          f"({layers} layers) before retraining")


def resumed_lr(ckpt: dict) -> float:
    """-R without --lr: the base learning rate of the run it resumes (its schedule's, else its flags'), so
    that a resumed -T run keeps its fine-tuning rate instead of starting again at 0.1."""
    for where in ((ckpt.get("scheduler") or {}).get("base_lr"), (ckpt.get("args") or {}).get("lr")):
        if isinstance(where, (int, float)) and not isinstance(where, bool):
            return float(where)
    return SCRATCH_LR


def read_input_checkpoint(args):
    """(checkpoint, path) that -R, -E or -T start from, read (not yet loaded into a model) and the model
    flags made the network it declares (utils.adopt_arch); (None, None) when the run starts from the
    seed. A bare --ckpt name is looked up in the folder the flags name."""
    if not (args.ckpt and (args.resume or args.evaluate or args.retrain)):
        return None, None
    path = find_ckpt(args, Path(args.ckpt_dir) if args.ckpt_dir else None)
    return read_checkpoint(args, path), path  # a .mess file too


def load_into(model, ckpt: dict, spec: dict, path) -> None:
    """The checkpoint's weights in ``model``, after its architecture and data set are checked."""
    check_arch(ckpt, spec, path)
    load_state_dict_checked(model, ckpt["model"], path)
    if ckpt.get("palette"):  # a palette checkpoint's weights must be its lut[idx] (docs/design.md §9)
        from mess.entry import NotRepresentable, check_representable
        try:
            check_representable({"model": ckpt["model"], "palette": ckpt["palette"]})
        except NotRepresentable as e:
            raise UserError(f"{path.name} is not a valid palette checkpoint: {e}") from None


def evaluate_checkpoint(args, net, val_loader, criterion, rt: Runtime, ckpt, ckpt_dir, run_id="") -> dict:
    """-E: one pass over the validation set, printed and appended to eval.csv."""
    t0 = time.time()
    metrics = evaluate(net, val_loader, criterion, rt, desc=f"test {Path(args.ckpt).name}")
    line = (f"test  {Path(args.ckpt).name}: top-1 {metrics['val_top1']:.2f}%  "
            f"top-5 {metrics['val_top5']:.2f}%  loss {metrics['val_loss']:.4f}")
    if "mess" in ckpt or "quant" in ckpt or "palette" in ckpt:
        line += "\n" + summarize(ckpt)
    console.print(line)
    if rt.dist.is_main:
        append_csv(ckpt_dir / "eval.csv", [{"ckpt": str(args.ckpt), **metrics,
                                            "seconds": round(time.time() - t0, 2), "run_id": run_id}])
    return {"metrics": metrics, "ckpt_dir": ckpt_dir}


def resume_training_state(args, ckpt, path, optimizer, rt: Runtime) -> tuple[int, float]:
    """-R: optimizer, loss scale and RNG back from the checkpoint (its form checked first, by
    resume.check_resume_state); (first epoch to run, best top-1)."""
    epoch, best_acc1 = resume.check_resume_state(ckpt, path)
    start_epoch = epoch + 1
    if start_epoch > args.epochs:
        raise UserError(f"{args.ckpt} already holds epoch {epoch} of --epochs {args.epochs}; give a larger "
                        f"--epochs to train on")
    resume.load_optimizer_state(optimizer, ckpt, path)
    if rt.scaler is not None and "scaler" in ckpt:
        rt.scaler.load_state_dict(ckpt["scaler"])
    if "rng" in ckpt:
        set_rng_state(ckpt["rng"])
    console.print(f"resumed from {args.ckpt} at epoch {start_epoch}")
    return start_epoch, best_acc1


@dataclass
class Loop:
    """What the epoch loop works with; built once by _run."""
    args: object
    rt: Runtime
    run: retrain.Retrainer
    net: nn.Module
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    train_loader: object
    val_loader: object
    shuffler: object
    ckpt_dir: Path
    spec: dict
    tracker: object
    run_id: str = ""
    best_epoch: int | None = None  # the epoch ckpt_best.pth holds
    history: list = None  # this run's summary rows so far, kept in each checkpoint (resume.repair)


def train(loop: Loop, start_epoch: int, best_acc1: float) -> dict:
    args, run, d = loop.args, loop.run, loop.rt.dist
    run.start()
    summary_csv = loop.ckpt_dir / run.summary_name()
    result = {"best_acc1": best_acc1, "ckpt_dir": loop.ckpt_dir, "history": [], "mode": run.mode,
              "searches": run.searches, "saved": []}
    t0 = time.time()
    for epoch in range(start_epoch, args.epochs + 1):
        row, searched = train_and_evaluate_epoch(loop, epoch)
        saves = run.saves(epoch)  # -N saves (and ranks) only projected networks
        is_best = saves and row["val_top1"] > best_acc1
        if saves:
            best_acc1 = max(best_acc1, row["val_top1"])
        if is_best:
            loop.best_epoch = epoch
        if run.mode == "free":
            row["searches"] = len(run.searches)
        loop.history = (loop.history or []) + [row]
        if d.is_main:
            if saves:
                result["saved"] += save_epoch(loop, epoch, best_acc1, is_best)
            append_csv(summary_csv, [row])
            loop.tracker.log(row, epoch)
        result["history"].append(row)
        console.print(f"epoch {epoch}/{args.epochs} lr {row['lr']:.3g} | train {row['train_loss']:.4f} "
                      f"{row['train_top1']:.2f}% | val {row['val_loss']:.4f} {row['val_top1']:.2f}% "
                      f"(top-5 {row['val_top5']:.2f}%) | best {best_acc1:.2f}% | {row['seconds']:.1f}s | "
                      f"{run_eta(t0, epoch - start_epoch + 1, args.epochs - epoch)}"
                      + (" | searched" if searched else "") + (" *" if is_best else ""))
    if d.is_main:
        loop.tracker.artifact(summary_csv)
    result["best_acc1"] = best_acc1
    return result


def run_eta(t0: float, done: int, left: int) -> str:
    """``elapsed 0:01:05 ETA 0:12:40``: this run's time so far, and its epochs left at its mean pace."""
    elapsed = time.time() - t0
    return f"elapsed {_hms(elapsed)} ETA {_hms(elapsed / done * left)}"


def _hms(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}"


def train_and_evaluate_epoch(loop: Loop, epoch: int) -> tuple[dict, bool]:
    """One epoch at its learning rate, then validation: (summary row, whether -N searched)."""
    args = loop.args
    t0 = time.time()
    lr = lr_at(args, epoch)
    for g in loop.optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)  # a MESS bank trains slower (retrain.BANK_LR_SCALE)
    set_epoch(loop.shuffler, args.seed, epoch)
    row = {"epoch": epoch, "lr": lr}
    row.update(train_one_epoch(loop.net, loop.train_loader, loop.criterion, loop.optimizer, loop.rt, epoch,
                               args, loop.run.extra_loss))
    searched = loop.run.end_of_epoch(epoch)  # -N: the projection into MESS form, before it is evaluated
    row.update(evaluate(loop.net, loop.val_loader, loop.criterion, loop.rt))
    row["seconds"] = round(time.time() - t0, 2)
    row["run_id"] = loop.run_id  # last: the columns before it read as they always did
    return row, searched


def save_epoch(loop: Loop, epoch: int, best_acc1: float, is_best: bool) -> list[Path]:
    """The epoch's checkpoint (and the best one, when it is): what -R, -E and -T read back."""
    args, rt = loop.args, loop.rt
    state = loop.run.state()  # plain weights, mess/quant entry, and what -R needs
    state.update({"arch": loop.spec, "epoch": epoch, "best_acc1": best_acc1, "best_epoch": loop.best_epoch,
                  "run_id": loop.run_id, "history": list(loop.history),
                  "optimizer": loop.optimizer.state_dict(),
                  "scheduler": {"sched": args.sched, "base_lr": args.lr, "epochs": args.epochs,
                                "last_epoch": epoch},
                  "args": plain_args(args), "rng": rng_state()})
    if rt.scaler is not None:  # fp16 loss scale: part of an exact resume
        state["scaler"] = rt.scaler.state_dict()
    epoch_name, best_name = loop.run.file_names(epoch)
    # the best file first: a kill before the epoch file leaves the previous epoch file the newest, and
    # -R from it runs this epoch again (bit for bit) and writes both; the other order could leave a best
    # file older than the newest epoch file's best epoch (resume.repair mends that)
    saved = [loop.ckpt_dir / epoch_name] + ([loop.ckpt_dir / best_name] if is_best else [])
    for p in reversed(saved):
        save_checkpoint(state, p)
    return saved


if __name__ == "__main__":
    from tracking import Experiment, tracked_run, train_command
    # every run is a sacred run (tracking.py) named by this tool and its mode; its Experiment is built
    # here, in the script whose sources sacred should record; flags refused up front record no run
    run_cli(lambda args: tracked_run(Experiment("main.py"), main, args, command=train_command,
                                     check=check_args), get_args_parser())
