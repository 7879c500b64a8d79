"""Fixed-slot H2O and window decoding: after the prompt, each layer's keys and values live in preallocated buffers of
`budget + 1` slots, so a decode step has static shapes, reads nothing back to the host, and can run as one CUDA graph.

    out = generate_fixed_slots(model, H2OCache(model, budget=0.2), input_ids, attention_mask, max_new_tokens=64,
                               cuda_graph=True)  # or WindowCache; out.sequences, out.scores (with output_scores)

The prompt runs through the dynamic cache (`H2OCache` or `WindowCache`), which evicts down to its budget; its layers
are then copied into fixed slots (`FixedSlotCache`). Each decode step writes the new token's key and value into the one
free slot, attends over every slot (keys are already RoPE-rotated, so slot order does not matter; padding and unfilled
slots are masked), adds the attention mass to the slot scores, and frees the slot `H2OLayer` would evict: the lowest
score outside the sinks and the recent window, padding before any real token, ties to the oldest token. The kept set
is the dynamic cache's, step for step. Ages are absolute positions held in a tensor, so no step reads a value back.

With `cuda_graph=True` (CUDA only) the first `WARMUP_STEPS` decode steps run eagerly on a side stream (Triton compiles
its kernels, cuBLAS sets up its workspace), then one step is captured with `torch.cuda.CUDAGraph` and replayed for the
rest; elsewhere the same step runs eagerly. A manual capture rather than `torch.compile(mode="reduce-overhead")`: the
step is HF's model, our attention's Python dispatch with its statistics callback, and Triton launches; Dynamo would
break the graph at the callback (leaving several graphs per step), recompile whenever a cache's integer state changes
and take minutes to compile 30 layers, while a capture needs only what the fixed slots give: no host reads, fixed
addresses. Greedy decoding only; with EOS ids, as `generate`: a row that has emitted one emits the pad token after it
(inside the step), and the host stops once every row has, reading the finished flags every `FINISH_CHECK_STEPS` steps.

`ctxaware eval --kv_cache h2o:B,slots` (or `window:B,slots`) generates through `generate_in_slots`, which takes
`model.generate`'s keyword arguments (stop strings looked for at the same checks) and refuses anything but greedy
decoding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import CacheLayerMixin
from transformers.generation import GenerationMode

from ctxaware.methods.h2o import EvictingCache, H2OCache, H2OLayer


WARMUP_STEPS = 2  # eager decode steps before the capture: Triton's compilation, cuBLAS's workspace
# Decode steps between two host reads of the rows' finished flags: each read waits for the GPU to drain its queue of
# replays, so reading every step would stall the graph; up to this many steps (all padding) run past the last EOS.
FINISH_CHECK_STEPS = 8
_LAST = torch.iinfo(torch.long).max  # an order no slot has


class FixedSlotLayer(CacheLayerMixin):
    """One layer's `budget + 1` slots: keys/values (B, Hkv, slots, D), scores (B, Hkv, slots) fp32, absolute
    positions (B, Hkv, slots) int64 (-1: never filled), the free slot (B, Hkv, 1) the next token goes to, and which
    slots hold real tokens (B, slots), the key padding mask of the attention call."""

    is_croppable = False

    def __init__(self, layer: H2OLayer, pad_start: torch.Tensor, column: torch.Tensor):
        super().__init__()
        batch, heads, stored, dim = layer.keys.shape
        if stored > layer.budget:
            raise RuntimeError(f"H2O layer holds {stored} entries, over its budget {layer.budget}")
        slots = layer.budget + 1
        self.sinks, self.num_recent, self.budget = layer.sinks, layer.num_recent, layer.budget
        self.keys = layer.keys.new_zeros(batch, heads, slots, dim)
        self.values = layer.values.new_zeros(batch, heads, slots, dim)
        self.scores = layer.scores.new_zeros(batch, heads, slots)
        self.positions = layer.positions.new_full((batch, heads, slots), -1)
        for name in ("keys", "values", "scores", "positions"):
            getattr(self, name)[:, :, :stored] = getattr(layer, name)
        self.pad_start = pad_start  # (B,) left-padding columns of each row
        self.column = column  # 0-d int64, shared by every layer: the column (position) of the token being written
        self.seen = layer.cumulative_length  # tokens seen, on the host (`get_seq_length`), counted by `count_step`
        self.slot = torch.arange(slots, device=layer.keys.device)
        self.real = torch.zeros(batch, slots, dtype=torch.bool, device=layer.keys.device)
        self.free = self._free_slot(column)
        self.device, self.dtype = layer.keys.device, layer.keys.dtype
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("a fixed-slot layer is built from a filled H2O layer, not lazily")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Writes one token's key and value into the free slot; returns every slot (the attention masks the empty
        and padding ones with `real`)."""
        if key_states.shape[-2] != 1:
            raise ValueError(f"a fixed-slot cache takes one token per step, got {key_states.shape[-2]}")
        index = self.free[..., None].expand(-1, -1, -1, key_states.shape[-1])
        self.keys.scatter_(2, index, key_states)
        self.values.scatter_(2, index, value_states)
        self.scores.scatter_(-1, self.free, 0.0)
        self.positions.scatter_(-1, self.free, self.column.expand_as(self.free))
        # Padding and empty slots sit in the same slots in every head (`_free_slot` frees them by slot index), so
        # the first head's positions say which slots of a row are real.
        torch.ge(self.positions[:, 0], self.pad_start[:, None], out=self.real)
        return self.keys, self.values

    def observe(self, key_mass: torch.Tensor | None) -> None:
        """Adds the step's per-key mass (B, Hq, slots; None for a window cache) and frees the slot to evict."""
        batch, heads, slots = self.scores.shape
        if key_mass is not None:
            self.scores += key_mass.view(batch, heads, -1, slots).sum(2).to(self.scores.dtype)
        self.free.copy_(self._free_slot(self.column + 1))

    def _free_slot(self, seen: torch.Tensor) -> torch.Tensor:
        """(B, Hkv, 1): an empty slot while one is left (nothing evicted: the dynamic cache is under its budget), else
        the entry `H2OLayer._evict` drops, given `seen` tokens so far: padding first, then the lowest score outside
        the sinks (the first `sinks` real tokens) and the recent window (the newest `num_recent`); ties go to the
        oldest token, as the dynamic cache's argmin over entries in position order does."""
        pad_start = self.pad_start[:, None, None]
        real = self.positions >= pad_start
        protected = (real & (self.positions < pad_start + self.sinks)) | (self.positions >= seen - self.num_recent)
        priority = self.scores.masked_fill(protected, math.inf).masked_fill(~real, -math.inf)
        slots = self.slot.numel()
        # Among equal priorities: empty slots, the last first (the kernels read the last key column as the query's own
        # and give a padded query no output, so the first token written makes the last slot real for good); then
        # padding, by slot; real tokens by position.
        unreal = torch.where(self.positions < 0, -2 * slots - self.slot, self.slot - slots)
        order = torch.where(real, self.positions, unreal)
        order = order.masked_fill(priority != priority.amin(-1, keepdim=True), _LAST)
        return order.argmin(-1, keepdim=True)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.slot.numel(), 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return self.budget


