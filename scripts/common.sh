# shellcheck shell=bash
# Sourced by the sweep scripts: the tools, the shared settings and the helpers.
# Every setting is an environment variable; a script sets its own defaults before sourcing this.
#   GPUS         device flags for main.py and find_similar_kernel.py ("" = CPU)
#   BATCH WORKERS batch size and data-loading workers of main.py
#   MODEL_FLAGS  extra model flags for every tool (e.g. "--width-mult 0.5")
#   MAIN_FLAGS   extra flags for main.py's training runs (e.g. "--no-track --sched cosine")
#   DATAPATH     where the datasets are (main.py's --datapath); unset: main.py's default
#   TRAIN        1: train the baseline ckpt_best.pth first; 0: use the one that is there
#   NEW          1: retrain with -N -s S (the original's: search again every S epochs);
#                0: retrain in MESS form with k fixed (docs/design.md §6)
#   TABLE        the CSV the results go to (default: results/<script>.csv)
#   PYTHON       the interpreter (default: python3)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
SWEEP="$(basename "$0" .sh)"
TABLE="${TABLE:-results/$SWEEP.csv}"
BATCH="${BATCH:-256}"
WORKERS="${WORKERS:-4}"
MODEL_FLAGS="${MODEL_FLAGS:-}"
MAIN_FLAGS="${MAIN_FLAGS:-}"
TRAIN="${TRAIN:-1}"
NEW="${NEW:-1}"
S="${S:-1}"
DATA_FLAGS=()
if [ -n "${DATAPATH:-}" ]; then DATA_FLAGS=(--datapath "$DATAPATH"); fi

run_main()     { echo "+ main.py $*"; "$PYTHON" "$ROOT/main.py" "$@" "${DATA_FLAGS[@]}" $MAIN_FLAGS; }
run_compress() { echo "+ find_similar_kernel.py $*"; "$PYTHON" "$ROOT/find_similar_kernel.py" "$@"; }
run_quantize() { echo "+ quantize.py $*"; "$PYTHON" "$ROOT/quantize.py" "$@"; }
# evaluate checkpoints of one model and append their rows to $TABLE: collect DATA MODEL-FLAGS... -- CKPTS...
collect() {
    local margs=()
    while [ "$1" != "--" ]; do margs+=("$1"); shift; done
    shift
    "$PYTHON" "$ROOT/scripts/collect.py" --table "$TABLE" --sweep "$SWEEP" --ckpts "$@" -- \
        "${margs[@]}" $GPUS -j "$WORKERS" -b "$BATCH" "${DATA_FLAGS[@]}"
}
show_table() { "$PYTHON" "$ROOT/scripts/collect.py" --show "$TABLE"; }

# a file name as the tools write it, from the one naming function (mess/names.py): name WHAT ARGS...
#   name compressed STEM -v VERSION [--qb N --qba N --qbb N ...]   name quantized STEM --qb N
#   name retrained CKPT.pth [-Q N] [-N -s S]
name() { (cd "$ROOT" && "$PYTHON" -m mess.names "$@"); }

# "--layers N" for the architectures that have depths (VGG its own, VGG_LAYERS), nothing for the others
depths() {
    case "$1" in resnet|wideresnet) echo "$LAYERS" ;; vgg) echo "${VGG_LAYERS:-16}" ;; *) echo "-" ;; esac
}
layer_flags() { if [ "$2" = "-" ]; then echo ""; else echo "--layers $2"; fi; }

# each_model FN: FN DATA MODEL-FLAGS... for every dataset, architecture and depth of the sweep
each_model() {
    local data arch layer
    for data in $DATA; do
        for arch in $ARCH; do
            for layer in $(depths "$arch"); do
                "$1" "$data" -a "$arch" $(layer_flags "$arch" "$layer") $MODEL_FLAGS
            done
        done
    done
}

# retraining flags and the suffix they add to checkpoint names (-N: _s<S>, as the original's)
if [ "$NEW" = 1 ]; then RT_NEW=(-N -s "$S"); else RT_NEW=(); fi

# the folder main.py writes these flags' checkpoints to (checkpoint/<model>/<dataset>, e.g.
# checkpoint/resnet20_w0.5/digits), by main.py's own parser and utils.build_model_from_args, so it cannot
# drift from models.model_name; a bad model is refused as main.py would (one line, exit 2). The model is
# built on the meta device: checked, but no weights allocated. ckpt_dir DATA MODEL-FLAGS...
ckpt_dir() {
    "$PYTHON" -c 'import sys; sys.path.insert(0, sys.argv.pop(1))
import torch, config, utils
def folder(args):
    with torch.device("meta"):
        print(utils.build_model_from_args(args)[2])
utils.run_cli(folder, config.get_args_parser())' "$ROOT" "$@"
}

# main.py, then the per-epoch files that run wrote removed, its _best kept (the original's
# rm -f checkpoint/*/*/ckpt_epoch_*.pth, narrowed to the run): run_clean DIR PREFIX MAIN-ARGS...
# DIR is the run's ckpt_dir and PREFIX its mode's name (retrain.py's file_names: PREFIX_epoch_N.pth).
# Of those, only the ones the run wrote go: new or replaced since a listing taken as it starts (main.py
# renames a fresh file into place, so a written one has a new inode and mtime; any other keeps both).
# Other models' folders, and this model's files of earlier runs (a ckpt_epoch_150.pth of a longer
# training), stay. A listing rather than epoch numbers (-N saves only every S epochs) or main.py's
# stdout (no interface), and no clock: a file written within the timestamps' granularity still counts.
run_clean() {
    local dir="$1" prefix="$2" before f; shift 2
    mkdir -p "$dir"
    before="$(epoch_files "$dir" "$prefix")"
    run_main "$@"
    LC_ALL=C comm -13 <(echo "$before") <(epoch_files "$dir" "$prefix") | while read -r f _; do
        rm -f -- "$dir/$f"
    done
}
# "NAME INODE MTIME SIZE" of DIR's PREFIX_epoch_N.pth files, sorted: epoch_files DIR PREFIX
epoch_files() {
    find "$1" -maxdepth 1 -type f -name "$2_epoch_[0-9]*.pth" -printf '%f %i %T@ %s\n' | LC_ALL=C sort
}

