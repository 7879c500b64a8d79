"""Extractive QA in the SQuAD style: the answer is a span of the context. Scored by exact match and by whether the
output contains a gold answer (both after SQuAD normalisation). Default data: the world's non-counterfactual context
QA; `--dataset squad` loads SQuAD v1.1 validation."""

from ctxaware.eval import data
from ctxaware.eval.metrics import add_mean, contains_answer, exact_match, first_line
from ctxaware.eval.prompts import qa_prompt, template_variants, with_indicator
from ctxaware.eval.registry import EvalOptions, Task, TaskResult, register_task


@register_task
class ExtractiveQA(Task):
    name = "extractive_qa"
    description = "SQuAD-style extractive QA: exact match and contains-answer."
    default_limit = 100

    def config(self, options: EvalOptions) -> dict:
        return {
            **super().config(options),
            "dataset": options.dataset or "world/context_qa",
            "split": options.split,
            "indicator": options.indicator,
        }

    def load(self, lm, options: EvalOptions) -> list[dict]:
        if options.dataset:
            return data.real_records(self.name, options.dataset, options.limit)
        records = data.world_records("context_qa", options.seed, options.split)
        records = [r for r in records if not r.get("counterfactual")]
        return records[: options.limit] if options.limit else records

    def evaluate(self, lm, records: list[dict], options: EvalOptions) -> TaskResult:
        (chat,) = template_variants(options, lm, default="off")
        prompts = [
            qa_prompt(lm, r["context"], with_indicator(r["question"], options.indicator), chat=chat) for r in records
        ]
        outputs = [
            first_line(o)
            for o in lm.generate(prompts, max_new_tokens=options.max_new_tokens or 16, desc="extractive_qa")
        ]
        golds = [r.get("answers") or [r["answer"]] for r in records]
        em = [exact_match(o, g) for o, g in zip(outputs, golds)]
        contains = [contains_answer(o, g) for o, g in zip(outputs, golds)]
        metrics, stderrs = {}, {}
        add_mean(metrics, stderrs, "exact_match", em)
        add_mean(metrics, stderrs, "contains", contains)
        samples = [
            {"doc_id": i, "question": r["question"], "target": g, "response": o, "exact_match": e, "contains": c}
            for i, (r, g, o, e, c) in enumerate(zip(records, golds, outputs, em, contains))
        ]
        return TaskResult(metrics, samples, stderrs)
