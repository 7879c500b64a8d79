"""Host time of our attention calls through Triton's launch (`JITFunction[grid]`) and through `direct_launch`
(`ctxaware/kernels/launch.py`), in one run on one GPU:

    python benchmarks/kernel_launch.py --out DIR [--seq 4096]

SF (sinks 4, groups of S/4) and dense forward+backward, 32 heads of 128, bf16, B=1. Per call: host time (issuing 30
calls without waiting, as `host_us`) and wall time (the same calls until the GPU is done; GPU-bound calls show their
kernels' time), the median of five repeats; outputs and gradients compared bit for bit between the two paths.
Writes kernel_launch.json and kernel_launch.md to --out.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import triton
from bench_common import git_commit, write_results

import ctxaware.kernels.triton_attention as kernels
from ctxaware.kernels import AttentionPattern, attention
from ctxaware.kernels.launch import DirectLaunch


CALLS, REPEATS = 30, 5


def timed(pattern, seq):
    """(outputs and gradients of the last call, median host us per call, median wall us per call)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(1, 32, seq, 128, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
        for _ in range(3)
    )
    grad = torch.randn(1, 32, seq, 128, device="cuda", dtype=torch.bfloat16, generator=gen)

    def call():
        for t in (q, k, v):
            t.grad = None
        out, _ = attention(q, k, v, pattern=pattern, backend="triton")
        out.backward(grad)
        return out

    for _ in range(10):
        out = call()
    torch.cuda.synchronize()
    results = (out.detach().clone(), q.grad.clone(), k.grad.clone(), v.grad.clone())
    runs = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        for _ in range(CALLS):
            call()
        host = (time.perf_counter() - start) / CALLS * 1e6
        torch.cuda.synchronize()
        runs.append((host, (time.perf_counter() - start) / CALLS * 1e6))
    hosts, walls = sorted(r[0] for r in runs), sorted(r[1] for r in runs)
    return results, hosts[REPEATS // 2], walls[REPEATS // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seq", type=int, nargs="+", default=[4096])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/kernel_launch.py times kernel launches: run it on a GPU")
    launchers = {name: obj for name, obj in vars(kernels).items() if isinstance(obj, DirectLaunch)}
    rows = []
    for seq in args.seq:
        for name, pattern in (("sf", AttentionPattern.sf(group_size_ratio=0.25, sinks=4)), ("dense", None)):
            row = {"pattern": name, "S": seq}
            for path in ("triton", "direct"):
                for kernel, launcher in launchers.items():  # Triton's launch: the jit functions themselves
                    setattr(kernels, kernel, launcher.fn if path == "triton" else launcher)
                outs, row[f"{path}_host_us"], row[f"{path}_wall_us"] = timed(pattern, seq)
                row.setdefault("outputs", []).append(outs)
            row["identical"] = all(torch.equal(a, b) for a, b in zip(*row.pop("outputs")))
            row["host_ratio"] = row["direct_host_us"] / row["triton_host_us"]
            row["wall_ratio"] = row["direct_wall_us"] / row["triton_wall_us"]
            print(json.dumps(row), flush=True)
            rows.append(row)
    meta = {
        "command": "python benchmarks/kernel_launch.py " + " ".join(sys.argv[1:]),
        "git": git_commit(),
        "gpu": torch.cuda.get_device_name(),
        "versions": {"torch": torch.__version__, "triton": triton.__version__},
    }
    lines = [
        f"# Kernel launch path ({meta['gpu']})",
        "",
        f"`{meta['command']}` (git {meta['git']}, triton {triton.__version__}). Forward+backward, 32 heads of 128, "
        "bf16; us per call, median of 5 x 30 calls; ratio = direct / Triton's launch.",
        "",
        "| pattern | S | host, Triton launch | host, direct | ratio | wall, Triton launch | wall, direct | ratio | "
        "identical |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['pattern']} | {r['S']} | {r['triton_host_us']:.0f} | {r['direct_host_us']:.0f} | "
            f"{r['host_ratio']:.2f} | {r['triton_wall_us']:.0f} | {r['direct_wall_us']:.0f} | {r['wall_ratio']:.2f} | "
            f"{r['identical']} |"
        )
    out = Path(args.out)
    write_results(
        out,
        {
            "kernel_launch.json": json.dumps({"meta": meta, "rows": rows}, indent=1),
            "kernel_launch.md": "\n".join(lines),
        },
    )


if __name__ == "__main__":
    main()
