"""A/B of attention-kernel variants against the package's, imported side by side and timed in one run (one GPU):

    python benchmarks/attention_variants.py --out DIR

Variants, all built from the installed `ctxaware.kernels.triton_attention` source, so they track the package:
- `tma`: every K/V tile of the forward and the dq kernel, and every Q/dO tile of the dk/dv kernel, through TMA
  tensor descriptors (host `TensorDescriptor`, 4-D blocks [1, 1, rows, D]);
- `tma_ws`: the same with `tl.range(..., warp_specialize=True)` on the forward's unmasked key loop;
the forward at 2, 3 and 4 pipeline stages, forward + backward at the package's stages. (To time the package against
an earlier version of it: `benchmarks/kernel_ab.py`.)
Causal, bf16, B=1, 32 query heads of 128 (32 or 8 kv heads), dense and SF (G = S/4, 4 sinks); SDPA cuDNN alongside.
Outputs and gradients are compared with the package's (max abs difference). Writes attention_variants.json to --out.
A variant that fails to compile (ptxas errors, shared memory) is reported and skipped.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path

import torch
from bench_common import (
    bench,
    edit_source,
    kernel_forward,
    kernel_forward_backward,
    load_kernel_source,
    write_results,
)
from torch.nn.attention import SDPBackend, sdpa_kernel


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ctxaware.kernels.triton_attention as package  # noqa: E402
from ctxaware.kernels import AttentionPattern  # noqa: E402


def tma_source(warp_specialize: bool) -> str:
    """The package's kernel module with K/V loads through tensor descriptors and a `tma_forward` entry point."""
    src = inspect.getsource(package)
    edits = [
        ("acc, lab_acc, m_i, l_i, q, k_base, v_base, PAD,", "acc, lab_acc, m_i, l_i, q, k_base, v_base, kvh, PAD,"),
        (
            """        k = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None], mask=col_in[None, :] & (offs_d[:, None] < D),
                    other=0.0)  # fmt: skip""",
            "        k = tl.trans(k_base.load([b.to(tl.int32), kvh.to(tl.int32), n0, 0]).reshape(BN, DP))",
        ),
        (
            """        v = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :], mask=col_in[:, None] & (offs_d[None, :] < D),
                    other=0.0)  # fmt: skip""",
            "        v = v_base.load([b.to(tl.int32), kvh.to(tl.int32), n0, 0]).reshape(BN, DP)",
        ),
        (
            "    k_base = K + b * skb + kvh * skh\n    v_base = V + b * svb + kvh * svh\n",
            "    k_base = K\n    v_base = V\n",
        ),
        # dq kernel: K/V tiles
        ("dq, q, do, lse2, delta, k_base, v_base, PAD,", "dq, q, do, lse2, delta, k_base, v_base, kvh, PAD,"),
        (
            "        k = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :], mask=kv_mask, other=0.0)\n"
            "        v = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :], mask=kv_mask, other=0.0)",
            "        k = k_base.load([b.to(tl.int32), kvh.to(tl.int32), n0, 0]).reshape(BN, DP)\n"
            "        v = v_base.load([b.to(tl.int32), kvh.to(tl.int32), n0, 0]).reshape(BN, DP)",
        ),
        # dk/dv kernel: Q/dO tiles
        (
            "        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :], mask=row_mask, other=0.0)\n"
            "        do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdom + offs_d[None, :], mask=row_mask, other=0.0)",
            "        q = Q.load([b.to(tl.int32), h.to(tl.int32), m0, 0]).reshape(BM, DP)\n"
            "        do = DO.load([b.to(tl.int32), h.to(tl.int32), m0, 0]).reshape(BM, DP)",
        ),
    ]
    src = edit_source(src, edits)
    if warp_specialize:
        loop = "    for n0 in range(start, stop, BN):\n        offs_n = n0 + tl.arange(0, BN)\n        col_in = offs_n < Sk\n        k = tl.trans"
        if loop not in src:
            raise RuntimeError("the kernel source changed; update the warp-specialised loop edit")
        src = src.replace(
            loop, loop.replace("range(start, stop, BN)", "tl.range(start, stop, BN, warp_specialize=not MASKED)")
        )
    return (
        src
        + """

from triton.tools.tensor_descriptor import TensorDescriptor


def tma_forward(q, k, v, pattern, num_stages):
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    dp = _pow2(d)
    pat = _pattern_args(pattern, hq, sk)
    dummy = q.new_empty(1, dtype=torch.int32)
    out = torch.empty_like(q)
    lse = torch.empty((b, hq, sq), device=q.device, dtype=torch.float32)
    cfg = dict(_blocks("fwd", sq, d, q.dtype, pat["KIND"] != 0), num_stages=num_stages)
    kd = TensorDescriptor(k, list(k.shape), list(k.stride()), [1, 1, cfg["BN"], dp])
    vd = TensorDescriptor(v, list(v.shape), list(v.stride()), [1, 1, cfg["BN"], dp])
    _fwd_kernel[(b * hq * _cdiv(sq, cfg["BM"]),)](
        q, kd, vd, out, lse, dummy, dummy, dummy, dummy, lse, dummy, dummy, lse,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out), hq, sq, sk, hq // hkv, d ** -0.5 * LOG2E, 1.0,
        D=d, DP=dp, CAUSAL=True, HAS_PAD=False, HAS_DOC=False, IEEE=False, SOFTCAP=False, HAS_GATE=False, HAS_LABELS=False,
        NUM_LABELS=1, LP=16, GATHER=False, SAVE_SCORES=False, HEAD_GROUP=_head_group(b * hq, hq // hkv, k), **pat, **cfg,
    )
    return out, lse


def tma_backward(q, k, v, out, lse, dout, pattern):
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    dp = _pow2(d)
    pat = _pattern_args(pattern, hq, sk)
    flags = dict(D=d, DP=dp, CAUSAL=True, HAS_PAD=False, HAS_DOC=False, IEEE=q.dtype == torch.float32, SOFTCAP=False, **pat)
    scale = d ** -0.5
    dummy = q.new_empty(1, dtype=torch.int32)
    delta = torch.empty((b, hq, sq), device=q.device, dtype=torch.float32)
    bm = 16 if _interpreting() else 64
    _bwd_delta_kernel[(_cdiv(sq, bm), b * hq)](
        out, dout, delta, dummy, dummy, dummy, sq, hq, D=d, DP=dp, BM=bm, HAS_GATE=False
    )
    common = (*_strides(q), *_strides(k), *_strides(v), *_strides(dout))
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    cfg = _blocks("dkdv", sq, d, q.dtype, pat["KIND"] != 0)
    qd = TensorDescriptor(q, list(q.shape), list(q.stride()), [1, 1, cfg["BM"], dp])
    dod = TensorDescriptor(dout, list(dout.shape), list(dout.stride()), [1, 1, cfg["BM"], dp])
    _bwd_dkdv_kernel[(b * hkv * _cdiv(sk, cfg["BN"]),)](
        qd, k, v, dod, lse, delta, dummy, dummy, dummy, dummy, dk, dv, lse, lse, *common,
        hq, hkv, sq, sk, hq // hkv, scale * LOG2E, scale, 1.0, GATHER=False, HEAD_GROUP=_head_group(b * hkv, 1, k),
        n_chunks=1, HEAD_SPLIT=1, split_stride=0, SINK_SPLIT=False, **flags, **cfg,
    )
    dq = torch.empty_like(q)
    cfg = _blocks("dq", sq, d, q.dtype, pat["KIND"] != 0)
    kd = TensorDescriptor(k, list(k.shape), list(k.stride()), [1, 1, cfg["BN"], dp])
    vd = TensorDescriptor(v, list(v.shape), list(v.stride()), [1, 1, cfg["BN"], dp])
    _bwd_dq_kernel[(b * hq * _cdiv(sq, cfg["BM"]),)](
        q, kd, vd, dout, lse, delta, dummy, dummy, dummy, dummy, dq, *common,
        hq, sq, sk, hq // hkv, scale * LOG2E, scale, 1.0, GATHER=False, HEAD_GROUP=_head_group(b * hq, hq // hkv, k),
        **flags, **cfg,
    )
    return dq, dk, dv
"""
    )


