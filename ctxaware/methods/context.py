"""Context awareness: locating the user's context in a tokenised chat, the indicator token, and attention steering.

Three pieces shared by `ctxaware score`, `recipes/context_sft.py` and `ctxaware eval --steer`:

- `encode_conversation` renders a conversation with the tokenizer's chat template and labels every token: key label
  `t + 1` on the span of scored turn `t` (its user message, or the record's `context` string inside it), 0 elsewhere;
  it also gives each assistant response's token range. Spans are found in the rendered text (the render of the
  conversation up to that message, searched from its end), then mapped to tokens through the offsets mapping, so the
  labels are exact for any fast tokenizer and template.
- `add_indicator_token` adds the indicator as a new special token whose embedding starts at the mean embedding of a
  descriptive phrase (a new row at random or zero would be an outlier the model has never read); `insert_indicator`
  appends it to the chosen user turns, the way `ctxaware eval --indicator` appends it to test questions.
- Steering (PASTA-style, as in the context-awareness paper): at chosen layers/heads, attention to keys outside the
  user's messages is scaled by `s` (0 < s <= 1) and renormalised. Scaling probabilities by `s` before renormalising
  is exactly adding `log s` to those keys' logits. The kernel family has no per-key additive bias, so steering runs
  as its own attention implementation, `attn_implementation="ctxaware_steer"`: the PyTorch reference math (scores
  materialised) with the bias on steered layers, transformers' SDPA on the others. A per-key bias in
  `ctxaware.kernels` would make steering O(S) memory; until then it is meant for evaluation-sized inputs.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from ctxaware.switches import GenerationSetup, register_generation_hook


SPANS = ("user", "context")
DEFAULT_INDICATOR = "<|context|>"
DEFAULT_INDICATOR_INIT = "Answer using the context in the user's message."
STEER_ATTN_IMPLEMENTATION = "ctxaware_steer"
_STEER_ATTR = "ctxaware_steering"


# --------------------------------------------------------------------------------------------------------------------
# Locating spans after tokenisation


@dataclass
class Turn:
    """One scored exchange: the user message `user_index`, answered by the assistant message `assistant_index`."""

    user_index: int
    assistant_index: int
    response: tuple[int, int]  # token range [start, end) of the assistant's content
    span_tokens: int  # tokens labelled with this turn's span


@dataclass
class EncodedConversation:
    input_ids: list[int]
    key_labels: list[int]  # 0 = other, t + 1 = span of turns[t]
    turns: list[Turn] = field(default_factory=list)


def _check_messages(messages: list[dict]) -> None:
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ValueError("a conversation must be a list of {'role', 'content'} messages (the `messages` column)")
    if not any(m["role"] == "user" for m in messages):
        raise ValueError(
            "a conversation has no user turn, so there is no user context to score: drop it from the data set, or "
            f"map its roles to user/assistant (roles here: {[m['role'] for m in messages]})"
        )


def _message_char_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character range of each message's content in it."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans, cursor = [], 0
    for index, message in enumerate(messages):
        content = message.get("content") or ""
        if not isinstance(content, str):
            raise ValueError(f"message {index} has non-text content ({type(content).__name__}); score text chats only")
        # The render up to this message ends with it (plus the turn's end marker): its last occurrence of the
        # content is the message itself, not an earlier mention of the same words.
        prefix = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
        start = prefix.rfind(content)
        if start < cursor or text[start : start + len(content)] != content:
            start = text.find(content, cursor)  # templates that render the last message differently
        if start < 0:
            raise ValueError(
                f"could not locate message {index} ({message['role']}: {content[:40]!r}) in the chat template's "
                "output: the template rewrites message contents (strips or reformats them). Normalise the messages "
                "the way the template does (e.g. strip whitespace) before scoring or training"
            )
        spans.append((start, start + len(content)))
        cursor = start + len(content)
    return text, spans


def encode_conversation(
    tokenizer, messages: list[dict], *, span: str = "user", context: str | None = None
) -> EncodedConversation:
    """Token ids, per-token span labels and the scored turns of a chat (see the module docstring).

    `span="user"` labels each turn's whole user message (the paper's "user tokens"); `span="context"` labels the
    `context` string inside the user message of each turn that contains it (a turn without it gets an empty span).
    """
    if span not in SPANS:
        raise ValueError(f"span must be one of {SPANS}, got {span!r}")
    if span == "context" and not context:
        context = None
    _check_messages(messages)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("locating spans needs a fast tokenizer (offsets mapping): load it with use_fast=True")
    text, char_spans = _message_char_spans(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    starts = torch.tensor([s for s, _ in offsets])
    ends = torch.tensor([e for _, e in offsets])

    def tokens_in(a: int, b: int) -> torch.Tensor:
        return (starts < b) & (ends > a) & (ends > starts)

    labels = torch.zeros(len(ids), dtype=torch.long)
    turns: list[Turn] = []
    last_user = None
    for index, message in enumerate(messages):
        if message["role"] == "user":
            last_user = index
            continue
        if message["role"] != "assistant" or last_user is None:
            continue
        user_start, user_end = char_spans[last_user]
        if span == "user":
            a, b = user_start, user_end
        elif context is not None and (found := text.find(context, user_start, user_end)) >= 0:
            a, b = found, found + len(context)
        else:
            a = b = user_start  # this turn's user message does not contain the context: empty span
        in_span = tokens_in(a, b)
        if b > a and not bool(in_span.any()):
            raise ValueError(
                f"the context span of message {last_user} ({text[a:b][:40]!r}) maps to no token after tokenisation: "
                "the tokenizer's offsets mapping does not cover it; use a tokenizer with offsets (a fast tokenizer)"
            )
        labels[in_span] = len(turns) + 1
        response = tokens_in(*char_spans[index]).nonzero().flatten()
        if len(response):
            turns.append(Turn(last_user, index, (int(response[0]), int(response[-1]) + 1), int(in_span.sum())))
        else:
            labels[in_span] = 0  # an empty response has nothing to score
        last_user = None
    if span == "context" and context is not None and not any(t.span_tokens for t in turns):
        raise ValueError(
            f"the record's context ({context[:40]!r}...) does not appear verbatim in any user message that an "
            "assistant answers: fix the `context` column, or score with span='user'"
        )
    return EncodedConversation(ids, labels.tolist(), turns)


def ablate_span(messages: list[dict], user_index: int, *, span: str = "user", context: str | None = None) -> list:
    """The conversation with the user context of one turn removed (the whole message for span='user')."""
    ablated = [dict(m) for m in messages]
    content = ablated[user_index]["content"]
    ablated[user_index]["content"] = "" if span == "user" else content.replace(context or "", "", 1)
    return ablated


# --------------------------------------------------------------------------------------------------------------------
# The indicator token


def add_indicator_token(model, tokenizer, token: str = DEFAULT_INDICATOR, init_phrase: str = DEFAULT_INDICATOR_INIT):
    """Adds `token` as a special token and initialises its embedding(s) to the mean of `init_phrase`'s; returns its id.

    The output embedding row (when not tied) gets the same treatment, so the model does not start out predicting it.
    """
    from tokenizers import AddedToken

    if token in tokenizer.get_vocab():
        raise ValueError(
            f"the indicator {token!r} is already a token of this tokenizer (id {tokenizer.convert_tokens_to_ids(token)})"
            ": using it would overload an existing meaning. Pick an unused string, e.g. '<|context_dependent|>'"
        )
    phrase_ids = tokenizer(init_phrase, add_special_tokens=False)["input_ids"]
    if not phrase_ids:
        raise ValueError("the indicator's init phrase tokenises to nothing: pass a descriptive phrase")
    tokenizer.add_tokens([AddedToken(token, special=True, normalized=False)], special_tokens=True)
    token_id = tokenizer.convert_tokens_to_ids(token)
    embeddings = model.get_input_embeddings()
    if token_id >= embeddings.weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        embeddings = model.get_input_embeddings()
    with torch.no_grad():
        weight = embeddings.weight
        weight[token_id] = weight[phrase_ids].mean(0)
        output = model.get_output_embeddings()
        if output is not None and output.weight.data_ptr() != weight.data_ptr():
            output.weight[token_id] = output.weight[phrase_ids].mean(0)
    return token_id


def insert_indicator(messages: list[dict], user_indices, indicator: str) -> list[dict]:
    """Appends ` indicator` to the given user messages (as `ctxaware eval --indicator` does to test questions)."""
    marked = [dict(m) for m in messages]
    for index in user_indices:
        if marked[index]["role"] != "user":
            raise ValueError(f"message {index} is a {marked[index]['role']} message; the indicator goes in user turns")
        marked[index]["content"] = f"{marked[index]['content']} {indicator}"
    return marked


# --------------------------------------------------------------------------------------------------------------------
# Attention steering


@dataclass
class SteeringState:
    """Shared by the attention modules of one model: which heads to steer and the user-token mask of the batch."""

    log_scale: float
    heads: dict[int, torch.Tensor]  # layer -> (Hq,) bool: steered query heads
    user_start: list[int]  # token ids that open a user message (the template's user header)
    user_end: int | None  # the token id that closes it
    special_ids: set[int]
    user_keys: torch.Tensor | None = None  # (B, Sk) bool, grows by one column per decode step


def user_markers(tokenizer) -> tuple[list[int], int | None]:
    """The token ids that open a user message in this chat template and the id that closes it.

    The opener is the shortest suffix of the tokens before a user message that is not also what precedes a system or
    assistant message; the closer is the first token after the message. Without a chat template: ([], None).
    """
    if not getattr(tokenizer, "chat_template", None):
        return [], None
    sentinel = "XQXSENTINELXQX"

    def around(role: str) -> tuple[list[int], list[int]] | None:
        try:
            text = tokenizer.apply_chat_template([{"role": role, "content": sentinel}], tokenize=False)
        except Exception:  # templates that reject a conversation opening with this role
            return None
        before, _, after = text.partition(sentinel)
        encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
        return encode(before), encode(after)

    before, after = around("user")
    others = [b for role in ("system", "assistant") if (found := around(role)) for b in [found[0]]]
    for n in range(1, len(before) + 1):
        if all(other[-n:] != before[-n:] for other in others):
            return before[-n:], (after[0] if after else None)
    return before, (after[0] if after else None)


def user_token_mask(input_ids: torch.Tensor, state: SteeringState) -> torch.Tensor:
    """(B, S) bool: tokens inside user messages. A row with no user header (plain prompt) counts all its non-special
    tokens as the user's."""
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    start, width = state.user_start, len(state.user_start)
    for row, ids in enumerate(input_ids.tolist()):
        opened = False
        for j in range(len(ids)):
            if width and j >= width and ids[j - width : j] == start:
                opened = True
            if opened and ids[j] == state.user_end:
                opened = False
            mask[row, j] = opened
        if not width or not any(ids[j : j + width] == start for j in range(len(ids) - width + 1)):
            mask[row] = torch.tensor([i not in state.special_ids for i in ids])
    return mask


