"""Learning to summarize from human feedback (Stiennon et al., 2020) on TRL 1.x: SFT, a reward model, online RL with
a KL penalty to the SFT policy, and DPO on the same comparisons as an offline baseline.

CPU, embedded tiny model and the synthetic world's posts and labelled comparisons (each stage a few minutes):
    accelerate launch recipes/rlhf_summarize.py --config recipes/configs/rlhf_summarize/default.yaml
Real data and models (GPU): recipes/configs/rlhf_summarize/{pythia_1b,qwen2.5_0.5b}.yaml.
One stage: `--stage sft|compare|reward|rl|dpo|eval`; `--stage all` runs them in that order.

Stages write `<output_dir>/<stage>/` (a full transformers model, LoRA merged, and `training_log.json`, the trainer's
logged steps) through a temporary folder, so a finished stage is never half-written; `--stage all` skips finished
stages (`--overwrite_stages` redoes them) and `--resume_from_checkpoint true` continues an interrupted stage from
`<output_dir>/checkpoints/<stage>/`.
- sft: SFTTrainer on post -> reference summary (loss on the summary). `--mediocre_reference_rate` makes that share
  of the world's training references mediocre, like TL;DR's human ones (a key fact left out, a filler sentence in
  its place), so SFT imitates imperfect summaries while the comparisons still label what is better.
- compare (world comparisons, `--comparison_samples N`): N sampled summaries of each training post from the SFT
  policy, compared in pairs by the world's ground-truth preference with the labeller's noise (the paper's labelled
  comparisons of policy samples: they show the reward model the mistakes this policy makes, such as made-up details);
  the reward and DPO stages train on them beside the world's hand-made comparisons.
- reward: RewardTrainer on the comparisons, a sequence classifier initialised from the SFT model; afterwards the mean
  score of reference summaries is stored as the reward bias (references then score ~0). `--repeat_negatives r` (world
  data) adds r comparisons per training post (0.5: half the posts get one) of its reference over the same reference
  with one fact stated twice, the reward hacking an RL policy finds when the reward model scores a repeat up; DPO
  trains on them too.
- rl: RLOOTrainer from the SFT model; rewards are the normalised reward model score and, for completions without
  EOS, the fixed `missing_eos_penalty` instead of the score; `beta` is the KL coefficient to the SFT policy (in the
  reward, per sequence, as in the paper).
- dpo: DPOTrainer from the SFT model on the same comparisons.
- eval: the shared `summarization` harness (ROUGE-L, ground-truth preference, reward-model score, win rate vs the SFT
  policy) for each trained policy, plus the win rate vs the references, the normalised reward, the mean length and
  a sampled KL to the SFT policy, on `eval_limit` posts of `eval_split` (the world's validation posts to choose
  settings, its test posts to report); `<output_dir>/eval/summary.json`.
"""

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState
from datasets import Dataset
from transformers import AutoModelForSequenceClassification, TrainingArguments, set_seed
from trl import (
    DPOConfig,
    DPOTrainer,
    ModelConfig,
    RewardConfig,
    RewardTrainer,
    RLOOConfig,
    RLOOTrainer,
    SFTConfig,
    SFTTrainer,
    TrlParser,
    get_peft_config,
)

import ctxaware.attention  # noqa: F401  (registers attn_implementation="ctxaware")
from ctxaware import models
from ctxaware.datafiles import is_local, is_local_file, load_rows
from ctxaware.hub import push_folder_to_hub, write_model_card
from ctxaware.io import atomic_directory
from ctxaware.methods import rlhf
from ctxaware.models import resolve_model_path
from ctxaware.outputs import claim_output_dir, latest_complete_checkpoint
from ctxaware.training import (
    TRL_PEFT_OPTIONS,
    RecipeTrainingArguments,
    RequireTrainingSteps,
    RunConfigCallback,
    check_4bit,
    check_model_options,
    load_causal_lm,
    resolve_resume_checkpoint,
    usage_errors,
)
from ctxaware.world.repeats import check_repeats_per_post


STAGES = ("sft", "compare", "reward", "rl", "dpo", "eval")
COMPARISONS_FILE = "comparisons.json"
TRAINING_LOG = "training_log.json"
WORLD = "world"
SFT_DATASETS = (WORLD, "trl-lib/tldr")
PREFERENCE_DATASETS = (WORLD, "trl-lib/tldr-preference", "openai/summarize_from_feedback")
# Hub preference sets without a test split: their validation split is held out instead.
HELD_OUT_SPLIT = {"trl-lib/tldr-preference": "validation", "openai/summarize_from_feedback": "validation"}


