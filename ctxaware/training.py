"""Training helpers shared by the recipes: packing text to a length, loading a causal LM (optionally 4-bit), checks
before resuming from a checkpoint, model cards and pushing a folder to the Hub, training throughput and peak memory."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from transformers import TrainerCallback

from ctxaware.io import write_json
from ctxaware.outputs import (
    RUN_CONFIG_NAME,
    config_differences,
    is_complete_checkpoint,
    latest_complete_checkpoint,
    saved_run_config,
)


@dataclass
class RecipeTrainingArguments:
    """Mixin placed before a TRL config class. `bf16` left unset turns on only where the GPU has it, so one YAML serves
    GPU and CPU runs (TRL's own default for an unset `bf16`, True, fails on a CPU); a training length that would train
    nothing, or not what was asked, is refused; the Hub token moves into the environment (`HF_TOKEN`, where
    huggingface_hub reads it), so that no config file or checkpoint written to disk holds it."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Replace what another run left in output_dir (its checkpoints are deleted)."},
    )

    def __post_init__(self):
        if self.bf16 is None:
            self.bf16 = not self.use_cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(
                f"--max_steps {self.max_steps} trains nothing, or not that many steps: pass a positive step count, or "
                "-1 to train for --num_train_epochs"
            )
        if self.max_steps == -1 and not self.num_train_epochs > 0:
            raise ValueError(f"--num_train_epochs {self.num_train_epochs} trains nothing: pass a positive value")
        if self.hub_token:
            os.environ["HF_TOKEN"] = self.hub_token
            self.hub_token = None
        super().__post_init__()


class RequireTrainingSteps(TrainerCallback):
    """Stops a run whose data loader yields no batch (fewer rows than a batch with `dataloader_drop_last`), before an
    untrained model can be saved as if trained."""

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        if train_dataloader is not None and len(train_dataloader) == 0:
            raise ValueError(
                f"the training data gives no batch of {args.per_device_train_batch_size} rows per device (drop_last="
                f"{args.dataloader_drop_last}): use more rows, a smaller --per_device_train_batch_size, or "
                "--dataloader_drop_last false"
            )

    def on_train_end(self, args, state, control, **kwargs):
        if state.global_step == 0:
            raise ValueError("training ran 0 steps: check --max_steps, --num_train_epochs and the data size")


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


def pack_texts(texts: Iterable[str], tokenizer, length: int, rows: int, *, what: str = "rows") -> list[list[int]]:
    """`rows` rows of exactly `length` tokens: each text as BOS text EOS (BOS only where the model starts plain text
    with it, as `generation.encode_prompt` decides: not SmolLM2, whose BOS is its chat turn marker), concatenated and
    cut; raises if the texts fill fewer rows, naming `what` to lower."""
    from ctxaware.generation import encode_prompt

    documents = (encode_prompt(tokenizer, text) for text in texts)
    packed = pack_token_stream(documents, length, max_rows=rows, separator=tokenizer.eos_token_id)
    if len(packed) < rows:
        raise ValueError(
            f"the data holds {len(packed)} rows of {length} tokens, fewer than the {rows} asked: lower {what} or use "
            "a larger data set"
        )
    return packed


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
    if not load_in_4bit:
        return
    if not torch.cuda.is_available():
        raise ValueError(
            "4-bit base weights (--load_in_4bit) need bitsandbytes on a CUDA GPU, and no GPU is visible: drop "
            "--load_in_4bit to train in full precision on this machine"
        )
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("4-bit base weights (--load_in_4bit) need bitsandbytes: pip install 'ctxaware[4bit]'")


class RunConfigCallback(TrainerCallback):
    """Writes the run's configuration into every checkpoint, so a resume can check it trains the same run."""

    def __init__(self, config: dict):
        self.config = config

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                write_json(folder / RUN_CONFIG_NAME, self.config)


