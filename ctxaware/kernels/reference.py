"""Plain PyTorch reference of `ctxaware.kernels.attention`: same semantics, materialises the (Sq, Sk) scores.

It is the CPU run-time path and the oracle of the Triton tests. Inputs are upcast to float32 (float64 stays float64);
autograd gives dq, dk, dv and dgates.
"""

from __future__ import annotations

import torch

from ctxaware.kernels.patterns import AttentionPattern, pattern_mask


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    causal: bool = True,
    pattern: AttentionPattern | None = None,
    key_padding_mask: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    head_gates: torch.Tensor | None = None,
    key_mass: bool = False,
    key_labels: torch.Tensor | None = None,
    num_labels: int | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Returns (out, lse, key_mass or None, label_mass or None); inputs are assumed validated by `attention`."""
    _, hq, sq, _ = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    qc, kc, vc = q.to(compute), k.to(compute), v.to(compute)
    if hkv != hq:
        kc = kc.repeat_interleave(hq // hkv, dim=1)
        vc = vc.repeat_interleave(hq // hkv, dim=1)
    mask = pattern_mask(
        pattern, hq, sq, sk, causal=causal, key_padding_mask=key_padding_mask, doc_ids=doc_ids, device=q.device
    )
    gate = None
    if head_gates is not None:
        gates = head_gates.to(compute).transpose(1, 2)[..., None]  # (B, Hq, Sq, 1)
        # A gate of exactly 0 switches the (token, head) off: no work, no statistics, no gradient to the gate.
        gate = torch.where(gates == 0, torch.zeros_like(gates), gates)
        mask = mask & (gates != 0)
    scores = (qc @ kc.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~mask, float("-inf"))
    row_live = mask.any(-1, keepdim=True)
    lse_live = torch.logsumexp(scores.masked_fill(~row_live, 0.0), dim=-1, keepdim=True)
    probs = torch.exp(scores - lse_live)  # exactly 0 on masked keys and on fully masked rows
    out = probs @ vc
    if gate is not None:
        out = out * gate
    lse = lse_live.squeeze(-1).masked_fill(~row_live.squeeze(-1), float("-inf")).detach().float()
    stats_probs = probs.detach().float()
    mass = stats_probs.sum(dim=-2) if key_mass else None
    label_mass = None
    if key_labels is not None:
        onehot = torch.nn.functional.one_hot(key_labels.to(q.device).long(), num_labels).float()  # (B, Sk, L)
        label_mass = stats_probs @ onehot[:, None]
    return out.to(q.dtype), lse, mass, label_mass


def masked_sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    causal: bool = True,
    pattern: AttentionPattern | None = None,
    key_padding_mask: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    head_gates: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """The CPU run-time path when no statistics are asked for: the same boolean mask as `reference_attention`, fed
    to PyTorch's fused SDPA instead of a materialised softmax (several times faster, far less autograd memory)."""
    _, hq, sq, _ = q.shape
    if softcap is not None or not torch.isfinite(k).all():
        # SDPA has no soft-capping; and it scores masked keys too, so a NaN / inf key would reach rows that cannot see
        # it, where the reference masks the scores first, as the Triton kernel does: only rows that see the key.
        options = dict(causal=causal, pattern=pattern, key_padding_mask=key_padding_mask, doc_ids=doc_ids)
        return reference_attention(q, k, v, scale=scale, head_gates=head_gates, softcap=softcap, **options)[0]
    mask = pattern_mask(
        pattern, hq, sq, k.shape[2], causal=causal, key_padding_mask=key_padding_mask, doc_ids=doc_ids, device=q.device
    )
    if head_gates is not None:
        mask = mask & (head_gates.transpose(1, 2)[..., None] != 0)
    live = mask.any(-1, keepdim=True)
    # A row with no allowed key gives 0 (SDPA would give NaN): let it see every key, then zero it.
    mask = mask | ~live
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != hq
    )
    out = torch.where(live, out, 0)  # not a product: a NaN in a row that was let see every key must not survive
    if head_gates is not None:
        out = out * head_gates.transpose(1, 2)[..., None].to(out.dtype)
    return out
