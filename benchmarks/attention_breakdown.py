"""Where the attention kernels' time goes: the package's kernels with parts of their tile loops removed, timed beside
SDPA cuDNN and a large cuBLAS matmul (the tensor cores' sustained rate) in one run (one GPU):

    python benchmarks/attention_breakdown.py --out DIR
    python benchmarks/attention_breakdown.py --out DIR --smoke     # CPU, tiny shapes: checks the script end to end

Variants, rewritten from the installed `ctxaware.kernels.triton_attention` source (their outputs are not attention;
only their times mean something):
- `no_exp`: the forward's probabilities are the scaled scores themselves (no exp2: the special-function units idle);
- `no_pv`: the forward skips P @ V (and so loads no V); `qk_only`: both, leaving Q K^T, the row maxima and sums;
- `bwd_no_exp`: the dk/dv and dq kernels recompute P without exp2.
Dense causal and SF (G = S/4, 4 sinks), bf16, B=1, 32 heads of 128, 16k tokens; forward and forward + backward.
TFLOP/s count the matmuls FlashAttention counts (forward 2, backward 5 per tile; ours recomputes P in two backward
kernels, 7), over the causal half. Writes attention_breakdown.json and attention_breakdown.md to --out.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time
from pathlib import Path


if "--smoke" in sys.argv:  # before triton is imported: the interpreter runs the kernels on CPU tensors
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
from bench_common import (  # noqa: E402
    bench,
    edit_source,
    git_commit,
    kernel_forward,
    kernel_forward_backward,
    load_kernel_source,
    wall_ms,
    write_results,
)


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ctxaware.kernels.triton_attention as package  # noqa: E402
from ctxaware.kernels import AttentionPattern  # noqa: E402


FWD_EXP = ("p = tl.math.exp2(qk * row_scale - m_safe[:, None])", "p = qk * row_scale - m_safe[:, None]")
FWD_PV = ("acc = _dot(p, v, acc * alpha[:, None], IEEE)", "acc = acc * alpha[:, None]")
BWD_EXP = [
    ("pT = tl.math.exp2(sT - lse2[None, :])", "pT = sT - lse2[None, :]"),
    ("p = tl.math.exp2(s2 - lse2[:, None])", "p = s2 - lse2[:, None]"),
]  # fmt: skip
VARIANTS = {"no_exp": [FWD_EXP], "no_pv": [FWD_PV], "qk_only": [FWD_EXP, FWD_PV], "bwd_no_exp": BWD_EXP}


def causal_tflops(h: int, s: int, d: int, matmuls: int, ms: float, density: float = 1.0) -> float:
    """Rate of `matmuls` S x S x D matmuls per head over the causal half (times the pattern's density)."""
    return matmuls * 2 * h * s * s * d / 2 * density / (ms * 1e-3) / 1e12


def measure(modules: dict, h: int, s: int, d: int, device, dtype, bench) -> dict:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, h, s, d, device=device, dtype=dtype) for _ in range(3))
    dout = torch.randn_like(q)
    rows = {}
    # SF's density against dense causal: each query sees its group's earlier keys, G = S/4, plus the sinks
    for name, pattern, density in (("dense", None, 1.0), ("sf", AttentionPattern.sf(s // 4, sinks=4), 0.25)):
        for variant, module in modules.items():
            row = {}
            if variant != "bwd_no_exp":
                row["fwd_ms"] = bench(lambda m=module, p=pattern: kernel_forward(m, q, k, v, p))
                row["fwd_tflops"] = causal_tflops(h, s, d, 2, row["fwd_ms"], density)
            if variant in ("package", "bwd_no_exp"):
                row["fwdbwd_ms"] = bench(lambda m=module, p=pattern: kernel_forward_backward(m, q, k, v, dout, p))
                row["fwdbwd_tflops"] = causal_tflops(h, s, d, 7, row["fwdbwd_ms"], density)
            rows[f"{name} {variant}"] = row
            print(name, variant, json.dumps(row), flush=True)
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        sdpa = torch.nn.functional.scaled_dot_product_attention
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            fwd = bench(lambda: sdpa(q, k, v, is_causal=True))
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            both = bench(lambda: torch.autograd.grad(sdpa(*leaves, is_causal=True), leaves, dout))
        rows["dense cudnn"] = {"fwd_ms": fwd, "fwd_tflops": causal_tflops(h, s, d, 2, fwd),
                               "fwdbwd_ms": both, "fwdbwd_tflops": causal_tflops(h, s, d, 7, both)}  # fmt: skip
        a, b = (torch.randn(8192, 8192, device=device, dtype=dtype) for _ in range(2))
        mm = bench(lambda: torch.mm(a, b))  # what the tensor cores sustain on a large square matmul
        rows["cublas mm 8192^3"] = {"ms": mm, "tflops": 2 * 8192**3 / (mm * 1e-3) / 1e12}
        print("cudnn / cublas", rows["dense cudnn"], rows["cublas mm 8192^3"], flush=True)
    return rows


COLUMNS = [("fwd_ms", ".3f"), ("fwd_tflops", ".0f"), ("fwdbwd_ms", ".3f"), ("fwdbwd_tflops", ".0f")]


def write(out: Path, rows: dict, meta: dict) -> None:
    lines = [f"# Attention time breakdown on {meta['gpu']}", "",
             f"Command: `{meta['command']}` (torch {meta['torch']}, git {meta['git'][:10]}). {meta['dtype']}, B=1, causal, "
             f"{meta['shape']}; ms (do_bench median) and TFLOP/s (forward 2 matmuls, forward + backward 7, over the "
             "causal half times the pattern's density).", "",
             "| pattern, kernel | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s |", "|---|---|---|---|---|"]  # fmt: skip
    for key, row in rows.items():
        if "ms" in row:
            lines.append(f"| {key} | {row['ms']:.3f} | {row['tflops']:.0f} | | |")
            continue
        cells = [format(row[c], f) if c in row else "-" for c, f in COLUMNS]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    write_results(out, {"attention_breakdown.json": json.dumps({"meta": meta, "rows": rows}, indent=1),
                        "attention_breakdown.md": "\n".join(lines)})  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for attention_breakdown.json and attention_breakdown.md")
    parser.add_argument("--seq", type=int, default=16384)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: checks the script end to end")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("benchmarks/attention_breakdown.py times Triton kernels: run it on a GPU (or --smoke on CPU)")
    device, dtype = (torch.device("cpu"), torch.float32) if args.smoke else (torch.device("cuda"), torch.bfloat16)
    h, s, d = (4, 32, 16) if args.smoke else (32, args.seq, 128)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    source = inspect.getsource(package)
    modules = {"package": package}
    for name, edits in VARIANTS.items():
        modules[name] = load_kernel_source(f"breakdown_{name}", edit_source(source, edits), out)
    meta = {"command": "python benchmarks/attention_breakdown.py " + " ".join(sys.argv[1:]), "git": git_commit(),
            "gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke)", "torch": torch.__version__,
            "shape": f"{h} heads of {d}, S={s}", "dtype": str(dtype).replace("torch.", ""),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
    rows = measure(modules, h, s, d, device, dtype, wall_ms if args.smoke else bench)
    write(out, rows, meta)


if __name__ == "__main__":
    main()
