"""Knowledge-conflict QA: when the context contradicts what the model memorised, does its answer follow the context
or the memory? Scored by generation (which answer the output contains) and by log-likelihood (which answer the model
prefers), with and without the chat template."""

from ctxaware.eval import data
from ctxaware.eval.metrics import add_mean, contains_answer, first_line
from ctxaware.eval.prompts import qa_prompt, template_variants, variant_name, with_indicator
from ctxaware.eval.registry import EvalOptions, Task, TaskResult, register_task


@register_task
class CounterfactualQA(Task):
    name = "counterfactual_qa"
    description = "Follows-context vs follows-memory rates on context QA whose context may contradict memorised facts."
    default_limit = 100
    higher_is_better = {"memory_rate_plain": False, "memory_rate_chat": False}

    def config(self, options: EvalOptions) -> dict:
        return {
            **super().config(options),
            "split": options.split,
            "indicator": options.indicator,
            "metrics": "context_rate / memory_rate: share of counterfactual items whose generated answer contains the "
            "context's / the memorised answer; prefers_context: share where log p(context answer) > log p(memory "
            "answer); acc: contains the context's answer, over all items",
        }

    def load(self, lm, options: EvalOptions) -> list[dict]:
        return data.world_records("context_qa", options.seed, options.split, options.limit)

    def evaluate(self, lm, records: list[dict], options: EvalOptions) -> TaskResult:
        metrics, stderrs, samples = {}, {}, []
        conflicts = [i for i, r in enumerate(records) if r["counterfactual"] and r["answer"] != r["memory_answer"]]
        for chat in template_variants(options, lm, default="both"):
            variant = variant_name(chat)
            prompts = [
                qa_prompt(lm, r["context"], with_indicator(r["question"], options.indicator), chat=chat)
                for r in records
            ]
            outputs = [
                first_line(o)
                for o in lm.generate(prompts, max_new_tokens=options.max_new_tokens or 16, desc=f"cfqa/{variant}")
            ]
            follows_context = [contains_answer(o, r["answer"]) for o, r in zip(outputs, records)]
            follows_memory = [
                contains_answer(o, r["memory_answer"]) if r["memory_answer"] else 0.0 for o, r in zip(outputs, records)
            ]
            add_mean(metrics, stderrs, f"acc_{variant}", follows_context)
            requests = []
            for i in conflicts:
                # A leading space: the answer continues "Answer:" (plain) or starts the assistant turn (chat).
                sep = "" if chat else " "
                requests.append((prompts[i], lm.encode_continuation(sep + records[i]["answer"])))
                requests.append((prompts[i], lm.encode_continuation(sep + records[i]["memory_answer"])))
            logliks = lm.loglikelihood(requests, desc=f"cfqa/{variant}") if requests else []
            prefers = {i: float(logliks[2 * n][0] > logliks[2 * n + 1][0]) for n, i in enumerate(conflicts)}
            if conflicts:
                add_mean(metrics, stderrs, f"context_rate_{variant}", [follows_context[i] for i in conflicts])
                add_mean(metrics, stderrs, f"memory_rate_{variant}", [follows_memory[i] for i in conflicts])
                add_mean(metrics, stderrs, f"prefers_context_{variant}", list(prefers.values()))
            samples += [
                {
                    "doc_id": i,
                    "template": variant,
                    "counterfactual": bool(r["counterfactual"]),
                    "question": r["question"],
                    "target": r["answer"],
                    "memory_answer": r["memory_answer"],
                    "response": o,
                    "follows_context": fc,
                    "follows_memory": fm,
                    "prefers_context": prefers.get(i),
                }
                for i, (r, o, fc, fm) in enumerate(zip(records, outputs, follows_context, follows_memory))
            ]
        return TaskResult(metrics, samples, stderrs, extra={"n_counterfactual": len(conflicts)})
