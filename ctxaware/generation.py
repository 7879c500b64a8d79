"""Batched greedy generation and log-likelihood scoring for causal LMs, shared by the evaluation harnesses and recipes.

Generation pads on the left so every row's next token sits in the last column; scoring pads on the right and reads
each row's own positions. Both sort inputs by length so a batch wastes little padding, then restore the caller's order.
"""

from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm


# A tokenizer_config.json key: false where plain text must not start with BOS (see `encode_prompt`).
PLAIN_TEXT_BOS_KEY = "add_bos_to_plain_text"


def encode_prompt(tokenizer, text: str, *, add_bos: bool = True) -> list[int]:
    """Token ids of `text`, with the BOS token prepended when the tokenizer has one and did not add it itself, unless
    its config sets `PLAIN_TEXT_BOS_KEY` false (models converted from GGUF files that say so: SmolLM2's BOS is its
    chat turn marker, which plain text never starts with).

    Chat-templated text already carries its BOS, so callers pass `add_bos=False` for it.
    """
    ids = tokenizer(text, add_special_tokens=add_bos)["input_ids"]
    bos = tokenizer.bos_token_id
    if add_bos and starts_with_bos(tokenizer) and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    return ids


def starts_with_bos(tokenizer) -> bool:
    """Whether the model expects plain text to start with its BOS token: it has one, and its config does not set
    `PLAIN_TEXT_BOS_KEY` false."""
    return tokenizer.bos_token_id is not None and getattr(tokenizer, "init_kwargs", {}).get(PLAIN_TEXT_BOS_KEY, True)


def plain_text_bos(tokenizer) -> str:
    """The BOS text to put before plain text that the tokenizer will encode with its special tokens: BOS where the
    model expects it (`starts_with_bos`) and the tokenizer does not add it itself, else ""."""
    if not starts_with_bos(tokenizer):
        return ""
    ids = tokenizer("x", add_special_tokens=True)["input_ids"]
    return "" if ids and ids[0] == tokenizer.bos_token_id else tokenizer.bos_token


