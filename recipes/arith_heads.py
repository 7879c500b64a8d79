"""Arithmetic heads: find the attention heads and MLPs that carry arithmetic by patching, then fine-tune only them.

Embedded default (tiny model, synthetic world, CPU, a few minutes):
    accelerate launch recipes/arith_heads.py --config recipes/configs/arith_heads/default.yaml
Baselines in the same recipe and run setup:
    accelerate launch recipes/arith_heads.py --config recipes/configs/arith_heads/default.yaml --method random_heads
    accelerate launch recipes/arith_heads.py --config recipes/configs/arith_heads/default.yaml --method lora
    accelerate launch recipes/arith_heads.py --config recipes/configs/arith_heads/default.yaml --method full
Reuse a selection instead of patching again: `--head_selection OUTPUT_DIR/head_selection.json`; rank again
from saved patching runs (e.g. with another `num_mlps`): `--attribution_from OUTPUT_DIR/attribution`.

1. Attribution (method heads): clean/corrupted arithmetic pairs (one operand or the operator changed, same token
   length, the answer's first digit changed) from the world's `attribution_split`; activation patching of every
   head's pre-o_proj output and every MLP output in both directions and path patching to the final position (see
   `ctxaware.methods.patching` for the metric: the logit difference of the two answers' first differing tokens,
   normalised). The top `num_heads` heads by effect under `selection_score` and the top `num_mlps` MLPs under
   `mlp_selection_score` (direct effect) are selected; `selection_sign absolute` ranks by |effect| instead, which
   also picks components that push against the answer (on the tiny model such a head learned the task slower). The
   tiny config ranks heads by direct effect too (path patching): its total-effect top 3 are all layer-1 operand
   movers and learn the task far slower (see its yaml).
2. Precise SFT: trained deltas on the selected heads' q/k/v rows and o_proj columns (shared GQA k/v rows by
   `kv_policy`) and the selected MLPs' weights (`ctxaware.methods.arith_heads`), TRL SFTTrainer with the loss on
   " ANSWER\n" only (see `training_examples`) on the world's `train_split` problems of `train_ops` x `train_digits` x
   `train_templates`. Baselines: `random_heads` (the same numbers of random heads and MLPs; with `head_selection`,
   drawn among the unselected ones; never the `exclude_mlps`), `lora` (PEFT), `full` (every weight).
3. Evaluation before and after: arithmetic accuracy by (template, op, digits) of `eval_templates` on `eval_split`
   (test by default; validation to choose settings), grouped into in distribution and transfer (other digits,
   templates, ops); the shared harness tasks `eval_tasks` on `eval_split` too (`eval_haystack_file` and
   `eval_lengths` for long_ppl: `books` holds held-out public-domain books); closed-book recall of memorised facts.
Outputs in `output_dir`: `attribution/` (ranked JSON and layer x head heat map per patching run),
`head_selection.json`, `adapter/` (ctxaware format; PEFT for lora; `model/` for full), `results.json`;
`--merge true` adds `merged/`, a plain transformers model.
"""

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from accelerate import PartialState
from datasets import Dataset
from transformers import set_seed
from trl import ModelConfig, SFTConfig, SFTTrainer, TrlParser

from ctxaware.adapters import count_trainable
from ctxaware.eval.arithmetic import parse_number
from ctxaware.eval.model import EvalModel
from ctxaware.eval.runner import evaluate_in_process
from ctxaware.generation import encode_prompt
from ctxaware.heads import HeadLayout, random_heads, resolve_head_count, save_head_selection, top_heads
from ctxaware.io import write_json
from ctxaware.methods.arith_heads import KV_POLICIES, HeadDeltaAdapter, check_selection, load_component_selection
from ctxaware.methods.patching import PatchingResult, build_batches, keep_answered, patch_all
from ctxaware.models import load_tokenizer, resolve_model_path
from ctxaware.outputs import claim_output_dir
from ctxaware.training import (
    RecipeTrainingArguments,
    RequireTrainingSteps,
    check_model_options,
    load_causal_lm,
    usage_errors,
)
from ctxaware.world import QA_PROMPT, build_world, closed_book_qa
from ctxaware.world.probe import matches
from ctxaware.world.tasks import ARITHMETIC_OPS, ARITHMETIC_TEMPLATES, arithmetic_pairs, arithmetic_records


