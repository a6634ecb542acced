#!/usr/bin/env bash
# Download and convert every published checkpoint that down_ckpt.py knows (see --list).
#
#   ./down_ckpt_all.sh                                  # from download.pytorch.org and github.com
#   ./down_ckpt_all.sh --mirror https://lab-server/w/   # extra flags go to every call
#   ./down_ckpt_all.sh --mirror http://lab-server/w/ --allow-http --deadline 600
#
# Finished files are skipped, so a second run only fetches what failed the first time.
set -u
for a in "$@"; do
    if [ "$a" = --sha256 ] || [ "${a#--sha256=}" != "$a" ]; then
        echo "down_ckpt_all.sh: error: --sha256 pins one file: give it to down_ckpt.py for that file" >&2
        exit 2
    fi
done
PY=${PYTHON:-python}
TOOL="$(dirname "$0")/down_ckpt.py"  # checkpoints land in ./checkpoint of the current folder
list=$($PY "$TOOL" --list) || exit 2
failed=0
while IFS= read -r line; do
    args=${line%%#*}  # drop the trailing "# description"
    # shellcheck disable=SC2086  # $args is a list of flags
    $PY "$TOOL" $args "$@" || failed=$((failed + 1))
done <<< "$list"
if [ "$failed" -gt 0 ]; then
    echo "down_ckpt_all.sh: $failed download(s) failed; run it again to retry them" >&2
    exit 2
fi
