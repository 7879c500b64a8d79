"""LoFiT: pick a few attention heads by learned scales, then tune offset vectors on their outputs (before o_proj).

Embedded default (tiny model, synthetic world: a passage states a false version of a memorised fact and the answer is
the true one, the world's analogue of TruthfulQA; CPU, a few minutes):
    accelerate launch recipes/lofit.py --config recipes/configs/lofit/default.yaml
Baselines in the same recipe, at the same K / a comparable budget (LoRA trains at `lora_learning_rate`):
    accelerate launch recipes/lofit.py --config recipes/configs/lofit/default.yaml --method random_heads \
        --exclude_heads outputs/lofit/default/head_selection.json   # K random heads among those LoFiT did not pick
    accelerate launch recipes/lofit.py --config recipes/configs/lofit/default.yaml --method all_heads
    accelerate launch recipes/lofit.py --config recipes/configs/lofit/default.yaml --method lora
Other tasks: recipes/configs/lofit/{chat_qa,context_qa,dpo_default}.yaml (tiny model),
{truthfulqa_dpo,clutrr_sft,mquake_sft}.yaml, known_facts_truthful.yaml (a real model: a passage contradicts a fact it
knows, the answer is the fact), arithmetic_question.yaml (a real model: arithmetic, where a few heads carry the effect).
The scientific check is `benchmarks/lofit_science.py`.

Stage 1 (method lofit) trains per-head scales A (init N(0, scale_init_std), L1 penalty `l1_lambda`) on every query
head and keeps the K with the largest ||A_h||; stage 2 trains offsets v on those K heads only, with the TRL config's
learning rate and epochs. `objective` sft trains on the completion only (TRL SFTTrainer, prompt/completion data);
dpo uses TRL DPOTrainer on prompt/chosen/rejected pairs. Outputs in `output_dir`: `adapter/` (ctxaware format, or a
PEFT adapter for lora), `head_selection.json`, `head_scores.png` (stage-1 norms, layer x head), `results.json`
(parameter counts, base and tuned scores). `--merge` also writes `merged/`, a plain transformers model.
"""

import ast
import json
import random
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from accelerate import PartialState
from datasets import Dataset
from transformers import set_seed
from trl import DPOConfig, DPOTrainer, ModelConfig, SFTConfig, SFTTrainer, TrlParser

from ctxaware.adapters import count_trainable
from ctxaware.datafiles import load_rows
from ctxaware.eval.knowledge_conflict import (
    REPLY_TOKENS,
    contradicting,
    known_facts,
    load_facts,
    load_train_facts,
    states_truth,
)
from ctxaware.eval.model import EvalModel
from ctxaware.generation import plain_text_bos
from ctxaware.heads import (
    HeadLayout,
    all_heads,
    load_head_selection,
    plot_head_scores,
    random_heads,
    save_head_selection,
    top_heads,
)
from ctxaware.methods.lofit import LoFiTAdapter
from ctxaware.models import load_tokenizer, resolve_model_path
from ctxaware.outputs import claim_output_dir
from ctxaware.training import (
    RecipeTrainingArguments,
    RequireTrainingSteps,
    check_model_options,
    load_causal_lm,
    usage_errors,
)
from ctxaware.world import CONTEXT_QA_PROMPT, arithmetic, build_world, closed_book_qa, context_qa, preference_pairs
from ctxaware.world.probe import matches
from ctxaware.world.tasks import ARITHMETIC_OPS, arithmetic_records


METHODS = ("lofit", "random_heads", "all_heads", "lora")
# task -> objective it is built for; world/* come from the embedded world, known_facts/* from the knowledge_conflict
# facts, the others are loaded by name.
TASKS = {
    "world/truthful_qa": "sft",
    "world/chat_qa": "sft",
    "world/context_qa": "sft",
    "world/arithmetic": "sft",
    "world/arithmetic_question": "sft",
    "world/preference": "dpo",
    "known_facts/truthful": "sft",
    "truthfulqa": "dpo",
    "clutrr": "sft",
    "mquake": "sft",
}