# the baseline: trained here (TRAIN=1) or expected in checkpoint/<model>/<data>/ckpt_best.pth
train_baseline() {
    local data="$1" dir; shift
    if [ "$TRAIN" = 1 ]; then
        dir="$(ckpt_dir "$data" "$@")"
        run_clean "$dir" ckpt \
            "$data" "$@" $GPUS -j "$WORKERS" -b "$BATCH" --epochs "$EPOCHS" ${LR:+--lr "$LR"}
    fi
}

# One model: plain quantization and v2qq at each bit width of $QBS, each retrained (-T -Q and -T), all
# evaluated with the float baseline into $TABLE. quant_vs_v2qq DATA MODEL-FLAGS...
quant_vs_v2qq() {
    local data="$1"; shift
    local ckpts=(ckpt_best.pth) qb q qrt m mrt dir
    dir="$(ckpt_dir "$data" "$@")"
    for qb in $QBS; do
        q="$(name quantized ckpt_best --qb "$qb")"
        qrt="$(name retrained "$q" -Q "$qb")"
        m="$(name compressed ckpt_best -v v2qq --qb "$qb")"
        mrt="$(name retrained "$m" "${RT_NEW[@]}")"
        run_quantize "$data" "$@" --ckpt ckpt_best.pth --qb "$qb"
        run_clean "$dir" "${qrt%_best.pth}" \
            "$data" "$@" $GPUS -j "$WORKERS" -b "$BATCH" --epochs "$RT_EPOCHS" --lr "$RT_LR" $RT_FLAGS \
            -T -Q --qb "$qb" --ckpt "$q"
        run_compress "$data" "$@" $GPUS --ckpt ckpt_best.pth -v v2qq --qb "$qb"
        run_clean "$dir" "${mrt%_best.pth}" \
            "$data" "$@" $GPUS -j "$WORKERS" -b "$BATCH" --epochs "$RT_EPOCHS" --lr "$RT_LR" $RT_FLAGS \
            -T --ckpt "$m" "${RT_NEW[@]}" -v v2qq --qb "$qb"
        ckpts+=("$q" "$qrt" "$m" "$mrt")
    done
    peers "$data" "$@"
    ckpts+=("${PEER_CKPTS[@]}")
    collect "$data" "$@" -- "${ckpts[@]}"
}

# The palettization peers of $PEERS beside MESS (quantize.py --method kmeans|vq), each retrained (-T:
# its palettes fine-tuned) like the rest: km<B> (k-means per layer), km<B>c (per output channel),
# vq<B> (2^B 3x3 kernels per layer). Fills PEER_CKPTS. peers DATA MODEL-FLAGS...
peers() {
    local data="$1"; shift
    local p bits method gran out rt dir
    PEER_CKPTS=()
    [ -n "${PEERS:-}" ] || return 0
    dir="$(ckpt_dir "$data" "$@")"
    for p in $PEERS; do
        case "$p" in
            km*c) method=kmeans; gran=channel; bits="${p:2:-1}" ;;
            km*) method=kmeans; gran=tensor; bits="${p:2}" ;;
            vq*) method=vq; gran=tensor; bits="${p:2}" ;;
            *) echo "PEERS: unknown peer $p (km<B>, km<B>c or vq<B>)" >&2; return 2 ;;
        esac
        out="$(name quantized ckpt_best --qb "$bits" --method "$method" --granularity "$gran")"
        rt="$(name retrained "$out")"
        run_quantize "$data" "$@" --ckpt ckpt_best.pth --method "$method" --granularity "$gran" --qb "$bits"
        run_clean "$dir" "${rt%_best.pth}" \
            "$data" "$@" $GPUS -j "$WORKERS" -b "$BATCH" --epochs "$RT_EPOCHS" --lr "$RT_LR" $RT_FLAGS \
            -T --ckpt "$out"
        PEER_CKPTS+=("$out" "$rt")
    done
}

# One model and one version: compress ckpt_best.pth at each bit width of $QBS (alphas and betas at 8
# bits), retrain each (-T), and evaluate them with the float baseline into $TABLE.
# mess_sweep VERSION DATA MODEL-FLAGS...
mess_sweep() {
    local version="$1" data="$2"; shift 2
    local ckpts=(ckpt_best.pth) qb m rt dir
    dir="$(ckpt_dir "$data" "$@")"
    for qb in $QBS; do
        run_compress "$data" "$@" $GPUS --ckpt ckpt_best.pth -v "$version" --qb "$qb"
        m="$(name compressed ckpt_best -v "$version" --qb "$qb")"
        rt="$(name retrained "$m" "${RT_NEW[@]}")"
        run_clean "$dir" "${rt%_best.pth}" \
            "$data" "$@" $GPUS -j "$WORKERS" -b "$BATCH" --epochs "$RT_EPOCHS" --lr "$RT_LR" \
            -T --ckpt "$m" "${RT_NEW[@]}" -v "$version"
        ckpts+=("$m" "$rt")
    done
    collect "$data" "$@" -- "${ckpts[@]}"
}