METHODS = ("heads", "random_heads", "lora", "full")
PATCHING_RUNS = (
    "activation:corrupted_into_clean",
    "activation:clean_into_corrupted",
    "path:corrupted_into_clean",
    "path:clean_into_corrupted",
)
SELECTION_SIGNS = ("positive", "absolute")


@dataclass
class ArithHeadsArguments:
    method: str = field(default="heads", metadata={"help": f"One of {', '.join(METHODS)}."})
    world_seed: int = field(default=0, metadata={"help": "Seed of the synthetic world."})
    # training data
    train_ops: list[str] = field(
        default_factory=lambda: ["*"], metadata={"help": f"Operations from {ARITHMETIC_OPS}."}
    )
    train_digits: list[int] = field(default_factory=lambda: [1, 2], metadata={"help": "Operand digit counts."})
    train_templates: list[str] = field(
        default_factory=lambda: ["plain"], metadata={"help": f"From {list(ARITHMETIC_TEMPLATES)}."}
    )
    train_per_cell: int = field(default=400, metadata={"help": "Training problems per (template, op, digits)."})
    train_split: str = field(default="train", metadata={"help": "World split of the training problems."})
    # attribution
    attribution_pairs: int = field(default=64, metadata={"help": "Clean/corrupted pairs patched."})
    attribution_split: str = field(default="validation", metadata={"help": "World split the pairs come from."})
    corruption: str = field(default="operand", metadata={"help": "operand, operator or any."})
    keep_correct: bool = field(default=True, metadata={"help": "Patch only pairs the model gets right (LD signs)."})
    drop_mismatched: bool = field(
        default=False, metadata={"help": "Skip pairs whose prompts tokenise to different lengths instead of failing."}
    )
    patching_runs: list[str] = field(
        default_factory=lambda: list(PATCHING_RUNS[:3]),
        metadata={"help": f"KIND:DIRECTION runs, from {PATCHING_RUNS}."},
    )
    patching_positions: str = field(default="all", metadata={"help": "Patch at all positions or the last."})
    selection_score: str = field(
        default="activation:corrupted_into_clean",
        metadata={
            "help": "The patching run "
            "whose |effect| ranks heads (activation: total effect, heads that move "
            "operands; path: direct effect, heads that write the answer)."
        },
    )
    mlp_selection_score: str = field(
        default="path:corrupted_into_clean",
        metadata={
            "help": "The run ranking MLPs "
            "(direct effect: MLPs that write the answer; MLP 0 acts on every token's "
            "embedding, so its total effect is ~1 and says nothing)."
        },
    )
    selection_sign: str = field(
        default="positive",
        metadata={
            "help": "Rank by the signed effect (positive: the "
            "components that carry the answer) or by |effect| (absolute: also those that push "
            "against it)."
        },
    )
    num_heads: float = field(default=0.05, metadata={"help": "Heads tuned: a count (>= 1), a fraction, or 0."})
    num_mlps: int = field(default=1, metadata={"help": "MLPs tuned (top by effect, see selection_sign)."})
    exclude_mlps: list[int] = field(
        default_factory=list,
        metadata={
            "help": "MLP layers never selected nor drawn by random_heads (e.g. 0: the first MLP acts on every "
            "token's embedding, so its total effect is ~1 and says nothing about arithmetic)."
        },
    )
    head_selection: str | None = field(
        default=None, metadata={"help": "A head_selection.json to reuse (skips patching)."}
    )
    attribution_from: str | None = field(
        default=None,
        metadata={
            "help": "An earlier heads run's attribution/ folder: rank heads and MLPs from its saved patching runs "
            "(num_heads, num_mlps, the selection scores) instead of patching again."
        },
    )
    kv_policy: str = field(default="full_group", metadata={"help": f"Shared GQA k/v rows: {', '.join(KV_POLICIES)}."})
    kv_lr_ratio: float = field(
        default=1.0,
        metadata={
            "help": "Trained k/v rows learn at this fraction of the learning "
            "rate (under kv_policy any they also change the group's unselected heads)."
        },
    )
    delta_targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "o"])
    # baselines
    lora_learning_rate: float = field(default=1e-3, metadata={"help": "LoRA's learning rate (others: learning_rate)."})
    # evaluation
    eval_per_cell: int = field(default=20, metadata={"help": "Test problems per (template, op, digits); 0: none."})
    eval_digits: list[int] = field(default_factory=lambda: [1, 2, 3])
    eval_templates: list[str] = field(
        default_factory=lambda: list(ARITHMETIC_TEMPLATES),
        metadata={"help": "Templates of the arithmetic evaluation."},
    )
    eval_split: str = field(
        default="test",
        metadata={
            "help": "World split of the arithmetic evaluation and the harness tasks (validation to choose settings, "
            "test to report)."
        },
    )
    eval_haystack_file: str | None = field(
        default=None, metadata={"help": "Text of the long_ppl harness task: a file or a named source (books)."}
    )
    eval_lengths: list[int] | None = field(default=None, metadata={"help": "long_ppl's window lengths."})
    eval_tasks: list[str] = field(
        default_factory=lambda: ["extractive_qa", "counterfactual_qa"],
        metadata={"help": "Harness tasks (ctxaware eval), before and after."},
    )
    eval_limit: int = field(
        default=100, metadata={"help": "Records per harness task and closed-book facts; 0: neither."}
    )
    merge: bool = field(default=False, metadata={"help": "Also save the merged plain model (heads methods)."})
    attribution_only: bool = field(
        default=False,
        metadata={"help": "Method heads: patch, save the selection and attribution, then stop (no training)."},
    )
    eval_before_from: str | None = field(
        default=None,
        metadata={
            "help": "An earlier run's results.json whose `before` metrics (same base model and evaluation settings) "
            "are reused instead of evaluating the base model again."
        },
    )

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}: choose one of {', '.join(METHODS)}.")
        if self.kv_policy not in KV_POLICIES:
            raise ValueError(f"kv_policy={self.kv_policy!r}: choose one of {', '.join(KV_POLICIES)}.")
        if self.kv_policy == "none" and self.kv_lr_ratio != 1.0:
            raise ValueError(
                f"kv_lr_ratio={self.kv_lr_ratio} does nothing with kv_policy='none' (no k/v rows train): "
                "set kv_policy to 'any' or 'full_group', or drop kv_lr_ratio."
            )
        if self.selection_sign not in SELECTION_SIGNS:
            raise ValueError(f"selection_sign={self.selection_sign!r}: choose one of {', '.join(SELECTION_SIGNS)}.")
        if self.attribution_only and (self.method != "heads" or self.head_selection or self.attribution_from):
            raise ValueError(
                "attribution_only patches the model: use it with method heads, no head_selection, no attribution_from."
            )
        if self.head_selection and self.attribution_from:
            raise ValueError("head_selection and attribution_from both choose the components: give one.")
        if unknown := set(self.eval_templates) - set(ARITHMETIC_TEMPLATES):
            raise ValueError(
                f"unknown eval_templates {sorted(unknown)}: choose from {', '.join(ARITHMETIC_TEMPLATES)}."
            )
        if unknown := set(self.patching_runs) - set(PATCHING_RUNS):
            raise ValueError(f"unknown patching runs {sorted(unknown)}: choose from {', '.join(PATCHING_RUNS)}.")
        for score in (self.selection_score, self.mlp_selection_score):
            if score not in self.patching_runs:
                raise ValueError(f"selection score {score} must be one of patching_runs {self.patching_runs}.")