def steer_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """AttentionInterface entry for steering runs: reference math with `log s` added to the logits of keys outside
    the user's messages on steered heads; layers without steered heads go to SDPA unchanged."""
    state: SteeringState | None = getattr(module, _STEER_ATTR, None)
    heads = None if state is None else state.heads.get(module.layer_idx)
    if heads is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=0.0, **kwargs
        )
    if state.user_keys is None or state.user_keys.shape != (query.shape[0], key.shape[2]):
        raise RuntimeError(
            f"steering holds a user-token mask of shape {None if state.user_keys is None else state.user_keys.shape}"
            f" for {key.shape[2]} keys: steering needs `input_ids` (not inputs_embeds) on every forward"
        )
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    groups = query.shape[1] // key.shape[1]
    keys, values = key.repeat_interleave(groups, 1).float(), value.repeat_interleave(groups, 1).float()
    scores = (query.float() @ keys.transpose(-1, -2)) * scale
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[2]].float()
    outside = (~state.user_keys).to(scores.device)[:, None, None, :]  # (B, 1, 1, Sk)
    steered = heads.to(scores.device)[None, :, None, None]  # (1, Hq, 1, 1)
    scores = scores + state.log_scale * (outside & steered).float()
    probs = torch.softmax(scores, dim=-1)
    out = (probs @ values).to(query.dtype)
    return out.transpose(1, 2).contiguous(), probs.to(query.dtype)


