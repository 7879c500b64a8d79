"""Long-context perplexity at several lengths.

Full evaluation (the default): each sample is one window of exactly L tokens cut from the text stream, scored in one
forward pass, so the ppl at L averages over all positions 1..L-1 (not just the far ones). Sliding evaluation
(`--ppl_stride S`): each sample is a stretch of 2 x max(lengths) tokens scored with windows of L tokens moved by S,
every token scored once from the window that gives it the most context. `--limit` is the number of samples per
length. Text: the world's context documents by default, `--haystack_file` for a text file, `--dataset pg19`.
"""

import math

from ctxaware.eval import data
from ctxaware.eval.registry import EvalOptions, Task, TaskResult, read_text_file, register_task


DEFAULT_LENGTHS = [128, 256, 512]
DEFAULT_PER_LENGTH = 2


@register_task
class LongPerplexity(Task):
    name = "long_ppl"
    description = "Token-level perplexity at several context lengths (full or sliding windows)."

    @staticmethod
    def _lengths(options):
        return options.lengths or DEFAULT_LENGTHS

    def higher_is_better_for(self, metric: str) -> bool:
        return False

    def config(self, options: EvalOptions) -> dict:
        mode = f"sliding (stride {options.ppl_stride})" if options.ppl_stride else "full (one window per sample)"
        source = options.haystack_file or (f"dataset {options.dataset}" if options.dataset else "world/context_qa")
        return {
            **super().config(options),
            "lengths": self._lengths(options),
            "mode": mode,
            "samples_per_length": options.limit or DEFAULT_PER_LENGTH,
            "text": source,
        }

    def _text(self, options: EvalOptions) -> str:
        if options.haystack_file:
            return read_text_file(options.haystack_file, "Text file")
        if options.dataset:
            return "\n\n".join(r["text"] for r in data.real_records(self.name, options.dataset, 4))
        records = data.world_records("context_qa", options.seed, options.split)
        return "\n\n".join(r["context"] for r in records if not r.get("counterfactual"))

    def load(self, lm, options: EvalOptions) -> list[dict]:
        lengths, per_length = self._lengths(options), options.limit or DEFAULT_PER_LENGTH
        stream = lm.tokenizer(self._text(options), add_special_tokens=False)["input_ids"]
        records = []
        for length in lengths:
            size = 2 * max(lengths) if options.ppl_stride else length
            if len(stream) < size * per_length:
                raise ValueError(
                    f"The text has {len(stream)} tokens, fewer than the {per_length} x {size} needed for length "
                    f"{length}: pass a longer `--haystack_file`, fewer samples (`--limit`) or smaller `--lengths`."
                )
            for k in range(per_length):
                records.append({"length": length, "input_ids": stream[k * size : (k + 1) * size]})
        return records

    def evaluate(self, lm, records: list[dict], options: EvalOptions) -> TaskResult:
        from tqdm.auto import tqdm

        totals: dict[int, list[float]] = {}
        samples = []
        for i, r in enumerate(tqdm(records, desc="long_ppl", disable=not options.progress, leave=False)):
            stride = min(options.ppl_stride, r["length"]) if options.ppl_stride else None
            nll, count = lm.token_nll(r["input_ids"], window=r["length"], stride=stride)
            total = totals.setdefault(r["length"], [0.0, 0])
            total[0] += nll
            total[1] += count
            samples.append({"doc_id": i, "length": r["length"], "tokens_scored": count, "ppl": math.exp(nll / count)})
        metrics = {}
        for length, (nll, count) in totals.items():
            metrics[f"ppl_len{length}"] = math.exp(nll / count)
        return TaskResult(metrics, samples)