class TrainingSpeed(TrainerCallback):
    """Throughput and peak GPU memory of one `trainer.train` call on rows of exactly `row_length` tokens; `result`
    (None until training ends): train_seconds, train_steps, train_tokens, tokens_per_s, peak_memory_gib (this
    process's GPU, None off CUDA). Counts only the steps this call ran (a resumed run's earlier ones are not), and
    times the span HF's `train_runtime` times (model loading and evaluation outside it, checkpoint saves inside),
    unrounded and with the step count it belongs to, which the returned metrics lack on a resume. tokens_per_s is the
    mean over every step, the first ones' warm-up (kernel autotuning, allocator growth) included."""

    def __init__(self, row_length: int):
        self.row_length = row_length
        self.result: dict | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._first_step = state.global_step
        if args.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(args.device)
        self._start = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        cuda = args.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(args.device)
        seconds = time.perf_counter() - self._start
        steps = state.global_step - self._first_step
        # Rows are packed to exactly row_length tokens (no padding), so each step trains batch x accumulation x
        # processes full rows; only a short last batch of an epoch (rows not a multiple of the batch) is overcounted.
        tokens = steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        tokens *= self.row_length
        self.result = {
            "train_seconds": seconds,
            "train_steps": steps,
            "train_tokens": tokens,
            "tokens_per_s": tokens / seconds,
            "peak_memory_gib": torch.cuda.max_memory_allocated(args.device) / 2**30 if cuda else None,
        }


def resolve_resume_checkpoint(resume: str | bool | None, output_dir: str, config: dict, ignore: Iterable[str] = ()):
    """The checkpoint folder to resume from (`True`/"true" = the newest complete one in `output_dir`: a save that was
    interrupted is skipped), or None; raises if it was written by a run whose configuration differs in a key outside
    `ignore`."""
    if resume in (None, False, "", "false", "False"):
        return None
    if resume in (True, "true", "True"):
        last = latest_complete_checkpoint(output_dir)
        if last is None:
            raise FileNotFoundError(
                f"--resume_from_checkpoint asks for the latest checkpoint in {output_dir}, which holds no complete "
                "one: pass a checkpoint folder, or drop the flag to start fresh"
            )
        resume = last
    folder = Path(resume)
    if not is_complete_checkpoint(folder):
        raise FileNotFoundError(
            f"{folder} is not a complete checkpoint (no readable trainer_state.json): pass a checkpoint-N folder "
            "whose save finished, or --resume_from_checkpoint true for the newest complete one"
        )
    saved = saved_run_config(folder)
    if saved is None:
        raise FileNotFoundError(
            f"{folder} is not a checkpoint of this recipe (no {RUN_CONFIG_NAME}): pass a checkpoint-N folder "
            "written by the same recipe"
        )
    differing = config_differences(saved, config, ignore)
    if differing:
        raise ValueError(
            f"cannot resume from {folder}: it was trained with a different configuration "
            f"({'; '.join(differing[:8])}). Resume with the checkpoint's settings, or start a fresh run in another "
            "--output_dir"
        )
    return str(folder)


# The ModelConfig options TRL's `get_peft_config` reads: a recipe that builds its LoRA through it reads these.
TRL_PEFT_OPTIONS = (
    "use_peft",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "lora_target_parameters",
    "lora_modules_to_save",
    "lora_task_type",
    "use_rslora",
    "use_dora",
)


def check_model_options(model_args, used: Iterable[str]) -> None:
    """A recipe that takes TRL's `ModelConfig` but reads only the options in `used` refuses any other one set away
    from its default: a flag it would silently ignore."""
    defaults = type(model_args)()
    ignored = [
        f"--{f.name}"
        for f in fields(model_args)
        if f.name not in used and getattr(model_args, f.name) != getattr(defaults, f.name)
    ]
    if ignored:
        raise ValueError(
            f"{', '.join(ignored)}: this recipe does not use {'that option' if len(ignored) == 1 else 'those options'}"
            f" (of TRL's model options it reads {', '.join('--' + name for name in sorted(used))})"
        )


@contextmanager
def usage_errors(prog: str) -> Iterator[None]:
    """Bad input (raised as ValueError or FileNotFoundError with a message naming the fix) ends a recipe with that one
    line on stderr and exit code 2, as argparse does, instead of a traceback."""
    import yaml

    try:
        yield
    except (ValueError, FileNotFoundError, yaml.YAMLError) as error:
        kind = "the --config file is not valid YAML: " if isinstance(error, yaml.YAMLError) else ""
        print(f"{prog}: error: {kind}{' '.join(str(error).split())}", file=sys.stderr)
        raise SystemExit(2) from None
