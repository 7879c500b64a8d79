"""SinkLoRA: extend a causal LM's context with LoRA, SF-Attn during training, full attention at evaluation.

    accelerate launch recipes/sinklora.py                          # the embedded tiny model to 4x its context, CPU
    accelerate launch recipes/sinklora.py --config recipes/configs/sinklora/llama3_8b_32k.yaml
    accelerate launch --config_file recipes/accelerate/fsdp.yaml recipes/sinklora.py --config ...

Steps: evaluate the original model; load the base with RoPE scaling (YaRN or linear, factor = target / original
length) on the ctxaware kernels and evaluate it untrained; pack text (the synthetic world's documents in `train_mix`
proportions, or a Hub/local data set by name) into rows of `max_length` tokens; attach the training pattern (`sf`,
`s2` or `full`) and LoRA with trainable embeddings and norms; train with TRL's SFTTrainer (gradient checkpointing,
resumable: a checkpoint from another configuration is refused), counting which pattern and backend every attention
call ran; then, with full attention, evaluate passkey retrieval and perplexity at several lengths through the
`ctxaware eval` harnesses and print the before/after table. `{output_dir}/adapter/` receives the PEFT adapter
(embeddings and norms included), `sinklora.json` (RoPE scaling, context, pattern, the attention that ran, the
training's tokens/s and peak GPU memory), `eval_results.json` and a model card; `--push_to_hub` uploads that folder.

The default (the embedded model, 512 -> 2048 tokens on a CPU) uses YaRN: linear interpolation costs the model its
short-context perplexity (212 at 512 tokens untrained, 86 after 8 steps at lr 1e-3) and passkey retrieval, which
YaRN keeps (41 and 1.0 untrained); benchmarks/results/sinklora_main_job_sweep.json holds every configuration tried.
"""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import set_seed
from trl import ModelConfig, SFTConfig, SFTTrainer, TrlParser

import ctxaware.attention
from ctxaware.datafiles import load_rows, require_column
from ctxaware.fused_layers import apply_fused_layers, check_fused_layers
from ctxaware.hub import push_folder_to_hub, write_model_card
from ctxaware.io import atomic_directory
from ctxaware.methods import sinklora
from ctxaware.models import EMBEDDED_MODEL_NAME, load_tokenizer, resolve_model_path
from ctxaware.outputs import claim_output_dir
from ctxaware.training import (
    RecipeTrainingArguments,
    RequireTrainingSteps,
    RunConfigCallback,
    TrainingSpeed,
    check_4bit,
    check_model_options,
    load_causal_lm,
    pack_texts,
    resolve_resume_checkpoint,
    usage_errors,
)


