#!/usr/bin/env bash
# The last line of a device call's command: `bash benchmarks/device/pack_out.sh`. A call returns at most 8 files from
# $OUT, none more than 2 folders down, and leaves the rest out without stopping the call (a day's A/B JSON was lost
# that way). When $OUT holds more than that, every file in it except top-level .tgz archives (e.g. lanes.sh's) goes
# into $OUT/out.tgz and the packed files are removed (model weights stay out of it, where they are); here,
# `tar xzf /work/.device/N/out.tgz` unpacks it. Prints what it did; exit 2 without $OUT.
set -euo pipefail
if [ -z "${OUT:-}" ] || [ ! -d "$OUT" ]; then
  echo "pack_out.sh: no \$OUT folder; run it as the last step of a device call's command" >&2
  exit 2
fi
out=$OUT
limit=8
files=$(find "$out" -type f | wc -l)
deep=$(find "$out" -mindepth 4 -type f | wc -l)  # $OUT/a/b/file is 3 down from $OUT; deeper ones are not returned
if [ "$files" -le "$limit" ] && [ "$deep" -eq 0 ]; then
  echo "pack_out: $files files in \$OUT, all returned as they are"
  exit 0
fi
list=$(mktemp)
(cd "$out" && find . -type f ! \( -path './*.tgz' -a ! -path './*/*' \) ! -path ./out.tgz \
  ! \( -name '*.safetensors' -o -name '*.bin' -o -name '*.pt' -o -name '*.pth' \) | sort) > "$list"
tar czf "$out/out.tgz.part" -C "$out" -T "$list"
(cd "$out" && xargs -d '\n' rm -f < "$list" && find . -mindepth 1 -type d -empty -delete)
mv "$out/out.tgz.part" "$out/out.tgz"
echo "pack_out: $(wc -l < "$list") of $files files packed into \$OUT/out.tgz (the device returns $limit files)"
rm -f "$list"
