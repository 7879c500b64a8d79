"""Attention allocation: per layer and head, the share of attention that the question (and the assistant header)
puts on the user's context versus the instruction, the question itself and the template's tokens (BOS, role markers).

The mass comes from the kernel family's `label_mass` statistic, which never materialises the S x S probabilities on
CUDA: the model runs once per record (batch 1) on `attn_implementation="ctxaware"` with `key_labels` set on every
attention module (`ctxaware.attention.set_attention_options`); the mass is averaged over the query rows after the
context, then over records. `--attention_baseline` takes another run's
results JSON and plots both models side by side with their difference.
"""

import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ctxaware import generation
from ctxaware.eval import data
from ctxaware.eval.prompts import qa_text, template_variants
from ctxaware.eval.registry import EvalOptions, Task, TaskResult, register_task
from ctxaware.world.tasks import CONTEXT_INSTRUCTION


LABELS = ("other", "instruction", "context", "question")


@register_task
class AttentionAllocation(Task):
    name = "attention_allocation"
    description = "Per-layer/head attention mass from the question onto the user context vs other roles."
    default_limit = 50

    def config(self, options: EvalOptions) -> dict:
        return {
            **super().config(options),
            "labels": list(LABELS),
            "queries": "tokens after the context (question and assistant header)",
            "attention_baseline": options.attention_baseline,
        }

    def load(self, lm, options: EvalOptions) -> list[dict]:
        return data.world_records("context_qa", options.seed, options.split, options.limit)

    def evaluate(self, lm, records: list[dict], options: EvalOptions) -> TaskResult:
        import torch
        from tqdm.auto import tqdm

        (chat,) = template_variants(options, lm, default="on" if lm.has_chat_template else "off")
        total, samples = None, []
        with label_mass_attention(lm.model) as (collected, set_labels):
            for i, record in enumerate(
                tqdm(records, desc="attention_allocation", disable=not options.progress, leave=False)
            ):
                ids, labels, first_query = labelled_prompt(lm, record["context"], record["question"], chat=chat)
                set_labels(torch.tensor([labels], device=lm.model.device))
                with torch.no_grad():
                    lm.model(input_ids=torch.tensor([ids], device=lm.model.device))
                if not collected:
                    raise RuntimeError(
                        "No attention layer reported label mass: this model's attention does not go through "
                        "transformers' AttentionInterface, so attention_allocation cannot measure it."
                    )
                # (layers, heads, labels): mean over the query rows after the context.
                per_record = torch.stack([collected[k][0, :, first_query:].mean(1) for k in sorted(collected)])
                per_record = per_record.cpu().double().numpy()
                total = per_record if total is None else total + per_record
                samples.append(
                    {
                        "doc_id": i,
                        "prompt_tokens": len(ids),
                        "context_tokens": labels.count(LABELS.index("context")),
                        **{f"{name}_mass": float(per_record[..., k].mean()) for k, name in enumerate(LABELS)},
                    }
                )
        mean = total / len(records)
        metrics = {f"{name}_mass": float(mean[..., k].mean()) for k, name in enumerate(LABELS)}
        matrix = {name: mean[..., k].round(6).tolist() for k, name in enumerate(LABELS)}
        plots = {"heatmap": _plot_writer(mean[..., LABELS.index("context")], options.attention_baseline)}
        return TaskResult(
            metrics, samples, plots=plots, extra={"mass": matrix, "labels": list(LABELS), "template": chat}
        )


def labelled_prompt(lm, context: str, question: str, *, chat: bool) -> tuple[list[int], list[int], int]:
    """Token ids of the prompt, a label per token (index into LABELS), and the index of the first query row."""
    tokenizer = lm.tokenizer
    user = qa_text(context, question, chat=chat)
    if chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], add_generation_prompt=True, tokenize=False
        )
        prefix: list[int] = []
    else:
        text = user
        prefix = [tokenizer.bos_token_id] if generation.starts_with_bos(tokenizer) else []
    spans = {"context": _find(text, context, 0)}
    spans["question"] = _find(text, question, spans["context"][1])
    if chat:
        spans["instruction"] = _find(text, CONTEXT_INSTRUCTION, 0)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = prefix + encoded["input_ids"]
    labels = [0] * len(prefix)
    for start, end in encoded["offset_mapping"]:
        label = 0
        for name, (span_start, span_end) in spans.items():
            if start < span_end and end > span_start:
                label = LABELS.index(name)
        labels.append(label)
    context_label = LABELS.index("context")
    last_context = max(i for i, label in enumerate(labels) if label == context_label)
    return ids, labels, last_context + 1


def _find(text: str, part: str, start: int) -> tuple[int, int]:
    index = text.find(part, start)
    if index < 0:
        raise ValueError(f"Could not find {part[:40]!r} in the rendered prompt: the chat template rewrites messages.")
    return index, index + len(part)


@contextmanager
def label_mass_attention(model):
    """Runs `model`'s attention on the ctxaware kernels with label statistics; yields a dict layer -> label_mass that
    each forward fills, and a setter for the key labels of the next forward."""
    from ctxaware.attention import ATTN_IMPLEMENTATION, set_attention_options

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    collected: dict[int, object] = {}

    def on_stats(module, stats):
        collected[module.layer_idx] = stats.label_mass

    def set_labels(labels):
        collected.clear()
        set_attention_options(base, key_labels=labels, num_labels=len(LABELS), on_stats=on_stats)

    previous = base.config._attn_implementation
    base.set_attn_implementation(ATTN_IMPLEMENTATION)
    try:
        yield collected, set_labels
    finally:
        set_attention_options(base, key_labels=None, num_labels=None, on_stats=None)
        base.set_attn_implementation(previous)


def _plot_writer(context_mass: np.ndarray, baseline_path: str | None):
    baseline = None
    if baseline_path:
        path = Path(baseline_path)
        if not path.is_file():
            raise FileNotFoundError(f"Attention baseline {path} does not exist: pass a results_*.json of another run.")
        extra = json.loads(path.read_text()).get("extra", {}).get("attention_allocation")
        if not extra:
            raise ValueError(f"{path} has no attention_allocation results: run that model with this task first.")
        baseline = np.asarray(extra["mass"]["context"])
        if baseline.shape != context_mass.shape:
            raise ValueError(f"The baseline's layer x head shape {baseline.shape} differs from {context_mass.shape}.")

    def write(path):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        panels = [("this model", context_mass, False)]
        if baseline is not None:
            panels += [("baseline", baseline, False), ("this model - baseline", context_mass - baseline, True)]
        fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 0.35 * context_mass.shape[0] + 2))
        for ax, (title, matrix, diff) in zip(np.atleast_1d(axes), panels):
            limit = float(np.abs(matrix).max()) or 1.0
            image = ax.imshow(
                matrix,
                cmap="RdBu" if diff else "viridis",
                aspect="auto",
                vmin=-limit if diff else 0,
                vmax=limit if diff else 1,
            )
            ax.set_xlabel("head")
            ax.set_ylabel("layer")
            ax.set_title(f"context mass: {title}")
            fig.colorbar(image, ax=ax)
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=120)
        plt.close(fig)

    return write
