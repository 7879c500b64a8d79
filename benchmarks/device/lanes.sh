#!/usr/bin/env bash
# Runs long GPU jobs across device calls: each lane is a detached process that outlives the call that started it,
# and every call (start or poll) waits up to WAIT seconds, then copies all lanes' logs and results to $OUT.
#   bash benchmarks/device/lanes.sh start LANES_FILE WAIT     LANES_FILE: one lane a line, "name<TAB>command"
#   bash benchmarks/device/lanes.sh poll WAIT                  (in a later call on the same warm machine)
# A lane's command runs from the repository root with benchmarks/device/setup.sh (or $LANES_SETUP) sourced and
# LANE_OUT set to its results folder; $LANES_ROOT/<name>/rc (default /tmp/lanes) appears when it ends.
# $OUT gets each lane's cmd, log and rc as files and everything under the lanes' results folders (model weights left
# out) as lanes.tgz: the device returns only shallow folders of few files. With more lane files than a call returns,
# pack_out.sh moves the cmd, log and rc files into out.tgz.
set -uo pipefail
shopt -s nullglob
cd "$(git rev-parse --show-toplevel 2>/dev/null || pwd)"
root=${LANES_ROOT:-/tmp/lanes}
export LANES_SETUP=${LANES_SETUP:-benchmarks/device/setup.sh}
mode=${1:?start or poll}
if [ "$mode" = start ]; then
  lanes_file=${2:?lanes file}; wait_s=${3:?seconds}
  [ -f "$lanes_file" ] || { echo "lanes.sh: no lanes file $lanes_file; write one lane a line, name<TAB>command" >&2; exit 2; }
  mkdir -p $root
  started=0
  while IFS=$'\t' read -r name cmd; do
    [ -z "$name" ] || [ "${name:0:1}" = "#" ] && continue
    mkdir -p "$root/$name/out"
    printf '%s\n' "$cmd" > "$root/$name/cmd"
    # shellcheck disable=SC2016
    setsid bash -c 'source "$LANES_SETUP" > /dev/null; export LANE_OUT="$1/out"
      bash "$1/cmd" > "$1/log" 2>&1; echo $? > "$1/rc"' _ "$root/$name" < /dev/null > /dev/null 2>&1 &
    echo "started lane $name"
    started=$((started + 1))
  done < "$lanes_file"
  [ $started -gt 0 ] || { echo "lanes.sh: $lanes_file holds no lanes; write one lane a line, name<TAB>command" >&2; exit 2; }
else
  wait_s=${2:?seconds}
  lanes=("$root"/*/)
  [ ${#lanes[@]} -gt 0 ] || { echo "lanes.sh: no lanes under $root (a fresh machine loses them); start them again" >&2; exit 2; }
fi
deadline=$((SECONDS + wait_s))
while [ $SECONDS -lt $deadline ]; do
  running=0
  for d in $root/*/; do [ -f "$d/rc" ] || running=$((running + 1)); done
  [ $running -eq 0 ] && break
  sleep 2
done
for d in $root/*/; do
  name=$(basename "$d")
  echo "lane $name: $( [ -f "$d/rc" ] && echo "ended rc=$(cat "$d/rc")" || echo running ); last lines:"
  tail -n 4 "$d/log" 2>/dev/null | sed 's/^/    /'
done
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
if [ -n "${OUT:-}" ]; then
  for d in $root/*/; do
    mkdir -p "$OUT/lanes/$(basename "$d")"
    cp "$d"/cmd "$d"/log "$d"/rc "$OUT/lanes/$(basename "$d")/" 2>/dev/null
  done
  tar czf "$OUT/lanes.tgz" -C "$(dirname "$root")" --exclude='*.safetensors' --exclude='*.bin' --exclude='*.pt' \
    --exclude='*.pth' "$(basename "$root")"
  bash "$(dirname "${BASH_SOURCE[0]}")/pack_out.sh"  # many lanes' logs are more files than a call returns
fi
exit 0