# One class, unlike the other recipes: the RL stage's RLOOConfig plus the other stages' settings, mapped by stage_args.
@dataclass
class RLHFConfig(RecipeTrainingArguments, RLOOConfig):
    """RLOOConfig (the RL stage's settings; the shared Trainer settings apply to every stage) plus the other stages."""

    output_dir: str = field(default="runs/rlhf_summarize", metadata={"help": "One folder per stage goes in here."})
    stage: str = field(default="all", metadata={"help": "sft, reward, rl, dpo, eval, or all (in that order)."})
    overwrite_stages: bool = field(default=False, metadata={"help": "Redo stages whose output already exists."})
    # TRL's default, under transformers' current name (setting the deprecated `gradient_checkpointing` warns).
    activation_checkpointing: bool = True
    dataset_name: str = field(
        default=WORLD,
        metadata={"help": "Posts + references: world, trl-lib/tldr, or a local file/folder of its shape."},
    )
    preference_dataset_name: str = field(
        default=WORLD,
        metadata={
            "help": "Comparisons: world, trl-lib/tldr-preference, openai/summarize_from_feedback, or a local "
            "file/folder of either shape."
        },
    )
    world_seed: int = field(default=0, metadata={"help": "Seed of the synthetic world (`build_world`)."})
    label_noise: float = field(default=0.1, metadata={"help": "World comparisons: probability a label is flipped."})
    pairs_per_post: int = field(
        default=2, metadata={"help": "World comparisons per held-out post (and default below)."}
    )
    train_pairs_per_post: int | None = field(
        default=None,
        metadata={
            "help": "World comparisons labelled per training post, hand-made and of SFT samples (default: "
            "pairs_per_post). The reward model underfits on few: more labelled pairs of the same posts show it more "
            "of each contrast (a fact dropped, a detail made up, a filler added); the held-out pairs keep pairs_per_post."
        },
    )
    comparison_samples: int = field(
        default=0,
        metadata={
            "help": "World data: SFT samples per training post that the compare stage labels in pairs with the "
            "ground truth (the paper's comparisons of policy samples); the reward model and DPO train on them too. "
            "0: hand-made comparisons only."
        },
    )
    mediocre_reference_rate: float = field(
        default=0.0,
        metadata={
            "help": "World training posts: share of references replaced by a mediocre human-like one (a key fact "
            "left out, a filler sentence in its place) that SFT imitates; comparisons and ground truth unchanged."
        },
    )
    mediocre_reference_seed: int = field(default=0, metadata={"help": "Seed of which references are mediocre."})
    repeat_negatives: float = field(
        default=0.0,
        metadata={
            "help": "World data: comparisons per training post (0.5: half the posts get one; at most 2) of its "
            "reference over the reference with one fact stated twice, for the reward and DPO stages. 0: none."
        },
    )
    train_limit: int | None = field(default=None, metadata={"help": "Use at most this many posts / comparisons."})
    max_length: int = field(default=512, metadata={"help": "Token limit of SFT, reward and DPO examples."})
    sft_learning_rate: float = 3e-6
    sft_max_steps: int = field(default=-1, metadata={"help": "-1: sft_num_train_epochs epochs."})
    sft_num_train_epochs: float = 1.0
    reward_learning_rate: float = 3e-6
    reward_max_steps: int = -1
    reward_batch_size: int | None = field(
        default=None,
        metadata={"help": "Pairs per device and step of the reward stage (default: per_device_train_batch_size)."},
    )
    reward_num_train_epochs: float = 1.0
    dpo_learning_rate: float = 3e-6
    dpo_max_steps: int = -1
    dpo_num_train_epochs: float = 1.0
    dpo_beta: float = field(default=0.1, metadata={"help": "DPO's beta (the RL stage's KL coefficient is `beta`)."})
    missing_eos_penalty: float | None = field(
        default=-1.0, metadata={"help": "Reward of a completion with no EOS (replaces its score); null: off."}
    )
    normalize_reward: bool = field(default=True, metadata={"help": "Subtract the reference summaries' mean score."})
    normalization_limit: int = field(default=256, metadata={"help": "Reference summaries the bias is taken on."})
    sft_model_path: str | None = field(default=None, metadata={"help": "SFT policy (default: <output_dir>/sft)."})
    reward_model_path: str | None = field(
        default=None, metadata={"help": "Reward model (default: <output_dir>/reward)."}
    )
    comparisons_dir: str | None = field(
        default=None,
        metadata={
            "help": "The compare stage's folder of labelled SFT samples (default: <output_dir>/compare); another "
            "output_dir's lets a stage run beside that run's stages."
        },
    )
    eval_split: str = field(
        default="test",
        metadata={
            "help": "Posts and held-out pairs the eval stage scores: validation to choose settings, test to report "
            "(the world's splits; real data sets are evaluated on their held-out split)."
        },
    )
    eval_limit: int = field(
        default=64,
        metadata={
            "help": "Posts of eval_split for the eval stage (the world makes more of the split's posts if needed)."
        },
    )
    eval_batch_size: int = 16
    kl_samples_per_prompt: int = field(default=4, metadata={"help": "Eval: samples per post for the KL estimate."})

    def __post_init__(self):
        if self.stage not in (*STAGES, "all"):
            raise ValueError(f"--stage {self.stage!r} is unknown; choose one of {', '.join(STAGES)} or all.")
        if self.dataset_name not in SFT_DATASETS and not is_local(self.dataset_name):
            raise ValueError(
                f"--dataset_name {self.dataset_name!r}: choose one of {', '.join(SFT_DATASETS)}, or a local file or "
                "folder with trl-lib/tldr's prompt/completion columns."
            )
        if self.preference_dataset_name not in PREFERENCE_DATASETS and not is_local(self.preference_dataset_name):
            raise ValueError(
                f"--preference_dataset_name {self.preference_dataset_name!r}: choose one of "
                f"{', '.join(PREFERENCE_DATASETS)}, or a local file or folder with either one's columns."
            )
        for flag, name in (
            ("dataset_name", self.dataset_name),
            ("preference_dataset_name", self.preference_dataset_name),
        ):
            if is_local_file(name):
                raise ValueError(
                    f"--{flag} {name} is a single file, but the recipe trains on its train split and evaluates on its "
                    "test split: pass a folder holding train.jsonl and test.jsonl (or .json / .parquet)."
                )
        if self.comparison_samples and (self.preference_dataset_name != WORLD or self.dataset_name != WORLD):
            raise ValueError(
                "--comparison_samples needs the world's posts and comparisons (their ground truth labels the samples); "
                "with real data the comparisons are human ones: set it to 0."
            )
        if self.repeat_negatives and (self.preference_dataset_name != WORLD or self.dataset_name != WORLD):
            raise ValueError(
                "--repeat_negatives needs the world's posts and references (the repeated facts are the world's key "
                "facts): set it to 0 with real data."
            )
        check_repeats_per_post(self.repeat_negatives)
        if self.eval_split not in ("validation", "test"):
            raise ValueError(f"--eval_split {self.eval_split!r}: choose validation (to choose settings) or test.")
        if self.eval_split != "test" and (self.dataset_name, self.preference_dataset_name) != (WORLD, WORLD):
            raise ValueError(
                "--eval_split validation needs the world's posts and comparisons; real data sets are evaluated on "
                "their held-out split: drop --eval_split."
            )
        if self.mediocre_reference_rate and self.dataset_name != WORLD:
            raise ValueError(
                f"--mediocre_reference_rate applies to the world's posts only; {self.dataset_name}'s references are "
                "already human-written: drop it or set it to 0."
            )
        super().__post_init__()


