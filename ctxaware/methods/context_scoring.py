"""Context-dependency scores: how much each chat example's responses depend on the user's context, by two metrics.

The computation behind `ctxaware score` (its command line, files and plot: `ctxaware.score_cli`) and behind
`recipes/context_sft.py`'s conditional mode. Per example and per user turn (a user message answered by an
assistant message):
- `attention`: the context-awareness paper's "user attention ratio". For every query row that predicts a response
  token, the attention mass on the turn's user span, max over heads, then mean over the rows; at one layer or
  averaged over all layers. The mass is the kernel family's `label_mass` statistic (one forward, no S x S buffer on
  CUDA), not materialised attention weights.
- `loglik_gain`: model-agnostic (any causal LM, no attention access needed): the mean per-token log-likelihood of the
  response with the user span present minus with it removed, i.e. the pointwise mutual information between the
  response and the user's context, per token. It is > 0 when the context makes the response more likely.
The example's score is its turns' maximum. `select_turns` chooses turns above a threshold or in a top percentile,
`summarize` gives the two metrics' Spearman agreement (and AUROC against a `kind` column when the data has one), and
`heads_report` ranks heads by mean context mass on chosen turns minus the others (the heads that
`ctxaware eval --steer pasta:heads_from=...` steers).
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np

from ctxaware.datafiles import require_column


METRICS = ("attention", "loglik_gain")
WORLD_DATASET = "world"


# --------------------------------------------------------------------------------------------------------------------
# Data


def _sharegpt_to_messages(conversation: list[dict]) -> list[dict]:
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
    messages = []
    for turn in conversation:
        if turn.get("from") not in roles:
            raise ValueError(f"unknown ShareGPT speaker {turn.get('from')!r}; expected one of {sorted(roles)}")
        messages.append({"role": roles[turn["from"]], "content": turn["value"]})
    return messages


def load_chat_records(
    dataset: str,
    *,
    split: str = "train",
    limit: int | None = None,
    messages_column: str | None = None,
    world_seed: int = 0,
    world_context_rate: float = 0.5,
    world_knowledge_form: str = "bare",
) -> list[dict]:
    """Records with a `messages` list: the synthetic world's chat data, a local file or folder, or a Hub data set."""
    if dataset == WORLD_DATASET:
        from ctxaware.world import build_world, chat_sft

        return chat_sft(
            build_world(world_seed),
            split,
            n=limit or 2000,
            context_rate=world_context_rate,
            knowledge_form=world_knowledge_form,
        )
    from ctxaware.datafiles import load_rows

    rows = load_rows(dataset, split=split)
    rows = [dict(row) for row in (rows if limit is None else rows.select(range(min(limit, len(rows)))))]
    column = messages_column or next((c for c in ("messages", "conversations") if rows and c in rows[0]), None)
    if not rows:
        raise ValueError(f"{dataset} has no records")
    if column is None or column not in rows[0]:
        raise ValueError(
            f"{dataset} has no conversation column (columns: {sorted(rows[0])}): pass --messages_column NAME"
        )
    require_column(rows, column, dataset, "give every row a conversation, or drop the rows without one")
    for row in rows:
        conversation = row.pop(column)
        is_sharegpt = conversation and "from" in conversation[0]
        row["messages"] = _sharegpt_to_messages(conversation) if is_sharegpt else conversation
    return rows


# --------------------------------------------------------------------------------------------------------------------
# Scoring


@contextmanager
def _label_mass(model, layer: int | None):
    """Runs `model` on the ctxaware kernels; yields (collected, set_labels): each forward fills `collected[layer]`
    with (B, H, S) = per query row, each head's mass on the label of the row's turn (`row_labels`)."""
    import torch

    from ctxaware.attention import ATTN_IMPLEMENTATION, attention_modules, set_attention_options

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    num_layers = len(attention_modules(base))
    if layer is not None and not 0 <= layer < num_layers:
        raise IndexError(f"--layer {layer} out of range: the model has {num_layers} layers (0..{num_layers - 1})")
    layers = None if layer is None else [layer]
    collected: dict[int, torch.Tensor] = {}
    current: dict[str, torch.Tensor] = {}

    def on_stats(module, stats):
        rows = current["row_labels"].to(stats.label_mass.device)  # (B, S)
        index = rows[:, None, :, None].expand(*stats.label_mass.shape[:3], 1)
        collected[module.layer_idx] = stats.label_mass.gather(-1, index).squeeze(-1)

    def set_labels(key_labels, row_labels, num_labels):
        collected.clear()
        current["row_labels"] = row_labels
        set_attention_options(base, layers=layers, key_labels=key_labels, num_labels=num_labels, on_stats=on_stats)

    def clear():
        set_attention_options(base, key_labels=None, num_labels=None, on_stats=None)

    previous = base.config._attn_implementation
    base.set_attn_implementation(ATTN_IMPLEMENTATION)
    try:
        yield collected, set_labels, clear
    finally:
        clear()
        base.set_attn_implementation(previous)


