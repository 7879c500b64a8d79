"""Passkey retrieval: a number hidden in filler text of a given length, asked for at the end; accuracy per length.
`--limit` is the number of samples per length; each sample hides the key at a seeded random depth. A sample is right
when the first number of the greedy output is the key: a prefix of it, or a longer number starting with it, is wrong.
The filler is the world's true statements, or `--haystack_file` (a text file or a named source such as `books`, its
`--split`). Keys and depths are drawn per split (`data.sample_seed`): validation keys are not the test's."""

import random

from ctxaware import texts
from ctxaware.eval import data
from ctxaware.eval.arithmetic import parse_number
from ctxaware.eval.metrics import add_mean
from ctxaware.eval.registry import EvalOptions, Task, TaskResult, register_task


DEFAULT_LENGTHS = [128, 256, 512]
DEFAULT_PER_LENGTH = 5


def passkey_score(key: str, output: str) -> float:
    """1.0 when the first number in `output` is exactly `key`."""
    return float(parse_number(output) == key)


@register_task
class Passkey(Task):
    name = "passkey"
    version = 2  # 1 counted any output containing the key, a longer number included
    description = "Passkey retrieval accuracy across context lengths (the first number of the greedy output)."

    def config(self, options: EvalOptions) -> dict:
        return {
            **super().config(options),
            "lengths": options.lengths or DEFAULT_LENGTHS,
            "samples_per_length": options.limit or DEFAULT_PER_LENGTH,
            "haystack_file": options.haystack_file,
        }

    def load(self, lm, options: EvalOptions) -> list[dict]:
        passkey_example = data.world_function("passkey_example")
        rng = random.Random(data.sample_seed(options.seed, options.split))
        haystack = texts.read_text(options.haystack_file, split=options.split) if options.haystack_file else None
        records = []
        for length in options.lengths or DEFAULT_LENGTHS:
            for _ in range(options.limit or DEFAULT_PER_LENGTH):
                depth, seed = rng.random(), rng.randrange(2**31)
                record = dict(
                    passkey_example(
                        lm.tokenizer, length, depth, seed, haystack_text=haystack, world=data.world(options.seed)
                    )
                )
                records.append({**record, "length": length, "depth": depth})
        return records

    def evaluate(self, lm, records: list[dict], options: EvalOptions) -> TaskResult:
        prompts = [lm.encode(r["text"], chat=False) for r in records]
        outputs = lm.generate(prompts, max_new_tokens=options.max_new_tokens or 12, desc="passkey")
        scores = [passkey_score(str(r["answer"]), o) for r, o in zip(records, outputs)]
        metrics, stderrs = {}, {}
        add_mean(metrics, stderrs, "acc", scores)
        for length in options.lengths or DEFAULT_LENGTHS:
            add_mean(
                metrics, stderrs, f"acc_len{length}", [s for r, s in zip(records, scores) if r["length"] == length]
            )
        samples = [
            {
                "doc_id": i,
                "length": r["length"],
                "depth": r["depth"],
                "target": str(r["answer"]),
                "response": o,
                "acc": s,
            }
            for i, (r, o, s) in enumerate(zip(records, outputs, scores))
        ]
        return TaskResult(metrics, samples, stderrs)