class FixedSlotCache(EvictingCache):
    """An `H2OCache` or `WindowCache` after its prompt, in fixed slots (see the module docstring). The model is called
    with one token per row, its RoPE positions as `position_ids`, and no attention mask: each layer hands its own
    slot mask to the attention."""

    def __init__(self, cache: H2OCache, attention_mask: torch.Tensor | None = None):
        if not cache.layers or not all(layer.is_initialized for layer in cache.layers):
            raise ValueError("a fixed-slot cache is built from an H2O cache that has seen the prompt")
        first = cache.layers[0]
        batch, device = first.keys.shape[0], first.keys.device
        width = first.cumulative_length
        if attention_mask is None:
            pad_start = torch.zeros(batch, dtype=torch.long, device=device)
        else:
            pad_start = left_padding(attention_mask).to(device)
        self.column = torch.tensor(width, device=device)
        super().__init__(layers=[FixedSlotLayer(layer, pad_start, self.column) for layer in cache.layers])
        self.needs_key_mass = cache.needs_key_mass

    def _begin_forward(self, attention_mask: torch.Tensor | None) -> None:
        if attention_mask is not None:
            raise ValueError("call the model without attention_mask: a fixed-slot cache masks its own slots")

    def _observe(self, module: nn.Module, stats) -> None:
        if self.needs_key_mass and stats.key_mass is None:
            raise RuntimeError("H2O: the attention call returned no key mass")
        self.layers[module.layer_idx].observe(stats.key_mass if self.needs_key_mass else None)

    def attention_options(self, layer_idx: int) -> dict:
        return {**super().attention_options(layer_idx), "key_padding_mask": self.layers[layer_idx].real}

    def advance(self) -> None:
        """On the device, inside the step: the next token's column."""
        self.column += 1

    def count_step(self) -> None:
        """On the host, after each step (a replayed graph runs no Python): the tokens seen, for `get_seq_length`."""
        for layer in self.layers:
            layer.seen += 1


