"""Attention allocation: per layer and head, the share of attention that the question (and the assistant header)
puts on the user's context versus the system prompt, the question itself and the template's tokens.

The mass comes from the kernel family's `label_mass` statistic (`ctxaware.kernels.attention(..., key_labels=...,
num_labels=...)`), which never materialises the S x S probabilities on CUDA. The model runs once per record (batch 1,
no padding) with its attention routed through the kernel by a temporary `AttentionInterface` entry; the mass is
averaged over the query rows after the context, then over records. `--attention_baseline` takes another run's
results JSON and plots both models side by side with their difference.
"""

import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ctxaware.eval import data
from ctxaware.eval.prompts import template_variants
from ctxaware.eval.registry import EvalOptions, Task, TaskResult, register_task


LABELS = ("other", "system", "context", "question")
SYSTEM_PROMPT = "Answer the question using the context."
ATTN_NAME = "ctxaware_eval_label_mass"


@register_task
class AttentionAllocation(Task):
    name = "attention_allocation"
    description = "Per-layer/head attention mass from the question onto the user context vs other roles."

    def config(self, options: EvalOptions) -> dict:
        return {
            **super().config(options),
            "labels": list(LABELS),
            "queries": "tokens after the context (question and assistant header)",
            "system_prompt": SYSTEM_PROMPT,
            "attention_baseline": options.attention_baseline,
        }

    def load(self, lm, options: EvalOptions) -> list[dict]:
        return data.world_records("context_qa", options.seed, options.split, options.limit)

    def evaluate(self, lm, records: list[dict], options: EvalOptions) -> TaskResult:
        import torch
        from tqdm.auto import tqdm

        (chat,) = template_variants(options, lm, default="on" if lm.has_chat_template else "off")
        total, samples = None, []
        with label_mass_attention(lm.model) as collected:
            for i, record in enumerate(
                tqdm(records, desc="attention_allocation", disable=not options.progress, leave=False)
            ):
                ids, labels, first_query = labelled_prompt(lm, record["context"], record["question"], chat=chat)
                collected.labels = torch.tensor([labels], device=lm.model.device)
                collected.mass.clear()
                with torch.no_grad():
                    lm.model(input_ids=torch.tensor([ids], device=lm.model.device))
                if not collected.mass:
                    raise RuntimeError(
                        "No attention layer reported label mass: this model's attention does not go through "
                        "transformers' AttentionInterface, so attention_allocation cannot measure it."
                    )
                # (layers, heads, labels): mean over the query rows after the context.
                per_record = torch.stack(
                    [collected.mass[k][0, :, first_query:].mean(1) for k in sorted(collected.mass)]
                )
                per_record = per_record.cpu().double().numpy()
                total = per_record if total is None else total + per_record
                samples.append(
                    {"doc_id": i, "prompt_tokens": len(ids), "context_tokens": labels.count(LABELS.index("context")),
                     **{f"{name}_mass": float(per_record[..., k].mean()) for k, name in enumerate(LABELS)}}
                )  # fmt: skip
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
    if chat:
        messages = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": f"{context}\n\n{question}"},
        ]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        spans = {"system": _find(text, SYSTEM_PROMPT, 0), "context": _find(text, context, 0)}
        spans["question"] = _find(text, question, spans["context"][1])
        prefix: list[int] = []
    else:
        text = f"Context: {context}\nQuestion: {question}\nAnswer:"
        spans = {"context": _find(text, context, 0)}
        spans["question"] = _find(text, question, spans["context"][1])
        prefix = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
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


class _Collector:
    def __init__(self):
        self.labels = None
        self.mass: dict[int, object] = {}


@contextmanager
def label_mass_attention(model):
    """Routes `model`'s attention through the kernel with label statistics; yields the collector it fills."""
    from transformers import AttentionInterface

    from ctxaware.kernels import attention

    collector = _Collector()

    def forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        out, stats = attention(
            query, key, value, scale=scaling, causal=True, key_labels=collector.labels, num_labels=len(LABELS)
        )
        collector.mass[module.layer_idx] = stats.label_mass
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register(ATTN_NAME, forward)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    previous = base.config._attn_implementation
    base.set_attn_implementation(ATTN_NAME)
    try:
        yield collector
    finally:
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
            image = ax.imshow(matrix, cmap="RdBu" if diff else "viridis", aspect="auto",
                              vmin=-limit if diff else 0, vmax=limit if diff else 1)  # fmt: skip
            ax.set_xlabel("head")
            ax.set_ylabel("layer")
            ax.set_title(f"context mass: {title}")
            fig.colorbar(image, ax=ax)
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=120)
        plt.close(fig)

    return write
