"""Summarisation: ROUGE-L F1 against the reference, the world's ground-truth preference score, a reward model's
score (`--reward_model`), and the win rate under the ground-truth preference against a baseline run's summaries
(`--baseline_samples`: the samples JSONL this task wrote for the baseline model; items are matched by `doc_id`).
`--dataset tldr` loads trl-lib/tldr (no ground-truth preference there, so ROUGE-L and the reward model only)."""

import json
from pathlib import Path

from ctxaware.eval import data
from ctxaware.eval.metrics import add_mean, first_line, rouge_l
from ctxaware.eval.prompts import summary_prompt, template_variants
from ctxaware.eval.registry import EvalOptions, Task, TaskResult, register_task


@register_task
class Summarization(Task):
    name = "summarization"
    description = "Summaries scored by ROUGE-L, ground-truth preference, reward model and win rate vs a baseline."
    default_limit = 50

    def config(self, options: EvalOptions) -> dict:
        return {
            **super().config(options),
            "dataset": options.dataset or "world/summarization",
            "reward_model": options.reward_model,
            "baseline_samples": options.baseline_samples,
            "win_rate": "P(pref(ours) > pref(baseline)) with ties counted as 1/2",
        }

    def load(self, lm, options: EvalOptions) -> list[dict]:
        if options.dataset:
            return data.real_records(self.name, options.dataset, options.limit)
        # `n`: a --limit beyond the split's default posts makes more of them (the first posts stay the same)
        return data.world_records("summarization", options.seed, options.split, options.limit, n=options.limit)

    def evaluate(self, lm, records: list[dict], options: EvalOptions) -> TaskResult:
        (chat,) = template_variants(options, lm, default="off")
        prompts = [summary_prompt(lm, r["post"], chat=chat) for r in records]
        outputs = lm.generate(prompts, max_new_tokens=options.max_new_tokens or 48, desc="summarization")
        summaries = [first_line(o) for o in outputs]
        metrics, stderrs = {}, {}
        rouge = [rouge_l(s, r["reference"]) for s, r in zip(summaries, records)]
        add_mean(metrics, stderrs, "rouge_l", rouge)
        samples = [
            {"doc_id": i, "post": r["post"], "reference": r["reference"], "summary": s, "rouge_l": g}
            for i, (r, s, g) in enumerate(zip(records, summaries, rouge))
        ]
        if not options.dataset:
            preference_score = data.world_function("preference_score")
            prefs = [float(preference_score(r, s)) for r, s in zip(records, summaries)]
            add_mean(metrics, stderrs, "preference", prefs)
            for sample, p in zip(samples, prefs):
                sample["preference"] = p
            if options.baseline_samples:
                wins = win_rates(records, summaries, prefs, read_baseline(options.baseline_samples), preference_score)
                add_mean(metrics, stderrs, "win_rate", wins)
                for sample, w in zip(samples, wins):
                    sample["win"] = w
        elif options.baseline_samples:
            raise ValueError("A win rate needs the world's ground-truth preference: drop `--dataset` or the baseline.")
        if options.reward_model:
            rewards = reward_scores(options.reward_model, records, summaries, options.batch_size)
            add_mean(metrics, stderrs, "reward", rewards)
            for sample, value in zip(samples, rewards):
                sample["reward"] = value
        return TaskResult(metrics, samples, stderrs)


def read_baseline(path: str) -> dict[int, str]:
    """doc_id -> summary from a summarization samples JSONL."""
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"Baseline samples {path} do not exist: pass the samples_summarization_*.jsonl of a run."
        )
    baseline = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            if "summary" not in row or "doc_id" not in row:
                raise ValueError(f"{path} is not a summarization samples file: rows need `doc_id` and `summary`.")
            baseline[row["doc_id"]] = row["summary"]
    return baseline


def win_rates(records, summaries, prefs, baseline: dict[int, str], preference_score) -> list[float]:
    missing = [i for i in range(len(records)) if i not in baseline]
    if missing:
        raise ValueError(
            f"The baseline samples lack doc_ids {missing[:5]}...: run the baseline with the same --seed and at least "
            "as large a --limit."
        )
    wins = []
    for i, (record, ours) in enumerate(zip(records, prefs)):
        theirs = float(preference_score(record, baseline[i]))
        wins.append(1.0 if ours > theirs else 0.5 if ours == theirs else 0.0)
    return wins


def reward_scores(reward_model: str, records, summaries, batch_size: int) -> list[float]:
    """Scalar reward of each (post, summary), in the text format the RLHF recipe trains reward models on
    (`ctxaware.methods.rlhf.reward_model_text`: the reward tokenizer's chat template when it has one, user = post,
    assistant = summary, else `post + TL;DR: summary`); on the GPU when there is one."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from ctxaware.methods.rlhf import reward_model_text, score_texts
    from ctxaware.models import load_tokenizer, resolve_model_path

    path = resolve_model_path(reward_model)
    tokenizer = load_tokenizer(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    model.config.pad_token_id = tokenizer.pad_token_id
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    texts = [reward_model_text(tokenizer, record["post"], summary) for record, summary in zip(records, summaries)]
    return score_texts(model, tokenizer, texts, batch_size)
