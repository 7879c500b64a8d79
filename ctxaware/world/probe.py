"""Quick greedy probes of the phenomena the embedded model must show, run right after pretraining.

These are sanity numbers for the training log (no chat template, plain prompts after BOS, greedy decoding); the
reported evaluation is `ctxaware eval`. A generation counts as correct when its first line, stripped, starts with the
answer followed by a non-alphanumeric character (or nothing).
"""

import torch

from ctxaware.world.entities import World
from ctxaware.world.longctx import passkey_example
from ctxaware.world.preference import SUMMARY_PROMPT, key_fact_coverage, preference_score, summarization
from ctxaware.world.tasks import CONTEXT_QA_PROMPT, QA_PROMPT, arithmetic, closed_book_qa, context_qa


def matches(generation: str, answer: str) -> bool:
    line = generation.strip().split("\n")[0].strip()
    return line.startswith(answer) and (len(line) == len(answer) or not line[len(answer)].isalnum())


@torch.no_grad()
def greedy(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 64) -> list[str]:
    """Left-padded batched greedy decoding of plain-text prompts (BOS prepended), cut at EOS."""
    outputs = []
    for start in range(0, len(prompts), batch_size):
        encoded = [
            [tokenizer.bos_token_id, *tokenizer(p, add_special_tokens=False)["input_ids"]]
            for p in prompts[start : start + batch_size]
        ]
        width = max(map(len, encoded))
        ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, seq in enumerate(encoded):
            ids[row, width - len(seq) :] = torch.tensor(seq)
            mask[row, width - len(seq) :] = 1
        generated = model.generate(
            input_ids=ids.to(model.device),
            attention_mask=mask.to(model.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        outputs += tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
    return outputs


def _accuracy(model, tokenizer, prompts: list[str], answers: list[str], max_new_tokens: int) -> list[bool]:
    return [matches(g, a) for g, a in zip(greedy(model, tokenizer, prompts, max_new_tokens), answers)]


def _mean(values) -> float:
    values = list(values)
    return round(sum(values) / len(values), 4) if values else float("nan")


def probe_phenomena(model, tokenizer, world: World, limit: int = 200, passkey_lengths=(256, 512, 1024, 2048)) -> dict:
    """Closed-book recall, counterfactual context-following, arithmetic by op and digits, pass keys by length and
    summary key-fact coverage, on the test split."""
    metrics = {}
    for split in ("train", "test"):
        records = closed_book_qa(world, split)[:limit]
        hits = _accuracy(model, tokenizer, [QA_PROMPT.format(**r) for r in records], [r["answer"] for r in records], 8)
        metrics[f"closed_book_{split}_acc"] = _mean(hits)

    records = context_qa(world, "test", n=limit)
    prompts = [CONTEXT_QA_PROMPT.format(context=r["context"], question=r["question"]) for r in records]
    generations = greedy(model, tokenizer, prompts, 8)
    for group, keep in {
        "counterfactual": lambda r: r["counterfactual"],
        "faithful": lambda r: r["memory_answer"] is not None and not r["counterfactual"],
        "novel": lambda r: r["memory_answer"] is None,
    }.items():
        pairs = [(g, r) for g, r in zip(generations, records) if keep(r)]
        metrics[f"context_qa_{group}_follows_context"] = _mean(matches(g, r["answer"]) for g, r in pairs)
        if group == "counterfactual":
            metrics["context_qa_counterfactual_says_memory"] = _mean(matches(g, r["memory_answer"]) for g, r in pairs)

    records = arithmetic(world, "test", n_per_cell=40)
    hits = _accuracy(model, tokenizer, [r["prompt"] for r in records], [r["answer"] for r in records], 10)
    for op, digits in sorted({(r["op"], r["digits"]) for r in records}):
        metrics[f"arithmetic_{op}_{digits}d_acc"] = _mean(
            h for h, r in zip(hits, records) if (r["op"], r["digits"]) == (op, digits)
        )

    for n_tokens in passkey_lengths:
        examples = [
            passkey_example(tokenizer, n_tokens, depth, seed)
            for depth in (0.1, 0.3, 0.5, 0.7, 0.9)
            for seed in range(4)
        ]
        hits = _accuracy(model, tokenizer, [e["text"] for e in examples], [e["answer"] for e in examples], 8)
        metrics[f"passkey_{n_tokens}_acc"] = _mean(hits)

    records = summarization(world, "test")[: min(limit, 100)]
    summaries = greedy(model, tokenizer, [SUMMARY_PROMPT.format(post=r["post"]) for r in records], 48)
    summaries = [s.strip().split("\n")[0] for s in summaries]
    coverage = [key_fact_coverage(r, s) for s, r in zip(summaries, records)]
    metrics["summary_key_fact_coverage"] = _mean(coverage)
    metrics["summary_preference_score"] = _mean(preference_score(r, s) for s, r in zip(summaries, records))
    metrics["summary_reference_score"] = _mean(preference_score(r, r["reference"]) for r in records)
    metrics["summary_examples"] = summaries[:3]
    return metrics
