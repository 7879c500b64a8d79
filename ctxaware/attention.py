"""The kernel family as a transformers attention implementation: `attn_implementation="ctxaware"`.

Importing this module registers it with `transformers.AttentionInterface` (and, for mask creation, the FA2 mask
function, which hands over the 2D padding mask instead of building an S x S one), so every model family whose
attention goes through the interface (Llama, Qwen2/3, Mistral, Gemma, ...) runs on `ctxaware.kernels.attention`.

Trainer does not pass custom keyword arguments down to attention, so per-module behaviour (a pattern, head gates,
statistics) lives on the attention module itself as an `AttentionOptions`, set by method code with
`set_attention_options`. Packed sequences (position ids restarting at 0, no attention mask) become `doc_ids`.
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

from ctxaware.kernels import AttentionPattern, AttentionStats, attention


ATTN_IMPLEMENTATION = "ctxaware"
_OPTIONS_ATTR = "ctxaware_attention_options"


@dataclass
class AttentionOptions:
    """What one attention module does beyond dense causal attention. Method code owns these fields."""

    pattern: AttentionPattern | None = None
    head_gates: torch.Tensor | None = None  # (B, Sq, Hq), set before each forward (e.g. by a MoH router hook)
    key_mass: bool = False  # per-key attention mass (H2O)
    key_labels: torch.Tensor | None = None  # (B, Sk) int span labels for label_mass (context scoring)
    num_labels: int | None = None
    # (B, Sk) bool, True = a real key: replaces the model's padding mask (a fixed-slot KV cache, whose slots are not in
    # token order, passes its own and calls the model without one).
    key_padding_mask: torch.Tensor | None = None
    on_stats: Callable[[nn.Module, AttentionStats], None] | None = None  # receives the statistics of each call
    backend: str = "auto"
    # When set, counts every call by (pattern as the kernel applied it, backend that ran): honest run records.
    call_log: Counter | None = None


def output_projection(module: nn.Module) -> nn.Linear | None:
    """The attention module's output projection, found by its role rather than its name (`o_proj` in Llama and most
    families, `dense` in GPT-NeoX, `out_proj` elsewhere): the last linear layer the module registers, since every
    family builds its input projections (q, k, v, or a fused qkv) before the one that maps the heads back."""
    linears = [child for child in module.children() if isinstance(child, nn.Linear)]
    return getattr(module, "o_proj", None) or (linears[-1] if len(linears) >= 2 else None)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The model's self-attention modules, in layer order (the modules transformers calls the interface from)."""
    modules = [
        m
        for m in model.modules()
        if hasattr(m, "layer_idx") and "Attention" in type(m).__name__ and output_projection(m) is not None
    ]
    if not modules:
        raise ValueError(
            f"found no attention modules (with `layer_idx`, input and output projections) in {type(model).__name__}: "
            "ctxaware supports decoder families whose attention goes through transformers' AttentionInterface"
        )
    return sorted(modules, key=lambda m: m.layer_idx)


def set_attention_options(model: nn.Module, layers: Iterable[int] | None = None, **values) -> list[AttentionOptions]:
    """Sets option fields on the attention modules of `layers` (all layers by default); returns their options."""
    known = {f.name for f in fields(AttentionOptions)}
    if unknown := set(values) - known:
        raise TypeError(f"unknown attention options {sorted(unknown)}; known: {sorted(known)}")
    modules = attention_modules(model)
    selected = range(len(modules)) if layers is None else list(layers)
    updated = []
    for index in selected:
        if not 0 <= index < len(modules):
            raise IndexError(f"layer {index} out of range: the model has {len(modules)} attention layers")
        options = get_attention_options(modules[index])
        for name, value in values.items():
            setattr(options, name, value)
        updated.append(options)
    return updated


def get_attention_options(module: nn.Module) -> AttentionOptions:
    """The module's options, created (dense, no statistics) on first access."""
    options = getattr(module, _OPTIONS_ATTR, None)
    if options is None:
        options = AttentionOptions()
        setattr(module, _OPTIONS_ATTR, options)
    return options