@dataclass
class SinkLoRAArguments:
    """SinkLoRA's own settings: the training attention pattern, RoPE scaling, the training text and the final
    evaluation."""

    attention: str = field(default="sf", metadata={"help": "Training attention: sf (SinkLoRA), s2 (LongLoRA), full."})
    group_size_ratio: float = field(default=0.25, metadata={"help": "Group size as a fraction of the row length."})
    sinks: int = field(default=4, metadata={"help": "Global sink tokens of SF-Attn."})
    rope_scaling: str = field(default="yarn", metadata={"help": "RoPE scaling: yarn, linear or none."})
    rope_factor: float | None = field(
        default=None, metadata={"help": "RoPE scaling factor >= 1 (default: max_length / original context)."}
    )
    trainable_embeddings_norms: bool = field(
        default=True, metadata={"help": "Train embeddings and norms fully (saved with the adapter), as LongLoRA+."}
    )
    fused_layers: bool = field(
        default=False,
        metadata={
            "help": "liger-kernel's fused RMSNorm, SwiGLU and RoPE (CUDA; pip install 'ctxaware[fused]'): the step's "
            "elementwise time halves at long context. The loss is fused by SFTTrainer already."
        },
    )
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Hub data set, local .json/.jsonl/.parquet/.txt file or folder, or `books`; default: the world's "
            "long documents."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub data set configuration name."})
    dataset_split: str = field(default="train", metadata={"help": "Split of dataset_name."})
    dataset_streaming: bool = field(default=False, metadata={"help": "Stream dataset_name (large corpora)."})
    num_train_rows: int = field(default=16, metadata={"help": "Packed rows of max_length tokens to train on."})
    world_seed: int = field(default=0, metadata={"help": "Seed of the synthetic world (default data)."})
    train_mix: list[str] = field(
        default_factory=lambda: ["passkey:2", "needle:1", "key_value:0.5", "reading:2", "facts:1"],
        metadata={"help": "Default data: the world's document kinds as kind:weight (passkey, needle, reading, ...)."},
    )
    eval_ppl_lengths: list[int] | None = field(
        default=None, metadata={"help": "long_ppl lengths (default: original, 2x and 4x context, up to max_length)."}
    )
    eval_passkey_lengths: list[int] | None = field(
        default=None, metadata={"help": "passkey (and niah) lengths (default: max_length)."}
    )
    eval_niah: bool = field(
        default=False,
        metadata={"help": "Also needle-in-a-haystack (plain prompt, 5 depths, eval_passkey_limit per depth)."},
    )
    eval_retrieval_text: str | None = field(
        default=None,
        metadata={
            "help": "Haystack of the passkey and NIAH evaluation: a text file or `books` (its --eval_split portion); "
            "default: the world's true statements."
        },
    )
    eval_text_file: str | None = field(
        default=None,
        metadata={
            "help": "Text file or `books` (its test book) for the long_ppl evaluation; default: world passages."
        },
    )
    eval_split: str = field(
        default="test",
        metadata={
            "help": "Split the evaluation reads (`books` portion, passkey/NIAH keys): validation while choosing "
            "settings, test for the report."
        },
    )
    eval_limit: int = field(default=2, metadata={"help": "Perplexity windows per length (0: skip the evaluation)."})
    eval_passkey_limit: int | None = field(
        default=10, metadata={"help": "Passkey samples per length (None: eval_limit)."}
    )
    eval_batch_size: int = field(default=2, metadata={"help": "Batch size of the final evaluation."})
    eval_baselines: bool = field(
        default=True,
        metadata={"help": "Also evaluate the original model and the RoPE-scaled untrained one (single process)."},
    )


@dataclass
class SinkLoRATrainingConfig(RecipeTrainingArguments, SFTConfig):
    """SFTConfig with SinkLoRA's training defaults; `max_length` is the training row length and target context
    (default: 4x the model's)."""

    output_dir: str = field(
        default="outputs/sinklora", metadata={"help": "Checkpoints; the final adapter goes to adapter/."}
    )
    max_length: int | None = field(
        default=None, metadata={"help": "Training rows and target context, in tokens (default: 4x the model's)."}
    )
    learning_rate: float = 1e-3
    lr_scheduler_type: str = "constant_with_warmup"
    warmup_steps: float = 2
    max_steps: int = 16
    per_device_train_batch_size: int = 1
    activation_checkpointing: bool = False  # on in the GPU configs; a CPU at the default length does not need it
    activation_checkpointing_kwargs: dict | None = field(default_factory=lambda: {"use_reentrant": False})
    logging_steps: float = 1
    save_strategy: str = "steps"
    save_steps: float = 16
    save_total_limit: int | None = 1
    dataset_kwargs: dict | None = field(default_factory=lambda: {"skip_prepare_dataset": True})


@dataclass
class SinkLoRAModelConfig(ModelConfig):
    """TRL's model options with SinkLoRA's defaults; the recipe reads only MODEL_OPTIONS and refuses the others set."""

    model_name_or_path: str | None = field(
        default=EMBEDDED_MODEL_NAME, metadata={"help": "Base model: the embedded name, a folder or a Hub id."}
    )
    dtype: str | None = field(default="float32", metadata={"help": "Weights dtype: float32, bfloat16, auto."})
    attn_implementation: str | None = field(
        default=ctxaware.attention.ATTN_IMPLEMENTATION, metadata={"help": "Must be ctxaware (the kernel family)."}
    )
    use_peft: bool = field(default=True, metadata={"help": "LoRA (false: full fine-tuning with the same patterns)."})
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | None = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