def _batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _response_logprobs(logits, input_ids, row: int, start: int, end: int):
    """Log-probabilities of tokens [start, end) of `row`, read from the rows that predict them."""
    import torch

    scores = logits[row, start - 1 : end - 1].float()
    targets = input_ids[row, start:end].to(scores.device)
    return (scores.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(scores, -1)).cpu()


def score_records(
    model,
    tokenizer,
    records: list[dict],
    *,
    layer: int | None = None,
    span: str = "user",
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool = True,
) -> tuple[list[list[dict]], dict[tuple[int, int], np.ndarray]]:
    """Scores every turn of every record. Returns, per record, a list of turn dicts (`user_index`,
    `assistant_index`, `attention`, `loglik_gain`, `span_tokens`, `response_tokens`; metrics None for a turn cut by
    `max_length`), and per (record, turn) the (layers, heads) mean context mass used to rank heads."""
    import torch
    from tqdm.auto import tqdm

    from ctxaware.methods.context import ablate_span, encode_conversation

    encoded = []
    for i, record in enumerate(records):
        try:
            encoded.append(
                encode_conversation(tokenizer, record["messages"], span=span, context=record.get("context"))
            )
        except (ValueError, KeyError) as error:
            raise ValueError(f"record {i}: {error}") from error
    limit = max_length or max(len(e.input_ids) for e in encoded)
    turns = [
        [
            {
                "user_index": t.user_index,
                "assistant_index": t.assistant_index,
                "span_tokens": t.span_tokens,
                "response_tokens": t.response[1] - t.response[0],
                "attention": None,
                "loglik_gain": None,
            }
            for t in e.turns
        ]
        for e in encoded
    ]
    kept = [[t.response[1] <= limit for t in e.turns] for e in encoded]
    full_logprob: dict[tuple[int, int], torch.Tensor] = {}
    heads: dict[tuple[int, int], np.ndarray] = {}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = model.device
    model.eval()

    def pad(rows: list[list[int]], value: int) -> torch.Tensor:
        width = max(len(r) for r in rows)
        return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)

    with torch.no_grad(), _label_mass(model, layer) as (collected, set_labels, clear):
        batches = _batches([min(len(e.input_ids), limit) for e in encoded], batch_size)
        for batch in tqdm(batches, desc="score: attention", disable=not progress, leave=False):
            ids = pad([encoded[i].input_ids[:limit] for i in batch], pad_id)
            mask = pad([[1] * min(len(encoded[i].input_ids), limit) for i in batch], 0)
            key_labels = pad([encoded[i].key_labels[:limit] for i in batch], 0)
            row_labels = torch.zeros_like(ids)
            for row, i in enumerate(batch):
                for t, turn in enumerate(encoded[i].turns):
                    if kept[i][t]:
                        row_labels[row, turn.response[0] - 1 : turn.response[1] - 1] = t + 1
            num_labels = 1 + max(len(encoded[i].turns) for i in batch)
            set_labels(key_labels.to(device), row_labels, num_labels)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            if not collected:
                raise RuntimeError(
                    "no attention layer reported label mass: this model's attention does not go through "
                    "transformers' AttentionInterface, so the attention metric cannot be computed"
                )
            own = torch.stack([collected[k] for k in sorted(collected)], 1).float().cpu()  # (B, layers, H, S)
            for row, i in enumerate(batch):
                for t, turn in enumerate(encoded[i].turns):
                    if not kept[i][t]:
                        continue
                    rows = own[row, :, :, turn.response[0] - 1 : turn.response[1] - 1]  # (layers, H, n)
                    turns[i][t]["attention"] = float(rows.max(1).values.mean(-1).mean())
                    heads[(i, t)] = rows.mean(-1).numpy()
                    full_logprob[(i, t)] = _response_logprobs(logits, ids, row, *turn.response)
        clear()

        ablated = []  # (record, turn, ids, response range)
        for i, e in enumerate(encoded):
            for t, turn in enumerate(e.turns):
                if not kept[i][t]:
                    continue
                if turn.span_tokens == 0:
                    turns[i][t]["loglik_gain"] = 0.0  # nothing to remove
                    continue
                messages = ablate_span(
                    records[i]["messages"], turn.user_index, span=span, context=records[i].get("context")
                )
                other = encode_conversation(tokenizer, messages, span="user")
                response = next(o.response for o in other.turns if o.assistant_index == turn.assistant_index)
                ablated.append((i, t, other.input_ids[: response[1]], response))
        batches = _batches([len(a[2]) for a in ablated], batch_size)
        for batch in tqdm(batches, desc="score: ablation", disable=not progress, leave=False):
            ids = pad([ablated[k][2] for k in batch], pad_id)
            mask = pad([[1] * len(ablated[k][2]) for k in batch], 0)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            for row, k in enumerate(batch):
                i, t, _, response = ablated[k]
                without = _response_logprobs(logits, ids, row, *response)
                turns[i][t]["loglik_gain"] = float((full_logprob[(i, t)] - without).mean())
    return turns, heads