def use_ctxaware_attention(model: nn.Module) -> tuple[nn.Module, str]:
    """Switches `model` (a PEFT model's base) to these kernels; returns what `restore_attention` needs to undo it."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    restore = (base, base.config._attn_implementation)
    if restore[1] != ATTN_IMPLEMENTATION:
        base.set_attn_implementation(ATTN_IMPLEMENTATION)
    return restore


def restore_attention(restore: tuple[nn.Module, str]) -> None:
    if restore[1] != ATTN_IMPLEMENTATION:
        restore[0].set_attn_implementation(restore[1])


def ctxaware_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """AttentionInterface entry: (B, H, S, D) in, (B, S, H, D) out, no attention weights (none are materialised)."""
    if dropout > 0:
        raise ValueError(
            f"attention dropout {dropout} is not supported by the ctxaware kernels: set the model config's "
            "attention_dropout to 0"
        )
    if kwargs.get("s_aux") is not None:
        raise ValueError("learned attention sinks (s_aux) are not supported by the ctxaware kernels: use 'eager'")
    options = get_attention_options(module)
    pattern = options.pattern
    if sliding_window is not None:
        if pattern is not None and pattern.kind != "dense":
            raise ValueError(
                f"layer {getattr(module, 'layer_idx', '?')} has the model's sliding window {sliding_window} and the "
                f"pattern {pattern.kind!r}; one replaces the other: set config.sliding_window=None to use the pattern"
            )
        pattern = AttentionPattern.sliding_window(sliding_window)

    if torch.is_autocast_enabled(query.device.type):
        # As SDPA does under autocast: RoPE leaves q, k in float32 while v is already in the autocast dtype.
        dtype = torch.get_autocast_dtype(query.device.type)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    batch, _, q_len, _ = query.shape
    k_len = key.shape[2]
    key_padding_mask = options.key_padding_mask
    if key_padding_mask is None:
        key_padding_mask = _key_padding_mask(attention_mask, batch, k_len)
    elif attention_mask is not None:
        raise ValueError(
            "the attention module has its own key padding mask (a fixed-slot KV cache) and the model got an "
            "attention mask too: call the model without attention_mask"
        )
    doc_ids = None
    if attention_mask is None and position_ids is not None and q_len == k_len and position_ids.shape[-1] == k_len:
        doc_ids = _doc_ids(position_ids, batch)

    out, stats = attention(
        query,
        key,
        value,
        scale=scaling,
        causal=getattr(module, "is_causal", True),
        pattern=pattern,
        key_padding_mask=key_padding_mask,
        doc_ids=doc_ids,
        head_gates=options.head_gates,
        key_mass=options.key_mass,
        key_labels=options.key_labels,
        num_labels=options.num_labels,
        softcap=softcap,
        backend=options.backend,
    )
    if options.call_log is not None:
        applied = stats.pattern.describe(k_len) if stats.pattern is not None else "dense"
        options.call_log[(applied, stats.backend)] += 1
    if options.on_stats is not None:
        options.on_stats(module, stats)
    return out.transpose(1, 2).contiguous(), None


def _key_padding_mask(attention_mask: torch.Tensor | None, batch: int, k_len: int) -> torch.Tensor | None:
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(
            f"the ctxaware attention takes a 2D padding mask, got shape {tuple(attention_mask.shape)}: pass the "
            "tokenizer's attention_mask, not a prepared 4D mask"
        )
    mask = attention_mask[:, -k_len:].bool()
    if mask.shape != (batch, k_len):
        raise ValueError(f"attention mask of shape {tuple(attention_mask.shape)} does not cover {k_len} keys")
    return mask


class _DocIdsMemo:
    """`_doc_ids_from_positions` of the last position ids seen. Every layer of one forward (and the recomputation of
    checkpointed layers) receives the same position-id tensor; deciding whether it is packed reads a value back from
    the GPU, so without the memo each layer's call would stall the host until the GPU catches up."""

    def __init__(self):
        self.key: tuple | None = None  # (weak reference to the tensor, its in-place version, batch)
        self.value: torch.Tensor | None = None

    def __call__(self, position_ids: torch.Tensor, batch: int) -> torch.Tensor | None:
        key = self.key
        if key is not None and key[0]() is position_ids and key[1:] == (position_ids._version, batch):
            return self.value
        self.value = _doc_ids_from_positions(position_ids.expand(batch, -1))
        self.key = (weakref.ref(position_ids), position_ids._version, batch)
        return self.value


def _doc_ids_from_positions(position_ids: torch.Tensor) -> torch.Tensor | None:
    """Packed rows restart their position ids at 0 for every document; a plain row (0..S-1) gives None."""
    starts = position_ids == 0
    starts[:, 0] = True
    doc_ids = starts.cumsum(-1)
    if _capturing(position_ids):  # nothing can be read back: keep the ids (a plain row is one document, the same
        return doc_ids  # attention through the kernels' per-key document check)
    return None if bool((doc_ids == 1).all()) else doc_ids


def _capturing(tensor: torch.Tensor) -> bool:
    """Whether a CUDA graph is being captured on the current stream (a value read back from the GPU fails it), or
    the calls are the warm-up of one (`cuda_graph_warmup`)."""
    return _warming_up_capture or (tensor.is_cuda and torch.cuda.is_current_stream_capturing())


_doc_ids = _DocIdsMemo()
_warming_up_capture = False


@contextmanager
def cuda_graph_warmup() -> Iterator[None]:
    """Run the warm-up calls before a CUDA-graph capture inside this. Under capture the attention cannot read back
    whether position ids mark packed rows, so it keeps the kernels' per-key document check (the same attention over
    one document); warming up as captured compiles and loads those kernel variants before the capture, where a
    variant's first launch can invalidate it (`cudaErrorStreamCaptureInvalidated`, seen on a fresh H100)."""
    global _warming_up_capture
    before, _warming_up_capture = _warming_up_capture, True
    _doc_ids.key = None  # a memo made outside would skip the capture path; one made inside must not leak out
    try:
        yield
    finally:
        _warming_up_capture = before
        _doc_ids.key = None


AttentionInterface.register(ATTN_IMPLEMENTATION, ctxaware_attention_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, flash_attention_mask)