def left_padding(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) padding columns before each row's first real token; raises unless every row is padded on the left only."""
    pads = (attention_mask == 0).sum(-1)
    columns = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    if not torch.equal(attention_mask != 0, columns[None] >= pads[:, None]):
        raise ValueError("fixed-slot decoding needs prompts padded on the left only (as batched generation pads)")
    return pads


class FixedSlotDecoder:
    """Greedy decoding of `input_ids` through `cache` (a fresh `H2OCache` or `WindowCache`): the prompt's forward at
    construction (`token`, `logits` hold its next token and float32 logits), then one fixed-slot decode step per
    `step()`, which updates `token` and `logits` in place; captured as a CUDA graph after the warm-up steps when
    `cuda_graph` is set. With `eos_token_id` (ids), as `generate`: a row that has emitted one of them feeds and emits
    `pad_token_id` (default: the first EOS id) from then on, and `finished` (B,) says which rows have."""

    def __init__(
        self,
        model: nn.Module,
        cache: H2OCache,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        eos_token_id: Sequence[int] = (),
        pad_token_id: int | None = None,
        cuda_graph: bool = False,
    ):
        if cuda_graph and not input_ids.is_cuda:
            raise ValueError("cuda_graph=True needs the model and inputs on a CUDA device")
        if not isinstance(cache, H2OCache) or cache.layers[0].is_initialized:
            raise ValueError("fixed-slot decoding starts from a fresh H2OCache or WindowCache")
        mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask
        if mask is None:  # as `generate` does: no mask without padding, positions from 0
            positions = torch.arange(input_ids.shape[-1], device=input_ids.device).expand_as(input_ids)
        else:
            left_padding(mask)
            positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        self.model, self.cuda_graph = model, cuda_graph
        with torch.no_grad():  # the last position's logits only, as `generate` asks
            prompt = dict(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=cache)
            output = model(**prompt, use_cache=True, logits_to_keep=1)
        self.cache = FixedSlotCache(cache, mask)
        self.eos = torch.tensor(list(eos_token_id), dtype=torch.long, device=input_ids.device)  # (E,), maybe empty
        self.pad = eos_token_id[0] if pad_token_id is None and len(eos_token_id) else pad_token_id
        self.finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        self.logits = output.logits[:, -1].float()  # (B, V): the latest step's logits, as `generate` scores them
        self.token = self.logits.argmax(-1, keepdim=True)  # (B, 1): the latest greedy token, the next step's input
        self._finish()
        self.position = positions[:, -1:] + 1  # (B, 1): its RoPE position
        self.graph: torch.cuda.CUDAGraph | None = None
        self.eager_steps = 0

    @torch.no_grad()
    def step(self) -> None:
        """One decode step: feeds `token`, leaves the next token and its logits in `token` and `logits`."""
        if self.graph is not None:
            self.graph.replay()
        elif not self.cuda_graph:
            self._step()
        elif self.eager_steps < WARMUP_STEPS:
            current, side = torch.cuda.current_stream(), torch.cuda.Stream()
            side.wait_stream(current)
            with torch.cuda.stream(side):
                self._step()
            current.wait_stream(side)
            self.eager_steps += 1
        else:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # records only: the state moves on at the replay below
                self._step()
            self.graph = graph
            graph.replay()
        self.cache.count_step()

    def _step(self) -> None:
        """The step as captured: reads and writes only the decoder's and the cache's fixed buffers."""
        logits = self.model(input_ids=self.token, position_ids=self.position, cache=self.cache, use_cache=True).logits
        self.logits.copy_(logits[:, -1])
        self.token.copy_(self.logits.argmax(-1, keepdim=True))
        self._finish()
        self.position += 1
        self.cache.advance()

    def _finish(self) -> None:
        """`generate`'s EOS rule on the new `token`, on the device: a finished row's token becomes the pad token, and
        a row whose token is an EOS id is finished from now on."""
        if self.eos.numel():
            self.token.masked_fill_(self.finished[:, None], self.pad)
            self.finished |= (self.token == self.eos).any(-1)


@dataclass
class FixedSlotOutput:
    sequences: torch.Tensor  # (B, prompt + new tokens): max_new_tokens, or fewer once every row has emitted an EOS
    scores: tuple[torch.Tensor, ...] | None  # one float32 (B, V) logits per new token, with output_scores
    cache: FixedSlotCache