# TRL's model options this recipe reads (the policy's and reward model's loading and LoRA); others set are refused.
MODEL_OPTIONS = (
    "model_name_or_path",
    "dtype",
    "attn_implementation",
    "load_in_4bit",
    "bnb_4bit_quant_type",
    *TRL_PEFT_OPTIONS,
)
CONFIG_CLASSES = (RLHFConfig, ModelConfig)


# ------------------------------------------------------------------------------------------------------------- data
def summary_records(cfg: RLHFConfig, split: str) -> list[dict]:
    """{"post", "reference"} records: the world's posts (training references mediocre at `mediocre_reference_rate`),
    or trl-lib/tldr (whose prompts end in `TL;DR:`)."""
    if cfg.dataset_name == WORLD:
        from ctxaware.world import build_world, mediocre_references, summarization

        world = build_world(cfg.world_seed)
        records = summarization(world, split)
        if split == "train" and cfg.mediocre_reference_rate:
            references = mediocre_references(world, split, cfg.mediocre_reference_rate, cfg.mediocre_reference_seed)
            records = [{**record, "reference": reference} for record, reference in zip(records, references)]
    else:
        rows = load_rows(cfg.dataset_name, split=split)
        records = [{"post": rlhf.post_from_prompt(r["prompt"]), "reference": r["completion"]} for r in rows]
    return records[: cfg.train_limit] if cfg.train_limit and split == "train" else records


