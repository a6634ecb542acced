#!/usr/bin/env bash
# ResNet-18/34/50 on ImageNet: at each bit width plain linear quantization and v2qq of the pretrained
# ckpt_best.pth (down_ckpt.py; TRAIN=1 trains one instead), each retrained for RT_EPOCHS and evaluated:
# accuracy and compression ratio side by side in results/sh_resnet_imagenet_v2qq.csv.
#
#   DATAPATH=/dataset/ImageNet bash scripts/sh_resnet_imagenet_v2qq.sh       # the original's sweep, 2 GPUs
#   DATA=digits LAYERS=20 QBS=4 EPOCHS=1 RT_EPOCHS=1 GPUS= TRAIN=1 MODEL_FLAGS="--width-mult 0.5" \
#       bash scripts/sh_resnet_imagenet_v2qq.sh
#
# Settings (environment): DATA ARCH LAYERS QBS EPOCHS RT_EPOCHS RT_LR RT_FLAGS GPUS DATAPATH, and common.sh's.
DATA="${DATA:-imagenet}"
ARCH="${ARCH:-resnet}"
LAYERS="${LAYERS:-18 34 50}"   # the original's (101 and 152 commented out)
QBS="${QBS:-8 6 4 3 2}"
EPOCHS="${EPOCHS:-90}"
RT_EPOCHS="${RT_EPOCHS:-90}"
RT_LR="${RT_LR:-0.01}"
RT_FLAGS="${RT_FLAGS:---wd 1e-5 -p 500}"
GPUS="${GPUS-"-C -g 0 1"}"
WORKERS="${WORKERS:-16}"
TRAIN="${TRAIN:-0}"
S="${S:-5}"
source "$(dirname "$0")/common.sh"

sweep() { train_baseline "$@"; quant_vs_v2qq "$@"; }
each_model sweep
show_table
