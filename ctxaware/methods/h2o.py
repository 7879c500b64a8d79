"""H2O KV-cache eviction (heavy hitters + recent window + sink tokens) as a `transformers` cache, and its baseline
at the same budget: sinks + recent window only (StreamingLLM), which keeps no attention statistics.

    cache = H2OCache(model, budget=0.2)            # keep 20% of the prompt's length; or budget=512 tokens
    model.generate(input_ids, attention_mask=mask, cache=cache, max_new_tokens=32)  # or past_key_values=
    cache = WindowCache(model, budget=0.2)         # the first 4 real tokens and the newest rest of the budget

The score of a cached key is its attention mass summed over every query that has seen it (prefill and each decode
step) and over the query heads that share its key/value head; the kernel family returns that mass without
materialising attention (`key_mass=True`), so eviction costs no S x S buffer. After each layer's attention the layer
keeps `budget` entries per (row, key/value head): the first `sinks` real tokens, the `recent` newest tokens, and the
highest-scoring rest. Positions keep counting every token seen (`get_seq_length`), so RoPE positions of new tokens
are unchanged by eviction.

Padding (left, as in batched generation) is evicted before any real token and the kept entries stay in storage
order with padding first, so the rightmost `kept + new` columns of generate's 2D attention mask still describe the
cache exactly; that is how the ctxaware attention reads padding, and why this cache needs
`attn_implementation="ctxaware"` (it raises otherwise).

`ctxaware eval --kv_cache h2o:BUDGET` uses it through the `kv_cache` switch registered at the end of this module;
`h2o:BUDGET,slots` decodes in fixed slots (`ctxaware.methods.h2o_static`), greedy only.
"""

from __future__ import annotations

import abc
import functools
import math

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

from ctxaware.attention import ATTN_IMPLEMENTATION, attention_modules, get_attention_options
from ctxaware.switches import GenerationSetup, register_generation_hook


_HOOKS_ATTR = "_ctxaware_h2o_hooks"


def parse_budget(text: str) -> float | int:
    """`0.2` -> a fraction of the prompt (0 < f <= 1); `512` -> a token count."""
    try:
        value = float(text)
    except ValueError as error:
        raise ValueError(
            f"H2O budget {text!r} is not a number: pass a fraction like 0.2 or a count like 512"
        ) from error
    if value <= 0:
        raise ValueError(f"H2O budget must be positive, got {text!r}")
    if value <= 1 and "." in text:
        return value
    if value != int(value):
        raise ValueError(f"H2O budget {text!r}: use a fraction in (0, 1] or a whole token count")
    return int(value)