def preference_pairs(cfg: RLHFConfig, split: str = "train", noise: float | None = None) -> list[dict]:
    """{"post", "chosen", "rejected"} comparisons; world labels carry `noise` (default: `label_noise`) flips, and the
    world's training comparisons include the compare stage's labelled SFT samples (`comparison_samples`) and the
    repeated-fact comparisons (`repeat_negatives`)."""
    name = cfg.preference_dataset_name
    if name == WORLD:
        from ctxaware.world import build_world, repeated_fact_pairs
        from ctxaware.world import preference_pairs as world_pairs

        world = build_world(cfg.world_seed)
        noise = cfg.label_noise if noise is None else noise
        rows = world_pairs(world, split, noise, cfg.seed, pairs_per_post(cfg, split))
        pairs = rlhf.preference_records(rows, f"world/{split}")
        if split == "train" and (cfg.comparison_samples or cfg.repeat_negatives):  # of the limited posts already
            own = policy_pairs(cfg) if cfg.comparison_samples else []
            repeats = repeated_fact_pairs(world, split, cfg.repeat_negatives, cfg.seed, cfg.train_limit)
            return pairs[: cfg.train_limit] + own + (rlhf.preference_records(repeats, "repeats") if repeats else [])
    elif name == "openai/summarize_from_feedback":
        hub_split = HELD_OUT_SPLIT[name] if split == "test" else split
        pairs = rlhf.summarize_from_feedback_rows(load_rows(name, config="comparisons", split=hub_split))
    else:
        rows = load_rows(name, split=HELD_OUT_SPLIT.get(name, split) if split == "test" else split)
        if "summaries" in rows.column_names:  # a local copy of summarize_from_feedback's comparisons
            pairs = rlhf.summarize_from_feedback_rows(rows)
        else:
            pairs = rlhf.preference_records(list(rows), name)
    return pairs[: cfg.train_limit] if cfg.train_limit and split == "train" else pairs


def pairs_per_post(cfg: RLHFConfig, split: str) -> int:
    """Comparisons per world post: `train_pairs_per_post` (if set) on the training split, else `pairs_per_post`."""
    return (cfg.train_pairs_per_post or cfg.pairs_per_post) if split == "train" else cfg.pairs_per_post


def policy_pairs(cfg: RLHFConfig) -> list[dict]:
    path = Path(cfg.comparisons_dir or Path(cfg.output_dir) / "compare") / COMPARISONS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: run `--stage compare` after SFT (it labels the SFT policy's samples), or set "
            "`--comparison_samples 0`."
        )
    return rlhf.preference_records(json.loads(path.read_text()), str(path))


# ----------------------------------------------------------------------------------------------------------- stages
def stage_args(cfg: RLHFConfig, config_class, stage: str, **overrides):
    """A stage's TRL config: every Trainer setting of the recipe's config (every RLOO setting for the RL stage), plus
    the stage's own values."""
    inherited = RLOOConfig if config_class is RLOOConfig else TrainingArguments
    shared = {f.name for f in dataclasses.fields(inherited) if f.init}
    own = {f.name for f in dataclasses.fields(config_class) if f.init}
    values = {k: v for k, v in dataclasses.asdict(cfg).items() if k in shared}
    values.update(output_dir=str(Path(cfg.output_dir) / "checkpoints" / stage), push_to_hub=False)
    values.update({k: v for k, v in overrides.items() if k in own})
    values.pop("resume_from_checkpoint", None)
    values.pop("generation_batch_size", None)  # derived by RLOOConfig from steps_per_generation, which is kept
    if "max_length" in own:
        values["max_length"] = cfg.max_length
    return config_class(**values)


def resume_checkpoint(cfg: RLHFConfig, args, run_config: dict) -> str | None:
    """The checkpoint to continue from with `--resume_from_checkpoint` (true: the stage's latest, if any)."""
    resume = cfg.resume_from_checkpoint
    if resume in (True, "true", "True") and latest_complete_checkpoint(args.output_dir) is None:
        return None
    return resolve_resume_checkpoint(resume, args.output_dir, run_config, ignore=("stage", "overwrite_stages"))


def load_tokenizer(path: str):
    tokenizer = models.load_tokenizer(resolve_model_path(path))
    return tokenizer


def attn(model_args: ModelConfig) -> str:
    return model_args.attn_implementation or ctxaware.attention.ATTN_IMPLEMENTATION


def load_policy(path: str, model_args: ModelConfig):
    dtype = model_args.dtype if torch.cuda.is_available() else "float32"
    return load_causal_lm(
        path,
        dtype=dtype,
        attn_implementation=attn(model_args),
        load_in_4bit=model_args.load_in_4bit,
        bnb_4bit_quant_type=model_args.bnb_4bit_quant_type,
    )


