#!/usr/bin/env bash
# VGG-16 on CIFAR: train the baseline, then at each bit width plain linear quantization (quantize.py) and
# v2qq (find_similar_kernel.py), each retrained (-T -Q / -T) and evaluated: accuracy and compression ratio
# side by side in results/sh_vgg16_cifar_v2qq.csv.
#
#   bash scripts/sh_vgg16_cifar_v2qq.sh           # the original's sweep: CIFAR-10/100, 2 GPUs, 200 epochs
#   DATA=digits QBS=4 EPOCHS=1 RT_EPOCHS=1 GPUS= MODEL_FLAGS="--width-mult 0.25" bash scripts/sh_vgg16_cifar_v2qq.sh
#
#   PEERS="km2 km2c vq6" bash scripts/sh_vgg16_cifar_v2qq.sh   # also k-means palettes and kernel codebooks
#
# Settings (environment): DATA ARCH LAYERS QBS EPOCHS LR RT_EPOCHS RT_LR RT_FLAGS GPUS PEERS, and
# scripts/common.sh's.
DATA="${DATA:-cifar10 cifar100}"
ARCH="${ARCH:-vgg}"
VGG_LAYERS="${VGG_LAYERS:-${LAYERS:-16}}"  # the VGG depth(s); LAYERS works too
QBS="${QBS:-8 6 4 3 2}"
EPOCHS="${EPOCHS:-200}"
LR="${LR:-0.05}"
RT_EPOCHS="${RT_EPOCHS:-200}"
RT_LR="${RT_LR:-0.005}"
RT_FLAGS="${RT_FLAGS:-}"
GPUS="${GPUS-"-C -g 0 1"}"
WORKERS="${WORKERS:-8}"
S="${S:-5}"
source "$(dirname "$0")/common.sh"

sweep() { train_baseline "$@"; quant_vs_v2qq "$@"; }
each_model sweep
show_table
