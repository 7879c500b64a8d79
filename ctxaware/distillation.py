"""Knowledge distillation from a frozen teacher: the KL divergence between the teacher's and the student's next-token
distributions, computed from their final hidden states and LM heads a chunk of tokens at a time, so the
[tokens, vocab] logits are never held whole (a trainer whose loss uses a fused LM head has no full logits either)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def frozen(model: nn.Module) -> nn.Module:
    """`model` itself in eval mode, its parameters taking no gradient: a teacher."""
    model.eval().requires_grad_(False)
    return model


def frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen copy of `model` (same dtype and device): the teacher that is the model before it changes."""
    return frozen(copy.deepcopy(model))


def saved_teacher(source: str, student: nn.Module, tokenizer) -> nn.Module:
    """The frozen teacher saved at `source` (a model folder, or a recipe's output directory whose `model/` holds
    one), loaded as `ctxaware.models.load_model` loads any model, in `student`'s dtype and on its device. Refuses a
    teacher whose tokenizer (token to id) or LM head size differs from the student's `tokenizer` and head."""
    from ctxaware.models import load_model

    folder = Path(source).expanduser()
    if (folder / "model" / "config.json").is_file():
        folder = folder / "model"
    dtype = str(student.dtype).removeprefix("torch.")
    teacher, teacher_tokenizer = load_model(str(folder), dtype=dtype, device=str(student.device))
    sizes = (len(teacher_tokenizer), teacher.get_output_embeddings().out_features)
    expected = (len(tokenizer), student.get_output_embeddings().out_features)
    if teacher_tokenizer.get_vocab() != tokenizer.get_vocab() or sizes != expected:
        raise ValueError(
            f"distill_teacher {source}: its vocabulary (tokenizer, LM head: {sizes[0]}, {sizes[1]}) differs from the "
            f"model's ({expected[0]}, {expected[1]}): pass a model of the same tokenizer, e.g. the dense control "
            "trained from the same base model."
        )
    check_plain_lm_head(teacher.config)
    return frozen(teacher)


@contextmanager
def final_hidden_states(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Inside the block, each forward of `model`'s backbone (`model.base_model`) appends its last hidden states
    [batch, seq, hidden] to the yielded list, in the autograd graph: a fused-LM-head forward's states, which its
    output does not carry."""
    captured: list[torch.Tensor] = []
    handle = model.base_model.register_forward_hook(lambda module, args, output: captured.append(output[0]))
    try:
        yield captured
    finally:
        handle.remove()


def check_plain_lm_head(config) -> None:
    """Distillation takes the logits as the LM head's output: refuses a model that scales or caps them after it."""
    config = config.get_text_config()
    for name in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier"):
        if getattr(config, name, None) is not None:
            raise ValueError(
                f"distillation takes the logits as the LM head's output, but this model's config sets {name}: "
                "use distill_coef 0 with it"
            )


def next_token_kl(
    student_hidden: torch.Tensor,
    student_head: nn.Linear,
    teacher_hidden: torch.Tensor,
    teacher_head: nn.Linear,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 2048,
) -> torch.Tensor:
    """Mean over the positions the LM loss counts (those whose next-token label, `labels[:, 1:]`, is not -100) of
    KL(teacher || student) between the next-token distributions at `temperature`, times temperature**2 (Hinton's
    scaling: the gradient's size does not shrink with the temperature). Hidden states are [batch, seq, hidden] (the
    teacher's without gradient); logits come from each head in float32, `chunk_size` tokens at a time, each chunk
    recomputed in the backward pass, so at most one chunk's [chunk_size, vocab] logits are alive. A batch with no
    counted position gives a zero that is still connected to the student."""
    mask = labels[:, 1:] != -100
    student = student_hidden[:, :-1][mask]
    teacher = teacher_hidden[:, :-1][mask].detach()
    total = student.sum().float() * 0  # connected to the student even when no position counts
    for start in range(0, len(student), chunk_size):
        end = start + chunk_size
        chunk = (student[start:end], teacher[start:end], student_head, teacher_head, temperature)
        total = total + checkpoint(_chunk_kl, *chunk, use_reentrant=False)
    return total * temperature**2 / max(len(student), 1)


def _chunk_kl(student, teacher, student_head, teacher_head, temperature) -> torch.Tensor:
    """Sum over the chunk's tokens of KL(teacher || student) at `temperature`, in float32."""
    student_logp = F.log_softmax(F.linear(student, student_head.weight, student_head.bias).float() / temperature, -1)
    with torch.no_grad():
        teacher_logp = F.log_softmax(
            F.linear(teacher, teacher_head.weight, teacher_head.bias).float() / temperature, -1
        )
    return F.kl_div(student_logp, teacher_logp, log_target=True, reduction="sum")
