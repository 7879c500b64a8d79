"""benchmarks/device/branch_trees.sh: main's kernel modules as the A/B baselines and each candidate branch's package
and benchmarks side by side under gpu/, so one device call times several branches from main's checkout."""

import shutil
import subprocess
from pathlib import Path

import pytest


SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "device" / "branch_trees.sh"


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def repo(tmp_path):
    """A small repository shaped like this one: main and a candidate branch that changes the kernels."""
    repo = tmp_path / "repo"
    for path, text in {
        "ctxaware/kernels/triton_attention.py": "MAIN_KERNELS = 1\n",
        "ctxaware/kernels/moh_router.py": "MAIN_ROUTER = 1\n",
        "benchmarks/kernel_ab.py": "print('ab')\n",
        "benchmarks/results/old.json": "{}\n",
        "eval/task.py": "TASK = 1\n",
        "data/README.md": "data\n",
        "tests/gpu/test_kernels_gpu.py": "GPU_TEST = 1\n",
        "benchmarks/device/branch_trees.sh": SCRIPT.read_text(),
    }.items():
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text(text)
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "-c", "user.email=t@t", "-c", "user.name=t", "add", ".")
    _git(repo, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "main")
    _git(repo, "checkout", "-qb", "candidate")
    (repo / "ctxaware/kernels/triton_attention.py").write_text("CANDIDATE_KERNELS = 1\n")
    _git(repo, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qam", "candidate")
    _git(repo, "checkout", "-q", "main")
    return repo


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_branch_trees_hold_main_baselines_and_each_branch(repo):
    run = subprocess.run(["bash", "benchmarks/device/branch_trees.sh", "candidate"], cwd=repo, capture_output=True,
                         text=True, check=True)  # fmt: skip
    assert "gpu/br_candidate:" in run.stdout
    gpu = repo / "gpu"
    assert (gpu / "main_kernels.py").read_text() == "MAIN_KERNELS = 1\n"  # the baseline is main's, not the branch's
    assert (gpu / "main_router.py").read_text() == "MAIN_ROUTER = 1\n"
    tree = gpu / "br_candidate"
    assert (tree / "ctxaware/kernels/triton_attention.py").read_text() == "CANDIDATE_KERNELS = 1\n"
    assert (tree / "benchmarks/kernel_ab.py").is_file() and not (tree / "benchmarks/results").exists()
    assert (tree / "tests/gpu/test_kernels_gpu.py").is_file()  # the branch's GPU tests run from its tree
    assert (tree / "ctxaware/eval/task.py").read_text() == "TASK = 1\n"  # linked to the checkout's eval/ and data/
    assert (tree / "ctxaware/data/README.md").is_file()


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_a_missing_branch_stops_before_anything_is_written(repo):
    run = subprocess.run(["bash", "benchmarks/device/branch_trees.sh", "candidate", "no-such-branch"], cwd=repo,
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 2 and "no branch no-such-branch" in run.stderr
    assert not (repo / "gpu").exists()


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_a_patch_is_applied_onto_main_and_a_patch_that_does_not_apply_stops_it(repo, tmp_path):
    """Unmerged candidates are kept as patches (branches have not survived a change of checkout): NAME.patch goes onto
    main and its tree to gpu/br_NAME, tests included; main's checkout and branches stay as they were."""
    patch = tmp_path / "candidate.patch"
    patch.write_text(_git(repo, "format-patch", "-1", "candidate", "--stdout"))
    _git(repo, "branch", "-qD", "candidate")
    run = subprocess.run(["bash", "benchmarks/device/branch_trees.sh", str(patch)], cwd=repo, capture_output=True,
                         text=True, check=True)  # fmt: skip
    assert "gpu/br_candidate:" in run.stdout and "(candidate)" in run.stdout
    tree = repo / "gpu" / "br_candidate"
    assert (tree / "ctxaware/kernels/triton_attention.py").read_text() == "CANDIDATE_KERNELS = 1\n"
    assert (tree / "ctxaware/kernels/moh_router.py").read_text() == "MAIN_ROUTER = 1\n"  # main's other files
    assert (repo / "ctxaware/kernels/triton_attention.py").read_text() == "MAIN_KERNELS = 1\n"
    assert _git(repo, "branch", "--format=%(refname:short)").split() == ["main"]
    assert "branch_trees" not in _git(repo, "worktree", "list")  # the temporary worktree is gone
    shutil.rmtree(repo / "gpu")
    stale = tmp_path / "stale.patch"
    stale.write_text(patch.read_text().replace("-MAIN_KERNELS = 1", "-OTHER_KERNELS = 1"))
    run = subprocess.run(["bash", "benchmarks/device/branch_trees.sh", str(stale)], cwd=repo, capture_output=True,
                         text=True)  # fmt: skip
    assert run.returncode == 2 and "does not apply to main" in run.stderr
    assert not (repo / "gpu").exists() and len(_git(repo, "worktree", "list").splitlines()) == 1
