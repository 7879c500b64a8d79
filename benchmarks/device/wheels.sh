#!/usr/bin/env bash
# Fills .whl/ (git-ignored) with the wheels the GPU machine needs beside its own torch/triton/numpy/pandas/pyarrow:
# the dependency closure of this project's stack for CPython 3.12 on x86-64 (the device's Python), resolved by pip
# from metadata only, then downloaded without the packages the machine already has (the large ones).
#   bash benchmarks/device/wheels.sh            (about 35 MB; what travels with a call is capped at 64 MiB)
# On the device: `source benchmarks/device/setup.sh` installs them into /tmp/site and imports the stack.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
py=${PYTHON:-.venv/bin/python}
# The CPU venv's versions, so the GPU runs the code the tests ran.
# liger-kernel (the `fused` extra, CUDA only) is not in the CPU venv: its newest release goes.
pins=$($py - <<'PY'
from importlib.metadata import version
names = ["transformers", "peft", "trl", "accelerate", "datasets", "gguf", "huggingface_hub", "tokenizers",
         "safetensors"]
print(" ".join(f"{n}=={version(n)}" for n in names), "liger-kernel")
PY
)
# Present on the device image (torch 2.11, triton 3.6); too large to carry, and the device's own build must be used.
# Also left out: hf-xet (4.3 MB), huggingface_hub's Xet download backend, which an offline machine never uses; with it
# the wheels, the tracked tree and two candidates' device trees passed the 64 MiB a call carries.
machine_has='^(torch|triton|nvidia-.*|cuda-.*|numpy|pandas|pyarrow|sympy|mpmath|networkx|setuptools|hf-xet)$'
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
report=$(mktemp)
# shellcheck disable=SC2086
$py -m pip install -q --dry-run --ignore-installed --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" --target /tmp/ctxaware-wheels-dry --report "$report" $pins
mapfile -t wanted < <($py - "$report" "$machine_has" <<'PY'
import json, re, sys
report, skip = json.load(open(sys.argv[1])), re.compile(sys.argv[2])
for item in report["install"]:
    meta = item["metadata"]
    name = re.sub(r"[-_.]+", "-", meta["name"]).lower()
    if not skip.match(name):
        print(f"{name}=={meta['version']}")
PY
)
rm -rf .whl && mkdir -p .whl
$py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d .whl "${wanted[@]}"
rm -f "$report"
echo "${#wanted[@]} wheels: ${wanted[*]}"
du -sh .whl
