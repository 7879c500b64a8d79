"""The learned MoH router's inference gates in one Triton kernel (`ctxaware.methods.moh.router`'s `token_gates`).

In a decode step the router's PyTorch form launches dozens of small ops per layer (a matmul, softmaxes, top-k,
scatter, mixing, reordering) around one token, so the step is bound by launches, not by arithmetic. This kernel does
all of it in one launch per layer, one program per token, with the same formula:
    logits = lr_ratio * W x, W = [routed; shared (if n_shared > 1); mix (if n_shared > 0)] rows
    routed = softmax(logits_routed) * topk_mask(logits_routed) * scale_r
    shared = softmax(logits_shared) * scale_s   (n_shared > 1; a single shared head: scale_s alone)
    scale_s, scale_r = 2 n_shared softmax(logits_mix)_0, 2 n_routed softmax(logits_mix)_1   (n_shared > 0)
    scale_r = n_routed                                                                       (n_shared == 0)
and writes each gate to its head's column. Inference only: no gradients, no load statistics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ctxaware.kernels.launch import direct_launch
from ctxaware.kernels.triton_attention import _pow2


HIDDEN_BLOCK = 128  # hidden-size chunk each program reads per step of the router matmul
# A decode call has a program or a few, each alone on its SM, so a step's loads are not hidden behind other programs'
# work: at 128 a 1B router's 16 steps x 3 loads wait on memory one after another (30 us a layer on an H100). Up to
# DECODE_ROWS tokens, each program reads DECODE_HIDDEN_BLOCK of the hidden size a step with DECODE_WARPS warps.
DECODE_ROWS, DECODE_HIDDEN_BLOCK, DECODE_WARPS = 16, 1024, 8


@triton.jit
def _softmax(x, valid):
    x = tl.where(valid, x, float("-inf"))
    e = tl.where(valid, tl.exp(x - tl.max(x, 0)), 0.0)
    return e / tl.sum(e, 0)


@direct_launch
@triton.jit
def _router_gates_kernel(
    X, W_ROUTED, W_SHARED, W_MIX, HEADS, OUT, hidden, lr_ratio, top_k,
    N_ROUTED: tl.constexpr, N_SHARED: tl.constexpr, RP: tl.constexpr, SP: tl.constexpr, BH: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0).to(tl.int64)
    offs_r = tl.arange(0, RP)
    offs_s = tl.arange(0, SP)
    offs_m = tl.arange(0, 2)
    routed = tl.zeros([RP], tl.float32)
    shared = tl.zeros([SP], tl.float32)
    mix = tl.zeros([2], tl.float32)
    for h0 in range(0, hidden, BH):
        offs_h = h0 + tl.arange(0, BH)
        h_in = offs_h < hidden
        x = tl.load(X + token * hidden + offs_h, mask=h_in, other=0.0).to(tl.float32)
        w = tl.load(W_ROUTED + offs_r[:, None] * hidden + offs_h[None, :],
                    mask=(offs_r[:, None] < N_ROUTED) & h_in[None, :], other=0.0)  # fmt: skip
        routed += tl.sum(w.to(tl.float32) * x[None, :], 1)
        if N_SHARED > 1:
            w = tl.load(W_SHARED + offs_s[:, None] * hidden + offs_h[None, :],
                        mask=(offs_s[:, None] < N_SHARED) & h_in[None, :], other=0.0)  # fmt: skip
            shared += tl.sum(w.to(tl.float32) * x[None, :], 1)
        if N_SHARED > 0:
            w = tl.load(W_MIX + offs_m[:, None] * hidden + offs_h[None, :], mask=h_in[None, :], other=0.0)
            mix += tl.sum(w.to(tl.float32) * x[None, :], 1)
    r_valid = offs_r < N_ROUTED
    routed = routed * lr_ratio
    probs = _softmax(routed, r_valid)
    chosen = offs_r < 0
    remaining = tl.where(r_valid, routed, float("-inf"))
    for _ in range(top_k):  # the k largest, one argmax at a time
        best = tl.argmax(remaining, 0)
        chosen = chosen | (offs_r == best)
        remaining = tl.where(offs_r == best, float("-inf"), remaining)
    scale_r = N_ROUTED * 1.0
    if N_SHARED > 0:
        alpha = _softmax(mix * lr_ratio, offs_m < 2)
        scale_s = tl.sum(tl.where(offs_m == 0, alpha, 0.0), 0) * (2 * N_SHARED)
        scale_r = tl.sum(tl.where(offs_m == 1, alpha, 0.0), 0) * (2 * N_ROUTED)
        s_valid = offs_s < N_SHARED
        if N_SHARED > 1:
            shared_gates = _softmax(shared * lr_ratio, s_valid) * scale_s
        else:
            shared_gates = tl.where(s_valid, scale_s, 0.0)
        heads = tl.load(HEADS + offs_s, mask=s_valid, other=0)
        tl.store(OUT + token * (N_SHARED + N_ROUTED) + heads, shared_gates.to(OUT.dtype.element_ty), mask=s_valid)
    gates = tl.where(chosen, probs * scale_r, 0.0)
    heads = tl.load(HEADS + N_SHARED + offs_r, mask=r_valid, other=0)
    tl.store(OUT + token * (N_SHARED + N_ROUTED) + heads, gates.to(OUT.dtype.element_ty), mask=r_valid)


def router_gates(
    x: torch.Tensor,
    routed_weight: torch.Tensor,
    shared_weight: torch.Tensor | None,
    mix_weight: torch.Tensor | None,
    heads: torch.Tensor,
    *,
    lr_ratio: float,
    top_k: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Gates (..., n_shared + n_routed) in `dtype` for attention inputs x (..., hidden); `heads` (int32) lists the
    shared heads then the routed ones, the column each gate goes to. Weights are the stored (lr_ratio-divided) ones."""
    n_routed, hidden = routed_weight.shape
    n_shared = len(heads) - n_routed
    rows = x.reshape(-1, hidden).contiguous()
    out = torch.empty(rows.shape[0], n_shared + n_routed, device=x.device, dtype=dtype)
    dummy = routed_weight
    block, warps = HIDDEN_BLOCK, 4
    if rows.shape[0] <= DECODE_ROWS:
        block, warps = min(DECODE_HIDDEN_BLOCK, _pow2(hidden)), DECODE_WARPS
    _router_gates_kernel[(rows.shape[0],)](
        rows, routed_weight.contiguous(), dummy if shared_weight is None else shared_weight.contiguous(),
        dummy if mix_weight is None else mix_weight.contiguous(), heads, out, hidden, float(lr_ratio), top_k,
        N_ROUTED=n_routed, N_SHARED=n_shared, RP=_pow2(n_routed), SP=_pow2(n_shared), BH=block, num_warps=warps,
    )  # fmt: skip
    return out.view(*x.shape[:-1], n_shared + n_routed)
