"""SinkLoRA: long-context LoRA with SF-Attn during training, full attention at evaluation, H2O at inference.

- Attention during training (`training_pattern`): `sf` = S^2 groups without wrap-around plus global sink tokens
  (SinkLoRA), `s2` = LongLoRA's shifted groups, `full` = dense. Patterns run on the ctxaware kernels with
  `group_size_ratio` (G = ratio x length, per call), so the same model trains at one length and evaluates at another.
- RoPE scaling (`rope_parameters`): linear interpolation or YaRN with factor = target / original length, written
  into the model config, so it is part of what `save_pretrained` / `sinklora.json` record.
- LoRA plus trainable embeddings and norms (`lora_config`): through PEFT's `modules_to_save`, so they are saved in
  the adapter and restored by `PeftModel.from_pretrained` (LongLoRA kept them in a separate file users lost).
- `full_attention(model)` switches the patterns off (evaluation as in the originals); `load_sinklora` rebuilds the
  base with the adapter's RoPE scaling and applies the adapter.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from torch import nn

from ctxaware.attention import ATTN_IMPLEMENTATION, attention_modules, get_attention_options, set_attention_options
from ctxaware.kernels import AttentionPattern


ATTENTION_CHOICES = ("sf", "s2", "full")
ROPE_CHOICES = ("linear", "yarn", "none")
METADATA_NAME = "sinklora.json"


def training_pattern(attention: str, group_size_ratio: float = 0.25, sinks: int = 4) -> AttentionPattern | None:
    """The kernel pattern of a training attention choice (None = dense)."""
    if attention not in ATTENTION_CHOICES:
        raise ValueError(f"attention={attention!r} is not one of {', '.join(ATTENTION_CHOICES)}")
    if attention == "full":
        return None
    if attention == "s2":
        return AttentionPattern.s2(group_size_ratio=group_size_ratio)
    return AttentionPattern.sf(group_size_ratio=group_size_ratio, sinks=sinks)


def check_group_size(seq_len: int, group_size_ratio: float, attention: str = "sf") -> int | None:
    """G for rows of `seq_len` tokens; raises unless G is an even whole number that divides `seq_len` (the shifted
    half moves groups by G/2, and uneven groups make the last one a different, shorter attention span)."""
    if attention == "full":
        return None
    if not 0 < group_size_ratio <= 1:
        raise ValueError(f"group_size_ratio must lie in (0, 1], got {group_size_ratio}")
    group = seq_len * group_size_ratio
    if group != int(group) or int(group) % 2 or seq_len % int(group):
        groups = round(1 / group_size_ratio)
        step = 2 * groups
        fix = (seq_len // step) * step or step
        raise ValueError(
            f"sequence length {seq_len} is not compatible with group_size_ratio={group_size_ratio}: the group size "
            f"{group:g} must be an even whole number dividing the length. Use a length that is a multiple of {step} "
            f"(e.g. --max_length {fix}) or another group_size_ratio"
        )
    return int(group)


def rope_parameters(config, rope_type: str, target_length: int, factor: float | None = None) -> dict | None:
    """The config's `rope_parameters` for `target_length`: linear or YaRN scaling by `factor` (default: target /
    the model's original context, at least 1); None for `rope_type="none"`."""
    if rope_type not in ROPE_CHOICES:
        raise ValueError(f"rope_scaling={rope_type!r} is not one of {', '.join(ROPE_CHOICES)}")
    current = dict(getattr(config, "rope_parameters", None) or {})
    original = current.get("original_max_position_embeddings") or config.max_position_embeddings
    if factor is None:
        factor = max(1.0, target_length / original)
    if factor < 1:
        raise ValueError(
            f"a RoPE scaling factor of {factor} < 1 would compress the original context of {original} tokens: use a "
            "factor >= 1 (omit --rope_factor to get target_length / original length)"
        )
    if rope_type == "none":
        return None
    theta = current.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    params = {"rope_type": rope_type, "rope_theta": theta, "factor": float(factor)}
    if rope_type == "yarn":
        params["original_max_position_embeddings"] = original
    return params


def trainable_module_names(model: nn.Module) -> list[str]:
    """Leaf names of the input embedding and every norm module: PEFT `modules_to_save` entries (LongLoRA's "LoRA+")."""
    embedding = model.get_input_embeddings()
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if module is embedding}
    names |= {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if name and "norm" in type(module).__name__.lower() and not list(module.children())
    }
    return sorted(names)


def lora_config(
    model: nn.Module,
    *,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
    target_modules: list[str] | None = None,
    trainable_embeddings_norms: bool = True,
    extra_modules_to_save: list[str] | None = None,
):
    """A PEFT LoraConfig for SinkLoRA; embeddings and norms train fully and are saved with the adapter."""
    from peft import LoraConfig

    modules_to_save = list(extra_modules_to_save or [])
    if trainable_embeddings_norms:
        modules_to_save += [m for m in trainable_module_names(model) if m not in modules_to_save]
    tied = bool(getattr(model.config.get_text_config(), "tie_word_embeddings", False))
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules or ["q_proj", "k_proj", "v_proj", "o_proj"],
        modules_to_save=modules_to_save or None,
        ensure_weight_tying=tied and trainable_embeddings_norms,
        task_type="CAUSAL_LM",
    )