MODEL_OPTIONS = (
    "model_name_or_path",
    "model_revision",
    "dtype",
    "attn_implementation",
    "load_in_4bit",
    "bnb_4bit_quant_type",
    "use_peft",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "lora_modules_to_save",
)
CONFIG_CLASSES = (SinkLoRAArguments, SinkLoRATrainingConfig, SinkLoRAModelConfig)
# Keys a resume may change: where things go, how often they are logged or saved, how long training runs.
RESUME_MAY_DIFFER = {
    "output_dir",
    "overwrite_output_dir",
    "resume_from_checkpoint",
    "logging_dir",
    "logging_steps",
    "save_steps",
    "save_total_limit",
    "save_strategy",
    "max_steps",
    "num_train_epochs",
    "push_to_hub",
    "hub_model_id",
    "hub_token",
    "hub_private_repo",
    "report_to",
    "run_name",
    "eval_limit",
    "eval_split",
    "eval_passkey_limit",
    "eval_baselines",
    "eval_niah",
    "eval_text_file",
    "eval_retrieval_text",
    "eval_batch_size",
    "eval_ppl_lengths",
    "eval_passkey_lengths",
    "dataloader_num_workers",
    "disable_tqdm",
}


def validate(
    args: SinkLoRAArguments,
    training_args: SinkLoRATrainingConfig,
    model_args: SinkLoRAModelConfig,
    original_length: int,
) -> int:
    """Checks everything that can fail before a model loads; returns the target length."""
    if model_args.attn_implementation != ctxaware.attention.ATTN_IMPLEMENTATION:
        raise ValueError(
            f"attn_implementation={model_args.attn_implementation!r}: the SinkLoRA patterns run on the ctxaware "
            "kernels; use --attn_implementation ctxaware and pick the pattern with --attention sf|s2|full"
        )
    check_4bit(model_args.load_in_4bit)
    if args.num_train_rows < 1:
        raise ValueError(f"--num_train_rows {args.num_train_rows} trains on nothing: pass a positive row count")
    target = training_args.max_length or 4 * original_length
    sinklora.training_pattern(args.attention, args.group_size_ratio, args.sinks)
    sinklora.check_group_size(target, args.group_size_ratio, args.attention)
    if args.rope_factor is not None and args.rope_factor < 1:
        raise ValueError(
            f"--rope_factor {args.rope_factor} is below 1, which would compress the original context: use a factor "
            f">= 1, or omit it to get max_length / original length ({target / original_length:g})"
        )
    if args.rope_scaling not in sinklora.ROPE_CHOICES:
        raise ValueError(f"--rope_scaling {args.rope_scaling!r}: use one of {', '.join(sinklora.ROPE_CHOICES)}")
    if args.eval_split not in ("validation", "test"):
        raise ValueError(f"--eval_split {args.eval_split!r}: use validation (choosing settings) or test (the report)")
    if not args.dataset_name:
        parse_mix(args.train_mix)
    return target


def load_text_dataset(args: SinkLoRAArguments, text_field: str = "text"):
    """The data set named by `dataset_name` (Hub id, local file or folder, `books`; a .txt file is one document a
    line, column `text`); raises naming the first row without `text_field` (SFTConfig's `dataset_text_field`; checked
    up front unless streaming)."""
    name = args.dataset_name
    dataset = load_rows(name, config=args.dataset_config, split=args.dataset_split, streaming=args.dataset_streaming)
    fix = "pass --dataset_text_field with the column that holds the text, or give every row that column"
    require_column(dataset if not args.dataset_streaming else [next(iter(dataset))], text_field, name, fix)
    return dataset