class H2OLayer(DynamicLayer):
    """One layer's cache: keys/values (B, Hkv, kept, D), their accumulated scores and absolute positions."""

    is_croppable = False

    def __init__(self, budget: float | int, sinks: int, recent_ratio: float, reference_length: int | None = None):
        super().__init__()
        self.budget_spec = budget
        self.sinks = sinks
        self.recent_ratio = recent_ratio
        self.reference_length = reference_length
        self.budget: int | None = None
        self._resolve_budget(reference_length)
        self.cumulative_length = 0
        self.scores: torch.Tensor | None = None  # (B, Hkv, kept) fp32
        self.positions: torch.Tensor | None = None  # (B, Hkv, kept) int64, absolute token positions

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            batch, heads = key_states.shape[:2]
            self.scores = torch.zeros(batch, heads, 0, device=self.device)
            self.positions = torch.zeros(batch, heads, 0, dtype=torch.long, device=self.device)
            self._resolve_budget(key_states.shape[-2])
        batch, heads, new = key_states.shape[:3]
        positions = torch.arange(self.cumulative_length, self.cumulative_length + new, device=self.device)
        self.positions = torch.cat([self.positions, positions.expand(batch, heads, new)], dim=-1)
        self.scores = torch.cat([self.scores, self.scores.new_zeros(batch, heads, new)], dim=-1)
        self.cumulative_length += new
        return super().update(key_states, value_states)

    def _resolve_budget(self, length: int | None) -> None:
        """The budget in tokens: a fraction is taken of `reference_length` when given, else of the first call's."""
        if self.budget is not None or (isinstance(self.budget_spec, float) and length is None):
            return
        if isinstance(self.budget_spec, float):
            self.budget = max(1, math.ceil(self.budget_spec * (self.reference_length or length)))
        else:
            self.budget = self.budget_spec

    def get_seq_length(self) -> int:
        """Tokens seen, evicted ones included: generate derives the next positions from it."""
        return self.cumulative_length

    def get_max_length(self) -> int:
        """Entries held after each call (the budget); -1 while a fraction budget awaits its first call."""
        return -1 if self.budget is None else self.budget

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        stored = self.keys.shape[-2] if self.is_initialized else 0
        return stored + query_length, 0

    @property
    def num_recent(self) -> int:
        return min(round(self.budget * self.recent_ratio), max(self.budget - self.sinks, 0))

    def observe(self, key_mass: torch.Tensor | None, real: torch.Tensor | None) -> None:
        """Adds one attention call's per-key mass (B, Hq, kept; None for a window cache, which keeps no scores) and
        evicts down to the budget."""
        batch, heads, stored = self.scores.shape
        if key_mass is not None:
            if key_mass.shape[-1] != stored:
                raise RuntimeError(
                    f"H2O: attention returned mass for {key_mass.shape[-1]} keys, the cache holds {stored}"
                )
            self.scores += key_mass.view(batch, heads, -1, stored).sum(2).to(self.scores.dtype)
        if stored > self.budget:
            self._evict(real)

    def _evict(self, real: torch.Tensor | None) -> None:
        batch, heads, stored = self.scores.shape
        index = torch.arange(stored, device=self.device)
        if real is None:  # no padding: the sinks are the first entries
            sink, pad = (index < self.sinks)[None, :], None
        else:
            sink, pad = real & (real.cumsum(-1) <= self.sinks), ~real[:, None, :]
        protected = (sink | (index >= stored - self.num_recent))[:, None, :]
        priority = self.scores.masked_fill(protected, math.inf)
        if pad is not None:
            priority = priority.masked_fill(pad, -math.inf)
        if stored == self.budget + 1:  # a decode step: one entry goes, every other keeps its place
            kept = index[: self.budget]
            chosen = kept + (kept >= priority.argmin(dim=-1, keepdim=True))
        else:  # ascending storage order keeps padding first and real tokens in position order
            chosen = priority.topk(self.budget, dim=-1).indices.sort(dim=-1).values
        self.scores = self.scores.gather(-1, chosen)
        self.positions = self.positions.gather(-1, chosen)
        gather = chosen[..., None].expand(-1, -1, -1, self.keys.shape[-1])
        self.keys = self.keys.gather(2, gather)
        self.values = self.values.gather(2, gather)

    def reset(self) -> None:
        super().reset()
        self.scores = self.positions = self.budget = None
        self.cumulative_length = 0
        self._resolve_budget(self.reference_length)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("an H2O cache cannot be cropped (assisted decoding): use a full cache there")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self._select(beam_idx.to(self.device))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            for name in ("keys", "values", "scores", "positions"):
                setattr(self, name, getattr(self, name).repeat_interleave(repeats, dim=0))

    def _select(self, indices: torch.Tensor) -> None:
        for name in ("keys", "values", "scores", "positions"):
            setattr(self, name, getattr(self, name)[indices])


class EvictingCache(Cache, metaclass=abc.ABCMeta):
    """A cache that sees each layer's attention call through `enable_h2o`'s hooks, and sets the attention options of
    the model's modules for the duration of each forward it is passed to."""

    needs_key_mass = True  # the attention calls return per-key mass while this cache is in use

    def _begin_forward(self, attention_mask: torch.Tensor | None) -> None:
        """Called before each forward with the model's 2D mask."""

    @abc.abstractmethod
    def _observe(self, module: nn.Module, stats) -> None:
        """Called after each layer's attention with its statistics: what a cache keeps follows from them."""

    def attention_options(self, layer_idx: int) -> dict:
        """The `AttentionOptions` fields of layer `layer_idx` during this cache's forwards."""
        return {"key_mass": self.needs_key_mass, "on_stats": self._observe}


