"""Long-context perplexity at several lengths.

Full evaluation (the default): each sample is one window of exactly L tokens cut from the text stream, scored in one
forward pass, so the ppl at L averages over all positions 1..L-1 (not just the far ones). Sliding evaluation
(`--ppl_stride S`): each sample is a stretch of 2 x max(lengths) tokens scored with windows of L tokens moved by S,
every token scored once from the window that gives it the most context. `--limit` is the number of samples per
length. Text: the world's context documents by default, `--haystack_file` for a text file or a named source (`books`:
held-out public-domain books, the `--split` portion), `--dataset pg19`.

Under a KV cache (`--kv_cache h2o:B`; `full` keeps the one-pass scoring, which is what a full cache computes): each
window streams through a fresh cache as in generation, a prefill up to the cache's budget then one token per step,
so evictions happen between steps exactly as while decoding (H2O's streaming language-modelling setting; a budget
fraction is of the window's length). Adds `kv_bytes_len{L}` (K/V bytes held at the end, per sample) and
`kv_full_bytes_len{L}` (a full cache of the same tokens).
"""

import math

from ctxaware import texts
from ctxaware.eval import data
from ctxaware.eval.registry import EvalOptions, Task, TaskResult, register_task


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
            return texts.read_text(options.haystack_file, split=options.split)
        if options.dataset:
            return "\n\n".join(r["text"] for r in data.real_records(self.name, options.dataset, 4))
        records = data.world_records("context_qa", options.seed, options.split)
        return "\n\n".join(r["context"] for r in records if not r.get("counterfactual"))

    def load(self, lm, options: EvalOptions) -> list[dict]:
        if options.ppl_stride and lm.has_kv_cache:
            raise ValueError(
                "--ppl_stride cannot be combined with --kv_cache: under a KV cache each window streams through the "
                "cache token by token; drop --ppl_stride (or use --kv_cache full for sliding windows)."
            )
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
        if lm.has_kv_cache:
            return self._evaluate_streaming(lm, records)
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

    def _evaluate_streaming(self, lm, records: list[dict]) -> TaskResult:
        metrics, samples = {}, []
        for length in dict.fromkeys(r["length"] for r in records):
            indices = [i for i, r in enumerate(records) if r["length"] == length]
            scored = lm.streaming_nll([records[i]["input_ids"] for i in indices], desc=f"long_ppl {length}")
            for i, s in zip(indices, scored, strict=True):
                samples.append(
                    {
                        "doc_id": i,
                        "length": length,
                        "tokens_scored": s.tokens,
                        "ppl": math.exp(s.nll / s.tokens),
                        "kv_bytes": s.kv_bytes,
                        "kv_full_bytes": s.kv_full_bytes,
                    }
                )
            metrics[f"ppl_len{length}"] = math.exp(sum(s.nll for s in scored) / sum(s.tokens for s in scored))
            metrics[f"kv_bytes_len{length}"] = sum(s.kv_bytes for s in scored) / len(scored)
            metrics[f"kv_full_bytes_len{length}"] = sum(s.kv_full_bytes for s in scored) / len(scored)
        samples.sort(key=lambda sample: sample["doc_id"])
        mode = "streaming through the KV cache (prefill up to its budget, then one token per step)"
        return TaskResult(metrics, samples, extra={"mode": mode, "kv_cache": lm.setup.applied.get("kv_cache")})
