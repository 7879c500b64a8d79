"""A/B of the kernel module against an earlier version of it, dense and MoH-gated, timed side by side in one run:

    git show REV:ctxaware/kernels/triton_attention.py > /tmp/old_kernels.py
    python benchmarks/kernel_ab.py --baseline /tmp/old_kernels.py --out DIR [--variant _GROUP_KV_BYTES=8388608 ...]
    python benchmarks/kernel_ab.py --baseline ctxaware/kernels/triton_attention.py --out DIR --smoke   # CPU check

Both modules' `triton_attention` run on the same inputs: forward and forward + backward, dense and with 50% of the
heads routed per token (8 shared + 8 of 24 routed, MoH's 50% split), at 32/8 heads of 64 (4k, 16k) and 32/32 heads
of 128 (4k, 16k, 32k; forward + backward up to 16k); `--pattern sf` times SF-Attn instead, `--pattern
decode_key_mass` one decode query a row (B=8) with and without key_mass, `--shape` other shapes.
Times are GPU time: medians of CUDA-graph replay
(`bench_common.bench_graph`), so the host's Python and launches, which differ between versions, are left out.
`--variant NAME=VALUE[,NAME=VALUE]` also times a copy of the package with tuning constants changed (Python literals),
e.g. `_GROUP_KV_BYTES=8388608` (K/V bytes per launch group of heads).
Outputs are compared with the baseline's (max abs difference). `--repeats N` times every shape N times, the versions'
order alternating between runs, and reports each time's median, every run's value and each version's change against
the baseline per run (a single run's noise is about 2% at some shapes). Writes kernel_ab.json and kernel_ab.md to --out.
--smoke: tiny shapes on CPU under TRITON_INTERPRET=1, wall-clock times; checks the script, times nothing real.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import statistics
import sys
import time
from pathlib import Path


if "--smoke" in sys.argv:  # before triton is imported: the interpreter runs the kernels on CPU tensors
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
from bench_common import (  # noqa: E402
    alternating_order,
    bench_graph,
    git_commit,
    import_kernel_module,
    kernel_forward,
    wall_ms,
    write_results,
)


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ctxaware.kernels.triton_attention as package  # noqa: E402
from ctxaware.kernels import AttentionPattern  # noqa: E402


SHAPES = [(32, 8, 64, 4096), (32, 8, 64, 16384), (32, 32, 128, 4096), (32, 32, 128, 16384), (32, 32, 128, 32768)]
SMOKE_SHAPES = [(4, 2, 16, 24)]
MAX_FWDBWD_S = 16384


def routed_gates(s: int, hq: int, device, dtype) -> torch.Tensor:
    """A quarter of the heads shared, a third of the others on per token: half the heads active."""
    shared = hq // 4
    routed = torch.rand(1, s, hq - shared, device=device).argsort(-1) < (hq - shared) // 3
    gates = torch.cat([torch.ones(1, s, shared, dtype=torch.bool, device=device), routed], -1)
    return gates.to(dtype).contiguous()


def cases(
    pattern: str, s: int, hq: int, device, dtype
) -> list[tuple[str, AttentionPattern | None, torch.Tensor | None]]:
    """(name, pattern, gates) of each timed case: dense and MoH-gated, or SF-Attn as the SinkLoRA recipe trains it."""
    if pattern == "sf":
        return [("sf", AttentionPattern.sf(s // 4, sinks=4), None)]
    return [("dense", None, None), ("routed50", None, routed_gates(s, hq, device, dtype))]


def measure(variants: dict, shape: tuple, device, dtype, bench, pattern: str = "dense") -> dict:
    hq, hkv, d, s = shape
    torch.manual_seed(0)
    q = torch.randn(1, hq, s, d, device=device, dtype=dtype)
    k = torch.randn(1, hkv, s, d, device=device, dtype=dtype)
    v = torch.randn_like(k)
    dout = torch.randn_like(q)
    results = {}
    for case, pat, gates in cases(pattern, s, hq, device, dtype):
        with torch.no_grad():
            reference = kernel_forward(variants["baseline"], q, k, v, pattern=pat, head_gates=gates)
        for name, module in variants.items():
            row = {}
            with torch.no_grad():
                out = kernel_forward(module, q, k, v, pattern=pat, head_gates=gates)
                row["max_abs_diff"] = (out.float() - reference.float()).abs().max().item()
                row["fwd"] = bench(
                    lambda m=module, g=gates, a=pat: kernel_forward(m, q, k, v, pattern=a, head_gates=g)
                )
            if s <= MAX_FWDBWD_S:
                leaves = [t.detach().requires_grad_() for t in (q, k, v)]
                row["fwdbwd"] = bench(
                    lambda m=module, g=gates, a=pat, x=leaves: torch.autograd.grad(
                        kernel_forward(m, *x, pattern=a, head_gates=g), x, dout
                    )
                )
            key = f"{hq}/{hkv}x{d} S={s} {case} {name}"
            results[key] = row
            print(key, json.dumps(row), flush=True)
    return results


DECODE_BATCH = 8  # decode rows of `--pattern decode_key_mass`, as benchmarks/moh.py's decode attention


def measure_decode_key_mass(
    variants: dict, shape: tuple, device, dtype, bench, pattern: str = "decode_key_mass"
) -> dict:
    """One query per row against S keys (B=8, what H2O runs each decode step): the forward with and without
    key_mass; max abs diffs of the output and of key_mass against the baseline's."""
    hq, hkv, d, s = shape
    torch.manual_seed(0)
    q = torch.randn(DECODE_BATCH, hq, 1, d, device=device, dtype=dtype)
    k = torch.randn(DECODE_BATCH, hkv, s, d, device=device, dtype=dtype)
    v = torch.randn_like(k)
    results = {}

    def call(module, key_mass):
        return module.triton_attention(q, k, v, scale=d**-0.5, causal=True, pattern=None, key_padding_mask=None,
                                       doc_ids=None, head_gates=None, key_mass=key_mass, key_labels=None,
                                       num_labels=None)  # fmt: skip

    with torch.no_grad():
        reference, _, reference_mass, _ = call(variants["baseline"], True)
    for name, module in variants.items():
        with torch.no_grad():
            out, _, mass, _ = call(module, True)
        row = {
            "max_abs_diff": (out.float() - reference.float()).abs().max().item(),
            "key_mass_max_abs_diff": (mass - reference_mass).abs().max().item(),
            "fwd": bench(lambda m=module: call(m, True)),
            "fwd_without_key_mass": bench(lambda m=module: call(m, False)),
        }
        key = f"{hq}/{hkv}x{d} S={s} {pattern} {name}"
        results[key] = row
        print(key, json.dumps(row), flush=True)
    return results