@dataclass
class ArithHeadsTrainingConfig(RecipeTrainingArguments, SFTConfig):
    learning_rate: float = 3e-4
    num_train_epochs: float = 3.0
    per_device_train_batch_size: int = 32
    activation_checkpointing: bool = False
    logging_steps: int = 10
    save_strategy: str = "no"
    report_to: str = "none"
    max_length: int | None = 256


@dataclass
class ArithHeadsModelConfig(ModelConfig):
    """TRL's model options; this recipe reads only MODEL_OPTIONS (the LoRA ones for method lora) and refuses the others set."""

    model_name_or_path: str | None = field(
        default="ctxaware-tiny", metadata={"help": "Embedded name, path or Hub id."}
    )
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | None = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


MODEL_OPTIONS = ("model_name_or_path", "model_revision", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")
CONFIG_CLASSES = (ArithHeadsArguments, ArithHeadsTrainingConfig, ArithHeadsModelConfig)


# --- selection ----------------------------------------------------------------------------------------------------
def attribute(args: ArithHeadsArguments, model, tokenizer, output_dir: Path | None) -> dict:
    """Runs the patching analyses; returns {run name: PatchingResult}; writes them to `output_dir`/attribution."""
    pairs = arithmetic_pairs(
        args.world_seed,
        args.attribution_split,
        args.attribution_pairs,
        ops=args.train_ops,
        digits=args.train_digits,
        templates=args.train_templates,
        corruption=args.corruption,
    )
    batches = build_batches(pairs, tokenizer, drop_mismatched=args.drop_mismatched)
    if args.keep_correct:
        batches = keep_answered(model, batches)
    results = {}
    for run in args.patching_runs:
        kind, direction = run.split(":")
        results[run] = patch_all(model, batches, direction=direction, kind=kind, positions=args.patching_positions)
    return results


def load_attribution(args: ArithHeadsArguments) -> dict:
    """{run name: PatchingResult} of `args.patching_runs`, read from the folder `args.attribution_from`."""
    folder, runs = Path(args.attribution_from), {}
    for run in args.patching_runs:
        kind, direction = run.split(":")
        path = folder / f"{PatchingResult.file_name(kind, direction, args.patching_positions)}.json"
        if not path.is_file():
            raise ValueError(f"attribution_from {folder}: no {path.name} for patching run {run}.")
        runs[run] = PatchingResult.load(path)
    return runs


def random_components(layout: HeadLayout, num_heads: int, num_mlps: int, seed: int, exclude=((), ())):
    """`num_heads` random heads and `num_mlps` random MLP layers, none of them in `exclude` (heads, MLP layers)."""
    heads = random_heads(layout, num_heads, seed, exclude=exclude[0]) if num_heads else []
    mlps = [m for m in range(layout.num_layers) if m not in set(exclude[1])]
    if num_mlps > len(mlps):
        raise ValueError(
            f"cannot draw {num_mlps} MLPs outside the {len(set(exclude[1]))} excluded ones: lower num_mlps."
        )
    chosen = heads, sorted(random.Random(seed).sample(mlps, num_mlps))
    check_selection(layout, *chosen)
    return chosen


def top_components(
    head_effects: torch.Tensor, mlp_effects: torch.Tensor, num_heads: int, num_mlps: int, sign: str, exclude_mlps=()
):
    """(heads, MLP layers): the `num_heads` heads of a (layers, heads) effect tensor and the `num_mlps` MLPs of a
    (layers,) one, none in `exclude_mlps`, with the largest effects (`sign` positive) or |effects| (absolute), each
    sorted."""
    if sign == "absolute":
        head_effects, mlp_effects = head_effects.abs(), mlp_effects.abs()
    mlp_effects = mlp_effects.clone()
    mlp_effects[list(exclude_mlps)] = -math.inf
    heads = top_heads(head_effects, num_heads) if num_heads else []
    return heads, sorted(torch.topk(mlp_effects, num_mlps).indices.tolist()) if num_mlps else []


def select(args, layout: HeadLayout, model, tokenizer, seed: int, output_dir: Path, is_main: bool):
    """(heads, mlp_layers, attribution summary) for the methods that tune selected components."""
    if args.head_selection:
        heads, mlps = load_component_selection(args.head_selection, layout)
        if args.method == "random_heads":  # the control: as many heads and MLPs, drawn among the unselected ones
            excluded = (heads, [*mlps, *args.exclude_mlps])
            heads, mlps = random_components(layout, len(heads), len(mlps), seed, exclude=excluded)
        return heads, mlps, {"head_selection": args.head_selection}
    k = resolve_head_count(args.num_heads, layout.total_heads) if args.num_heads else 0
    if not set(args.exclude_mlps) <= set(range(layout.num_layers)):
        raise ValueError(f"exclude_mlps={args.exclude_mlps}: the model has MLPs 0-{layout.num_layers - 1}.")
    candidates = layout.num_layers - len(set(args.exclude_mlps))
    if args.num_mlps > candidates or args.num_mlps < 0:
        raise ValueError(f"num_mlps={args.num_mlps}: the model has {candidates} MLPs outside exclude_mlps.")
    if args.method == "random_heads":
        heads, mlps = random_components(layout, k, args.num_mlps, seed, exclude=((), args.exclude_mlps))
        return heads, mlps, {}
    runs = load_attribution(args) if args.attribution_from else attribute(args, model, tokenizer, output_dir)
    head_score, mlp_score = runs[args.selection_score].head_effects, runs[args.mlp_selection_score].mlp_effects
    heads, mlps = top_components(head_score, mlp_score, k, args.num_mlps, args.selection_sign, args.exclude_mlps)
    check_selection(layout, heads, mlps)
    summary = {
        name: {
            "clean_logit_diff": r.clean_logit_diff,
            "corrupted_logit_diff": r.corrupted_logit_diff,
            "num_pairs": r.num_pairs,
            "concentration": r.concentration(),
            "top": r.ranked()[:10],
        }
        for name, r in runs.items()
    }
    if is_main:
        for result in runs.values():
            result.save(output_dir / "attribution", heads)
    return heads, mlps, summary


# --- evaluation ---------------------------------------------------------------------------------------------------
def category(record: dict, args: ArithHeadsArguments) -> str:
    same = (
        record["template"] in args.train_templates,
        record["op"] in args.train_ops,
        record["digits"] in args.train_digits,
    )
    if all(same):
        return "in_distribution"
    if not same[1]:
        return "other_ops"
    if same[0]:
        return "other_digits"
    return "other_templates" if same[2] else "other_templates_and_digits"


@torch.no_grad()
def evaluate_model(args: ArithHeadsArguments, model, tokenizer, base_model: str) -> dict:
    """Arithmetic accuracy by cell and category, the harness tasks, and closed-book recall (flat metric dict)."""
    model.eval()
    lm = EvalModel(model, tokenizer, batch_size=64, progress=False)
    metrics = {}
    if args.eval_per_cell:
        records = arithmetic_records(
            args.world_seed,
            args.eval_split,
            ops=ARITHMETIC_OPS,
            digits=args.eval_digits,
            templates=args.eval_templates,
            n_per_cell=args.eval_per_cell,
        )
        outputs = lm.generate([lm.encode(r["prompt"], chat=False) for r in records], max_new_tokens=8)
        hits, groups = {}, {}
        for record, output in zip(records, outputs):
            hit = float(parse_number(output) == record["answer"])
            hits.setdefault(f"arith_cell/{record['template']}_{record['op']}_{record['digits']}d", []).append(hit)
            groups.setdefault(f"arith_{category(record, args)}", []).append(hit)
        metrics |= {name: sum(v) / len(v) for name, v in sorted(groups.items())}
        metrics |= {name: sum(v) / len(v) for name, v in sorted(hits.items())}
    if args.eval_tasks and args.eval_limit:
        results = evaluate_in_process(
            model,
            tokenizer,
            list(args.eval_tasks),
            config={"model": base_model},
            batch_size=64,
            limit=args.eval_limit,
            chat_template="off",
            split=args.eval_split,
            haystack_file=args.eval_haystack_file,
            lengths=args.eval_lengths,
        ).results
        for task, values in results["results"].items():
            metrics |= {
                f"{task}/{name.split(',')[0]}": value
                for name, value in values.items()
                if "_stderr" not in name and isinstance(value, float)
            }
    if args.eval_limit:
        facts = closed_book_qa(build_world(args.world_seed), "train")[: args.eval_limit]
        outputs = lm.generate([lm.encode(QA_PROMPT.format(**r), chat=False) for r in facts], max_new_tokens=8)
        metrics["closed_book_recall"] = sum(matches(o, r["answer"]) for o, r in zip(outputs, facts)) / len(facts)
    return metrics


def evaluation_settings(args: ArithHeadsArguments, model_args) -> dict:
    """What the `before` metrics depend on: the base model and every evaluation option (for eval_before_from)."""
    names = ("world_seed", "train_ops", "train_digits", "train_templates")
    settings = {name: value for name, value in asdict(args).items() if name.startswith("eval_") or name in names}
    del settings["eval_before_from"]
    return settings | {"model": model_args.model_name_or_path, "revision": model_args.model_revision}


class Stopwatch:
    """Seconds spent in each phase of a run, for results.json."""

    def __init__(self):
        self.start, self.laps = time.time(), {}

    def lap(self, name: str) -> dict:
        now = time.time()
        self.laps[name], self.start = round(now - self.start, 1), now
        return self.laps


# --- training -----------------------------------------------------------------------------------------------------
def training_examples(args: ArithHeadsArguments, tokenizer) -> list[dict]:
    """Pre-tokenised {"input_ids", "labels"}: BOS + prompt (as the evaluation encodes it) + " ANSWER\n", the loss on
    the completion only. The completion ends the way the world's arithmetic text does (the next line follows), not
    with EOS: SFTTrainer appends EOS to a prompt/completion record, and for problems the model already solves that
    EOS (~19 nats on ctxaware-tiny, the answer ~0) is the whole loss, so training learned to stop, not to compute."""
    records = arithmetic_records(
        args.world_seed,
        args.train_split,
        ops=args.train_ops,
        digits=args.train_digits,
        templates=args.train_templates,
        n_per_cell=args.train_per_cell,
    )
    examples = []
    for record in records:
        prompt_ids = encode_prompt(tokenizer, record["prompt"])
        input_ids = encode_prompt(tokenizer, record["prompt"] + " " + record["answer"] + "\n")
        if input_ids[: len(prompt_ids)] != prompt_ids:
            raise ValueError(f"{record['prompt']!r}: the tokenizer merges the prompt's end with the answer.")
        examples.append({"input_ids": input_ids, "labels": [-100] * len(prompt_ids) + input_ids[len(prompt_ids) :]})
    return examples


def save_selection(args: ArithHeadsArguments, output_dir: Path, heads, mlps, layout: HeadLayout) -> None:
    """`head_selection.json`: the heads and MLPs chosen, with the scores that chose them."""
    save_head_selection(
        output_dir / "head_selection.json",
        heads,
        layout,
        mlp_layers=mlps,
        method=args.method,
        selection_score=args.selection_score,
        mlp_selection_score=args.mlp_selection_score,
    )


def main(
    args: ArithHeadsArguments, training_args: ArithHeadsTrainingConfig, model_args: ArithHeadsModelConfig
) -> dict:
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
    dtype = torch.bfloat16 if training_args.bf16 else torch.float32
    model = load_causal_lm(path, dtype=dtype, revision=model_args.model_revision).to(state.device)
    model.requires_grad_(False)
    layout = HeadLayout.from_model(model)
    examples = training_examples(args, tokenizer)
    random.Random(training_args.seed).shuffle(examples)
    dataset = Dataset.from_list(examples)
    results = {"method": args.method, "base_model": model_args.model_name_or_path, "train_records": len(examples)}
    clock = Stopwatch()
    results["eval_settings"] = evaluation_settings(args, model_args)
    if args.attribution_only:
        heads, mlps, attribution = select(
            args, layout, model, tokenizer, training_args.seed, output_dir, state.is_main_process
        )
        results |= {"heads": [list(h) for h in heads], "mlp_layers": mlps, "attribution": attribution}
        results["timings_s"] = clock.lap("selection")
        if state.is_main_process:
            save_selection(args, output_dir, heads, mlps, layout)
            write_json(output_dir / "results.json", results)
        return results
    if args.eval_before_from:
        earlier = json.loads(Path(args.eval_before_from).read_text())
        if earlier.get("eval_settings") != results["eval_settings"]:
            raise ValueError(
                f"eval_before_from {args.eval_before_from}: its base model and evaluation settings "
                f"{earlier.get('eval_settings')} differ from this run's {results['eval_settings']}."
            )
        results["before"], results["before_from"] = earlier["before"], args.eval_before_from
    else:
        results["before"] = evaluate_model(args, model, tokenizer, model_args.model_name_or_path)
    clock.lap("eval_before")

    adapter = None
    config = training_args
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
        values = {f.name: getattr(training_args, f.name) for f in fields(SFTConfig) if f.init}
        config = SFTConfig(**{**values, "learning_rate": args.lora_learning_rate})
    elif args.method == "full":
        model.requires_grad_(True)
    else:
        heads, mlps, attribution = select(
            args, layout, model, tokenizer, training_args.seed, output_dir, state.is_main_process
        )
        clock.lap("selection")
        results |= {"heads": [list(h) for h in heads], "mlp_layers": mlps, "attribution": attribution}
        training = {k: v for k, v in asdict(args).items() if k.startswith(("train_", "method", "kv_", "num_"))}
        training |= {"learning_rate": training_args.learning_rate, "num_train_epochs": training_args.num_train_epochs}
        adapter = HeadDeltaAdapter.for_model(
            model,
            heads,
            mlps,
            kv_policy=args.kv_policy,
            kv_lr_ratio=args.kv_lr_ratio,
            targets=args.delta_targets,
            base_model=model_args.model_name_or_path,
            base_model_revision=model_args.model_revision,
            training=training,
        )
        adapter.to(state.device).attach(model)
        if state.is_main_process:
            output_dir.mkdir(parents=True, exist_ok=True)
            save_selection(args, output_dir, heads, mlps, layout)
    results["trained_parameters"] = count_trainable(model)
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[RequireTrainingSteps()]
    )
    results["train_metrics"] = trainer.train().metrics
    clock.lap("train")
    # The logged loss curve: the first check that training had something to learn (see `training_examples`).
    results["train_loss"] = [[h["step"], h["loss"]] for h in trainer.state.log_history if "loss" in h]
    results["after"] = evaluate_model(args, model, tokenizer, model_args.model_name_or_path)
    results["timings_s"] = clock.lap("eval_after")
    results["change"] = {k: results["after"][k] - results["before"][k] for k in results["after"]}

    if state.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        eval_results = {"arith_heads": {k: v for k, v in results["after"].items() if not k.startswith("arith_cell/")}}
        if adapter is not None:
            adapter.save_pretrained(
                output_dir / "adapter", eval_results=eval_results, tags=["arithmetic", args.method]
            )
            if args.merge:
                adapter.merge(model).save_pretrained(output_dir / "merged")
                tokenizer.save_pretrained(output_dir / "merged")
        elif args.method == "lora":
            model.save_pretrained(output_dir / "adapter")
        else:
            model.save_pretrained(output_dir / "model")
            tokenizer.save_pretrained(output_dir / "model")
        write_json(output_dir / "results.json", results)
        if training_args.push_to_hub:
            repo_id = training_args.hub_model_id or output_dir.name
            if adapter is not None:
                adapter.push_to_hub(repo_id, private=training_args.hub_private_repo, eval_results=eval_results)
            else:
                model.push_to_hub(repo_id, private=training_args.hub_private_repo)
        print(json.dumps({k: results[k] for k in ("method", "trained_parameters", "change")}, indent=2))
    return results


if __name__ == "__main__":
    with usage_errors("arith_heads"):
        main(*TrlParser(CONFIG_CLASSES).parse_args_and_config())
