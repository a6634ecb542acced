#!/usr/bin/env bash
# v2nb (no beta) on trained CIFAR ResNets: compress ckpt_best.pth, retrain (-T), and evaluate the float,
# compressed and retrained networks side by side in results/sh_v2nb_cifar_test.csv.
#
#   bash scripts/sh_v2nb_cifar_test.sh            # the original's sweep (its baselines: TRAIN=0, ckpt_best.pth)
#   DATA=digits LAYERS=20 EPOCHS=1 RT_EPOCHS=1 GPUS= TRAIN=1 bash scripts/sh_v2nb_cifar_test.sh
#
# Settings (environment): DATA ARCH LAYERS QBS EPOCHS RT_EPOCHS RT_LR GPUS, and those of scripts/common.sh.
DATA="${DATA:-cifar10 cifar100}"
ARCH="${ARCH:-resnet}"
LAYERS="${LAYERS:-20 32 44 56 110}"
QBS="${QBS:-8}"               # the bank's bits (v2nb quantizes like v2qq, without beta)
EPOCHS="${EPOCHS:-200}"
RT_EPOCHS="${RT_EPOCHS:-200}"
RT_LR="${RT_LR:-0.01}"
GPUS="${GPUS-"-C -g 0"}"
TRAIN="${TRAIN:-0}"
S="${S:-1}"
source "$(dirname "$0")/common.sh"

sweep() { train_baseline "$@"; mess_sweep v2nb "$@"; }
each_model sweep
show_table