@dataclass
class LoFiTArguments:
    method: str = field(default="lofit", metadata={"help": f"One of {', '.join(METHODS)}."})
    objective: str = field(default="sft", metadata={"help": "sft (completion-only loss) or dpo."})
    task: str = field(default="world/truthful_qa", metadata={"help": f"One of {', '.join(TASKS)}."})
    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub id, or local file or folder, for the non-world tasks."}
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split (slices allowed: 'train[:90%%]')."})
    dataset_test_split: str = field(default="test", metadata={"help": "Held-out split scored before and after."})
    world_seed: int = field(default=0, metadata={"help": "Seed of the synthetic world (world/* tasks)."})
    counterfactual_rate: float = field(
        default=1.0,
        metadata={
            "help": "world/context_qa, world/truthful_qa: share of "
            "passages that contradict the memorised fact (context_qa answers with the "
            "passage, truthful_qa with the fact)."
        },
    )
    known_only: bool = field(
        default=True,
        metadata={
            "help": "known_facts/truthful: keep only the facts the base model completes closed-book (the "
            "knowledge_conflict probe); false keeps them all."
        },
    )
    max_train_samples: int | None = None
    eval_limit: int = field(default=200, metadata={"help": "Held-out records scored before and after (0: none)."})
    extra_eval_split: str | None = field(
        default=None,
        metadata={
            "help": "A second held-out split scored before and after, as `<split>_base_score`, `<split>_score`, "
            "`<split>_gain` (e.g. test, with dataset_test_split validation)."
        },
    )
    num_heads: float = field(default=0.05, metadata={"help": "K: a head count (>= 1) or a fraction of all heads."})
    head_seed: int | None = field(
        default=None,
        metadata={
            "help": "random_heads: seed of the draw (default: `seed`), so several draws can share one training seed."
        },
    )
    exclude_heads: str | None = field(
        default=None,
        metadata={
            "help": "random_heads: a head_selection.json (a lofit "
            "run's) whose heads the draw avoids, so the control never repeats the "
            "selection it is compared with."
        },
    )
    l1_lambda: float = field(default=1e-3, metadata={"help": "Stage-1 L1 penalty on the scales."})
    scale_init_std: float = field(default=1e-3, metadata={"help": "Stage-1 scales start at N(0, std)."})
    stage1_learning_rate: float = 5e-3
    stage1_epochs: float = 1.0
    stage1_max_steps: int = field(default=-1, metadata={"help": "Caps stage 1 (-1: by epochs)."})
    lora_learning_rate: float = field(
        default=2e-3,
        metadata={
            "help": "method lora's learning rate (the offsets' "
            "`learning_rate` is orders of magnitude too large for LoRA weights)."
        },
    )
    merge: bool = field(default=False, metadata={"help": "Also save the merged plain model (LoFiT methods)."})

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}: choose one of {', '.join(METHODS)}.")
        if self.objective not in ("sft", "dpo"):
            raise ValueError(f"objective={self.objective!r}: choose sft or dpo.")
        if self.task not in TASKS:
            raise ValueError(f"task={self.task!r}: choose one of {', '.join(TASKS)}.")
        if self.exclude_heads and self.method != "random_heads":
            raise ValueError(f"exclude_heads only shapes a random_heads draw; drop it for method {self.method}.")
        if TASKS[self.task] != self.objective:
            raise ValueError(
                f"task {self.task} provides {TASKS[self.task]} data: set `objective: {TASKS[self.task]}`."
            )


@dataclass
class LoFiTTrainingConfig(RecipeTrainingArguments, SFTConfig):
    """Stage 2's (and LoRA's) training settings; DPO runs get the same values in a DPOConfig."""

    learning_rate: float = 1e-2
    num_train_epochs: float = 5.0
    per_device_train_batch_size: int = 8
    activation_checkpointing: bool = False
    logging_steps: int = 10
    save_strategy: str = "no"
    report_to: str = "none"
    max_length: int | None = 512
    beta: float = field(default=0.1, metadata={"help": "DPO: KL strength."})
    dpo_loss_type: list[str] = field(default_factory=lambda: ["sigmoid"], metadata={"help": "DPO loss type(s)."})


@dataclass
class LoFiTModelConfig(ModelConfig):
    """TRL's model options; this recipe reads only MODEL_OPTIONS (the LoRA ones for method lora) and refuses the others set."""

    model_name_or_path: str | None = field(
        default="ctxaware-tiny", metadata={"help": "Embedded name, path or Hub id."}
    )
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | None = field(default_factory=lambda: ["q_proj", "v_proj"])