def combined(runs: list[dict]) -> dict:
    """One row per case and version from repeated runs: each time's median and, over several runs, every run's value
    (`<time>_runs`); the largest difference to the baseline's output."""
    results = {}
    for key, row in runs[0].items():
        results[key] = {}
        for metric in row:
            values = [run[key][metric] for run in runs]
            if metric.endswith("diff"):
                results[key][metric] = max(values)
                continue
            results[key][metric] = statistics.median(values)
            if len(runs) > 1:
                results[key][f"{metric}_runs"] = values
    return results


def changes(results: dict) -> dict:
    """{case key: {time: {"per_run": [...], "median": ...}}}: each version's time over the baseline's, minus 1, run
    by run (the runs of one repeat were timed side by side) and the median of those."""
    out = {}
    for key, row in results.items():
        base_key = key.rsplit(" ", 1)[0] + " baseline"
        if key == base_key:
            continue
        base = results[base_key]
        out[key] = {}
        for metric, value in row.items():
            if metric.endswith(("diff", "_runs")):
                continue
            per_run = [
                v / b - 1
                for v, b in zip(row.get(f"{metric}_runs", [value]), base.get(f"{metric}_runs", [base[metric]]))
            ]
            out[key][metric] = {"per_run": per_run, "median": statistics.median(per_run)}
    return out