def max_diff(a, b) -> float:
    pairs = zip(a, b) if isinstance(a, tuple) else [(a, b)]
    return max((x.float() - y.float()).abs().max().item() for x, y in pairs)


def run_variants(variants: dict, prefix: str, extra: dict) -> dict:
    """Times every variant; the first is the reference its outputs are compared with."""
    results = {}
    reference = next(iter(variants.values()))()
    for variant, fn in variants.items():
        key = f"{prefix} {variant}"
        try:
            results[key] = {"ms": bench(fn), "max_abs_diff": max_diff(fn(), reference), **extra}
        except Exception as error:  # noqa: BLE001  (compile failures are results too)
            results[key] = {"error": str(error)[:300]}
        print(key, results[key], flush=True)
    return results


def measure(hkv: int, s: int, modules: dict) -> dict:
    """Every variant at (kv heads, length), dense and SF, forward and forward + backward, beside SDPA cuDNN."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, h, s, 128, device="cuda", dtype=torch.bfloat16) for h in (32, hkv, hkv))
    dout = torch.randn_like(q)
    kr, vr = k.repeat_interleave(32 // hkv, 1), v.repeat_interleave(32 // hkv, 1)
    peers = {}
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        peers["cudnn_fwd_ms"] = bench(
            lambda: torch.nn.functional.scaled_dot_product_attention(q, kr, vr, is_causal=True)
        )
        leaves = [t.detach().requires_grad_() for t in (q, kr, vr)]
        peers["cudnn_fwdbwd_ms"] = bench(lambda: torch.autograd.grad(
            torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=True), leaves, dout))  # fmt: skip
    results = {}
    for name, pattern in (("dense", None), ("sf", AttentionPattern.sf(s // 4, sinks=4))):
        fwd = {"package": lambda p=pattern: kernel_forward(package, q, k, v, p)}
        both = {"package": lambda p=pattern: kernel_forward_backward(package, q, k, v, dout, p)}
        for kind, module in modules.items():
            for stages in (2, 3, 4):
                fwd[f"{kind} stages={stages}"] = lambda m=module, p=pattern, st=stages: m.tma_forward(q, k, v, p, st)[
                    0
                ]
            both[kind] = lambda m=module, p=pattern: m.tma_backward(q, k, v, *m.tma_forward(q, k, v, p, 3), dout, p)
        results.update(run_variants(fwd, f"Hkv={hkv} S={s} {name} fwd", peers))
        results.update(run_variants(both, f"Hkv={hkv} S={s} {name} fwd+bwd", peers))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    modules = {
        "tma": load_kernel_source("av_tma", tma_source(False), out),
        "tma_ws": load_kernel_source("av_tma_ws", tma_source(True), out),
    }
    results = {}
    for hkv, s in ((32, 4096), (32, 16384), (8, 16384)):
        results.update(measure(hkv, s, modules))
    write_results(out, {"attention_variants.json": json.dumps(results, indent=1)})


if __name__ == "__main__":
    main()