MODEL_OPTIONS = ("model_name_or_path", "model_revision", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")
CONFIG_CLASSES = (LoFiTArguments, LoFiTTrainingConfig, LoFiTModelConfig)


# --- data ---------------------------------------------------------------------------------------------------------
TRUTHFUL_QUESTION = "{passage}\n\nQuestion: {question}"  # known_facts/truthful's user turn: no instruction to trust it


def load_records(args: LoFiTArguments, split: str, tokenizer, model=None) -> list[dict]:
    """Records as {"prompt", "completion"} (sft) or {"prompt", "chosen", "rejected"} (dpo), prompts as text (the
    chat template rendered into it for world/chat_qa and known_facts/truthful). world/truthful_qa is context_qa's
    records (known entities only) answered with the memorised fact instead of the passage's. known_facts/truthful
    needs the base `model` to keep the facts it knows (`known_only`)."""
    if args.task == "known_facts/truthful":
        return truthful_records(args, split, tokenizer, model)
    if args.task.startswith("world/"):
        world = build_world(args.world_seed)
        if args.task == "world/chat_qa":  # the chat corpus answers these with a full sentence: the format is the task
            return [
                {"prompt": chat_prompt(tokenizer, r["question"]), "completion": " " + r["answer"]}
                for r in closed_book_qa(world, split)
            ]
        if args.task in ("world/context_qa", "world/truthful_qa"):
            records = context_qa(
                world,
                split,
                n=2000 if split == "train" else 300,
                counterfactual_rate=args.counterfactual_rate,
                novel_rate=0.0,
            )
            answer = "memory_answer" if args.task == "world/truthful_qa" else "answer"
            return [{"prompt": CONTEXT_QA_PROMPT.format(**r), "completion": " " + r[answer]} for r in records]
        if args.task == "world/arithmetic":
            return [{"prompt": r["prompt"], "completion": " " + r["answer"]} for r in arithmetic(world, split)]
        if args.task == "world/arithmetic_question":
            return arithmetic_question_records(world, split)
        return [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in preference_pairs(world, split)]
    if not args.dataset_name:
        raise ValueError(f"task {args.task} needs `dataset_name` (a Hub id or a local JSON file).")
    rows = load_rows(args.dataset_name, config=args.dataset_config, split=split)  # one file: slices, "train[:90%]"
    return [record for row in rows for record in FORMATTERS[args.task](row)]


def truthful_records(args: LoFiTArguments, split: str, tokenizer, model) -> list[dict]:
    """known_facts/truthful: a passage contradicts a real fact, the question asks for it, the answer is the true fact.
    train: the training facts (`train_facts.jsonl`), 2,000 records cycling through them, each with another false
    answer; validation, test: the knowledge_conflict facts of that split, one record each. Each record keeps its
    `fact` (answer, counterfactual_answer) for `score`; training drops it."""
    facts = load_train_facts() if split == "train" else load_facts(split)
    if args.known_only:
        if model is None:
            raise ValueError("known_facts/truthful with known_only needs the base model, to probe the facts it knows.")
        facts = known_facts(EvalModel(model, tokenizer, batch_size=64, progress=False), facts)
        if not facts:
            raise ValueError(
                f"the base model completes none of the {split} facts closed-book: known_facts/truthful needs a model "
                "that knows them (or known_only false)."
            )
    if split == "train":
        facts = contradicting(facts, n=2000)
    return [
        {
            "prompt": chat_prompt(tokenizer, TRUTHFUL_QUESTION.format(**f)),
            "completion": f["answer"],  # the assistant turn starts the answer, no space after it
            "fact": f,
        }
        for f in facts
    ]


# world/arithmetic_question problems per (op, digits) cell: training takes what a cell has (1-digit cells hold fewer);
# held-out splits take up to the arithmetic-heads recipe's evaluation size (15 a cell: 118 on validation, 114 on test)
ARITHMETIC_TRAIN_PER_CELL = 200
ARITHMETIC_EVAL_PER_CELL = 15


def arithmetic_question_records(world, split: str) -> list[dict]:
    """world/arithmetic_question: the arithmetic-heads recipe's problems (+ - * at 1-3 digits, its question template,
    on which SmolLM2 starts near 0 and a few heads carry the effect). Held-out records are shuffled (seeded by the
    split) so that `eval_limit` keeps every cell, not the first ones."""
    per_cell = ARITHMETIC_TRAIN_PER_CELL if split == "train" else ARITHMETIC_EVAL_PER_CELL
    problems = arithmetic_records(
        world, split, ops=ARITHMETIC_OPS, digits=(1, 2, 3), templates=("question",), n_per_cell=per_cell
    )
    records = [{"prompt": r["prompt"], "completion": " " + r["answer"]} for r in problems]
    if split != "train":  # training records are shuffled by the training seed in `main`
        random.Random(f"arithmetic_question/{split}").shuffle(records)
    return records


def distinct_facts(records: list[dict]) -> int:
    """How many facts known_facts/truthful records hold (its training records cycle through them)."""
    return len({(r["fact"]["subject"], r["fact"]["relation"]) for r in records})


def chat_prompt(tokenizer, user: str) -> str:
    """`user` as the one user turn of the tokenizer's chat template, up to the start of the assistant's answer."""
    messages = [{"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def truthfulqa_pairs(row: dict) -> list[dict]:
    """truthfulqa/truthful_qa (generation): the best answer preferred to each incorrect one."""
    prompt = f"Q: {row['question']}\nA:"
    return [
        {"prompt": prompt, "chosen": " " + row["best_answer"], "rejected": " " + bad}
        for bad in row["incorrect_answers"]
    ]


def clutrr_example(row: dict) -> list[dict]:
    """CLUTRR/v1: the story, then the relation of the query's second person to the first."""
    first, second = ast.literal_eval(row["query"]) if isinstance(row["query"], str) else row["query"]
    prompt = f"{row['story']}\nQuestion: How is {second} related to {first}?\nAnswer:"
    return [{"prompt": prompt, "completion": " " + row["target_text"]}]


def mquake_examples(row: dict) -> list[dict]:
    """MQuAKE (CF-3k JSON): the edited facts as context, each multi-hop question answered with the new answer."""
    edits = " ".join(
        rewrite["prompt"].format(rewrite["subject"]) + " " + rewrite["target_new"]["str"] + "."
        for rewrite in row["requested_rewrite"]
    )
    return [
        {"prompt": f"{edits}\nQuestion: {q}\nAnswer:", "completion": " " + row["new_answer"]} for q in row["questions"]
    ]


FORMATTERS = {"truthfulqa": truthfulqa_pairs, "clutrr": clutrr_example, "mquake": mquake_examples}


def with_bos(records: list[dict], tokenizer) -> list[dict]:
    """Prompts start with BOS, as in pretraining, where the model starts plain text with it
    (`generation.plain_text_bos`)."""
    bos = plain_text_bos(tokenizer)
    if not bos:
        return records
    return [r if r["prompt"].startswith(bos) else {**r, "prompt": bos + r["prompt"]} for r in records]


# --- scoring ------------------------------------------------------------------------------------------------------
@torch.no_grad()
def sft_replies(model, tokenizer, records: list[dict], batch_size: int = 16) -> list[str]:
    """Greedy replies to sft records: REPLY_TOKENS tokens for records with a `fact`, else the answer's length + 2.
    Prompts are tokenized as in training (special tokens as the tokenizer adds them, BOS already in the text where
    `with_bos` put it)."""
    model.eval()
    pad = tokenizer.pad_token_id
    replies = []
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        answers = [r["completion"].strip() for r in batch]
        encoded = [tokenizer(r["prompt"])["input_ids"] for r in batch]
        width = max(map(len, encoded))
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=model.device)
        # from the lengths, not `ids != pad`: a chat prompt holds the end-of-turn token that may double as pad
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=model.device)
        max_new = (
            REPLY_TOKENS
            if "fact" in batch[0]
            else max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers) + 2
        )
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        replies += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return replies


