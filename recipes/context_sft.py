"""Vanilla and conditional instruction SFT (the context-awareness paper) with TRL's SFTTrainer.

CPU, the embedded tiny model and the synthetic world's chat data, a few minutes:
    accelerate launch recipes/context_sft.py --config recipes/configs/context_sft/default.yaml
The vanilla-SFT baseline is the same run with `--mode vanilla`. Llama-3-8B on UltraChat, scored by `ctxaware score`:
    accelerate launch --config_file recipes/accelerate/ddp.yaml recipes/context_sft.py \
        --config recipes/configs/context_sft/llama3_ultrachat.yaml

Conditional SFT marks the training turns whose responses depend on the user's context with an indicator token, so
that instruction tuning cannot teach the model to ignore context in general: at test time the indicator is appended
to context-dependent questions inside the chat template's user turn, where it was trained (`ctxaware eval --indicator
"<|context|>" --chat_template on`; after a plain prompt it is a format the model never saw). Steps:
1. Load the chat data (`world`, a JSON(L) file, or a Hub data set with a messages / ShareGPT column).
2. Conditional mode: the turns to mark come from `ctxaware score`'s scores.jsonl (`scores_path`: its per-turn
   `chosen`), or are scored here with the base model (same code, same options).
3. Add the indicator as a new special token (an error if it is already a token), its embedding initialised to the mean
   embedding of `indicator_init`, and append it to the chosen user turns.
4. Train with the chat template and assistant-only loss, LoRA (`use_peft`; the indicator's embedding row is trained
   and saved with the adapter through PEFT's `trainable_token_indices`) or full fine-tuning.
5. Save the adapter (or model), the tokenizer with the indicator, a `context_sft.json` and a model card;
   `--push_to_hub` pushes them. To load a LoRA adapter, resize the base model's embeddings to `len(tokenizer)` first;
   `--merge true` also writes `merged/`, a plain model with its tokenizer that `ctxaware eval --model` loads.
"""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, set_seed
from trl import ModelConfig, SFTConfig, SFTTrainer, TrlParser, get_peft_config

import ctxaware.attention  # noqa: F401  (registers attn_implementation="ctxaware" with transformers)
from ctxaware.hub import model_card_text
from ctxaware.io import write_text
from ctxaware.methods.context import (
    DEFAULT_INDICATOR,
    DEFAULT_INDICATOR_INIT,
    add_indicator_token,
    insert_indicator,
)
from ctxaware.methods.context_scoring import load_chat_records, score_records, select_turns
from ctxaware.models import load_tokenizer, resolve_model_path
from ctxaware.outputs import BOOKKEEPING_KEYS, claim_output_dir
from ctxaware.training import (
    TRL_PEFT_OPTIONS,
    RecipeTrainingArguments,
    RequireTrainingSteps,
    RunConfigCallback,
    check_model_options,
    resolve_resume_checkpoint,
    usage_errors,
)


@dataclass
class ContextSFTArguments:
    """The method's own settings: mode, chat data, how the context-dependent turns are chosen, the indicator."""

    mode: str = field(default="conditional", metadata={"help": "`vanilla` SFT, or `conditional` (indicator token)."})
    dataset: str = field(default="world", metadata={"help": "`world`, a .jsonl/.json file, or a Hub data set."})
    dataset_split: str = field(default="train", metadata={"help": "Split of the data set (UltraChat: train_sft)."})
    dataset_limit: int | None = field(default=None, metadata={"help": "Train on the first N records."})
    messages_column: str | None = field(default=None, metadata={"help": "Conversation column (default: auto)."})
    world_seed: int = field(default=0, metadata={"help": "Seed of the synthetic world (dataset `world`)."})
    world_context_rate: float = field(
        default=0.25, metadata={"help": "Share of context-dependent chats in the world's data (knowledge-heavy)."}
    )
    world_knowledge_form: str = field(
        default="bare",
        metadata={"help": "World knowledge chats: `bare` question, or `passage` (after a passage that agrees)."},
    )
    scores_path: str | None = field(
        default=None, metadata={"help": "`ctxaware score` output (folder or scores.jsonl); else scored here."}
    )
    score_span: str = field(default="user", metadata={"help": "Scoring here: `user` (paper) or `context` span."})
    score_layer: int | None = field(default=None, metadata={"help": "Scoring here: layer (default: all layers)."})
    select_by: str = field(default="attention", metadata={"help": "Scoring here: `attention` or `loglik_gain`."})
    threshold: float | None = field(default=None, metadata={"help": "Scoring here: mark turns >= this."})
    percentile: float | None = field(
        default=50.0, metadata={"help": "Scoring here: mark the top P percent (no threshold)."}
    )
    indicator: str = field(default=DEFAULT_INDICATOR, metadata={"help": "The indicator: a new special token."})
    indicator_init: str = field(
        default=DEFAULT_INDICATOR_INIT, metadata={"help": "Phrase whose mean embedding initialises the indicator."}
    )
    merge: bool = field(
        default=False,
        metadata={"help": "Also save `merged/`: LoRA folded in, with the tokenizer (for ctxaware eval)."},
    )

    def __post_init__(self):
        if self.mode not in ("vanilla", "conditional"):
            raise ValueError(f"mode must be `vanilla` or `conditional`, got {self.mode!r}")


