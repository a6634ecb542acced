#!/usr/bin/env bash
# The new method from scratch: train with -N -v v2qq (the search projects the network every S epochs)
# at each bit width, then evaluate the best projected checkpoint; rows go to results/sh_v2qq_cifar_run.csv.
#
#   bash scripts/sh_v2qq_cifar_run.sh                 # the original's sweep: CIFAR-10/100, 4 GPUs, 200 epochs
#   DATA=digits ARCH=resnet LAYERS=20 QBS=4 EPOCHS=1 GPUS= bash scripts/sh_v2qq_cifar_run.sh   # a minute, CPU
#
# Settings (environment): DATA ARCH LAYERS QBS EPOCHS S GPUS, and those of scripts/common.sh.
DATA="${DATA:-cifar10 cifar100}"
ARCH="${ARCH:-mobilenet mobilenetv2 resnet vgg}"
LAYERS="${LAYERS:-20 32 44}"   # ResNet depths (the original's; 56 and 110 commented out)
QBS="${QBS:-8 6 4 3 2}"
EPOCHS="${EPOCHS:-200}"
GPUS="${GPUS-"-C -g 0 1 2 3"}"
WORKERS="${WORKERS:-2}"
S="${S:-5}"
source "$(dirname "$0")/common.sh"

# the original's "new method" from scratch: -N -s S -v v2qq at each bit width of $QBS
new_method() {
    local data="$1"; shift
    local ckpts=() qb dir
    dir="$(ckpt_dir "$data" "$@")"
    for qb in $QBS; do
        run_clean "$dir" "ckpt_new_v2qq_q${qb}88_s$S" \
            "$data" "$@" $GPUS -j "$WORKERS" -b "$BATCH" --epochs "$EPOCHS" -N -s "$S" -v v2qq --qb "$qb"
        ckpts+=("ckpt_new_v2qq_q${qb}88_s${S}_best.pth")
    done
    collect "$data" "$@" -- "${ckpts[@]}"
}
each_model new_method
show_table
