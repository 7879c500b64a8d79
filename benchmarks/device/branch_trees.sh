#!/usr/bin/env bash
# Here, before a device call that A/Bs candidate branches against main in one go (carry [".whl", "gpu"]):
#   bash benchmarks/device/branch_trees.sh BRANCH|NAME.patch [...]
# writes main's kernel modules to gpu/main_kernels.py and gpu/main_router.py (the A/B baselines) and each branch's
# ctxaware/, benchmarks/ (results left out) and tests/ to gpu/br_<BRANCH>/, with eval/ and data/ linked in as the device's
# setup links them for the checkout (should a carry drop links, `ln -sfn $PWD/eval gpu/br_B/ctxaware/eval` there
# makes them again). On the device, from the checkout's root:
#   (cd gpu/br_BRANCH && PYTHONPATH=$PWD:/tmp/site python3 benchmarks/kernel_ab.py --baseline ../main_kernels.py ...)
# A candidate may also be a patch file (NAME.patch, from `git format-patch`; docs/experiments/patches/ keeps the
# unmerged ones, since branches have not survived a change of checkout): it is applied onto main with `git am` in a
# temporary worktree and its tree goes to gpu/br_NAME.
# A branch that does not exist or a patch that does not apply to main stops it before anything is written (exit 2).
# gpu/ is git-ignored. Each tree also holds the candidate's tests/, so its GPU tests run from it.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
[ $# -gt 0 ] || { echo "branch_trees.sh: name the branches to A/B, e.g. moh-dkdv-head-split" >&2; exit 2; }
names=() revs=()
for candidate in "$@"; do
  if [[ $candidate == *.patch ]]; then
    [ -f "$candidate" ] || { echo "branch_trees.sh: no patch file $candidate" >&2; exit 2; }
    work=$(mktemp -d)
    git worktree add -q --detach "$work" main
    if ! git -C "$work" -c user.name=branch_trees -c user.email=branch_trees@localhost am -q "$(realpath "$candidate")" \
        > /dev/null 2>&1; then
      git worktree remove --force "$work"
      echo "branch_trees.sh: $candidate does not apply to main: rebase its branch and format the patch again" >&2
      exit 2
    fi
    names+=("$(basename "$candidate" .patch)") revs+=("$(git -C "$work" rev-parse HEAD)")  # the commit outlives the worktree
    git worktree remove --force "$work"
  else
    git rev-parse --verify --quiet "$candidate^{commit}" > /dev/null \
      || { echo "branch_trees.sh: no branch $candidate here (git branch lists them)" >&2; exit 2; }
    names+=("$candidate") revs+=("$candidate")
  fi
done
mkdir -p gpu
git show main:ctxaware/kernels/triton_attention.py > gpu/main_kernels.py
git show main:ctxaware/kernels/moh_router.py > gpu/main_router.py
for i in "${!names[@]}"; do
  tree=gpu/br_${names[$i]}
  rm -rf "$tree" && mkdir -p "$tree"
  paths=(ctxaware benchmarks)
  if git cat-file -e "${revs[$i]}:tests" 2> /dev/null; then paths+=(tests); fi
  git archive "${revs[$i]}" "${paths[@]}" | tar -x -C "$tree"
  rm -rf "$tree/benchmarks/results"
  for sub in eval data; do ln -sfn "../../../$sub" "$tree/ctxaware/$sub"; done  # gpu/br_X/ctxaware -> the root's
  echo "$tree: $(git rev-parse --short "${revs[$i]}") (${names[$i]})"
done