@dataclass
class ContextSFTTrainingConfig(RecipeTrainingArguments, SFTConfig):
    """TRL's SFTConfig (chat template, assistant-only loss, `max_length`) with the recipes' shared training checks;
    TRL's defaults."""


@dataclass
class ContextSFTModelConfig(ModelConfig):
    """TRL's model options (TRL's defaults); this recipe reads only MODEL_OPTIONS (the LoRA ones through TRL's
    `get_peft_config`) and refuses the others set."""


MODEL_OPTIONS = ("model_name_or_path", "model_revision", "dtype", "attn_implementation", *TRL_PEFT_OPTIONS)
CONFIG_CLASSES = (ContextSFTArguments, ContextSFTTrainingConfig, ContextSFTModelConfig)


def chosen_user_turns(
    config: ContextSFTArguments,
    model,
    tokenizer,
    records: list[dict],
    *,
    batch_size: int = 8,
    max_length: int | None = 1024,
) -> list[list[int]]:
    """Per record, the user-message indices to mark: from `ctxaware score`'s output, or scored here (in batches of
    `batch_size` conversations cut to `max_length` tokens: main passes the training batch size and length; the
    defaults are SFTConfig's)."""
    if config.scores_path:
        path = Path(config.scores_path)
        path = path / "scores.jsonl" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} does not exist: pass the output folder (or scores.jsonl) of ctxaware score"
            )
        scored = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if len(scored) < len(records) or any(s["messages"] != r["messages"] for s, r in zip(scored, records)):
            raise ValueError(
                f"{path} was not scored on this data set (its messages differ): run `ctxaware score` with the same "
                "--dataset, --split and --limit, or drop scores_path to score here"
            )
        return [[t["user_index"] for t in s["context_scores"] if t.get("chosen")] for s in scored[: len(records)]]
    turns, _ = score_records(
        model,
        tokenizer,
        records,
        layer=config.score_layer,
        span=config.score_span,
        batch_size=batch_size,
        max_length=max_length,
        progress=False,
    )
    select_turns(turns, config.select_by, threshold=config.threshold, percentile=config.percentile)
    return [[t["user_index"] for t in record if t.get("chosen")] for record in turns]


def expose_lm_head_bias(model) -> None:
    """TRL's fused LM head reads `lm_head.bias`; on a model with tied embeddings PEFT wraps the head for the
    indicator row (`trainable_token_indices`) in a TrainableTokensWrapper that forwards only `weight`. Give the wrapper
    the wrapped head's bias (a plain attribute, not a registered parameter: the state dict stays PEFT's)."""
    head = model.get_output_embeddings()
    if head is not None and not hasattr(head, "bias"):
        object.__setattr__(head, "bias", getattr(getattr(head, "original_module", None), "bias", None))


