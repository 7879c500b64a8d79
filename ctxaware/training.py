"""Training helpers shared by the recipes: packing text to a length, loading a causal LM (optionally 4-bit), checks
before resuming from a checkpoint, model cards and pushing a folder to the Hub."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import TrainerCallback


class Bf16WhereAvailable:
    """Mixin placed before a TRL config class: `bf16` left unset turns on only where the GPU has it, so one YAML
    serves GPU and CPU runs (TRL's own default for an unset `bf16`, True, fails on a CPU)."""

    def __post_init__(self):
        if self.bf16 is None:
            self.bf16 = not self.use_cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        super().__post_init__()


RUN_CONFIG_NAME = "run_config.json"


def pack_token_stream(
    documents: Iterable[list[int]], length: int, *, max_rows: int | None = None, separator: int | None = None
) -> list[list[int]]:
    """Concatenates tokenized documents (each followed by `separator`, e.g. EOS) and cuts the stream into rows of
    exactly `length` tokens, dropping the incomplete tail: long-context training on full-length rows, as LongLoRA
    does. Stops once `max_rows` rows are full."""
    if length < 2:
        raise ValueError(f"rows must hold at least 2 tokens, got length={length}")
    rows, buffer = [], []
    for ids in documents:
        buffer.extend(ids)
        if separator is not None:
            buffer.append(separator)
        while len(buffer) >= length:
            rows.append(buffer[:length])
            buffer = buffer[length:]
            if max_rows is not None and len(rows) >= max_rows:
                return rows
    return rows


def load_causal_lm(
    name_or_path: str,
    *,
    dtype: str | torch.dtype | None = "auto",
    attn_implementation: str | None = None,
    load_in_4bit: bool = False,
    bnb_4bit_quant_type: str = "nf4",
    revision: str | None = None,
    **config_overrides,
):
    """A causal LM by path or Hub id (the embedded name resolves through `ctxaware.models`); `config_overrides` set
    config attributes before the weights load (e.g. `rope_parameters`, `max_position_embeddings`)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from ctxaware.models import resolve_model_path

    check_4bit(load_in_4bit)
    kwargs = dict(config_overrides)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    if load_in_4bit:
        compute = dtype if isinstance(dtype, torch.dtype) else torch.bfloat16
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=bnb_4bit_quant_type, bnb_4bit_compute_dtype=compute
        )
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    return AutoModelForCausalLM.from_pretrained(
        resolve_model_path(name_or_path), dtype=dtype, revision=revision, **kwargs
    )


def check_4bit(load_in_4bit: bool) -> None:
    if load_in_4bit and not torch.cuda.is_available():
        raise ValueError(
            "4-bit base weights (--load_in_4bit) need bitsandbytes on a CUDA GPU, and no GPU is visible: drop "
            "--load_in_4bit to train in full precision on this machine"
        )


class RunConfigCallback(TrainerCallback):
    """Writes the run's configuration into every checkpoint, so a resume can check it trains the same run."""

    def __init__(self, config: dict):
        self.config = config

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                (folder / RUN_CONFIG_NAME).write_text(json.dumps(self.config, indent=2, sort_keys=True, default=str))


def resolve_resume_checkpoint(resume: str | bool | None, output_dir: str, config: dict, ignore: Iterable[str] = ()):
    """The checkpoint folder to resume from (`True`/"true" = the latest in `output_dir`), or None; raises if it was
    written by a run whose configuration differs in a key outside `ignore`."""
    from transformers.trainer_utils import get_last_checkpoint

    if resume in (None, False, "", "false", "False"):
        return None
    if resume in (True, "true", "True"):
        last = get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None
        if last is None:
            raise FileNotFoundError(
                f"--resume_from_checkpoint asks for the latest checkpoint in {output_dir}, which holds none: pass "
                "a checkpoint folder, or drop the flag to start fresh"
            )
        resume = last
    folder = Path(resume)
    saved_file = folder / RUN_CONFIG_NAME
    if not saved_file.is_file():
        raise FileNotFoundError(
            f"{folder} is not a checkpoint of this recipe (no {RUN_CONFIG_NAME}): pass a checkpoint-N folder "
            "written by the same recipe"
        )
    saved = json.loads(saved_file.read_text())
    current = json.loads(json.dumps(config, sort_keys=True, default=str))
    ignored = set(ignore)
    differing = sorted(k for k in saved.keys() | current.keys() if k not in ignored and saved.get(k) != current.get(k))
    if differing:
        details = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}" for k in differing[:8])
        raise ValueError(
            f"cannot resume from {folder}: it was trained with a different configuration ({details}). Resume with the "
            "checkpoint's settings, or start a fresh run in another --output_dir"
        )
    return str(folder)


def write_model_card(
    folder: str | Path,
    *,
    title: str,
    base_model: str,
    description: str,
    results: dict[str, dict[str, float]] | None = None,
    tags: Iterable[str] = (),
    library_name: str = "peft",
    usage: str | None = None,
) -> Path:
    """README.md with Hub metadata and a results table (`results[task][metric] = value`)."""
    lines = ["---", f"library_name: {library_name}", f"base_model: {base_model}", "tags:"]
    lines += [f"- {tag}" for tag in ("ctxaware", *tags)]
    lines += ["---", "", f"# {title}", "", description.strip(), ""]
    if results:
        lines += ["## Evaluation", "", "| task | metric | value |", "|---|---|---|"]
        for task, metrics in results.items():
            lines += [f"| {task} | {metric} | {value:.4g} |" for metric, value in metrics.items()]
        lines.append("")
    if usage:
        lines += ["## Usage", "", "```python", usage.strip(), "```", ""]
    path = Path(folder) / "README.md"
    path.write_text("\n".join(lines))
    return path


def push_folder_to_hub(folder: str | Path, repo_id: str, *, private: bool | None = None, token: str | None = None):
    """Creates `repo_id` if needed and uploads `folder` (adapter, card, results) in one commit."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="Upload with ctxaware")