def package_variant(spec: str, index: int):
    """A copy of the package's kernel module with the constants of `spec` ("NAME=VALUE,NAME=VALUE") changed."""
    module = import_kernel_module(Path(package.__file__), f"kernel_ab_variant{index}")
    for assignment in spec.split(","):
        name, _, value = assignment.partition("=")
        if not hasattr(module, name):
            raise SystemExit(f"--variant {spec}: the kernel module has no {name!r}; name one of its constants")
        try:
            setattr(module, name, ast.literal_eval(value))
        except (ValueError, SyntaxError):
            raise SystemExit(f"--variant {spec}: {value!r} is not a Python literal (e.g. 0.5, 8388608)") from None
    return module


def write(out: Path, results: dict, meta: dict) -> None:
    lines = [f"# Kernel A/B on {meta['gpu']}", "", f"Command: `{meta['command']}` (torch {meta['torch']}, git "
             f"{meta['git'][:10]}, baseline {meta['baseline']}). Causal, B=1; ms, GPU time (CUDA-graph replay).", "",
             "| heads x D | S | case | version | fwd | fwd+bwd (decode_key_mass: fwd without key_mass) | max abs diff |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for key, row in results.items():
        shape, s, case, name = key.split(" ")
        fwdbwd = row.get("fwdbwd", row.get("fwd_without_key_mass"))
        fwdbwd = f"{fwdbwd:.3f}" if fwdbwd is not None else "-"
        lines.append(
            f"| {shape} | {s[2:]} | {case} | {name} | {row['fwd']:.3f} | {fwdbwd} | {row['max_abs_diff']:.3g} |"
        )
    change = changes(results)
    lines += ["", "Change against the baseline (each version's time over the baseline's of the same run, minus 1):", "",
              "| heads x D | S | case | version | time | per run | median |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for key, by_metric in change.items():
        shape, s, case, name = key.split(" ")
        for metric, c in by_metric.items():
            per_run = " / ".join(f"{x:+.1%}" for x in c["per_run"])
            lines.append(f"| {shape} | {s[2:]} | {case} | {name} | {metric} | {per_run} | {c['median']:+.1%} |")
    body = {"meta": meta, "results": results, "changes": change}
    write_results(out, {"kernel_ab.json": json.dumps(body, indent=1), "kernel_ab.md": "\n".join(lines) + "\n"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", required=True, help="an earlier ctxaware/kernels/triton_attention.py")
    parser.add_argument("--out", required=True, help="folder for kernel_ab.json and kernel_ab.md")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=VALUE[,NAME=VALUE]",
                        help="also time a copy of the package with these module constants changed")  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: checks the script end to end")
    parser.add_argument("--pattern", choices=["dense", "sf", "decode_key_mass"], default="dense",
                        help="dense and MoH-gated cases, SF-Attn (G = S/4, 4 sinks), or one decode query a row "
                        "with key_mass (the forward+backward column then holds the forward without key_mass)")  # fmt: skip
    parser.add_argument("--shape", nargs=4, type=int, action="append", metavar=("HQ", "HKV", "D", "S"),
                        help="time these shapes instead of the default list (repeatable)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=1, help="runs of every shape, the versions' order alternating")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: pass 1 or more")
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("benchmarks/kernel_ab.py times Triton kernels: run it on a GPU (or pass --smoke on CPU)")
    device, dtype = (torch.device("cpu"), torch.float32) if args.smoke else (torch.device("cuda"), torch.bfloat16)
    baseline = import_kernel_module(Path(args.baseline), "kernel_ab_baseline")
    variants = {"baseline": baseline, "package": package}
    for index, spec in enumerate(args.variant):
        variants[f"package@{spec}"] = package_variant(spec, index)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python benchmarks/kernel_ab.py " + " ".join(sys.argv[1:]), "git": git_commit(),
            "gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke)", "torch": torch.__version__,
            "baseline": Path(args.baseline).name, "date": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
    results = {}
    timer = wall_ms if args.smoke else bench_graph
    for shape in SMOKE_SHAPES if args.smoke else args.shape or SHAPES:
        measure_shape = measure_decode_key_mass if args.pattern == "decode_key_mass" else measure
        runs = [
            measure_shape(alternating_order(variants, repeat), tuple(shape), device, dtype, timer, args.pattern)
            for repeat in range(args.repeats)
        ]
        results.update(combined(runs))
        write(out, results, meta)  # after every shape: a cut-short run keeps what it measured


if __name__ == "__main__":
    main()