@torch.no_grad()
def score(model, tokenizer, records: list[dict], objective: str, batch_size: int = 16) -> float:
    """sft: greedy accuracy (the first line of `sft_replies` starts with the answer; for records with a `fact`, it
    states the true answer and not the passage's, `states_truth`); dpo: share of pairs where the chosen answer has the
    higher log-likelihood."""
    model.eval()
    if objective == "sft":
        replies = sft_replies(model, tokenizer, records, batch_size)
        return sum(is_correct(text, r) for text, r in zip(replies, records)) / len(records)
    wins = 0
    for r in records:
        prompt = tokenizer(r["prompt"])["input_ids"]
        logps = []
        for answer in (r["chosen"], r["rejected"]):
            ids = torch.tensor(
                [prompt + tokenizer(answer, add_special_tokens=False)["input_ids"]], device=model.device
            )
            logits = model(ids).logits[0, len(prompt) - 1 : -1].float().log_softmax(-1)
            logps.append(logits.gather(-1, ids[0, len(prompt) :, None]).sum().item())
        wins += logps[0] > logps[1]
    return wins / len(records)


def is_correct(reply: str, record: dict) -> bool:
    fact = record.get("fact")
    if fact:
        return states_truth(reply, fact["answer"], fact["counterfactual_answer"])
    return matches(reply, record["completion"].strip())


