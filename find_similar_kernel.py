"""Compress a trained checkpoint with MESS: every covered kernel becomes ``alpha * bank[k] + beta``.

    python find_similar_kernel.py cifar10 -a mobilenet -v v2qq --ckpt ckpt_best.pth  # ckpt_best_v2qq_q888.pth
    python find_similar_kernel.py cifar10 -a resnet --layers 56 -v v2 --np --ckpt ckpt_best.pth
    python main.py cifar10 -a mobilenet -E --ckpt ckpt_best_v2qq_q888.pth

The CLI of ``mess.compress`` (the maths: docs/design.md §1-§3): it writes the compressed checkpoint,
its packed ``.mess`` file beside it, and prints the storage account (§5).
"""
from __future__ import annotations

import copy
import sys
import time

from config import BANK_FLAGS, BN_FLAGS, MESS_FLAGS, MODEL_FLAGS, TRACK_FLAGS, OneLineParser, add_flags
from data import calibration_images
from mess.account import print_account, storage_account
from mess.bn import batchnorms, calibrate_bn
from mess.checkpoint import check_output_folder, checkpoint_writer, state_bytes, with_weights, write_together
from mess.compress import compress
from mess.names import compressed_name, packed_name
from mess.packed_write import size_line, write_mess
from mess.settings import Settings
from utils import (
    UserError,
    adopt_declared_arch,
    build_declared,
    load_model_checkpoint,
    run_cli,
    select_device,
)


def get_args_parser():
    parser = OneLineParser(prog="find_similar_kernel.py",
                           description="Compress a trained checkpoint with MESS (writes a new checkpoint "
                                       "and its packed .mess file beside it and prints the storage "
                                       "account).")
    add_flags(parser, MODEL_FLAGS + MESS_FLAGS + ("fc",) + BANK_FLAGS + BN_FLAGS + TRACK_FLAGS)
    return parser.mark_required("ckpt")


def calibrate(args, model, state_dict: dict) -> dict:
    """BatchNorm calibration of the compressed ``state_dict`` in place (--bn-calib, --bn-images, mess.bn)
    against the float ``model``; returns what the checkpoint records of it ({} when off)."""
    if args.bn_calib == "off" or not batchnorms(model):
        return {}
    try:
        images = calibration_images(args.dataset, args.datapath, args.bn_images, args.arch)
    except UserError as e:  # compressing needs no data: say what is skipped, and why
        print(f"note: BatchNorm statistics left as they were (no training images: {e}); "
              f"--bn-calib off skips it without this note", file=sys.stderr)
        return {}
    net = copy.deepcopy(model)
    net.load_state_dict(state_dict)
    layers = calibrate_bn(net, images, method=args.bn_calib, reference=model)
    for key, v in net.state_dict().items():
        if "running_" in key or key.endswith("num_batches_tracked"):
            state_dict[key] = v.detach().cpu().clone()
    return {"bn_calib": {"method": args.bn_calib, "images": len(images), "layers": layers}}


def main(args):
    settings = Settings.from_args(args)  # flag errors first, before any file is read
    if args.bn_calib != "off" and args.bn_images < 1:
        raise UserError(f"--bn-images must be at least 1, got {args.bn_images} (--bn-calib off switches "
                        f"the calibration off)")
    device = select_device(args.cuda, args.gpuids)
    model, ckpt, path = load_model_checkpoint(args)
    # before the work: room beside the input for the checkpoint and its .mess (each at most float32 weights)
    check_output_folder(path.parent, 2 * state_bytes(model), "the compressed checkpoint and its .mess")
    if "mess" in ckpt:
        print(f"note: {path.name} is already a MESS checkpoint ({ckpt['mess'].get('version')}); "
              f"searching its reconstructed weights again")
    t0 = time.perf_counter()
    c = compress(model, settings, arch=args.arch, device=device)
    seconds = time.perf_counter() - t0
    bn = calibrate(args, model, c.state_dict)
    c.entry.args = {k: v for k, v in vars(args).items()  # never the database URL: it may hold a password
                    if isinstance(v, (str, int, float, bool, list, type(None))) and k != "mongo_url"}
    name = compressed_name(path.stem, settings, pointwise_ran=c.entry.pointwise is not None)
    out_path = path.with_name(name)
    out = with_weights(ckpt, c.state_dict, mess=c.entry.to_dict(), **bn)
    mess_path = out_path.with_name(packed_name(name))
    # the packed network beside the checkpoint: both written, or neither (and the old ones kept)
    _, mess_bytes = write_together([(out_path, checkpoint_writer(out)),
                                    (mess_path, lambda tmp: write_mess(tmp, out, build=build_declared))])
    account = storage_account(c.state_dict, c.entry)
    n_targets = sum(r["targets"] or 0 for r in c.rows)
    print_account(account, c.rows, title=f"MESS {settings.version}: {path.name}")
    print(f"searched {n_targets:,} vectors in {seconds:.2f}s on {device}; wrote {out_path} "
          f"and {mess_path.name}")
    if bn:
        print(f"BatchNorm statistics: {bn['bn_calib']['method']} on {bn['bn_calib']['images']} augmented "
              f"training images ({bn['bn_calib']['layers']} layers)")
    print(size_line(mess_path, mess_bytes, c.state_dict))
    return {"path": out_path, "mess": out["mess"], "entry": c.entry, "account": account,
            "ratio": account.ratio, "rows": c.rows, "seconds": seconds, "mess_path": mess_path,
            "mess_bytes": mess_bytes}


if __name__ == "__main__":
    from tracking import Experiment, tracked_run
    # every run is a sacred run (tracking.py), built here so that sacred records this script
    run_cli(lambda args: tracked_run(Experiment("find_similar_kernel.py"), main, args, command="compress",
                                     check=adopt_declared_arch),
            get_args_parser())
