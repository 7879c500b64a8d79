#!/usr/bin/env bash
# Here, before a device call that A/Bs candidate branches against main in one go (carry [".whl", "gpu"]):
#   bash benchmarks/device/branch_trees.sh BRANCH [BRANCH ...]
# writes main's kernel modules to gpu/main_kernels.py and gpu/main_router.py (the A/B baselines) and each branch's
# ctxaware/ and benchmarks/ (results left out) to gpu/br_<BRANCH>/, with eval/ and data/ linked in as the device's
# setup links them for the checkout (should a carry drop links, `ln -sfn $PWD/eval gpu/br_B/ctxaware/eval` there
# makes them again). On the device, from the checkout's root:
#   (cd gpu/br_BRANCH && PYTHONPATH=$PWD:/tmp/site python3 benchmarks/kernel_ab.py --baseline ../main_kernels.py ...)
# A branch that does not exist stops it before anything is written (exit 2). gpu/ is git-ignored.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
[ $# -gt 0 ] || { echo "branch_trees.sh: name the branches to A/B, e.g. moh-dkdv-head-split" >&2; exit 2; }
for branch in "$@"; do
  git rev-parse --verify --quiet "$branch^{commit}" > /dev/null \
    || { echo "branch_trees.sh: no branch $branch here (git branch lists them)" >&2; exit 2; }
done
mkdir -p gpu
git show main:ctxaware/kernels/triton_attention.py > gpu/main_kernels.py
git show main:ctxaware/kernels/moh_router.py > gpu/main_router.py
for branch in "$@"; do
  tree=gpu/br_$branch
  rm -rf "$tree" && mkdir -p "$tree"
  git archive "$branch" ctxaware benchmarks | tar -x -C "$tree"
  rm -rf "$tree/benchmarks/results"
  for sub in eval data; do ln -sfn "../../../$sub" "$tree/ctxaware/$sub"; done  # gpu/br_X/ctxaware -> the root's
  echo "$tree: $(git rev-parse --short "$branch") ($branch)"
done