def finish_stage(cfg: RLHFConfig, model_args: ModelConfig, stage: str, trainer, tokenizer, base_path: str) -> Path:
    """Saves the trained model (LoRA merged into a full-precision base) and its card to `<output_dir>/<stage>`."""
    final = Path(cfg.output_dir) / stage
    model = trainer.accelerator.unwrap_model(trainer.model)
    if trainer.accelerator.is_main_process:
        with atomic_directory(final) as tmp:
            if hasattr(model, "merge_and_unload"):
                if model_args.load_in_4bit:  # merge into the base loaded in 16 bits, not into quantized weights
                    from peft import PeftModel

                    model.save_pretrained(tmp / "adapter")
                    base = type(model.get_base_model()).from_pretrained(base_path, dtype=torch.bfloat16)
                    model = PeftModel.from_pretrained(base, tmp / "adapter")
                model = model.merge_and_unload()
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            # every logged step (RL: reward per function, KL, completion lengths, clipped = no-EOS ratio)
            (tmp / TRAINING_LOG).write_text(json.dumps(trainer.state.log_history, indent=1))
            if stage == "reward" and cfg.normalize_reward:
                bias = normalization_bias(cfg, model, tokenizer)
                rlhf.save_reward_normalization(tmp, bias, cfg.normalization_limit)
                print(f"reward bias on references: {bias:.4f} (subtracted from every score)")
            write_model_card(
                tmp,
                title=f"{Path(cfg.output_dir).name}-{stage}",
                base_model=base_path,
                description=f"Stage `{stage}` of ctxaware's `recipes/rlhf_summarize.py` (summarisation RLHF).",
                results=trainer_metrics(trainer),
                tags=("rlhf", "summarization", stage),
                library_name="transformers",
            )
        if cfg.push_to_hub:
            repo = f"{cfg.hub_model_id or Path(cfg.output_dir).name}-{stage}"
            push_folder_to_hub(final, repo, private=cfg.hub_private_repo, token=cfg.hub_token)
    trainer.accelerator.wait_for_everyone()
    return final


def trainer_metrics(trainer) -> dict:
    logs = [entry for entry in trainer.state.log_history if "train_loss" in entry]
    return {"train": {"loss": logs[-1]["train_loss"], "steps": trainer.state.global_step}} if logs else {}


def normalization_bias(cfg: RLHFConfig, model, tokenizer) -> float:
    records = summary_records(cfg, "train")[: cfg.normalization_limit]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return rlhf.reward_bias(
        model.to(device).eval(), tokenizer, [r["post"] for r in records], [r["reference"] for r in records]
    )


def peft_config(model_args: ModelConfig, **changes):
    if model_args.load_in_4bit and not model_args.use_peft:
        raise ValueError("A 4-bit base cannot be trained directly: add --use_peft to train LoRA adapters on it.")
    return get_peft_config(dataclasses.replace(model_args, **changes)) if model_args.use_peft else None


def run_sft(cfg: RLHFConfig, model_args: ModelConfig) -> Path:
    tokenizer = load_tokenizer(model_args.model_name_or_path)
    train = Dataset.from_list(rlhf.sft_rows(summary_records(cfg, "train"), tokenizer))
    args = stage_args(
        cfg,
        SFTConfig,
        "sft",
        learning_rate=cfg.sft_learning_rate,
        max_steps=cfg.sft_max_steps,
        num_train_epochs=cfg.sft_num_train_epochs,
        completion_only_loss=True,
    )
    run_config = {"stage": "sft", "model": model_args.model_name_or_path, **args.to_dict()}
    trainer = SFTTrainer(
        model=load_policy(model_args.model_name_or_path, model_args),
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=peft_config(model_args),
        callbacks=[RunConfigCallback(run_config), RequireTrainingSteps()],
    )
    trainer.train(resume_from_checkpoint=resume_checkpoint(cfg, args, run_config))
    return finish_stage(cfg, model_args, "sft", trainer, tokenizer, resolve_model_path(model_args.model_name_or_path))


def run_compare(cfg: RLHFConfig, model_args: ModelConfig) -> Path | str:
    """Samples the SFT policy on the training posts and labels pairs of its samples with the world's preference."""
    if not cfg.comparison_samples:
        return "off (--comparison_samples 0)"
    from ctxaware.world import build_world, policy_comparisons

    final = Path(cfg.output_dir) / "compare"
    state = PartialState()
    if state.is_main_process:
        sft_path = cfg.sft_model_path or str(Path(cfg.output_dir) / "sft")
        records = summary_records(cfg, "train")
        summaries = rlhf.sample_summaries(
            load_policy(sft_path, model_args).to(state.device).eval(),
            load_tokenizer(sft_path),
            [r["post"] for r in records],
            samples_per_post=cfg.comparison_samples,
            max_new_tokens=cfg.max_completion_length,
            temperature=cfg.temperature,
            batch_size=cfg.eval_batch_size,
            seed=cfg.seed,
        )
        world = build_world(cfg.world_seed)
        pairs = policy_comparisons(world, "train", summaries, cfg.label_noise, cfg.seed, pairs_per_post(cfg, "train"))
        with atomic_directory(final) as tmp:
            (tmp / COMPARISONS_FILE).write_text(json.dumps(pairs, indent=1))
        print(f"{len(pairs)} labelled pairs of SFT samples ({cfg.comparison_samples} per post, {len(records)} posts)")
    state.wait_for_everyone()  # the next stages of every process read the file
    return final