def set_training_pattern(model: nn.Module, pattern: AttentionPattern | None) -> None:
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        raise ValueError(
            f"SinkLoRA patterns run on the ctxaware kernels, but the model uses {model.config._attn_implementation!r}: "
            f"load it with attn_implementation={ATTN_IMPLEMENTATION!r}"
        )
    set_attention_options(model, pattern=pattern)


def prepare_model(model: nn.Module, pattern: AttentionPattern | None, peft_config=None) -> nn.Module:
    """Attaches the training pattern to every attention module and wraps the model with PEFT (when given)."""
    set_training_pattern(model, pattern)
    if peft_config is None:
        return model
    from peft import get_peft_model

    return get_peft_model(model, peft_config)


@contextmanager
def full_attention(model: nn.Module) -> Iterator[nn.Module]:
    """Dense attention inside the block (evaluation, generation), the training patterns restored after it."""
    modules = attention_modules(model)
    saved = [get_attention_options(m).pattern for m in modules]
    try:
        for module in modules:
            get_attention_options(module).pattern = None
        yield model
    finally:
        for module, pattern in zip(modules, saved):
            get_attention_options(module).pattern = pattern


@contextmanager
def record_attention(model: nn.Module) -> Iterator[dict]:
    """Counts, inside the block, every attention call by the pattern the kernel applied and the backend that ran
    (read at the call, not from any config); the yielded dict is filled with `attention_record`'s summary on exit."""
    modules = attention_modules(model)
    logs = [Counter() for _ in modules]
    saved = [get_attention_options(m).call_log for m in modules]
    record: dict = {}
    try:
        for module, log in zip(modules, logs):
            get_attention_options(module).call_log = log
        yield record
    finally:
        for module, log in zip(modules, saved):
            get_attention_options(module).call_log = log
        record.update(attention_record(logs))


def attention_record(logs: list[Counter]) -> dict:
    """{"patterns": {pattern: calls}, "backends": {backend: calls}, "calls", "layers", "layers_called"} over the
    per-layer call logs, so a layer that never ran (or ran another pattern) shows."""
    patterns, backends = Counter(), Counter()
    for log in logs:
        for (pattern, backend), calls in log.items():
            patterns[pattern] += calls
            backends[str(backend)] += calls
    return {
        "patterns": dict(patterns),
        "backends": dict(backends),
        "calls": sum(patterns.values()),
        "layers": len(logs),
        "layers_called": sum(1 for log in logs if log),
    }


def expected_pattern(attention: str, group_size_ratio: float, sinks: int, length: int) -> str:
    """How the kernel describes the training pattern of `attention` at rows of `length` tokens."""
    pattern = training_pattern(attention, group_size_ratio, sinks)
    return "dense" if pattern is None else pattern.describe(length)


def check_attention_ran(record: dict, expected: str) -> None:
    """Raises unless every attention call of every layer ran `expected` (so a run that silently trained dense while
    its configuration says "sf" cannot be saved as an SF adapter)."""
    if record["patterns"].keys() != {expected} or record["layers_called"] != record["layers"]:
        raise RuntimeError(
            f"training was configured for {expected} attention, but the attention modules ran {record['patterns']} "
            f"in {record['layers_called']} of {record['layers']} layers: the pattern was not applied as configured; "
            "no adapter was saved"
        )


def write_metadata(folder: str | Path, **metadata) -> Path:
    """`sinklora.json` beside the adapter: base model, RoPE parameters, context length, pattern, eval results."""
    path = Path(folder) / METADATA_NAME
    path.write_text(json.dumps(metadata, indent=2, default=str))
    return path


def read_metadata(adapter: str | Path) -> dict:
    path = Path(adapter) / METADATA_NAME
    if not path.is_file():
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(str(adapter), METADATA_NAME))
    return json.loads(path.read_text())


def load_sinklora(adapter: str | Path, *, base_model: str | None = None, dtype="auto", **kwargs):
    """The base model rebuilt with the adapter's RoPE scaling and context length, plus the adapter (embeddings and
    norms included), on the ctxaware kernels with dense attention. Returns a PeftModel."""
    from peft import PeftModel

    import ctxaware.attention  # noqa: F401  (registers the implementation)
    from ctxaware.training import load_causal_lm

    metadata = read_metadata(adapter)
    model = load_causal_lm(
        base_model or metadata["base_model"],
        dtype=dtype,
        attn_implementation=ATTN_IMPLEMENTATION,
        **base_config_overrides(metadata),
        **kwargs,
    )
    return PeftModel.from_pretrained(model, str(adapter))


def base_config_overrides(metadata: dict) -> dict:
    """The config changes the base model needs before the adapter fits: the extended context and its RoPE scaling."""
    overrides = {"max_position_embeddings": metadata["max_position_embeddings"]}
    if metadata.get("rope_parameters"):
        overrides["rope_parameters"] = metadata["rope_parameters"]
    return overrides