def _length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    raise ValueError("The tokenizer has neither a pad nor an EOS token: set `tokenizer.pad_token` before evaluating.")


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence[list[int]],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    generate_kwargs: dict | None = None,
    cache_factory: Callable[[], object] | None = None,
    generate_fn: Callable[..., torch.Tensor] | None = None,
    desc: str = "generate",
    progress: bool = True,
    stop_strings: Sequence[str] | None = None,
) -> list[str]:
    """Greedy continuations of token-id `prompts`, decoded without special tokens and cut at the first EOS.

    `stop_strings` end a row's generation once its text contains one (a few-shot prompt's next `Question:`), which
    only saves time: callers cut the text themselves, since the string may straddle tokens. `generate_fn` replaces
    `model.generate` (same keyword arguments, returns the sequences)."""
    pad_id = _pad_id(tokenizer)
    device = model.device
    outputs: list[str] = [""] * len(prompts)
    batches = _length_sorted_batches([len(p) for p in prompts], batch_size)
    for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
        width = max(len(prompts[i]) for i in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids = prompts[i]
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
        kwargs = dict(generate_kwargs or {})
        if cache_factory is not None:
            kwargs["cache"] = cache_factory()
        if stop_strings:
            kwargs.update(stop_strings=list(stop_strings), tokenizer=tokenizer)
        generated = (generate_fn or model.generate)(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
            **kwargs,
        )
        for row, i in enumerate(batch):
            new_tokens = generated[row, width:].tolist()
            if tokenizer.eos_token_id in new_tokens:
                new_tokens = new_tokens[: new_tokens.index(tokenizer.eos_token_id)]
            outputs[i] = tokenizer.decode(new_tokens, skip_special_tokens=True)
    return outputs


@torch.no_grad()
def loglikelihood(
    model,
    tokenizer,
    requests: Sequence[tuple[list[int], list[int]]],
    *,
    batch_size: int = 8,
    desc: str = "score",
    progress: bool = True,
) -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids): the summed log-probability of the continuation given the context,
    and whether greedy decoding would have produced it token by token."""
    pad_id = _pad_id(tokenizer)
    device = model.device
    results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    sequences = [list(ctx) + list(cont) for ctx, cont in requests]
    for ctx, cont in requests:
        if not ctx or not cont:
            raise ValueError("Scoring needs a non-empty context (at least a BOS token) and a non-empty continuation.")
    batches = _length_sorted_batches([len(s) for s in sequences], batch_size)
    for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
        width = max(len(sequences[i]) for i in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            input_ids[row, : len(sequences[i])] = torch.tensor(sequences[i], dtype=torch.long)
            attention_mask[row, : len(sequences[i])] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits.float()
        logprobs = torch.log_softmax(logits, dim=-1).cpu()
        for row, i in enumerate(batch):
            ctx_len, cont = len(requests[i][0]), torch.tensor(requests[i][1], dtype=torch.long)
            # Position t predicts token t + 1, so the continuation is read from the positions just before it.
            rows = logprobs[row, ctx_len - 1 : ctx_len - 1 + len(cont)]
            total = rows.gather(-1, cont[:, None]).sum().item()
            results[i] = (total, bool((rows.argmax(-1) == cont).all()))
    return results


@torch.no_grad()
def token_nll(
    model,
    input_ids: Sequence[int],
    *,
    window: int,
    stride: int | None = None,
) -> tuple[float, int]:
    """Summed negative log-likelihood of `input_ids[1:]` and the number of tokens it covers.

    `stride=None` scores one full window (the text must be at most `window` tokens). With a stride, windows of
    `window` tokens slide by `stride` and each token is scored once, from the window that gives it the most context
    (the standard sliding-window perplexity).
    """
    ids = torch.tensor(list(input_ids), dtype=torch.long)[None].to(model.device)
    total, count = 0.0, 0
    if stride is None:
        if ids.shape[1] > window:
            raise ValueError(f"Full evaluation needs at most {window} tokens, got {ids.shape[1]}: pass a stride.")
        starts = [0]
    elif not 0 < stride <= window:
        raise ValueError(f"The stride must be in 1..window ({window}), got {stride}.")
    else:
        starts = list(range(0, max(ids.shape[1] - window, 0) + stride, stride))
    scored_until = 1  # the first token has no prediction
    for start in starts:
        end = min(start + window, ids.shape[1])
        if end <= scored_until:
            break
        logits = model(input_ids=ids[:, start:end]).logits.float()
        targets = ids[0, start + 1 : end]
        nll = torch.nn.functional.cross_entropy(logits[0, :-1], targets, reduction="none")
        new = nll[scored_until - start - 1 :]
        total += new.sum().item()
        count += new.numel()
        scored_until = end
    return total, count


@torch.no_grad()
def streaming_token_nll(
    model,
    sequences: Sequence[Sequence[int]],
    cache,
    *,
    prefill: int | None = None,
) -> tuple[list[float], int]:
    """Per-row summed negative log-likelihood of `sequences[r][1:]` (rows of one length) and the tokens per row,
    with the text fed through `cache` as generation feeds it: one forward over the first `prefill` tokens, then one
    token per step, so an evicting cache (H2O) drops keys between steps exactly as it does while decoding.

    `prefill=None` takes as many tokens as the cache holds without evicting (`cache.get_max_length()`; the whole
    text for an unbounded cache): every step then sees the same keys as token-by-token decoding from the first token,
    which is H2O's streaming language-modelling setting. The cache ends holding the keys of all tokens but the last.
    """
    ids = torch.tensor([list(s) for s in sequences], dtype=torch.long, device=model.device)
    length = ids.shape[1]
    if length < 2:
        raise ValueError(f"Streaming perplexity needs at least 2 tokens per row, got {length}.")
    if prefill is None:
        capacity = cache.get_max_length() if cache.layers else -1  # a DynamicCache without config has no layers yet
        prefill = length - 1 if capacity < 1 else capacity
    prefill = max(1, min(prefill, length - 1))
    logits = model(input_ids=ids[:, :prefill], cache=cache, use_cache=True).logits
    nll = _row_nll(logits[:, :-1], ids[:, 1:prefill])
    next_logits = logits[:, -1:]
    for t in range(prefill, length):
        nll += _row_nll(next_logits, ids[:, t : t + 1])
        if t < length - 1:
            next_logits = model(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True).logits
    return nll.tolist(), length - 1


def _row_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits, (B, T) targets -> (B,) summed NLL in float64 (hundreds of steps are added per row)."""
    nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
    return nll.double().sum(-1)


def kv_cache_bytes(cache) -> tuple[int, int]:
    """(bytes of keys and values `cache` holds, bytes a full cache of every token it has seen would hold)."""
    held = full = 0
    for layer in cache.layers:
        if not getattr(layer, "is_initialized", False):
            continue
        per_entry = sum(t.element_size() * t.numel() // t.shape[-2] for t in (layer.keys, layer.values))
        held += per_entry * layer.keys.shape[-2]
        full += per_entry * layer.get_seq_length()
    return held, full