def run_reward(cfg: RLHFConfig, model_args: ModelConfig) -> Path:
    sft_path = cfg.sft_model_path or str(Path(cfg.output_dir) / "sft")
    tokenizer = load_tokenizer(sft_path)
    pairs = preference_pairs(cfg, "train")
    rows = rlhf.reward_rows(pairs, tokenizer, cfg.max_length)
    if not rows:
        raise ValueError(f"No comparison fits in --max_length {cfg.max_length} tokens: raise it.")
    check_4bit(model_args.load_in_4bit)
    model = AutoModelForSequenceClassification.from_pretrained(
        resolve_model_path(sft_path),
        num_labels=1,
        dtype=model_args.dtype if torch.cuda.is_available() else "float32",
        attn_implementation=attn(model_args),
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    args = stage_args(
        cfg,
        RewardConfig,
        "reward",
        learning_rate=cfg.reward_learning_rate,
        max_steps=cfg.reward_max_steps,
        num_train_epochs=cfg.reward_num_train_epochs,
        per_device_train_batch_size=cfg.reward_batch_size or cfg.per_device_train_batch_size,
    )
    run_config = {"stage": "reward", "model": sft_path, **args.to_dict()}
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=peft_config(model_args, lora_task_type="SEQ_CLS", lora_modules_to_save=["score"]),
        callbacks=[RunConfigCallback(run_config), RequireTrainingSteps()],
    )
    trainer.train(resume_from_checkpoint=resume_checkpoint(cfg, args, run_config))
    return finish_stage(cfg, model_args, "reward", trainer, tokenizer, sft_path)


def reward_functions(cfg: RLHFConfig, policy_tokenizer, eos_token_ids: list[int]) -> list:
    reward_path = cfg.reward_model_path or str(Path(cfg.output_dir) / "reward")
    reward_tokenizer = load_tokenizer(reward_path)
    rlhf.check_same_tokenizer(policy_tokenizer, reward_tokenizer, reward_path)
    device = PartialState().device
    reward_model = AutoModelForSequenceClassification.from_pretrained(
        resolve_model_path(reward_path), dtype=torch.bfloat16 if device.type == "cuda" else torch.float32
    ).to(device)
    reward_model.config.pad_token_id = reward_tokenizer.pad_token_id
    bias = rlhf.load_reward_bias(reward_path) if cfg.normalize_reward else 0.0
    with_penalty = cfg.missing_eos_penalty is not None
    functions = [
        rlhf.RewardModelReward(
            reward_model, reward_tokenizer, bias=bias, eos_token_ids=eos_token_ids, score_unfinished=not with_penalty
        )
    ]
    if with_penalty:
        functions.append(rlhf.EOSPenalty(eos_token_ids, cfg.missing_eos_penalty))
    return functions


def run_rl(cfg: RLHFConfig, model_args: ModelConfig) -> Path:
    sft_path = cfg.sft_model_path or str(Path(cfg.output_dir) / "sft")
    tokenizer = load_tokenizer(sft_path)
    tokenizer.padding_side = "left"
    records = summary_records(cfg, "train")
    rlhf.check_generation_length(tokenizer, [r["reference"] for r in records], cfg.max_completion_length)
    policy = load_policy(sft_path, model_args)
    eos_ids = sorted({tokenizer.eos_token_id, *_as_list(policy.generation_config.eos_token_id)} - {None})
    args = stage_args(cfg, RLOOConfig, "rl")
    run_config = {"stage": "rl", "model": sft_path, **args.to_dict()}
    trainer = RLOOTrainer(
        model=policy,
        reward_funcs=reward_functions(cfg, tokenizer, eos_ids),
        args=args,
        train_dataset=Dataset.from_list(rlhf.rl_rows(records, tokenizer)),
        processing_class=tokenizer,
        peft_config=peft_config(model_args),
        callbacks=[RunConfigCallback(run_config), RequireTrainingSteps()],
    )
    trainer.train(resume_from_checkpoint=resume_checkpoint(cfg, args, run_config))
    tokenizer.padding_side = "right"
    return finish_stage(cfg, model_args, "rl", trainer, tokenizer, sft_path)