# --- training -----------------------------------------------------------------------------------------------------
def trl_config(training_args: LoFiTTrainingConfig, objective: str, **overrides):
    """The TRL config of `objective` carrying the run's shared training settings (and stage overrides)."""
    target = SFTConfig if objective == "sft" else DPOConfig
    values = {
        f.name: getattr(training_args, f.name) for f in fields(target) if f.init and hasattr(training_args, f.name)
    }
    if objective == "dpo":
        values["loss_type"] = training_args.dpo_loss_type
    return target(**{**values, **overrides})


def make_trainer(objective: str, model, config, dataset: Dataset, tokenizer, ref_model=None, l1_adapter=None, l1=0.0):
    trainer_cls = SFTTrainer if objective == "sft" else DPOTrainer
    if l1_adapter is not None:
        trainer_cls = type("L1" + trainer_cls.__name__, (trainer_cls,), {"compute_loss": _l1_loss(l1_adapter, l1)})
    kwargs = {"ref_model": ref_model} if objective == "dpo" else {}
    return trainer_cls(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[RequireTrainingSteps()],
        **kwargs,
    )


def _l1_loss(adapter: LoFiTAdapter, l1: float):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super(type(self), self).compute_loss(model, inputs, return_outputs, num_items_in_batch)
        penalty = l1 * adapter.l1_penalty()
        return (result[0] + penalty, result[1]) if return_outputs else result + penalty

    return compute_loss


def load_base(model_args: LoFiTModelConfig, training_args: LoFiTTrainingConfig):
    dtype = torch.bfloat16 if training_args.bf16 else torch.float32
    return load_causal_lm(model_args.model_name_or_path, dtype=dtype, revision=model_args.model_revision)


