"""liger-kernel's fused RMSNorm, SwiGLU and RoPE on a loaded transformers model (CUDA only).

Only the layers are swapped: TRL's SFTTrainer already computes the loss through its own chunked fused LM head (the
logits are never materialised) and refuses liger's fused cross-entropy beside it. At SmolLM2's shape and 32k tokens
the fused layers halve the training step's elementwise GPU time (RESULTS.md, "SinkLoRA training step").
"""

from __future__ import annotations

import inspect

import torch
from torch import nn


# What is fused: every layer liger offers for the family except the loss, which the trainer fuses already.
FUSED = dict(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False)


def check_fused_layers(model_type: str) -> None:
    """Raises, naming the fix, where the fused layers cannot run: no CUDA GPU, no liger-kernel, an unsupported family."""
    if not torch.cuda.is_available():
        raise ValueError("--fused_layers needs a CUDA GPU (liger-kernel's Triton kernels): drop --fused_layers")
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError as error:
        raise ValueError(
            "--fused_layers needs liger-kernel: pip install 'ctxaware[fused]' (or liger-kernel), or drop --fused_layers"
        ) from error
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise ValueError(
            f"--fused_layers: liger-kernel has no fused layers for model type {model_type!r}; drop --fused_layers"
        )


def apply_fused_layers(model: nn.Module) -> dict:
    """Swaps the model's RMSNorm, SwiGLU MLP and RoPE for liger's fused kernels (RoPE is patched module-wide for the
    family, as liger does); returns what was fused, for the run's record."""
    model_type = model.config.model_type
    check_fused_layers(model_type)
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    apply = MODEL_TYPE_TO_APPLY_LIGER_FN[model_type]
    accepted = inspect.signature(apply).parameters
    fused = {name: value for name, value in FUSED.items() if name in accepted}
    apply(model=model, **fused)
    return {"library": "liger-kernel", "model_type": model_type, **fused}