def parse_mix(entries: list[str]) -> dict[str, float]:
    """`["passkey:2", "reading:1"]` -> {"passkey": 2.0, "reading": 1.0}, the weights of `pretraining_corpus`."""
    from ctxaware.world.corpus import DEFAULT_MIX

    mix = {}
    for entry in entries:
        kind, _, weight = entry.partition(":")
        kind = kind.strip()
        if kind not in DEFAULT_MIX or not weight.replace(".", "", 1).isdigit():
            raise ValueError(
                f"--train_mix entry {entry!r}: use kind:weight with a weight >= 0 and a kind among "
                f"{', '.join(DEFAULT_MIX)} (e.g. --train_mix passkey:2 reading:1)"
            )
        mix[kind] = float(weight)
    if not sum(mix.values()) > 0:
        raise ValueError(f"--train_mix {' '.join(entries)!r} gives no document a positive weight")
    return mix


def packed_rows(args: SinkLoRAArguments, tokenizer, length: int, *, seed: int, text_field: str) -> list[list[int]]:
    """`num_train_rows` rows of exactly `length` tokens of the training text (`training.pack_texts`); `seed` draws the
    world's documents, `text_field` is the data set's text column."""
    if args.dataset_name:
        texts = (row[text_field] for row in load_text_dataset(args, text_field))
    else:
        from ctxaware.world import build_world, pretraining_corpus

        mix = parse_mix(args.train_mix)
        corpus = pretraining_corpus(build_world(args.world_seed), 10**9, seed=seed, mix=mix, max_tokens=length)
        texts = (doc["text"] for doc in corpus)
    return pack_texts(texts, tokenizer, length, args.num_train_rows, what="--num_train_rows")


def evaluate(
    model, tokenizer, args: SinkLoRAArguments, original_length: int, target: int, name: str
) -> tuple[dict, dict]:
    """passkey and long_ppl with full attention, through the ctxaware eval harnesses: ({task: {metric: value}},
    {task: the harness's results JSON})."""
    from ctxaware.eval.runner import evaluate_in_process

    ppl_lengths = args.eval_ppl_lengths or sorted({min(original_length * k, target) for k in (1, 2, 4)})
    passkey_lengths = args.eval_passkey_lengths or [target]
    summary, full = {}, {}
    config = {"model": name, "adapter": None, "device": str(model.device), "dtype": str(model.dtype)}
    model.eval()
    tasks = [("passkey", passkey_lengths), ("long_ppl", ppl_lengths)]
    if args.eval_niah:
        tasks.insert(1, ("niah", passkey_lengths))
    with torch.no_grad(), sinklora.full_attention(model):
        for task, lengths in tasks:
            results = evaluate_in_process(
                model,
                tokenizer,
                [task],
                config=config,
                batch_size=args.eval_batch_size,
                limit=args.eval_limit if task == "long_ppl" else args.eval_passkey_limit or args.eval_limit,
                lengths=lengths,
                haystack_file=args.eval_text_file if task == "long_ppl" else args.eval_retrieval_text,
                split=args.eval_split,
                chat_template="off" if task == "niah" else None,
            ).results
            full[task] = results
            summary[task] = {
                metric.split(",")[0]: value
                for metric, value in results["results"][task].items()
                if isinstance(value, float) and "stderr" not in metric
            }
    return summary, full


def before_after_table(results: dict[str, dict], labels: dict[str, str]) -> list[str]:
    """Markdown rows: perplexity at each evaluated length, passkey (and niah) accuracy, one row per model."""
    columns = []  # (task, metric, header)
    for task, prefix, name in (
        ("long_ppl", "ppl_len", "ppl"),
        ("passkey", "acc_len", "passkey"),
        ("niah", "acc_plain_len", "niah"),
    ):
        metrics = {k for r in results.values() for k in r.get(task, {}) if k.startswith(prefix)}
        for metric in sorted(metrics, key=lambda k: int(k.removeprefix(prefix))):
            columns.append((task, metric, f"{name}@{metric.removeprefix(prefix)}"))
    rows = ["| model | " + " | ".join(c[2] for c in columns) + " |", "|---|" + "---|" * len(columns)]
    for name, result in results.items():
        values = [f"{result[t][m]:.2f}" if m in result.get(t, {}) else "-" for t, m, _ in columns]
        rows.append(f"| {labels.get(name, name)} | " + " | ".join(values) + " |")
    return rows