def main(args: LoFiTArguments, training_args: LoFiTTrainingConfig, model_args: LoFiTModelConfig) -> dict:
    check_model_options(model_args, MODEL_OPTIONS)
    set_seed(training_args.seed)
    state = PartialState()
    output_dir = Path(training_args.output_dir)
    claim_output_dir(
        output_dir,
        {**asdict(args), **training_args.to_dict(), **asdict(model_args)},
        overwrite=training_args.overwrite_output_dir,
        resumable=False,
    )
    path = resolve_model_path(model_args.model_name_or_path)
    tokenizer = load_tokenizer(path, revision=model_args.model_revision)
    model = load_base(model_args, training_args).to(state.device)
    model.requires_grad_(False)
    train_records = with_bos(load_records(args, args.dataset_train_split, tokenizer, model), tokenizer)
    random.Random(training_args.seed).shuffle(train_records)
    train_records = train_records[: args.max_train_samples]
    test_records = with_bos(load_records(args, args.dataset_test_split, tokenizer, model), tokenizer)
    test_records = test_records[: args.eval_limit]
    extra_split = args.extra_eval_split
    extra_records = with_bos(load_records(args, extra_split, tokenizer, model), tokenizer) if extra_split else []
    extra_records = extra_records[: args.eval_limit]
    dataset = Dataset.from_list([{k: v for k, v in r.items() if k != "fact"} for r in train_records])
    layout = HeadLayout.from_model(model)
    results = {
        "method": args.method,
        "task": args.task,
        "objective": args.objective,
        "base_model": model_args.model_name_or_path,
    }
    if args.task == "known_facts/truthful":  # the training facts its records hold (known_only: known to the base)
        results["train_facts"] = distinct_facts(train_records)
    if test_records:
        results["base_score"] = score(model.to(state.device), tokenizer, test_records, args.objective)
        results["eval_records"] = len(test_records)
    if extra_records:
        results[f"{extra_split}_base_score"] = score(model.to(state.device), tokenizer, extra_records, args.objective)
        results[f"{extra_split}_eval_records"] = len(extra_records)
    ref_model = load_base(model_args, training_args) if args.objective == "dpo" and args.method != "lora" else None

    if args.method == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=model_args.lora_r,
            lora_alpha=model_args.lora_alpha,
            target_modules=model_args.lora_target_modules,
            lora_dropout=model_args.lora_dropout,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
        results["trained_parameters"] = count_trainable(model)
        config = trl_config(training_args, args.objective, learning_rate=args.lora_learning_rate)
        trainer = make_trainer(args.objective, model, config, dataset, tokenizer)
        trainer.train()
        adapter = None
    else:
        if args.method == "lofit":
            heads, scores = select_heads(args, training_args, model, layout, dataset, tokenizer, ref_model)
        else:
            heads = (
                draw_random_heads(args, layout, training_args.seed)
                if args.method == "random_heads"
                else all_heads(layout)
            )
            scores = None
        training = {k: v for k, v in asdict(args).items() if k not in ("merge", "eval_limit", "extra_eval_split")}
        training |= {"learning_rate": training_args.learning_rate, "num_train_epochs": training_args.num_train_epochs}
        adapter = LoFiTAdapter(
            layout,
            heads,
            offsets=True,
            base_model=model_args.model_name_or_path,
            base_model_revision=model_args.model_revision,
            training=training,
        )
        adapter.to(next(model.parameters()).device).attach(model)
        results["trained_parameters"] = count_trainable(model)
        stage2 = trl_config(training_args, args.objective, output_dir=str(output_dir / "stage2"))
        trainer = make_trainer(args.objective, model, stage2, dataset, tokenizer, ref_model)
        trainer.train()
        if state.is_main_process:
            output_dir.mkdir(parents=True, exist_ok=True)
            save_head_selection(
                output_dir / "head_selection.json",
                heads,
                layout,
                method=args.method,
                task=args.task,
                scores=scores.tolist() if scores is not None else None,
            )
            if scores is not None:
                plot_head_scores(output_dir / "head_scores.png", scores, heads, title=f"stage-1 ||A|| ({args.task})")

    results["base_parameters"] = sum(p.numel() for p in model.parameters()) - results["trained_parameters"]
    results["heads"] = len(adapter.heads) if adapter else None
    if test_records:
        results["score"] = score(model, tokenizer, test_records, args.objective)
        results["gain"] = results["score"] - results["base_score"]
    if extra_records:
        results[f"{extra_split}_score"] = score(model, tokenizer, extra_records, args.objective)
        results[f"{extra_split}_gain"] = results[f"{extra_split}_score"] - results[f"{extra_split}_base_score"]
    if state.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        eval_results = {args.task: {"score": results["score"]}} if test_records else None
        if adapter is not None:
            adapter.save_pretrained(output_dir / "adapter", eval_results=eval_results, tags=[args.method, args.task])
            if args.merge:
                adapter.merge(model).save_pretrained(output_dir / "merged")
                tokenizer.save_pretrained(output_dir / "merged")
        else:
            trainer.model.save_pretrained(output_dir / "adapter")
        (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        for stage_dir in (output_dir / "stage1", output_dir / "stage2"):  # the trainers' folders, empty unless saving
            if stage_dir.is_dir() and not any(stage_dir.iterdir()):
                stage_dir.rmdir()
        if training_args.push_to_hub:
            repo_id = training_args.hub_model_id or output_dir.name
            if adapter is not None:
                adapter.push_to_hub(repo_id, private=training_args.hub_private_repo, eval_results=eval_results)
            else:
                trainer.model.push_to_hub(repo_id, private=training_args.hub_private_repo)
        print(json.dumps(results, indent=2))
    return results


def draw_random_heads(args: LoFiTArguments, layout: HeadLayout, seed: int) -> list:
    """K heads drawn with `head_seed` (default `seed`) among those `exclude_heads` leaves (all of them without it)."""
    excluded = load_head_selection(args.exclude_heads, layout)[0] if args.exclude_heads else []
    return random_heads(layout, args.num_heads, seed if args.head_seed is None else args.head_seed, exclude=excluded)


def select_heads(args, training_args, model, layout, dataset, tokenizer, ref_model):
    """Stage 1: scales on every head with an L1 penalty; returns the top-K heads and the (layers, heads) norms."""
    stage1 = LoFiTAdapter(layout, all_heads(layout), scales=True, offsets=False, init_std=args.scale_init_std)
    stage1.to(next(model.parameters()).device).attach(model)
    config = trl_config(
        training_args,
        args.objective,
        learning_rate=args.stage1_learning_rate,
        num_train_epochs=args.stage1_epochs,
        max_steps=args.stage1_max_steps,
        output_dir=str(Path(training_args.output_dir) / "stage1"),
    )
    make_trainer(args.objective, model, config, dataset, tokenizer, ref_model, stage1, args.l1_lambda).train()
    stage1.detach()
    scores = stage1.scale_norms()
    return top_heads(scores, args.num_heads), scores


if __name__ == "__main__":
    with usage_errors("lofit"):
        main(*TrlParser(CONFIG_CLASSES).parse_args_and_config())
