"""Arithmetic accuracy by operation and digit count: the first integer the model writes must equal the answer."""

import re
from collections import defaultdict

from ctxaware.eval import data
from ctxaware.eval.metrics import add_mean
from ctxaware.eval.prompts import template_variants
from ctxaware.eval.registry import EvalOptions, Task, TaskResult, register_task


_NUMBER = re.compile(r"-?\d+")


def parse_number(text: str) -> str | None:
    """The first integer in `text` (digits may be grouped with commas), or None."""
    match = _NUMBER.search(text.replace(",", ""))
    return match.group() if match else None


def op_name(op: str) -> str:
    """A metric-friendly operation name: `+` -> add, `word*` -> word_mul."""
    base = {"+": "add", "-": "sub", "*": "mul"}.get(op[-1], op)
    return f"word_{base}" if op.startswith("word") else base


def interleave_cells(records: list[dict]) -> list[dict]:
    """Records reordered round-robin over (op, digits) cells, so that any `--limit` covers every cell evenly."""
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for record in records:
        cells[(record["op"], record["digits"])].append(dict(record))
    queues = list(cells.values())
    return [queue[i] for i in range(max(map(len, queues), default=0)) for queue in queues if i < len(queue)]


@register_task
class Arithmetic(Task):
    name = "arithmetic"
    description = "Exact-answer accuracy on the world's arithmetic problems, overall and by operation and digits."
    default_limit = 150

    def config(self, options: EvalOptions) -> dict:
        return {**super().config(options), "split": options.split, "answer": "first integer in the greedy output"}

    def load(self, lm, options: EvalOptions) -> list[dict]:
        records = data.world_function("arithmetic")(data.world(options.seed), options.split)
        return interleave_cells(records)[: options.limit]

    def evaluate(self, lm, records: list[dict], options: EvalOptions) -> TaskResult:
        (chat,) = template_variants(options, lm, default="off")
        prompts = [lm.encode(r["prompt"], chat=chat) for r in records]
        outputs = lm.generate(prompts, max_new_tokens=options.max_new_tokens or 10, desc="arithmetic")
        scores = [float(parse_number(o) == str(r["answer"]).replace(",", "")) for r, o in zip(records, outputs)]
        metrics, stderrs = {}, {}
        add_mean(metrics, stderrs, "acc", scores)
        by_op, by_digits, grid = defaultdict(list), defaultdict(list), defaultdict(lambda: defaultdict(list))
        for r, s in zip(records, scores):
            by_op[r["op"]].append(s)
            by_digits[r["digits"]].append(s)
            grid[r["op"]][r["digits"]].append(s)
        for op, values in sorted(by_op.items()):
            add_mean(metrics, stderrs, f"acc_{op_name(op)}", values)
        for digits, values in sorted(by_digits.items()):
            add_mean(metrics, stderrs, f"acc_digits{digits}", values)
        samples = [
            {
                "doc_id": i,
                "op": r["op"],
                "digits": r["digits"],
                "prompt": r["prompt"],
                "target": str(r["answer"]),
                "response": o,
                "acc": s,
            }
            for i, (r, o, s) in enumerate(zip(records, outputs, scores))
        ]
        table = {op: {str(d): sum(v) / len(v) for d, v in sorted(cells.items())} for op, cells in grid.items()}
        return TaskResult(metrics, samples, stderrs, extra={"acc_by_op_digits": table})