def _as_list(value) -> list:
    return [] if value is None else [value] if isinstance(value, int) else list(value)


def run_dpo(cfg: RLHFConfig, model_args: ModelConfig) -> Path:
    sft_path = cfg.sft_model_path or str(Path(cfg.output_dir) / "sft")
    tokenizer = load_tokenizer(sft_path)
    args = stage_args(
        cfg,
        DPOConfig,
        "dpo",
        learning_rate=cfg.dpo_learning_rate,
        max_steps=cfg.dpo_max_steps,
        num_train_epochs=cfg.dpo_num_train_epochs,
        beta=cfg.dpo_beta,
    )
    run_config = {"stage": "dpo", "model": sft_path, **args.to_dict()}
    trainer = DPOTrainer(
        model=load_policy(sft_path, model_args),
        args=args,
        train_dataset=Dataset.from_list(rlhf.dpo_rows(preference_pairs(cfg, "train"), tokenizer)),
        processing_class=tokenizer,
        peft_config=peft_config(model_args),
        callbacks=[RunConfigCallback(run_config), RequireTrainingSteps()],
    )
    trainer.train(resume_from_checkpoint=resume_checkpoint(cfg, args, run_config))
    return finish_stage(cfg, model_args, "dpo", trainer, tokenizer, sft_path)