def main(args: SinkLoRAArguments, training_args: SinkLoRATrainingConfig, model_args: SinkLoRAModelConfig) -> dict:
    from transformers import AutoConfig

    check_model_options(model_args, MODEL_OPTIONS)
    set_seed(
        training_args.seed
    )  # LoRA weights are created before the Trainer seeds anything: seed first, so runs repeat
    base_name = model_args.model_name_or_path or EMBEDDED_MODEL_NAME
    base_path = resolve_model_path(base_name)
    base_config = AutoConfig.from_pretrained(base_path, revision=model_args.model_revision)
    original_length = base_config.max_position_embeddings
    target = validate(args, training_args, model_args, original_length)
    if args.fused_layers:
        check_fused_layers(base_config.model_type)
    training_args.max_length = target
    rope = sinklora.rope_parameters(base_config, args.rope_scaling, target, args.rope_factor)
    rope_label = f"{args.rope_scaling} RoPE x{rope['factor']:g}" if rope else "no RoPE scaling"
    push, training_args.push_to_hub = training_args.push_to_hub, False  # pushed once at the end, with eval results
    run_config = {**asdict(args), **training_args.to_dict(), **asdict(model_args)}
    claim_output_dir(
        training_args.output_dir,
        run_config,
        overwrite=training_args.overwrite_output_dir,
        resume=training_args.resume_from_checkpoint,
        may_differ=RESUME_MAY_DIFFER,
    )
    resume = resolve_resume_checkpoint(
        training_args.resume_from_checkpoint, training_args.output_dir, run_config, RESUME_MAY_DIFFER
    )

    tokenizer = load_tokenizer(base_path, revision=model_args.model_revision)
    rows = packed_rows(args, tokenizer, target, seed=training_args.seed, text_field=training_args.dataset_text_field)
    overrides = {"max_position_embeddings": max(target, original_length)}
    if rope is not None:
        overrides["rope_parameters"] = rope

    from accelerate import PartialState

    def load(on_device: bool = False, **config_overrides):
        loaded = load_causal_lm(
            base_path,
            dtype=model_args.dtype,
            attn_implementation=model_args.attn_implementation,
            load_in_4bit=model_args.load_in_4bit,
            bnb_4bit_quant_type=model_args.bnb_4bit_quant_type,
            revision=model_args.model_revision,
            **config_overrides,
        )
        # The before-training evaluation runs on the device the Trainer will use, as the final one does.
        return loaded.to(PartialState().device) if on_device and not model_args.load_in_4bit else loaded

    # Before: the original model and the scaled one before any step, on the same held-out text as the trained model.
    before = {}
    baselines = args.eval_limit > 0 and args.eval_baselines and not resume
    if baselines and PartialState().num_processes > 1:
        print("sinklora: the before-training evaluation runs in single-process runs only; skipped")
        baselines = False
    if baselines:
        original = load(on_device=True)
        before["original"], _ = evaluate(original, tokenizer, args, original_length, target, base_name)
        del original
    model = load(on_device=baselines, **overrides)
    if baselines:
        before["scaled"], _ = evaluate(model, tokenizer, args, original_length, target, base_name)
    model.config.use_cache = False
    if model_args.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=training_args.activation_checkpointing
        )
    peft_config = None
    if model_args.use_peft:
        peft_config = sinklora.lora_config(
            model,
            r=model_args.lora_r,
            alpha=model_args.lora_alpha,
            dropout=model_args.lora_dropout,
            target_modules=model_args.lora_target_modules,
            trainable_embeddings_norms=args.trainable_embeddings_norms,
            extra_modules_to_save=model_args.lora_modules_to_save,
        )
    fused = apply_fused_layers(model) if args.fused_layers else None
    pattern = sinklora.training_pattern(args.attention, args.group_size_ratio, args.sinks)
    model = sinklora.prepare_model(model, pattern, peft_config)

    from datasets import Dataset

    speed = TrainingSpeed(row_length=target)
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=Dataset.from_dict({"input_ids": rows}),
        processing_class=tokenizer,
        callbacks=[RunConfigCallback(run_config), RequireTrainingSteps(), speed],
    )
    with sinklora.record_attention(model) as attention_ran:
        trainer.train(resume_from_checkpoint=resume)
    expected = sinklora.expected_pattern(args.attention, args.group_size_ratio, args.sinks, target)
    attention_ran["expected"] = expected
    sinklora.check_attention_ran(attention_ran, expected)

    summary, harness_results = {}, {}
    if trainer.is_world_process_zero():
        model = trainer.accelerator.unwrap_model(trainer.model)
        if args.eval_limit > 0:
            with sinklora.record_attention(model) as eval_attention_ran:
                summary, harness_results = evaluate(model, tokenizer, args, original_length, target, base_name)
            attention_ran["evaluation"] = eval_attention_ran
        final = Path(training_args.output_dir) / "adapter"
        with atomic_directory(final) as folder:
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            sinklora.write_metadata(
                folder,
                base_model=base_name,
                original_max_position_embeddings=original_length,
                max_position_embeddings=max(target, original_length),
                rope_parameters=rope,
                attention=args.attention,
                group_size_ratio=args.group_size_ratio,
                sinks=args.sinks,
                train_steps=trainer.state.global_step,
                training_speed=speed.result,
                fused_layers=fused,
                attention_ran=attention_ran,
                eval_results=summary,
            )
            (folder / "eval_results.json").write_text(
                json.dumps(
                    {"summary": summary, "before": before, "training_speed": speed.result, "harness": harness_results},
                    indent=2,
                    default=str,
                )
            )
            write_model_card(
                folder,
                title=f"SinkLoRA: {base_name} extended to {target} tokens",
                base_model=base_name,
                description=(
                    f"LoRA adapter (embeddings and norms trained fully and included) extending {base_name} from "
                    f"{original_length} to {target} tokens with {args.attention.upper()} attention during training "
                    f"(group size ratio {args.group_size_ratio}, {args.sinks} sinks) and "
                    f"{args.rope_scaling} RoPE scaling (factor {rope['factor'] if rope else 1:g}), "
                    f"{trainer.state.global_step} steps. Evaluated with full attention. Trained with "
                    "ctxaware's `recipes/sinklora.py`."
                ),
                results=summary,
                tags=("sinklora", "long-context", "lora"),
                usage=(
                    "from ctxaware.methods.sinklora import load_sinklora\n"
                    "model = load_sinklora('PATH_OR_REPO')  # the base rebuilt with this adapter's RoPE scaling"
                ),
            )
        print(f"adapter, model card and eval results: {final}")
        run_summary = {
            "train_steps": trainer.state.global_step,
            "training_speed": speed.result,
            "attention_ran": attention_ran,
        }
        print(json.dumps({**run_summary, "eval": summary, "before": before}, indent=2))
        if summary:
            labels = {
                "original": f"original {base_name} (context {original_length})",
                "scaled": f"{rope_label}, untrained",
                "trained": f"{rope_label} + {args.attention.upper()} LoRA, {trainer.state.global_step} steps",
            }
            print("\n".join(before_after_table({**before, "trained": summary}, labels)))
        if push:
            repo_id = training_args.hub_model_id or Path(training_args.output_dir).name
            push_folder_to_hub(final, repo_id, private=training_args.hub_private_repo, token=training_args.hub_token)
            print(f"pushed {final} to https://huggingface.co/{repo_id}")
    return summary


if __name__ == "__main__":
    with usage_errors("sinklora"):
        main(*TrlParser(CONFIG_CLASSES).parse_args_and_config())