def generate_fixed_slots(
    model: nn.Module,
    cache: H2OCache,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    cuda_graph: bool = False,
    output_scores: bool = False,
    rows_done: Callable[[torch.Tensor], Sequence[bool]] | None = None,
) -> FixedSlotOutput:
    """Greedy generation through `cache` (a fresh `H2OCache` or `WindowCache`) in fixed slots: the same tokens and
    logits as `model.generate(..., cache=cache, do_sample=False, eos_token_id=..., pad_token_id=...)` (no EOS stop
    without `eos_token_id`). See the module docstring.

    `rows_done(new_tokens)`, given the (B, T) new tokens on the host at each check of the finished flags, says which
    rows are done otherwise (a stop string written); generation ends once every row is done or finished, and those
    rows' tokens after that point are whatever they decoded (`generate` pads rows a stopping criterion ends)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    decoder = FixedSlotDecoder(
        model, cache, input_ids, attention_mask, eos_token_id=eos, pad_token_id=pad_token_id, cuda_graph=cuda_graph
    )
    tokens, scores = [decoder.token.clone()], [decoder.logits.clone()]
    for step in range(1, max_new_tokens):
        if step % FINISH_CHECK_STEPS == 0 and _all_done(decoder, tokens, rows_done):
            break
        decoder.step()
        tokens.append(decoder.token.clone())
        if output_scores:
            scores.append(decoder.logits.clone())
    new = torch.cat(tokens, dim=-1)
    if bool(decoder.finished.all()):  # `generate` stops at the step where the last row emitted its EOS
        ended = (new[..., None] == decoder.eos).any(-1)
        new = new[:, : int(ended.int().argmax(-1).max()) + 1]
    sequences = torch.cat([input_ids, new], dim=-1)
    return FixedSlotOutput(sequences, tuple(scores[: new.shape[1]]) if output_scores else None, decoder.cache)


def _all_done(decoder: FixedSlotDecoder, tokens: list[torch.Tensor], rows_done) -> bool:
    """One host read: whether every row has emitted an EOS or, by `rows_done`, is done otherwise."""
    if rows_done is None:
        return bool(decoder.eos.numel()) and bool(decoder.finished.all())
    done = decoder.finished.cpu() | torch.as_tensor(rows_done(torch.cat(tokens, dim=-1).cpu()), dtype=torch.bool)
    return bool(done.all())


# `generate`'s options that change greedy tokens (logits processors) or their number, each with the value that leaves
# it off (None leaves any off): fixed slots implement none of them.
_OFF = {
    "bad_words_ids": None,
    "begin_suppress_tokens": None,
    "exponential_decay_length_penalty": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "guidance_scale": None,
    "min_new_tokens": None,
    "renormalize_logits": None,
    "sequence_bias": None,
    "suppress_tokens": None,
    "watermarking_config": None,
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "min_length": 0,
    "remove_invalid_values": False,
    "num_return_sequences": 1,
}


@torch.no_grad()
def generate_in_slots(
    model: nn.Module,
    *,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    cache: H2OCache,
    max_new_tokens: int,
    stop_strings: Sequence[str] | None = None,
    tokenizer=None,
    **options,
) -> torch.Tensor:
    """`model.generate(...)`'s sequences for greedy decoding through a fresh `cache`, in fixed slots (`cuda_graph` on
    CUDA): the EOS and pad ids resolve as `generate` resolves them (its keyword arguments, else the model's generation
    config). Stop strings are looked for in the decoded rows at each check of the finished flags: generation ends
    once every row has written one or an EOS, up to `FINISH_CHECK_STEPS - 1` steps after `generate` would, and a row
    that wrote one goes on past it rather than padding, so the texts agree up to the first stop string (where callers
    cut). Raises for sampling, beam search and any other option `generate` would apply."""
    config, unused = model._prepare_generation_config(None, max_new_tokens=max_new_tokens, **options)
    ignored = sorted(unused) + [name for name, off in _OFF.items() if getattr(config, name) not in (None, off)]
    mode = config.get_generation_mode()
    if mode != GenerationMode.GREEDY_SEARCH or ignored:
        raise ValueError(
            f"fixed-slot decoding (`,slots`) is greedy only, got {mode.value} with {ignored or 'no other options'}: "
            "drop `,slots` to decode through the dynamic cache, or decode greedily"
        )
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need the tokenizer: pass tokenizer=..., as `generate` asks")

    def wrote_a_stop_string(new_tokens: torch.Tensor) -> list[bool]:
        texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [any(stop in text for stop in stop_strings) for text in texts]

    return generate_fixed_slots(
        model,
        cache,
        input_ids,
        attention_mask,
        max_new_tokens=max_new_tokens,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        cuda_graph=input_ids.is_cuda,
        rows_done=wrote_a_stop_string if stop_strings else None,
    ).sequences