# ------------------------------------------------------------------------------------------------------- evaluation
def run_eval(cfg: RLHFConfig, model_args: ModelConfig) -> Path:
    """Each trained policy on the shared summarisation harness, then the metrics it does not compute."""
    from ctxaware.eval.registry import EvalOptions, get_task
    from ctxaware.eval.runner import evaluate_in_process
    from ctxaware.eval.summarization import win_rates
    from ctxaware.models import load_model
    from ctxaware.world import preference_score

    out = Path(cfg.output_dir)
    if not PartialState().is_main_process:
        return out / "eval"
    reward_path = cfg.reward_model_path or str(out / "reward")
    sft_path = cfg.sft_model_path or str(out / "sft")
    policies = {"sft": sft_path, **{name: str(out / name) for name in ("rl", "dpo") if (out / name).is_dir()}}
    world = cfg.dataset_name == WORLD
    bias = rlhf.load_reward_bias(reward_path) if cfg.normalize_reward else 0.0
    options = {
        "limit": cfg.eval_limit,
        "seed": cfg.world_seed,
        "split": cfg.eval_split,
        "max_new_tokens": cfg.max_completion_length,
        "dataset": None if world else "tldr",
        "reward_model": reward_path,
    }
    records = get_task("summarization").load(
        None, EvalOptions(batch_size=cfg.eval_batch_size, progress=False, **options)
    )
    sft_model, sft_tokenizer = load_model(sft_path, dtype="float32")
    summary, sft_samples = {}, None
    with atomic_directory(out / "eval") as tmp:
        for name, path in policies.items():
            model, tokenizer = (sft_model, sft_tokenizer) if name == "sft" else load_model(path, dtype="float32")
            _, outcomes, written, _ = evaluate_in_process(
                model,
                tokenizer,
                ["summarization"],
                config={"model": name, "path": path},
                batch_size=cfg.eval_batch_size,
                output_path=tmp,
                baseline_samples=sft_samples if world else None,
                **options,
            )
            outcome = outcomes["summarization"]
            summaries = [sample["summary"] for sample in outcome.samples]
            metrics = {"win_rate_vs_sft" if k == "win_rate" else k: v for k, v in outcome.metrics.items()}
            metrics["reward_normalized"] = metrics["reward"] - bias
            metrics["mean_words"] = rlhf.mean_words(summaries)
            if world:
                prefs = [sample["preference"] for sample in outcome.samples]
                references = {i: r["reference"] for i, r in enumerate(records)}
                wins = win_rates(records, summaries, prefs, references, preference_score)
                metrics["win_rate_vs_reference"] = sum(wins) / len(wins)
            if name == "sft":
                sft_samples = str(written["samples/summarization"])
            else:
                prompts = [rlhf.policy_prompt(tokenizer, r["post"]) for r in records[: max(1, len(records) // 4)]]
                metrics["kl_to_sft"] = rlhf.sequence_kl(
                    model,
                    sft_model,
                    tokenizer,
                    prompts,
                    max_new_tokens=cfg.max_completion_length,
                    temperature=cfg.temperature,
                    samples_per_prompt=cfg.kl_samples_per_prompt,
                    seed=cfg.seed,
                    batch_size=max(1, cfg.eval_batch_size // cfg.kl_samples_per_prompt),
                )
            summary[name] = metrics
        summary["reward_model"] = reward_accuracy(cfg, reward_path, bias)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return out / "eval"


def reward_accuracy(cfg: RLHFConfig, reward_path: str, bias: float) -> dict:
    """Pairwise accuracy of the reward model on held-out comparisons (the world's: noise-free, i.e. against the
    ground-truth preference); on world data also by contrast, and on held-out repeated-fact comparisons (one per post:
    the reference over the reference with a fact stated twice), whatever `repeat_negatives` the model trained with."""
    pairs = preference_pairs(cfg, cfg.eval_split, noise=0.0)[: 4 * cfg.eval_limit]
    tokenizer = load_tokenizer(reward_path)
    model = AutoModelForSequenceClassification.from_pretrained(resolve_model_path(reward_path), dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.to("cuda" if torch.cuda.is_available() else "cpu")

    def prefers_chosen(pairs: list[dict]) -> list[bool]:
        scores = {
            side: rlhf.score_texts(
                model,
                tokenizer,
                [rlhf.reward_model_text(tokenizer, p["post"], p[side]) for p in pairs],
                cfg.eval_batch_size,
            )
            for side in ("chosen", "rejected")
        }
        return [c > r for c, r in zip(scores["chosen"], scores["rejected"])]

    correct = prefers_chosen(pairs)
    result = {"pairwise_accuracy": sum(correct) / len(correct), "n_pairs": len(correct), "bias": bias}
    if cfg.preference_dataset_name == WORLD:  # which contrasts the reward model gets right
        from ctxaware.world import build_world, repeated_fact_pairs, summarization

        world = build_world(cfg.world_seed)
        repeats = rlhf.preference_records(repeated_fact_pairs(world, cfg.eval_split, 1, cfg.seed), "repeats")
        repeats_correct = prefers_chosen(repeats[: 4 * cfg.eval_limit])
        result["repeated_fact_accuracy"] = {
            "accuracy": sum(repeats_correct) / len(repeats_correct),
            "n_pairs": len(repeats_correct),
        }
        records = {r["post"]: r for r in summarization(world, cfg.eval_split)}
        kinds = [pair_difference(records[p["post"]], p) for p in pairs]
        result["accuracy_by_difference"] = {
            kind: {
                "accuracy": sum(ok for ok, k in zip(correct, kinds) if k == kind) / kinds.count(kind),
                "n_pairs": kinds.count(kind),
            }
            for kind in sorted(set(kinds))
        }
    return result


def pair_difference(record: dict, pair: dict) -> str:
    """What makes a world pair's rejected summary worse, first match: `made_up` (more details the post lacks),
    `coverage` (fewer of the record's key facts), else `length` (a filler, words beyond the reference)."""
    from ctxaware.world.preference import key_fact_coverage, unfaithful_terms

    chosen, rejected = pair["chosen"], pair["rejected"]
    if len(unfaithful_terms(record["post"], rejected)) > len(unfaithful_terms(record["post"], chosen)):
        return "made_up"
    return "coverage" if key_fact_coverage(record, rejected) < key_fact_coverage(record, chosen) else "length"


# ------------------------------------------------------------------------------------------------------------- main
RUNNERS = {
    "sft": run_sft,
    "compare": run_compare,
    "reward": run_reward,
    "rl": run_rl,
    "dpo": run_dpo,
    "eval": run_eval,
}
DONE_FILES = {"compare": COMPARISONS_FILE}  # the file a finished stage leaves (default: its model's config.json)


def main(cfg: RLHFConfig, model_args: ModelConfig) -> None:
    check_model_options(model_args, MODEL_OPTIONS)
    set_seed(cfg.seed)  # seeds python, numpy and torch before the reward head and LoRA weights are created
    stages = STAGES if cfg.stage == "all" else (cfg.stage,)
    # One run's stages share the folder: a stage may be run alone, and `all` skips or resumes stages on its own.
    claim_output_dir(
        cfg.output_dir,
        {**cfg.to_dict(), **dataclasses.asdict(model_args)},
        overwrite=cfg.overwrite_output_dir,
        resume=True,
        may_differ=("stage", "overwrite_stages"),
    )
    for stage in stages:
        final = Path(cfg.output_dir) / stage
        if stage != "eval" and (final / DONE_FILES.get(stage, "config.json")).is_file() and not cfg.overwrite_stages:
            print(f"stage {stage}: already done in {final}; pass --overwrite_stages to redo it")
            continue
        print(f"stage {stage}: {RUNNERS[stage](cfg, model_args)}")


if __name__ == "__main__":
    with usage_errors("rlhf_summarize"):
        main(*TrlParser(CONFIG_CLASSES).parse_args_and_config())
