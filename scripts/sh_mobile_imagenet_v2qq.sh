#!/usr/bin/env bash
# MobileNet and MobileNetV2 on ImageNet: at each bit width plain linear quantization and v2qq of the
# pretrained ckpt_best.pth (down_ckpt.py; TRAIN=1 trains one instead), each retrained for RT_EPOCHS and
# evaluated: accuracy and compression ratio side by side in results/sh_mobile_imagenet_v2qq.csv.
#
#   DATAPATH=/dataset/ImageNet bash scripts/sh_mobile_imagenet_v2qq.sh       # the original's sweep, 2 GPUs
#   DATA=digits ARCH=mobilenet QBS=4 EPOCHS=1 RT_EPOCHS=1 GPUS= TRAIN=1 MODEL_FLAGS="--width-mult 0.25" \
#       bash scripts/sh_mobile_imagenet_v2qq.sh
#
# Settings (environment): DATA ARCH QBS EPOCHS RT_EPOCHS RT_LR RT_FLAGS GPUS DATAPATH, and scripts/common.sh's.
DATA="${DATA:-imagenet}"
ARCH="${ARCH:-mobilenet mobilenetv2}"
LAYERS="${LAYERS:-}"
QBS="${QBS:-8 6 4 3 2}"
EPOCHS="${EPOCHS:-200}"
RT_EPOCHS="${RT_EPOCHS:-90}"
RT_LR="${RT_LR:-0.01}"
RT_FLAGS="${RT_FLAGS:---wd 4e-5 -p 500}"
GPUS="${GPUS-"-C -g 0 1"}"
WORKERS="${WORKERS:-16}"
TRAIN="${TRAIN:-0}"
S="${S:-5}"
source "$(dirname "$0")/common.sh"

sweep() { train_baseline "$@"; quant_vs_v2qq "$@"; }
each_model sweep
show_table
