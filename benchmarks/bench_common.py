"""What every speed benchmark records about the tree it timed."""

import os
import subprocess
from pathlib import Path

import torch
import triton


def git_commit() -> str:
    """The benchmarked commit: CTXAWARE_GIT_COMMIT where the tree travelled without its repository (a `git archive`
    copy on the GPU machine), else `git rev-parse HEAD`; empty when neither is known."""
    if commit := os.environ.get("CTXAWARE_GIT_COMMIT"):
        return commit
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        )
    except OSError:  # no git on the machine
        return ""
    return result.stdout.strip()


def bench(fn) -> float:
    """Median ms of `triton.testing.do_bench` on the GPU, after one call outside the timing (compilation)."""
    fn()
    torch.cuda.synchronize()
    return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))


def bench_graph(fn) -> float:
    """GPU time: median ms of the calls replayed from a CUDA graph (`triton.testing.do_bench_cudagraph`), without the
    Python and launch time `bench` includes; an MoH-gated call at 4k tokens spends longer on the host than its kernels
    take on the H200."""
    fn()
    torch.cuda.synchronize()
    return float(triton.testing.do_bench_cudagraph(fn, rep=40, return_mode="median"))
