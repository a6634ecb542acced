#!/usr/bin/env bash
# The whole pipeline in one command, offline, on CPU: train a ResNet-20 on scikit-learn's digits, compress it
# with MESS v2qq, retrain the compressed network in MESS form, and print accuracy and compression ratio of
# the three side by side; then pack the retrained network into a .mess file, evaluate it straight from that file
# and print the sizes on disk (about two minutes on two cores). Checkpoints: checkpoint/resnet20/digits/.
#
#   bash scripts/quickstart.sh
#   EPOCHS=3 RT_EPOCHS=1 MODEL_FLAGS="--width-mult 0.5" bash scripts/quickstart.sh     # quicker
#
# Settings (environment): EPOCHS RT_EPOCHS RT_LR QB QBA QBB VERSION OMP_NUM_THREADS, and those of
# scripts/common.sh.
DATA="${DATA:-digits}"
EPOCHS="${EPOCHS:-8}"
RT_EPOCHS="${RT_EPOCHS:-3}"
RT_LR="${RT_LR:-0.001}"  # -T's own fine-tuning rate: 0.01 undoes what the compressed weights keep
VERSION="${VERSION:-v2qq}"
QB="${QB:-4}"     # bank weights: 4 bits, where the compressed network visibly loses accuracy
QBA="${QBA:-4}"   # alphas
QBB="${QBB:-4}"   # betas
GPUS="${GPUS-}"
BATCH="${BATCH:-128}"
WORKERS="${WORKERS:-0}"
NEW="${NEW:-0}"
TABLE="${TABLE:-results/quickstart.csv}"
# one thread unless told: PyTorch splits its sums by thread and training carries the last-bit differences
# on, so the README's numbers hold on any machine only at one thread count (and one is faster on busy cores)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
source "$(dirname "$0")/common.sh"

m=(-a resnet --layers 20 $MODEL_FLAGS)
run_main "$DATA" "${m[@]}" $GPUS -j "$WORKERS" -b "$BATCH" --epochs "$EPOCHS" --sched cosine
run_compress "$DATA" "${m[@]}" $GPUS --ckpt ckpt_best.pth -v "$VERSION" --qb "$QB" --qba "$QBA" --qbb "$QBB"
mess="$(name compressed ckpt_best -v "$VERSION" --qb "$QB" --qba "$QBA" --qbb "$QBB")"  # as it names it
run_main "$DATA" "${m[@]}" $GPUS -j "$WORKERS" -b "$BATCH" --epochs "$RT_EPOCHS" --sched cosine --lr "$RT_LR" \
    -T --ckpt "$mess" "${RT_NEW[@]}"
rm -f "$TABLE"
rt="$(name retrained "$mess" "${RT_NEW[@]}")"
rt="${rt%.pth}"
collect "$DATA" "${m[@]}" -- ckpt_best.pth "$mess" "$rt.pth"
show_table
# the packed network (README, "The packed .mess file"): the retrained checkpoint written as a .mess file,
# evaluated straight from it, and the sizes on disk (float32 state_dict, .mess, ratio)
"$PYTHON" "$ROOT/packed.py" "$DATA" "${m[@]}" --ckpt "$rt.pth"
run_main "$DATA" "${m[@]}" $GPUS -j "$WORKERS" -b "$BATCH" -E --ckpt "$rt.mess"
"$PYTHON" "$ROOT/packed.py" "$DATA" "${m[@]}" --ckpt "$rt.mess"