AttentionInterface.register(STEER_ATTN_IMPLEMENTATION, steer_attention_forward)
AttentionMaskInterface.register(STEER_ATTN_IMPLEMENTATION, eager_mask)  # an additive mask on every call


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    from ctxaware.attention import attention_modules

    return attention_modules(model)


def enable_steering(model, tokenizer, *, scale: float, heads: dict[int, list[int] | None] | None = None):
    """Steers `model` (layer -> query heads, None = all heads; `heads=None` = every layer); returns an undo callable."""
    if not 0 < scale <= 1:
        raise ValueError(
            f"the steering scale must be in (0, 1] (attention outside the user's context is scaled by "
            f"it; the paper uses 0.9-0.95), got {scale}"
        )
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    modules = _attention_modules(base)
    num_heads = base.config.num_attention_heads
    heads = {layer: None for layer in range(len(modules))} if heads is None else heads
    masks = {}
    for layer, chosen in heads.items():
        if not 0 <= layer < len(modules):
            raise ValueError(
                f"--steer: layer {layer} is out of range: the model has {len(modules)} layers; use layers "
                f"0-{len(modules) - 1}"
            )
        mask = torch.zeros(num_heads, dtype=torch.bool)
        for head in range(num_heads) if chosen is None else chosen:
            if not 0 <= head < num_heads:
                raise ValueError(
                    f"--steer: head {layer}.{head} is out of range: each layer has {num_heads} query heads; use "
                    f"heads LAYER.0-LAYER.{num_heads - 1}"
                )
            mask[head] = True
        masks[layer] = mask
    start, end = user_markers(tokenizer)
    state = SteeringState(math.log(scale), masks, start, end, set(tokenizer.all_special_ids))
    for module in modules:
        setattr(module, _STEER_ATTR, state)

    def track_user_tokens(_module, args):
        input_ids = args[0]
        decoding = state.user_keys is not None and input_ids.shape[1] == 1
        if decoding and state.user_keys.shape[0] == input_ids.shape[0]:
            new = torch.zeros((input_ids.shape[0], 1), dtype=torch.bool, device=state.user_keys.device)
            state.user_keys = torch.cat([state.user_keys, new], dim=1)  # generated tokens are not the user's
        else:
            state.user_keys = user_token_mask(input_ids, state).to(input_ids.device)

    handle = base.get_input_embeddings().register_forward_pre_hook(track_user_tokens)
    previous = base.config._attn_implementation
    base.set_attn_implementation(STEER_ATTN_IMPLEMENTATION)

    def undo():
        handle.remove()
        base.set_attn_implementation(previous)
        for module in modules:
            if hasattr(module, _STEER_ATTR):
                delattr(module, _STEER_ATTR)

    return undo


