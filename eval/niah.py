"""Needle in a haystack: retrieve one fact hidden at a given depth of a long context, over a grid of context lengths
and depths, with and without the chat template. `--limit` is the number of samples per grid cell."""

import numpy as np

from ctxaware import texts
from ctxaware.eval import data
from ctxaware.eval.metrics import add_mean, contains_answer, first_line, first_token_match
from ctxaware.eval.prompts import qa_prompt, template_variants, variant_name, with_indicator
from ctxaware.eval.registry import EvalOptions, Task, TaskResult, register_task


DEFAULT_LENGTHS = [128, 256, 512]
DEFAULT_DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]
DEFAULT_PER_CELL = 2


@register_task
class NeedleInAHaystack(Task):
    name = "niah"
    description = "Needle-in-a-haystack retrieval accuracy over context length x needle depth."

    def _grid(self, options: EvalOptions):
        return options.lengths or DEFAULT_LENGTHS, options.depths or DEFAULT_DEPTHS

    def config(self, options: EvalOptions) -> dict:
        lengths, depths = self._grid(options)
        return {
            **super().config(options),
            "lengths": lengths,
            "depths": depths,
            "samples_per_cell": options.limit or DEFAULT_PER_CELL,
            "haystack_file": options.haystack_file,
            "indicator": options.indicator,
            "metric": "contains the needle's answer, case- and punctuation-insensitive (acc); the first token of the "
            "reply's answer (its first line, after a restated 'The secret word of X is') is the answer's first token "
            "(found)",
        }

    def load(self, lm, options: EvalOptions) -> list[dict]:
        lengths, depths = self._grid(options)
        if any(d < 0 or d > 1 for d in depths):
            raise ValueError(f"Depths are fractions of the context in [0, 1]; got {depths}.")
        haystack = None
        if options.haystack_file:
            haystack = texts.read_text(options.haystack_file, split=options.split, what="Haystack file")
            available = len(lm.tokenizer(haystack, add_special_tokens=False)["input_ids"])
            if available < max(lengths):
                raise ValueError(
                    f"Haystack file {options.haystack_file} holds {available} tokens, fewer than the longest requested "
                    f"context ({max(lengths)}): pass a longer file or smaller `--lengths`."
                )
        needle_example = data.world_function("needle_example")
        records = []
        for length in lengths:
            for depth in depths:
                for k in range(options.limit or DEFAULT_PER_CELL):
                    seed = data.sample_seed(options.seed, options.split) * 1_000_003 + len(records)
                    record = dict(
                        needle_example(
                            lm.tokenizer, length, depth, seed, haystack_text=haystack, world=data.world(options.seed)
                        )
                    )
                    records.append({**record, "length": length, "depth": depth, "sample": k})
        return records

    def evaluate(self, lm, records: list[dict], options: EvalOptions) -> TaskResult:
        lengths, depths = self._grid(options)
        metrics, stderrs, samples, plots, grids = {}, {}, [], {}, {}
        for chat in template_variants(options, lm, default="both"):
            variant = variant_name(chat)
            prompts = [
                qa_prompt(lm, r["context"], with_indicator(r["question"], options.indicator), chat=chat)
                for r in records
            ]
            outputs = lm.generate(prompts, max_new_tokens=options.max_new_tokens or 16, desc=f"niah/{variant}")
            scores = [contains_answer(o, r["answer"]) for o, r in zip(outputs, records)]
            add_mean(metrics, stderrs, f"acc_{variant}", scores)
            # the needle found (its answer's first token) apart from copied whole: a small model finds more than it copies
            found = [first_token_match(lm.tokenizer, answer_span(o), r["answer"]) for o, r in zip(outputs, records)]
            add_mean(metrics, stderrs, f"found_{variant}", found)
            grid = np.zeros((len(lengths), len(depths)))
            counts = np.zeros_like(grid)
            for r, score in zip(records, scores):
                cell = (lengths.index(r["length"]), depths.index(r["depth"]))
                grid[cell] += score
                counts[cell] += 1
            grid = np.divide(grid, counts, out=np.full_like(grid, np.nan), where=counts > 0)
            grids[variant] = grid.tolist()
            for i, length in enumerate(lengths):
                metrics[f"acc_{variant}_len{length}"] = float(np.nanmean(grid[i]))
                metrics[f"found_{variant}_len{length}"] = float(
                    np.mean([f for r, f in zip(records, found) if r["length"] == length])
                )
            plots[f"heatmap_{variant}"] = _heatmap_writer(grid, lengths, depths, f"NIAH accuracy ({variant})")
            samples += [
                {
                    "doc_id": i,
                    "template": variant,
                    "length": r["length"],
                    "depth": r["depth"],
                    "question": r["question"],
                    "target": r["answer"],
                    "prompt_tokens": len(p),
                    "response": o,
                    "acc": s,
                    "found": f,
                }
                for i, (r, p, o, s, f) in enumerate(zip(records, prompts, outputs, scores, found))
            ]
        return TaskResult(
            metrics, samples, stderrs, plots, extra={"grid": grids, "lengths": lengths, "depths": depths}
        )


def answer_span(reply: str) -> str:
    """Where a reply gives its answer: its first line, after the last " is " when it restates the needle ("The
    secret word of X is Y."), as chat models do."""
    line = first_line(reply)
    return line.rpartition(" is ")[2] if " is " in line else line


def _heatmap_writer(grid, lengths, depths, title):
    def write(path):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2, 0.6 * len(depths) + 1.5))
        image = ax.imshow(np.asarray(grid).T, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(title)
        for i in range(len(lengths)):
            for j in range(len(depths)):
                value = grid[i][j]
                ax.text(i, j, "-" if np.isnan(value) else f"{value:.2f}", ha="center", va="center", fontsize=8)
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=120)
        plt.close(fig)

    return write
