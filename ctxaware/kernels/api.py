"""`attention`: the one entry point of the kernel family; validates inputs, then runs Triton or the reference."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ctxaware.kernels.patterns import AttentionPattern
from ctxaware.kernels.reference import masked_sdpa_attention, reference_attention


@dataclass
class AttentionStats:
    """Statistics of one call; a tensor field is None unless requested. None of them carries gradients.
    `backend` and `pattern` say what ran: the backend after resolving "auto", and the pattern it was given."""

    lse: torch.Tensor | None = None  # (B, Hq, Sq) fp32, natural log; -inf on fully masked / gated-off rows
    key_mass: torch.Tensor | None = None  # (B, Hq, Sk) fp32: sum over queries of the probability on each key
    label_mass: torch.Tensor | None = None  # (B, Hq, Sq, num_labels) fp32: per query, probability on each label
    backend: str | None = None  # "triton", "reference" or "sdpa"
    pattern: AttentionPattern | None = None  # None: dense


def _validate(q, k, v, pattern, key_padding_mask, doc_ids, head_gates, key_labels, num_labels, backend):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be (B, H, S, D); got shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    b, hq, sq, d = q.shape
    _, hkv, sk, _ = k.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k and v must be (B={b}, Hkv, Sk, D={d}); got {tuple(k.shape)} and {tuple(v.shape)}")
    if hq % hkv:
        raise ValueError(
            f"query heads ({hq}) must be a multiple of key/value heads ({hkv}) for grouped-query attention"
        )
    if sq > sk:
        raise ValueError(f"more queries ({sq}) than keys ({sk}): queries are the last Sq positions of the keys")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.dtype.is_floating_point:
        raise ValueError(f"q, k, v must be floating point; got {q.dtype}")
    if pattern is not None and not isinstance(pattern, AttentionPattern):
        raise TypeError(f"pattern must be an AttentionPattern or None, got {type(pattern).__name__}")
    if key_padding_mask is not None and (key_padding_mask.shape != (b, sk) or key_padding_mask.dtype != torch.bool):
        raise ValueError(
            f"key_padding_mask must be a bool tensor of shape (B={b}, Sk={sk}), True = real token; got "
            f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)} (use attention_mask.bool())"
        )
    if doc_ids is not None and (doc_ids.shape != (b, sk) or doc_ids.dtype.is_floating_point):
        raise ValueError(
            f"doc_ids must be an int tensor of shape (B={b}, Sk={sk}); got {doc_ids.dtype} {tuple(doc_ids.shape)}"
        )
    if head_gates is not None and head_gates.shape != (b, sq, hq):
        raise ValueError(f"head_gates must have shape (B={b}, Sq={sq}, Hq={hq}); got {tuple(head_gates.shape)}")
    if (key_labels is None) != (num_labels is None):
        raise ValueError("key_labels and num_labels go together: pass both for label_mass, or neither")
    if key_labels is not None:
        if key_labels.shape != (b, sk) or key_labels.dtype.is_floating_point:
            raise ValueError(
                f"key_labels must be an int tensor of shape (B={b}, Sk={sk}); got {key_labels.dtype} "
                f"{tuple(key_labels.shape)}"
            )
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        if key_labels.numel() and (int(key_labels.min()) < 0 or int(key_labels.max()) >= num_labels):
            raise ValueError(f"key_labels must lie in [0, num_labels={num_labels})")
    if backend not in ("auto", "triton", "reference", "sdpa"):
        raise ValueError(f"backend must be 'auto', 'triton', 'reference' or 'sdpa', got {backend!r}")


def _plain_dense(q, k, v, causal, pattern, key_padding_mask, doc_ids, head_gates, statistics, softcap) -> bool:
    """Dense attention with no mask, statistic or soft-cap, that SDPA's own causal flag expresses: a full square
    (Sq == Sk) or one decode query (it sees every key). Head gates only on one decode query with nothing to
    differentiate: scaling each head's output by its gate (0: off) is then all they do, and one query's row has no
    work worth skipping (our kernel would run one program per head over the whole cache; SDPA splits the keys)."""
    extras = (key_padding_mask, doc_ids, softcap)
    dense = (pattern is None or pattern.kind == "dense") and all(x is None for x in extras) and not statistics
    if head_gates is not None:
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, head_gates))
        dense = dense and q.shape[2] == 1 and not needs_grad
    return dense and (not causal or q.shape[2] in (1, k.shape[2])) and k.shape[2] > 0


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = True,
    pattern: AttentionPattern | None = None,
    key_padding_mask: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    head_gates: torch.Tensor | None = None,
    key_mass: bool = False,
    key_labels: torch.Tensor | None = None,
    num_labels: int | None = None,
    return_lse: bool = False,
    softcap: float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, AttentionStats]:
    """Attention over (B, H, S, D) tensors with patterns, padding, packing, head gates and statistics.

    q (B, Hq, Sq, D), k and v (B, Hkv, Sk, D); queries are the last Sq positions (decode when Sq < Sk). Returns
    (out (B, Hq, Sq, D) in q's dtype, AttentionStats). Semantics: see the `ctxaware.kernels` docstring.
    """
    _validate(q, k, v, pattern, key_padding_mask, doc_ids, head_gates, key_labels, num_labels, backend)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if not scale > 0:  # the Triton forward scales the row maximum instead of every score, which needs scale > 0
        raise ValueError(f"scale must be positive, got {scale}; the default is head_dim ** -0.5")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be positive (scores become softcap * tanh(score / softcap)), got {softcap}")
    statistics = key_mass or key_labels is not None or return_lse
    plain = _plain_dense(q, k, v, causal, pattern, key_padding_mask, doc_ids, head_gates, statistics, softcap)
    if backend == "auto":
        # A call that needs nothing only ours provides goes to PyTorch's fused SDPA (cuDNN / flash on a GPU, faster
        # than our dense kernel on Hopper, and split over the keys in decode); `backend="triton"` forces ours.
        backend = "sdpa" if plain else "triton" if q.is_cuda else "reference" if statistics else "sdpa"
    if backend == "triton" and k.shape[2] == 0:  # no key, no query: nothing to launch; the reference gives the shapes
        backend = "reference"
    kwargs = dict(
        scale=scale,
        causal=causal,
        pattern=pattern,
        key_padding_mask=key_padding_mask,
        doc_ids=doc_ids,
        head_gates=head_gates,
        key_mass=key_mass,
        key_labels=key_labels,
        num_labels=num_labels,
        softcap=softcap,
    )
    if backend == "sdpa":
        if statistics:
            raise ValueError("the 'sdpa' backend returns no statistics: use backend='reference' or 'triton'")
        kwargs = {
            name: value for name, value in kwargs.items() if name not in ("key_mass", "key_labels", "num_labels")
        }
        if plain:  # no mask to build: SDPA picks its fused kernel
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=causal and q.shape[2] > 1, scale=scale, enable_gqa=k.shape[1] != q.shape[1]
            )
            if head_gates is not None:
                out = out * head_gates.transpose(1, 2)[..., None].to(out.dtype)
        else:
            out = masked_sdpa_attention(q, k, v, **kwargs)
        return out, AttentionStats(backend=backend, pattern=pattern)
    if backend == "triton":
        from ctxaware.kernels.triton_attention import triton_attention

        out, lse, mass, label_mass = triton_attention(q, k, v, **kwargs)
    else:
        out, lse, mass, label_mass = reference_attention(q, k, v, **kwargs)
    stats = AttentionStats(lse=lse if return_lse else None, key_mass=mass, label_mass=label_mass)
    stats.backend, stats.pattern = backend, pattern
    return out, stats