def model_card(config: ContextSFTArguments, model_args: ContextSFTModelConfig, stats: dict) -> str:
    indicator = (
        f"Append ` {config.indicator}` to context-dependent user turns of the chat template (`ctxaware eval "
        f"--indicator '{config.indicator}' --chat_template on`): it is a special token of the tokenizer saved here, initialised from "
        f"{config.indicator_init!r}; {stats['turns_marked']} of {stats['turns']} training turns carried it."
        if config.mode == "conditional"
        else "No indicator (vanilla SFT baseline)."
    )
    loading = (
        "A PEFT LoRA adapter; the indicator's embedding row is stored with it (`trainable_token_indices`). Load the "
        "tokenizer from this folder, resize the base model's embeddings to `len(tokenizer)`, then "
        "`PeftModel.from_pretrained(model, this_folder)`."
        if model_args.use_peft
        else "A full model with its tokenizer: `AutoModelForCausalLM.from_pretrained(this_folder)`."
    )
    description = (
        f"Instruction SFT of `{model_args.model_name_or_path}` on `{config.dataset}` ({stats['records']} "
        f"conversations) with the chat template and assistant-only loss, by `recipes/context_sft.py` in mode "
        f"`{config.mode}`.\n\n{indicator}\n\n{loading}\n\nEvaluate: `ctxaware eval --model MERGED_OR_FULL_MODEL "
        f"--tasks counterfactual_qa,niah --indicator '{config.indicator}' --chat_template on`."
    )
    return model_card_text(
        title=f"{config.mode.capitalize()} SFT for context awareness (ctxaware)",
        base_model=model_args.model_name_or_path,
        description=description,
        tags=["context-awareness", f"{config.mode}-sft", "trl", "sft"],
        library_name="peft" if model_args.use_peft else "transformers",
        datasets=[config.dataset],
    )


def main(
    config: ContextSFTArguments, training_args: ContextSFTTrainingConfig, model_args: ContextSFTModelConfig
) -> None:
    check_model_options(model_args, MODEL_OPTIONS)
    set_seed(training_args.seed)  # before any weights are created (the indicator row, LoRA), so runs repeat
    run_config = {**asdict(config), **training_args.to_dict(), **asdict(model_args)}
    claim_output_dir(
        training_args.output_dir,
        run_config,
        overwrite=training_args.overwrite_output_dir,
        resume=training_args.resume_from_checkpoint,
    )
    path = resolve_model_path(model_args.model_name_or_path)
    tokenizer = load_tokenizer(path, revision=model_args.model_revision)
    dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
    model = AutoModelForCausalLM.from_pretrained(
        path, revision=model_args.model_revision, dtype=dtype, attn_implementation=model_args.attn_implementation
    )
    records = load_chat_records(
        config.dataset,
        split=config.dataset_split,
        limit=config.dataset_limit,
        messages_column=config.messages_column,
        world_seed=config.world_seed,
        world_context_rate=config.world_context_rate,
        world_knowledge_form=config.world_knowledge_form,
    )
    stats = {"records": len(records), "turns": sum(m["role"] == "assistant" for r in records for m in r["messages"])}
    peft_config = get_peft_config(model_args)
    if config.mode == "conditional":
        marked = chosen_user_turns(
            config,
            model,
            tokenizer,
            records,
            batch_size=training_args.per_device_train_batch_size,
            max_length=training_args.max_length,
        )
        token_id = add_indicator_token(model, tokenizer, config.indicator, config.indicator_init)
        records = [
            {**r, "messages": insert_indicator(r["messages"], m, config.indicator)} for r, m in zip(records, marked)
        ]
        stats.update(turns_marked=sum(len(m) for m in marked), indicator_id=token_id)
        if peft_config is not None:
            peft_config.trainable_token_indices = [token_id]  # the input embedding row; the model never predicts it
    dataset = Dataset.from_list([{"messages": r["messages"]} for r in records])
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[RunConfigCallback(run_config), RequireTrainingSteps()],
    )
    expose_lm_head_bias(trainer.model)
    trainer.train(
        resume_from_checkpoint=resolve_resume_checkpoint(
            training_args.resume_from_checkpoint, training_args.output_dir, run_config, BOOKKEEPING_KEYS
        )
    )
    trainer.save_model(training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=config.dataset)  # writes TRL's card; ours replaces it below
    if trainer.accelerator.is_main_process:
        output = Path(training_args.output_dir)
        summary = {
            "mode": config.mode,
            "indicator": config.indicator if config.mode == "conditional" else None,
            "indicator_init": config.indicator_init,
            "base_model": model_args.model_name_or_path,
            **stats,
        }
        (output / "context_sft.json").write_text(json.dumps(summary, indent=2) + "\n")
        write_text(output / "README.md", model_card(config, model_args, stats))
        if config.merge:
            merged = trainer.model.merge_and_unload() if model_args.use_peft else trainer.model
            merged.save_pretrained(output / "merged")
            tokenizer.save_pretrained(output / "merged")
        if training_args.push_to_hub:
            from huggingface_hub import upload_folder

            upload_folder(repo_id=trainer.hub_model_id, folder_path=output, allow_patterns=["README.md", "*.json"])


if __name__ == "__main__":
    with usage_errors("context_sft"):
        main(*TrlParser(CONFIG_CLASSES).parse_args_and_config())
