#!/usr/bin/env bash
# Runs the recipes' scientific checks at the same time on one GPU (the tiny model leaves it mostly idle) and packs
# their tables, JSON and plots into OUT/science.tar.gz.
#   benchmarks/science_all.sh OUT [CHECK ...]     (CHECK: context lofit arith rlhf moh sinklora; default: all)
# Each check runs under `timeout $SCIENCE_LIMIT` (default 540 s) with its log in OUT/CHECK.log.
set -u
out=$(realpath -m "${1:?usage: benchmarks/science_all.sh OUT [CHECK ...]}")
shift
checks=("$@")
[ ${#checks[@]} -eq 0 ] && checks=(context lofit arith rlhf moh sinklora)
here=$(dirname "$(realpath "$0")")
mkdir -p "$out"
declare -A extra=([sinklora]="--steps 300")
for check in "${checks[@]}"; do
    # shellcheck disable=SC2086
    timeout "${SCIENCE_LIMIT:-540}" python3 "$here/${check}_science.py" --out "$out/$check" ${extra[$check]:-} \
        > "$out/$check.log" 2>&1 &
done
wait
status=0
for check in "${checks[@]}"; do
    if [ -f "$out/$check/${check}_science.json" ]; then echo "$check: done"; else echo "$check: FAILED"; status=1; fi
    tail -n 25 "$out/$check.log"
done
(cd "$out" && find . -maxdepth 3 \( -name '*_science.json' -o -name '*_science.md' -o -name '*.png' -o -name '*.log' \
    -o -name 'results.json' -o -name 'summary.json' -o -name 'head_selection.json' \) -size -4M -print0 \
    | tar --null -czf science.tar.gz -T -)
exit $status
