"""GSM8K: grade-school math word problems; the answer is the number after `####` (exact numeric match).

Plain prompts (the default) are 5-shot, lm-evaluation-harness style: `Question: ...\\nAnswer: <worked solution> ####
N` five times from the shipped few-shot file, then the question. With `--chat_template on` the question is the user
turn, with an instruction to end on `#### N`. Metrics: `exact_match` reads the number after the first `####`
(strict); `exact_match_flexible` the last number of the response (what a model that ignores the format still gets).

Data: the shipped split (`--split test`, the full test set, or `validation`, 500 held-out training problems), or
`--dataset openai/gsm8k` (the Hub's test split) or `--dataset FILE` (a local file with `question` / `answer`).
"""

import json
import re

from ctxaware.data import DATA_DIR
from ctxaware.eval import data
from ctxaware.eval.metrics import add_mean
from ctxaware.eval.prompts import template_variants
from ctxaware.eval.registry import EvalOptions, Task, TaskResult, register_task


GSM8K_DIR = DATA_DIR / "gsm8k"
SHIPPED_SPLITS = ("test", "validation")
NUM_FEWSHOT = 5
CHAT_INSTRUCTION = "Solve this problem step by step. End with the final answer as a number after '####'."
_STRICT = re.compile(r"####\s*(-?[\d,]*\.?\d+)")
_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def target_answer(solution: str) -> str:
    """The number after `####` in a GSM8K solution, commas removed."""
    match = _STRICT.search(solution)
    if not match:
        raise ValueError(f"GSM8K solution without '#### N': {solution[-80:]!r}")
    return normalize_number(match.group(1))


def normalize_number(text: str) -> str:
    """`1,000` -> `1000`, `12.50` -> `12.5`, `7.0` -> `7`: the form exact match compares."""
    text = text.replace(",", "").rstrip(".")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text or "0"


def strict_answer(response: str) -> str | None:
    match = _STRICT.search(response)
    return normalize_number(match.group(1)) if match else None


def flexible_answer(response: str) -> str | None:
    numbers = _NUMBER.findall(response)
    return normalize_number(numbers[-1]) if numbers else None


def cut_response(response: str) -> str:
    """The answer to this question only: few-shot models go on to write the next `Question:`."""
    return response.split("Question:")[0].strip()


def gsm8k_row(row: dict) -> dict:
    return {"question": row["question"], "solution": row["answer"], "answer": target_answer(row["answer"])}


def _shipped(split: str) -> list[dict]:
    if split not in SHIPPED_SPLITS:
        raise ValueError(
            f"gsm8k ships the {' and '.join(SHIPPED_SPLITS)} splits, not {split!r}: pass --split test or validation, "
            "or --dataset FILE for another portion."
        )
    lines = (GSM8K_DIR / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
    return [gsm8k_row(json.loads(line)) for line in lines if line.strip()]


def fewshot_prefix(count: int = NUM_FEWSHOT) -> str:
    examples = _shipped_fewshot()[:count]
    return "".join(f"Question: {e['question']}\nAnswer: {e['solution']}\n\n" for e in examples)


def _shipped_fewshot() -> list[dict]:
    lines = (GSM8K_DIR / "fewshot.jsonl").read_text(encoding="utf-8").splitlines()
    return [gsm8k_row(json.loads(line)) for line in lines if line.strip()]


@register_task
class GSM8K(Task):
    name = "gsm8k"
    description = "GSM8K word problems: exact numeric match of the answer after '####' (5-shot, or chat zero-shot)."
    default_limit = 250

    def config(self, options: EvalOptions) -> dict:
        return {
            **super().config(options),
            "data": options.dataset or f"shipped {options.split}",
            "fewshot": NUM_FEWSHOT,
            "answer": "strict: number after '####'; flexible: last number in the response",
        }

    def load(self, lm, options: EvalOptions) -> list[dict]:
        if options.dataset:
            return data.real_records(self.name, options.dataset, options.limit)
        return _shipped(options.split)[: options.limit]

    def evaluate(self, lm, records: list[dict], options: EvalOptions) -> TaskResult:
        (chat,) = template_variants(options, lm, default="off")
        if chat:
            prompts = [lm.encode(f"{r['question']}\n\n{CHAT_INSTRUCTION}", chat=True) for r in records]
        else:
            prefix = fewshot_prefix()
            prompts = [lm.encode(f"{prefix}Question: {r['question']}\nAnswer:", chat=False) for r in records]
        stop = None if chat else ["Question:"]
        outputs = lm.generate(prompts, max_new_tokens=options.max_new_tokens or 256, desc="gsm8k", stop_strings=stop)
        responses = [o if chat else cut_response(o) for o in outputs]
        strict = [float(strict_answer(o) == r["answer"]) for r, o in zip(records, responses)]
        flexible = [float(flexible_answer(o) == r["answer"]) for r, o in zip(records, responses)]
        metrics, stderrs = {}, {}
        add_mean(metrics, stderrs, "exact_match", strict)
        add_mean(metrics, stderrs, "exact_match_flexible", flexible)
        samples = [
            {
                "doc_id": i,
                "question": r["question"],
                "target": r["answer"],
                "response": o,
                "exact_match": s,
                "exact_match_flexible": f,
            }
            for i, (r, o, s, f) in enumerate(zip(records, responses, strict, flexible))
        ]
        return TaskResult(metrics, samples, stderrs, extra={"chat_template": chat})