class H2OCache(EvictingCache):
    """Heavy-hitter + recent + sink KV cache; pass as `cache` (formerly `past_key_values`) to `generate` or a forward.

    budget: a float in (0, 1] keeps that fraction of the first call's (prompt's) length, or of `reference_length`
    when given (streaming perplexity, where the whole text is the reference, as in H2O's language-modelling runs);
    an int keeps that many tokens. sinks: first real tokens always kept. recent_ratio: share of the budget kept for
    the newest tokens (H2O's default split is half heavy hitters, half recent). One cache per `generate` call, like
    `DynamicCache`.
    """

    def __init__(
        self,
        model: nn.Module,
        budget: float | int,
        *,
        sinks: int = 4,
        recent_ratio: float = 0.5,
        reference_length: int | None = None,
    ):
        if isinstance(budget, bool) or not isinstance(budget, int | float):
            raise TypeError(f"H2O budget must be a float fraction or an int count, got {budget!r}")
        if isinstance(budget, float) and not 0 < budget <= 1:
            raise ValueError(f"an H2O budget fraction must lie in (0, 1], got {budget}; pass an int for a count")
        if isinstance(budget, int) and budget < 1:
            raise ValueError(f"an H2O budget count must be >= 1, got {budget}")
        if sinks < 0 or not 0 <= recent_ratio <= 1:
            raise ValueError(f"H2O needs sinks >= 0 and recent_ratio in [0, 1], got {sinks} and {recent_ratio}")
        base = enable_h2o(model)
        config = base.config.get_text_config()
        layer_types = getattr(config, "layer_types", None) or []
        if getattr(config, "sliding_window", None) or any(t != "full_attention" for t in layer_types):
            raise ValueError(
                "H2O eviction needs full-attention layers everywhere; this model has sliding-window layers "
                "(config.sliding_window / layer_types): use its own cache instead"
            )
        if reference_length is not None and reference_length < 1:
            raise ValueError(f"an H2O reference length must be >= 1, got {reference_length}")
        layers = [H2OLayer(budget, sinks, recent_ratio, reference_length) for _ in range(config.num_hidden_layers)]
        super().__init__(layers=layers)
        self._real: torch.Tensor | None = None

    def cache_bytes(self) -> int:
        """Bytes held by the cached keys and values (the memory H2O saves is against the full cache's)."""
        return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in self.layers if layer.is_initialized)

    def _begin_forward(self, attention_mask: torch.Tensor | None) -> None:
        self._real = None if attention_mask is None else attention_mask.bool()

    def _observe(self, module: nn.Module, stats) -> None:
        layer = self.layers[module.layer_idx]
        if (self.needs_key_mass and stats.key_mass is None) or not layer.is_initialized:
            return
        stored = layer.keys.shape[-2]
        real = None if self._real is None else self._real[:, -stored:].to(layer.device)
        layer.observe(stats.key_mass, real)


class WindowCache(H2OCache):
    """StreamingLLM's cache, H2O's baseline at the same budget: after each layer's attention it keeps the first
    `sinks` real tokens and the newest `budget - sinks` entries (H2O with `recent_ratio=1`, so the budget, padding,
    positions and `cache_bytes` behave identically), and asks the kernels for no statistics. Positions keep counting
    every token seen, as in H2O (StreamingLLM itself renumbers positions inside the cache)."""

    needs_key_mass = False

    def __init__(self, model: nn.Module, budget: float | int, *, sinks: int = 4, reference_length: int | None = None):
        super().__init__(model, budget, sinks=sinks, recent_ratio=1.0, reference_length=reference_length)


