#!/usr/bin/env bash
# v2qq over bit widths on trained CIFAR ResNets: compress ckpt_best.pth with find_similar_kernel.py, retrain
# the compressed network (-T), and evaluate the float, compressed and retrained networks side by side
# (accuracy and compression ratio) in results/sh_v2qq_cifar_test.csv.
#
#   bash scripts/sh_v2qq_cifar_test.sh            # the original's sweep (its baselines: TRAIN=0, ckpt_best.pth)
#   DATA=digits LAYERS=20 QBS=4 EPOCHS=1 RT_EPOCHS=1 GPUS= TRAIN=1 bash scripts/sh_v2qq_cifar_test.sh
#
# Settings (environment): DATA ARCH LAYERS QBS EPOCHS RT_EPOCHS RT_LR GPUS, and those of scripts/common.sh.
DATA="${DATA:-cifar10 cifar100}"
ARCH="${ARCH:-resnet}"
LAYERS="${LAYERS:-20 32 44}"
QBS="${QBS:-8 7 6 5 4 3 2}"
EPOCHS="${EPOCHS:-200}"       # of the baseline, when TRAIN=1
RT_EPOCHS="${RT_EPOCHS:-200}"  # the original retrained with main.py's default --epochs
RT_LR="${RT_LR:-0.01}"
GPUS="${GPUS-"-C -g 0"}"
TRAIN="${TRAIN:-0}"
S="${S:-1}"
source "$(dirname "$0")/common.sh"

sweep() { train_baseline "$@"; mess_sweep v2qq "$@"; }
each_model sweep
show_table