def heads_from_scores(path: str | Path, top_k: int) -> dict[int, list[int]]:
    """The `top_k` heads ranked by `ctxaware score`'s heads.json (context mass on chosen turns minus the rest)."""
    path = Path(path)
    if path.is_dir():
        path = path / "heads.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass the heads.json (or output folder) of `ctxaware score`")
    ranked = json.loads(path.read_text())["ranked"]
    if not 1 <= top_k <= len(ranked):
        raise ValueError(f"top_k must be in 1..{len(ranked)} (the heads scored in {path}), got {top_k}")
    heads: dict[int, list[int]] = {}
    for layer, head in ranked[:top_k]:
        heads.setdefault(layer, []).append(head)
    return heads


def parse_steer_args(args: str) -> dict:
    """`scale=0.9,layers=2+3,heads=1.0+2.5,heads_from=PATH,top_k=8` (a bare number is the scale)."""
    values: dict[str, str] = {}
    for part in filter(None, args.split(",")):
        name, sep, value = part.partition("=")
        if not sep:
            name, value = "scale", name
        if name not in ("scale", "layers", "heads", "heads_from", "top_k", "tokenizer"):
            raise ValueError(
                f"--steer pasta: unknown argument {name!r}; use scale=S, layers=L+L, heads=LAYER.HEAD+..., "
                "heads_from=PATH [top_k=K], tokenizer=PATH"
            )
        values[name] = value
    selectors = [name for name in ("layers", "heads", "heads_from") if name in values]
    if len(selectors) > 1:
        raise ValueError(f"--steer pasta: choose one of layers=, heads=, heads_from= (got {', '.join(selectors)})")
    try:
        heads = None
        if "layers" in values:
            heads = {int(layer): None for layer in values["layers"].split("+")}
        elif "heads" in values:
            heads = {}
            for item in values["heads"].split("+"):
                layer, head = item.split(".")
                heads.setdefault(int(layer), []).append(int(head))
        elif "heads_from" in values:
            heads = heads_from_scores(values["heads_from"], int(values.get("top_k", 8)))
        return {"scale": float(values.get("scale", 0.9)), "heads": heads, "tokenizer": values.get("tokenizer")}
    except ValueError as error:
        if "--steer" in str(error) or "top_k" in str(error):
            raise
        raise ValueError(
            f"--steer pasta:{args}: could not parse it ({error}); e.g. pasta:scale=0.9,heads=1.0+1.3"
        ) from None


@register_generation_hook("steer", "pasta")
def apply_pasta(model, args: str, setup: GenerationSetup) -> None:
    """`--steer pasta[:ARGS]`: see `parse_steer_args`. The tokenizer (for the user-turn markers) is the model's own."""
    from transformers import AutoTokenizer

    options = parse_steer_args(args)
    source = options["tokenizer"] or getattr(model, "name_or_path", None)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as error:
        raise ValueError(
            f"--steer pasta needs the model's tokenizer to find user turns; loading it from {source!r} failed "
            f"({error}): pass tokenizer=PATH"
        ) from error
    setup.stack.callback(enable_steering(model, tokenizer, scale=options["scale"], heads=options["heads"]))
