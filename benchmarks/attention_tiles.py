"""Sweep the tile sizes of each Triton attention kernel on this GPU, to choose the defaults of `_blocks`.

    python benchmarks/attention_tiles.py --out DIR [--seq 16384] [--heads 32 32] [--patterns dense sf]

For each kernel (fwd, dkdv, dq, mass) and each candidate (BM, BN, num_warps, num_stages) it times the forward (fwd),
the forward with key_mass (mass: the forward kernel keeps its default) or the backward (dkdv, dq; the other backward
kernel keeps its default) with only that kernel's tiles changed. Candidates
are compiled first in parallel worker processes (Triton's disk cache keeps them), then timed one by one.
Writes attention_tiles.json (every timing) and attention_tiles.md (the best candidates per kernel and pattern).
Candidates that do not fit the GPU (shared memory, registers) are recorded as failed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch
import triton


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from attention import bench  # noqa: E402  (benchmarks/attention.py: the same timing as the kernel benchmark)

from ctxaware.kernels import AttentionPattern, attention, triton_attention  # noqa: E402


CANDIDATES = {
    "fwd": dict(BM=[64, 128], BN=[64, 128], num_warps=[4, 8], num_stages=[2, 3, 4]),
    "dkdv": dict(BM=[32, 64], BN=[64, 128], num_warps=[4, 8], num_stages=[2, 3, 4]),
    "dq": dict(BM=[64, 128], BN=[32, 64], num_warps=[4, 8], num_stages=[2, 3, 4]),
    "mass": dict(BM=[32, 64, 128], BN=[64, 128], num_warps=[4, 8], num_stages=[2, 3, 4]),
}
DEFAULT_BLOCKS = triton_attention._blocks


def candidates(kernel: str) -> list[dict]:
    grid = CANDIDATES[kernel]
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def use_tiles(kernel: str, tiles: dict | None) -> None:
    """Make `_blocks` return `tiles` for `kernel` (None: the defaults everywhere)."""

    def blocks(name, sq, d, dtype, sparse, labels=False):
        if tiles is not None and name == kernel:
            return dict(tiles)
        return DEFAULT_BLOCKS(name, sq, d, dtype, sparse, labels=labels)

    triton_attention._blocks = blocks


def make_case(seq: int, hq: int, hkv: int, head_dim: int, pattern_name: str):
    torch.manual_seed(0)
    q = torch.randn(1, hq, seq, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, hkv, seq, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, hkv, seq, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    pattern = AttentionPattern.sf(seq // 4, sinks=4) if pattern_name == "sf" else AttentionPattern.dense()
    return q, k, v, pattern


def timed(kernel: str, case) -> float:
    q, k, v, pattern = case
    if kernel in ("fwd", "mass"):
        fn = lambda: attention(q, k, v, causal=True, pattern=pattern, key_mass=kernel == "mass")  # noqa: E731
    else:
        out, _ = attention(q, k, v, causal=True, pattern=pattern)
        grad = torch.randn_like(out)

        def fn():
            for t in (q, k, v):
                t.grad = None
            out.backward(grad, retain_graph=True)

    return bench(fn)


def compile_one(job) -> str | None:
    """Runs one candidate once (compiling it into the disk cache); returns the error text if it does not run."""
    kernel, tiles, seq, hq, hkv, head_dim, pattern_name = job
    use_tiles(kernel, tiles)
    try:
        small = min(seq, 2048)  # same compiled kernel (sizes are runtime arguments), less work
        q, k, v, pattern = make_case(small, hq, hkv, head_dim, pattern_name)
        out, _ = attention(q, k, v, causal=True, pattern=pattern, key_mass=kernel == "mass")
        if kernel in ("dkdv", "dq"):
            out.backward(torch.randn_like(out))
        torch.cuda.synchronize()
        return None
    except Exception as error:  # noqa: BLE001  (a candidate that does not fit is a result, not a crash)
        return f"{type(error).__name__}: {str(error)[:200]}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seq", type=int, default=16384)
    parser.add_argument("--heads", type=int, nargs=2, default=[32, 32], metavar=("HQ", "HKV"))
    parser.add_argument("--head_dim", type=int, default=128)
    parser.add_argument("--patterns", nargs="+", default=["dense", "sf"], choices=["dense", "sf"])
    parser.add_argument("--kernels", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    args = parser.parse_args()
    hq, hkv = args.heads
    started = time.time()
    jobs = [
        (kern, tiles, args.seq, hq, hkv, args.head_dim, pat)
        for pat in args.patterns
        for kern in args.kernels
        for tiles in candidates(kern)
    ]
    ctx = torch.multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(args.workers, mp_context=ctx) as pool:
        errors = list(pool.map(compile_one, jobs))
    print(f"compiled {len(jobs)} candidates in {time.time() - started:.0f} s", flush=True)
    rows = []
    for (kern, tiles, *_, pat), error in zip(jobs, errors):
        row = dict(kernel=kern, pattern=pat, **tiles)
        if error is None:
            use_tiles(kern, tiles)
            try:
                row["ms"] = timed(kern, make_case(args.seq, hq, hkv, args.head_dim, pat))
            except Exception as err:  # noqa: BLE001
                error = f"{type(err).__name__}: {str(err)[:200]}"
        if error is not None:
            row["error"] = error
        print(json.dumps(row), flush=True)
        rows.append(row)
    use_tiles("", None)
    defaults = {}
    for pat in args.patterns:
        for kern in args.kernels:
            tiles = DEFAULT_BLOCKS(kern, args.seq, args.head_dim, torch.bfloat16, pat != "dense")
            defaults[f"{kern}/{pat}"] = dict(
                tiles=tiles, ms=timed(kern, make_case(args.seq, hq, hkv, args.head_dim, pat))
            )
    write(Path(args.out), args, rows, defaults, time.time() - started)


def write(out: Path, args, rows, defaults, seconds):
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(
        command="python benchmarks/attention_tiles.py " + " ".join(sys.argv[1:]),
        gpu=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        seconds=round(seconds, 1),
    )
    (out / "attention_tiles.json").write_text(json.dumps(dict(meta=meta, defaults=defaults, rows=rows), indent=1))
    lines = [
        f"# Attention tile sweep on {meta['gpu']}",
        "",
        f"Command: `{meta['command']}` (S={args.seq}, "
        f"heads {args.heads[0]}/{args.heads[1]}, bf16, D={args.head_dim}, causal; ms = median of do_bench of the forward "
        "(fwd), the forward with key_mass (mass) or the whole backward (dkdv, dq)).",
        "",
        "| kernel | pattern | default tiles | default ms | best tiles | best ms | best / default |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, default in defaults.items():
        kern, pat = key.split("/")
        ok = [r for r in rows if r["kernel"] == kern and r["pattern"] == pat and "ms" in r]
        if not ok:
            continue
        best = min(ok, key=lambda r: r["ms"])
        tiles = {k: best[k] for k in CANDIDATES[kern]}
        lines.append(
            f"| {kern} | {pat} | {default['tiles']} | {default['ms']:.2f} | {tiles} | {best['ms']:.2f} | "
            f"{best['ms'] / default['ms']:.2f} |"
        )
    (out / "attention_tiles.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