# --------------------------------------------------------------------------------------------------------------------
# Selection and agreement


def _scored(turns: list[list[dict]], metric: str) -> list[float]:
    return [t[metric] for record in turns for t in record if t[metric] is not None]


def select_turns(
    turns: list[list[dict]], metric: str, *, threshold: float | None = None, percentile: float | None = None
) -> float:
    """Marks `chosen` on every turn (score >= threshold; the top `percentile`% when no threshold); returns the
    threshold used."""
    if metric not in METRICS:
        raise ValueError(f"select_by must be one of {METRICS}, got {metric!r}")
    scores = np.asarray(_scored(turns, metric))
    if not len(scores):
        raise ValueError("no turn was scored: every response lies beyond --max_length; raise it")
    low, high = float(scores.min()), float(scores.max())
    if threshold is None:
        if percentile is None or not 0 < percentile < 100:
            raise ValueError(f"pass a threshold, or a percentile in (0, 100) (got {percentile})")
        threshold = float(np.quantile(scores, 1 - percentile / 100))
    elif not low <= threshold <= high:
        raise ValueError(
            f"threshold {threshold} is outside the {metric} scores' range [{low:.4g}, {high:.4g}]: it would choose "
            "all turns or none. Pick a value in that range, or use --percentile"
        )
    for record in turns:
        for turn in record:
            turn["chosen"] = turn[metric] is not None and turn[metric] >= threshold
    return threshold


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties averaged."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    return (np.bincount(inverse, weights=ranks) / counts)[inverse]


def spearman(x, y) -> float | None:
    """Spearman's rank correlation (None when either side is constant or there are fewer than 3 points)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(np.corrcoef(_ranks(x), _ranks(y))[0, 1])


def auroc(scores, positive) -> float | None:
    """Area under the ROC curve (Mann-Whitney U / n+ n-); None without both classes."""
    scores, positive = np.asarray(scores, dtype=float), np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return None
    return float((_ranks(scores)[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def example_score(record_turns: list[dict], metric: str) -> float | None:
    values = [t[metric] for t in record_turns if t[metric] is not None]
    return max(values) if values else None


def summarize(records: list[dict], turns: list[list[dict]], *, select_by: str, threshold: float) -> dict:
    pairs = [(t["attention"], t["loglik_gain"]) for record in turns for t in record if t["attention"] is not None]
    summary = {
        "records": len(records),
        "turns": sum(len(r) for r in turns),
        "turns_scored": len(pairs),
        "turns_chosen": sum(t.get("chosen", False) for r in turns for t in r),
        "records_chosen": sum(any(t.get("chosen", False) for t in r) for r in turns),
        "select_by": select_by,
        "threshold": threshold,
        "spearman_attention_loglik_gain": spearman(*zip(*pairs)) if pairs else None,
        "mean": {m: float(np.mean(_scored(turns, m))) if _scored(turns, m) else None for m in METRICS},
    }
    kinds = [record.get("kind") for record in records]
    if any(k is not None for k in kinds):
        # The world's generator labels each record: AUROC of the example score for kind == "context".
        for metric in METRICS:
            pairs = [(example_score(t, metric), k == "context") for t, k in zip(turns, kinds)]
            pairs = [p for p in pairs if p[0] is not None]
            summary[f"auroc_{metric}_vs_kind"] = auroc(*zip(*pairs)) if pairs else None
    return summary


def heads_report(turns: list[list[dict]], heads: dict[tuple[int, int], np.ndarray], layer: int | None = None) -> dict:
    """Per (layer, head): mean context mass on chosen turns minus on the others (all turns when one side is empty).
    `layer`: the one layer scored (`--layer`), else the rows are all layers in order."""
    if not heads:
        return {"ranked": [], "context_minus_rest": []}
    chosen = [v for (i, t), v in heads.items() if turns[i][t].get("chosen")]
    rest = [v for (i, t), v in heads.items() if not turns[i][t].get("chosen")]
    difference = np.mean(chosen, 0) - np.mean(rest, 0) if chosen and rest else np.mean(list(heads.values()), 0)
    num_layers, num_heads = difference.shape
    order = np.argsort(-difference, axis=None)
    layer_ids = list(range(num_layers)) if layer is None else [layer]
    return {
        "note": "rows are the scored layers (`layers`); entries: mean context mass on chosen turns minus the others",
        "layers": layer_ids,
        "context_minus_rest": difference.round(6).tolist(),
        "ranked": [[layer_ids[k // num_heads], int(k % num_heads)] for k in order],
    }