def enable_h2o(model: nn.Module) -> nn.Module:
    """Installs (once) the forward hooks through which an `EvictingCache` (`H2OCache`, `WindowCache`, or their
    fixed-slot decode form) passed as `cache` sees each layer's attention call (and key mass) to evict after it.
    Outside such calls the attention options are left as they were. Returns the base (non-PEFT) model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base, _HOOKS_ATTR, None) is not None:
        return base
    implementation = base.config._attn_implementation
    if implementation != ATTN_IMPLEMENTATION:
        raise ValueError(
            f"H2O needs the per-key attention mass of the ctxaware kernels, but the model runs {implementation!r} "
            f"attention: load it with attn_implementation={ATTN_IMPLEMENTATION!r} (after `import ctxaware.attention`) "
            f"or call model.set_attn_implementation({ATTN_IMPLEMENTATION!r})"
        )
    modules = attention_modules(base)
    saved: list[dict] = []  # per module, the option fields a cache set, as they were

    def before(_module, _args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # renamed `cache` in transformers 5.x
        if not isinstance(cache, EvictingCache):
            return
        cache._begin_forward(kwargs.get("attention_mask"))
        for module in modules:
            options = get_attention_options(module)
            values = cache.attention_options(module.layer_idx)
            saved.append({name: getattr(options, name) for name in values})
            for name, value in values.items():
                setattr(options, name, value)

    def after(_module, _args, _kwargs, _output):
        while saved:
            options = get_attention_options(modules[len(saved) - 1])
            for name, value in saved.pop().items():
                setattr(options, name, value)

    handles = (
        base.register_forward_pre_hook(before, with_kwargs=True),
        base.register_forward_hook(after, with_kwargs=True, always_call=True),
    )
    setattr(base, _HOOKS_ATTR, handles)
    return base


def disable_h2o(model: nn.Module) -> None:
    """Removes the hooks of `enable_h2o`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for handle in getattr(base, _HOOKS_ATTR, None) or ():
        handle.remove()
    if hasattr(base, _HOOKS_ATTR):
        delattr(base, _HOOKS_ATTR)


# --- `ctxaware eval --kv_cache h2o:BUDGET[,slots]` / `window:BUDGET[,slots]` -------------------------------------
@register_generation_hook("kv_cache", "h2o")
def _h2o_cache(model, args: str, setup: GenerationSetup) -> None:
    """A fresh `H2OCache` per generate call; attention switches to the ctxaware kernels, which give the key mass."""
    _evicting_cache(model, "h2o", args, setup, H2OCache)


@register_generation_hook("kv_cache", "window")
def _window_cache(model, args: str, setup: GenerationSetup) -> None:
    """A fresh `WindowCache` (sinks + recent window, StreamingLLM) per generate call, with H2O's budget semantics."""
    _evicting_cache(model, "window", args, setup, WindowCache)


def _evicting_cache(model, kind: str, args: str, setup: GenerationSetup, cache_class) -> None:
    """`BUDGET` or `BUDGET,slots`: the latter decodes in fixed slots (`generate_in_slots`), the same greedy tokens."""
    budget_text, _, mode = args.partition(",")
    if not budget_text:
        raise ValueError(
            f"--kv_cache {kind} needs a budget: `{kind}:0.2` (fraction of the prompt) or `{kind}:512` (tokens)."
        )
    if mode not in ("", "slots"):
        raise ValueError(f"--kv_cache {kind}:{args}: unknown option {mode!r}; the one option is `{kind}:0.2,slots`.")
    budget = parse_budget(budget_text)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    setup.stack.callback(base.set_attn_implementation, base.config._attn_implementation)
    base.set_attn_implementation(ATTN_IMPLEMENTATION)
    setup.stack.callback(disable_h2o, model)
    cache_class(model, budget)  # validates the model (full-attention layers only) now rather than at the first batch
    setup.cache_factory = lambda length=None: cache_class(model, budget, reference_length=length)
    if mode:
        from ctxaware.methods.h2o_static import generate_in_slots  # which imports this module

        setup.generate = functools.partial(generate_in_slots, model)
