"""Context awareness's scientific check, in one command on one GPU: the embedded tiny model (default) or
SmolLM2-135M-Instruct.

    python benchmarks/context_science.py --out runs/context_science
    python benchmarks/context_science.py --model smollm2-135m --split validation --out runs/context_smollm2_val

1. `ctxaware score` on the world's chat data: AUROC of both metrics (`attention`, `loglik_gain`) against the
   generator's labels (`kind`), their Spearman agreement, and the turns chosen for the indicator.
2. `recipes/context_sft.py` on the same data, steps and seed: vanilla SFT, and conditional SFT whose indicator goes on
   the turns chosen in 1. The tiny model: one conditional run, its turns chosen by `--select_by`; SmolLM2: one per
   metric (`conditional_attention`, the paper's attention ratio, and `conditional_loglik_gain`).
3. `ctxaware eval` on the base model, vanilla and conditional SFT: counterfactual QA, extractive QA and attention
   allocation under the chat template (the trained models' allocation plotted against the base model's);
   counterfactual QA and arithmetic without it; NIAH with and without it; the conditional models again with the
   indicator appended to the questions (counterfactual QA, extractive QA and NIAH), under the template only: the
   indicator was trained inside the template's user turn, and appended to a plain prompt it is a format the model
   never saw, which lowers the tiny model's plain-prompt scores (docs/experiments/2026-12-06-tiny-indicator.md).
   SmolLM2 adds knowledge conflict on capitals it knows (`knowledge_conflict`: its real memory against a passage)
   with and without the template, also with the indicator, and replaces arithmetic by gsm8k under the template
   (zero-shot). `--split` (validation or test) is the evaluation split: settings are chosen on validation, test is
   scored once; training and scoring data are the world's train split.
4. Targets: vanilla SFT lowers the context rate (the share of conflicting items whose answer follows the context)
   under the chat template against the base model (the drop, > 0); conditional SFT with the indicator recovers >= 70%
   of it; conditional SFT's general skill stays within 1 point of vanilla's (tiny: arithmetic, plain prompts: under
   the chat template every model scores 0, none was taught it) or 2 points (SmolLM2: gsm8k and extractive QA under the
   template, without the indicator); both scores separate context-dependent from knowledge-aligned chats (AUROC >=
   0.8). SmolLM2 is checked on both context measures (counterfactual QA, knowledge conflict) and both selections.

The world's knowledge-aligned chats come in the `passage` form (`chat_sft(knowledge_form="passage")`): the user
pastes true facts about a known entity, the asked one among them, and the assistant answers in the sentence it
memorised. With the `bare` form (a question alone, the form the tiny model saw in pretraining), SFT has nothing to
learn (loss ~0.003 from the first step) and context use does not move. SmolLM2 never saw the world: for it these
chats teach the world's facts, which the counterfactual items then contradict, so its knowledge chats ask facts it
names closed-book (`context_chats.py`), after the passage `--knowledge_passage` picks (`agrees`, the default, or
`unrelated`: another fact's passage, the answer from memory). Writes `context_science.json`,
`context_science.md` and `attention_allocation.png` to --out; `--smoke` runs the pipeline at toy sizes on CPU.
"""

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from context_chats import KNOWLEDGE_PASSAGES, write_chats
from science_common import (
    RECIPES,
    at_least,
    at_most,
    command_line,
    eval_command,
    git_commit,
    harness_metrics,
    launch_recipe,
    output_folder,
    run,
    science_parser,
)


CONFIGS = RECIPES / "configs" / "context_sft"
INDICATOR = "<|context|>"
METRICS = ("attention", "loglik_gain")
RECOVERY_TARGET, AUROC_TARGET = 0.7, 0.8


@dataclass(frozen=True)
class Setup:
    """What the check runs for one model: the recipe's config, the evaluation runs, targets and default sizes."""

    config: Path
    chat_tasks: str  # under the chat template
    plain_tasks: str  # without it
    indicator_tasks: str  # the conditional models with the indicator appended to the questions (template on)
    conflicts: tuple[str, ...]  # tasks whose context rate measures context use
    general: dict[str, tuple[str, str, str, str]]  # result key -> (target name, run, task, metric)
    tolerance: float  # |conditional - vanilla| allowed on each general skill
    one_run_per_metric: bool  # a conditional run per scoring metric (else one, by --select_by)
    sizes: dict
    smoke: dict
    chats: str = "world"  # `world` (the world's chat_sft) or `known_facts` (context_chats.py: world + known facts)
    span: str = "user"  # what the scores measure dependence on: the whole user message, or the passage in it
    niah_lengths: tuple[str, ...] = ()
    recipe_flags: tuple[str, ...] = ()
    smoke_recipe_flags: tuple[str, ...] = ()


SETUPS = {
    "ctxaware-tiny": Setup(
        config=CONFIGS / "default.yaml",
        chat_tasks="counterfactual_qa,extractive_qa,attention_allocation",
        plain_tasks="counterfactual_qa,arithmetic",  # arithmetic under the template is 0 for every model: never taught
        indicator_tasks="counterfactual_qa,extractive_qa",
        conflicts=("counterfactual_qa",),
        general={
            "arithmetic_plain": ("arithmetic", "plain", "arithmetic", "acc"),
            "extractive_qa_chat_contains": ("", "chat", "extractive_qa", "contains"),  # tracked, no target
        },
        tolerance=0.01,
        one_run_per_metric=False,
        sizes={"records": 2000, "epochs": 2.0, "batch_size": 8, "learning_rate": 1e-3, "limit": 500, "workers": 4},
        smoke={"records": 32, "epochs": 1.0, "limit": 20, "niah_limit": 1, "workers": 2},
    ),
    "smollm2-135m": Setup(
        config=CONFIGS / "smollm2.yaml",
        chat_tasks="counterfactual_qa,knowledge_conflict,extractive_qa,gsm8k,attention_allocation",
        plain_tasks="counterfactual_qa,knowledge_conflict",
        indicator_tasks="counterfactual_qa,knowledge_conflict,extractive_qa",
        conflicts=("counterfactual_qa", "knowledge_conflict"),
        general={
            "gsm8k_chat_flexible": ("gsm8k_chat", "chat", "gsm8k", "exact_match_flexible"),
            "extractive_qa_chat_contains": ("extractive_qa_chat", "chat", "extractive_qa", "contains"),
        },
        tolerance=0.02,
        one_run_per_metric=True,
        # 3,200 chats at batch 16: 200 steps a run; 200 records per task (knowledge conflict has 48 a split).
        sizes={
            "split": "validation",  # test only when asked, once
            "records": 3200,
            "epochs": 1.0,
            "batch_size": 16,
            "learning_rate": 5e-4,
            "limit": 200,
            "workers": 6,
        },
        smoke={
            "records": 16,
            "epochs": 1.0,
            "batch_size": 4,
            "limit": 4,
            "niah_limit": 1,
            "workers": 2,
            "max_new_tokens": 16,
        },
        chats="known_facts",
        span="context",
        niah_lengths=("--lengths", "256,512,1024"),
        recipe_flags=("--chat_template_path", str(CONFIGS / "smollm2_chat_template.jinja")),
        smoke_recipe_flags=("--dtype", "float32"),  # CPU
    ),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = science_parser("context", __doc__)
    parser.add_argument("--model", choices=sorted(SETUPS), default="ctxaware-tiny")
    parser.add_argument(
        "--split",
        choices=["validation", "test"],
        help="evaluation split (tiny: each task's default; SmolLM2: validation)",
    )
    parser.add_argument("--records", type=int, help="chat records, scored and trained on (tiny 2000, SmolLM2 3200)")
    parser.add_argument(
        "--seed", type=int, default=0, help="training seed of every SFT run (the chats stay the same): a replicate"
    )
    parser.add_argument("--context_rate", type=float, default=0.25, help="share of context-dependent chats")
    parser.add_argument(
        "--knowledge_form", choices=["bare", "passage"], default="passage", help="tiny: the world's knowledge chats"
    )
    parser.add_argument(
        "--knowledge_passage",
        choices=list(KNOWLEDGE_PASSAGES),
        default="agrees",
        help="SmolLM2: the passage before a known fact's question (context_chats.py)",
    )
    parser.add_argument(
        "--select_by", choices=METRICS, default="loglik_gain", help="tiny: the metric that chooses the turns"
    )
    parser.add_argument("--percentile", type=float, default=25.0, help="top P%% of turns get the indicator")
    parser.add_argument("--epochs", type=float, help="tiny 2, SmolLM2 1")
    parser.add_argument("--batch_size", type=int, help="tiny 8, SmolLM2 16")
    parser.add_argument("--learning_rate", type=float, help="tiny 1e-3, SmolLM2 5e-4")
    parser.add_argument(
        "--limit", type=int, help="eval records per task (tiny 500, SmolLM2 200; counterfactual QA has 300)"
    )
    parser.add_argument("--niah_limit", type=int, default=2, help="NIAH samples per length x depth cell")
    parser.add_argument("--max_new_tokens", type=int, help="override every eval task's generation length")
    parser.add_argument("--workers", type=int, help="steps run at the same time (tiny 4, SmolLM2 6)")
    args = parser.parse_args(argv)
    setup = SETUPS[args.model]
    if setup.chats != "known_facts" and args.knowledge_passage != "agrees":
        parser.error(f"--knowledge_passage: {args.model} trains on the world's chats (see --knowledge_form)")
    for name, value in setup.sizes.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.smoke:
        for name, value in setup.smoke.items():
            setattr(args, name, value)
    return args


def conditionals(args) -> dict[str, str]:
    """The conditional runs: name -> the metric whose top turns get the indicator."""
    if SETUPS[args.model].one_run_per_metric:
        return {f"conditional_{metric}": metric for metric in METRICS}
    return {"conditional": args.select_by}


def score_folder(out: Path, args, name: str) -> Path:
    """`scores` for the one conditional run, `scores_<metric>` when there is one per metric."""
    return out / ("scores" if name == "conditional" else f"scores_{conditionals(args)[name]}")


def chats_file(out: Path) -> Path:
    return out / "chats.jsonl"


def write_chat_set(args, out: Path) -> dict | None:
    """The mixed set of a known-facts setup (the base model's closed-book probe first), else None."""
    if SETUPS[args.model].chats != "known_facts":
        return None
    return write_chats(chats_file(out), args.model, args.records, args.context_rate, args.knowledge_passage)


def data_flags(args, out: Path, dataset: str, limit: str) -> list[str]:
    """The chat data of the scores and the training runs: the world's (generated in each step) or the mixed set."""
    if SETUPS[args.model].chats == "known_facts":
        return [dataset, str(chats_file(out)), limit, str(args.records)]
    flags = ["--world_context_rate", str(args.context_rate), "--world_knowledge_form", args.knowledge_form]
    return [dataset, "world", limit, str(args.records), *flags]


def score_command(args, out: Path, name: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "ctxaware.cli",
        "score",
        "--model",
        args.model,
        *data_flags(args, out, "--dataset", "--limit"),
        "--span",
        SETUPS[args.model].span,
        "--select_by",
        conditionals(args)[name],
        "--percentile",
        str(args.percentile),
        "--batch_size",
        "32",
        "--no_progress",
        "--output",
        str(score_folder(out, args, name)),
    ]


def sft_command(args, out: Path, name: str) -> list[str]:
    setup = SETUPS[args.model]
    mode = "vanilla" if name == "vanilla" else "conditional"
    scores = ["--scores_path", str(score_folder(out, args, name))] if mode == "conditional" else []
    smoke = ["--max_steps", "2", *setup.smoke_recipe_flags] if args.smoke else []
    return launch_recipe(
        "context_sft",
        "--config",
        str(setup.config),
        "--mode",
        mode,
        "--model_name_or_path",
        args.model,
        *data_flags(args, out, "--dataset", "--dataset_limit"),
        "--num_train_epochs",
        str(args.epochs),
        "--per_device_train_batch_size",
        str(args.batch_size),
        "--learning_rate",
        str(args.learning_rate),
        "--seed",
        str(args.seed),
        "--logging_steps",
        "25",
        "--merge",
        "true",
        "--output_dir",
        str(out / name),
        *setup.recipe_flags,
        *scores,
        *smoke,
    )


def evaluation(args, out: Path, name: str, model: str, *flags: str) -> tuple[list[str], Path]:
    """(command, log) of one `ctxaware eval` whose results land in out/name."""
    batch = "8" if args.smoke else "64"
    common = [*(["--split", args.split] if args.split else [])]
    common += ["--max_new_tokens", str(args.max_new_tokens)] if args.max_new_tokens else []
    command = eval_command(
        "--model", model, "--batch_size", batch, "--no_progress", "--output_path", str(out / name), *common, *flags
    )
    return command, out / f"{name}.log"


def model_evaluations(args, out: Path, name: str) -> dict[str, tuple[list[str], Path]]:
    """One model's runs: context tasks and the allocation plot under the chat template (the trained models against
    the base model's allocation), the plain-prompt tasks, NIAH with and without the template; a conditional model
    also with the indicator appended to the questions, under the template (where it was trained)."""
    setup = SETUPS[args.model]
    model = args.model if name == "base" else str(out / name / "merged")
    limit = ["--limit", str(args.limit)]
    baseline = [] if name == "base" else ["--attention_baseline", str(results_file(out / "base_chat"))]
    lengths = ["--lengths", "128"] if args.smoke else list(setup.niah_lengths)
    niah = ["--tasks", "niah", "--limit", str(args.niah_limit), *lengths]
    runs = {
        f"{name}_chat": evaluation(
            args, out, f"{name}_chat", model, "--tasks", setup.chat_tasks, "--chat_template", "on", *limit, *baseline
        ),
        f"{name}_plain": evaluation(
            args, out, f"{name}_plain", model, "--tasks", setup.plain_tasks, "--chat_template", "off", *limit
        ),
        f"{name}_niah": evaluation(args, out, f"{name}_niah", model, *niah),
    }
    if name in conditionals(args):  # the indicator appended to the questions
        indicator = ["--indicator", INDICATOR, "--chat_template", "on"]
        tasks = ["--tasks", setup.indicator_tasks]
        runs |= {
            f"{name}_indicator": evaluation(args, out, f"{name}_indicator", model, *tasks, *limit, *indicator),
            f"{name}_indicator_niah": evaluation(args, out, f"{name}_indicator_niah", model, *niah, *indicator),
        }
    return runs


def results_file(folder: Path) -> Path:
    return sorted(folder.glob("*/results_*.json"))[-1]


def run_all(jobs: dict[str, tuple[list[str], Path]], workers: int) -> dict[str, float]:
    """Runs independent steps side by side; returns each one's wall time."""

    def timed(name):
        start = time.time()
        run(*jobs[name])
        return name, time.time() - start

    with ThreadPoolExecutor(workers) as pool:
        return dict(pool.map(timed, jobs))


def selection_quality(scores_file: Path) -> dict:
    """Precision and recall of the chosen records against the generator's `kind == "context"`."""
    rows = [json.loads(line) for line in scores_file.read_text().splitlines() if line.strip()]
    chosen = [r["kind"] == "context" for r in rows if r["context_dependent"]]
    positives = sum(r["kind"] == "context" for r in rows)
    return {
        "records_chosen": len(chosen),
        "precision_vs_kind": sum(chosen) / len(chosen) if chosen else None,
        "recall_vs_kind": sum(chosen) / positives if positives else None,
    }


CONFLICT_KEYS = ("context_rate", "memory_rate", "prefers_context", "acc")


def conflict_row(metrics: dict, task: str, variant: str) -> dict:
    """A context-use task's rates in one template variant (None where the run did not cover it)."""
    values = metrics.get(task, {})
    return {
        key: values.get(f"{key}_{variant}") for key in CONFLICT_KEYS if task == "counterfactual_qa" or key != "acc"
    }


CONFLICT_RESULTS = {"counterfactual_qa": "counterfactual", "knowledge_conflict": "knowledge_conflict"}


def target(value, goal: str, passed: bool) -> dict:
    return {"value": value, "target": goal, "pass": bool(passed)}


def targets(
    results: dict,
    runs: tuple[str, ...] = ("conditional",),
    measures: tuple[str, ...] = ("counterfactual",),
    general: dict[str, str] | None = None,
    tolerance: float = 0.01,
) -> dict:
    """The issue's targets (context rate: the share of conflicting items whose answer follows the context), for each
    context measure (`counterfactual`, `knowledge_conflict`), each conditional run and each general skill (result key
    -> target name; default: the tiny model's arithmetic). One run (`conditional`) and the counterfactual measure keep
    the plain target names; the others add the measure and the run's metric."""
    general = {"arithmetic_plain": "arithmetic"} if general is None else general
    out = {}
    for measure in measures:
        tag = "" if measure == "counterfactual" else f"_{measure}"
        rates = {name: row["context_rate"] for name, row in results[measure].items()}
        base, vanilla = rates["base_chat"], rates["vanilla_chat"]
        drop = None if None in (base, vanilla) else base - vanilla
        out[f"vanilla_drop_in_context_rate_chat{tag}"] = target(drop, "> 0", drop is not None and drop > 0)
        for run_name in runs:
            indicator = rates.get(f"{run_name}_indicator_chat")
            recovery = (indicator - vanilla) / drop if drop and drop > 0 and indicator is not None else None
            suffix = tag + run_name.removeprefix("conditional")
            out[f"recovery_with_indicator{suffix}"] = target(
                recovery, f">= {RECOVERY_TARGET}", at_least(recovery, RECOVERY_TARGET)
            )
    for key, short in general.items():
        values = results["general"][key]
        for run_name in runs:
            mine, theirs = values.get(run_name), values.get("vanilla")
            gap = None if None in (mine, theirs) else mine - theirs
            out[f"{short}_{run_name}_minus_vanilla"] = target(
                gap, f"|x| <= {tolerance}", gap is not None and at_most(abs(gap), tolerance)
            )
    aurocs = {m: results["scores"][f"auroc_{m}_vs_kind"] for m in METRICS}
    out |= {
        f"auroc_{metric}_vs_kind": target(value, f">= {AUROC_TARGET}", at_least(value, AUROC_TARGET))
        for metric, value in aurocs.items()
    }
    return out


def setup_targets(args, results: dict) -> dict:
    setup = SETUPS[args.model]
    return targets(
        results,
        tuple(conditionals(args)),
        tuple(CONFLICT_RESULTS[task] for task in setup.conflicts),
        {key: short for key, (short, *_) in setup.general.items() if short},
        setup.tolerance,
    )


def collect(args, out: Path, names: list[str]) -> dict:
    setup = SETUPS[args.model]
    runs = conditionals(args)
    models = ("base", "vanilla", *runs)
    metrics = {name: harness_metrics(out / name) for name in names}
    first = next(iter(runs))
    summary = json.loads((score_folder(out, args, first) / "summary.json").read_text())
    scores = {k: v for k, v in summary.items() if k != "config"} | selection_quality(
        score_folder(out, args, first) / "scores.jsonl"
    )
    if len(runs) > 1:
        scores["selections"] = {
            name: selection_quality(score_folder(out, args, name) / "scores.jsonl")
            | {"threshold": json.loads((score_folder(out, args, name) / "summary.json").read_text())["threshold"]}
            for name in runs
        }
    results = {"scores": scores}
    for task in setup.conflicts:
        rows = {f"{m}_{v}": conflict_row(metrics[f"{m}_{v}"], task, v) for m in models for v in ("chat", "plain")}
        rows |= {
            f"{r}_indicator_{v}": conflict_row(metrics[f"{r}_indicator"], task, v)
            for r in runs
            for v in ("chat", "plain")
        }
        results[CONFLICT_RESULTS[task]] = rows
    general = {}
    for key, (_, variant, task, metric) in setup.general.items():
        general[key] = {m: metrics[f"{m}_{variant}"][task][metric] for m in models}
        if variant == "chat" and task in setup.indicator_tasks.split(","):
            general[key] |= {f"{r}_indicator": metrics[f"{r}_indicator"][task][metric] for r in runs}
    return results | {
        "general": general,
        "attention_context_mass_chat": {
            m: metrics[f"{m}_chat"]["attention_allocation"]["context_mass"] for m in models
        },
        "niah": {
            name: {v: metrics[f"{name}_niah"]["niah"].get(f"acc_{v}") for v in ("plain", "chat")}
            for name in (*models, *(f"{r}_indicator" for r in runs))
        },
        "training": {m: json.loads((out / m / "context_sft.json").read_text()) for m in ("vanilla", *runs)},
        "raw": metrics,
    }


def plot_allocation(out: Path, names: tuple[str, ...], path: Path) -> None:
    """Context mass per layer and head (chat template) of each model, and per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    masses = {}
    for name in names:
        extra = json.loads(results_file(out / f"{name}_chat").read_text())["extra"]["attention_allocation"]
        masses[name] = np.asarray(extra["mass"]["context"])
    count = len(names)
    fig, axes = plt.subplots(1, count + 1, figsize=(4.5 * (count + 1), 0.35 * masses["base"].shape[0] + 2.5))
    for ax, name in zip(axes, names):
        image = ax.imshow(masses[name], vmin=0, vmax=1, aspect="auto", cmap="viridis")
        ax.set(title=f"{name}: context mass", xlabel="head", ylabel="layer")
    fig.colorbar(image, ax=axes[count - 1])
    for name in names:
        axes[count].plot(masses[name].mean(1), marker="o", label=name)
    axes[count].set(title="mean over heads", xlabel="layer", ylabel="attention mass on the user's context")
    axes[count].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fmt(value, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def model_label(name: str) -> str:
    """`base`, `vanilla SFT`, `conditional SFT` (+ its selection metric when there are several)."""
    if name in ("base", "vanilla"):
        return "base" if name == "base" else "vanilla SFT"
    metric = name.removeprefix("conditional").lstrip("_")
    return f"conditional SFT ({metric})" if metric else "conditional SFT"


def conflict_table(rows: dict, runs: tuple[str, ...]) -> list[str]:
    keys = list(next(iter(rows.values())))
    lines = [
        "| model | template | indicator | " + " | ".join(k.replace("_", " ") for k in keys) + " |",
        "|---|---|---|" + "---|" * len(keys),
    ]
    for name in ("base", "vanilla", *runs):
        for indicator in ("no", "yes") if name in runs else ("-",):
            for variant in ("chat", "plain"):
                row = rows[f"{name}{'_indicator' if indicator == 'yes' else ''}_{variant}"]
                if all(v is None for v in row.values()):
                    continue  # a variant this run did not cover
                cells = " | ".join(fmt(row[k]) for k in keys)
                lines.append(f"| {model_label(name)} | {variant} | {indicator} | {cells} |")
    return lines


def chat_set(results: dict, settings: dict) -> str:
    """What the scored and trained chats were, in words."""
    if chats := results.get("chats"):
        return (
            f"chats ({chats['context_chats']} context-dependent from the world, the others about "
            f"{len(chats['known_facts'])} facts the base model knows closed-book, "
            f"{KNOWLEDGE_PASSAGES[chats['knowledge_passage']]})"
        )
    return f"world chats ({settings['knowledge_form']} knowledge form, context rate {settings['context_rate']})"


def write_report(out: Path, summary: dict) -> str:
    r, settings = summary["results"], summary["settings"]
    scores = r["scores"]
    runs = tuple(settings["conditional_runs"])
    rows = [
        f"{settings['model']}, evaluation split {settings['split'] or 'task default'}. Scores of {scores['records']} "
        f"{chat_set(r, settings)}: AUROC vs the labels: attention {fmt(scores['auroc_attention_vs_kind'])}, loglik_gain "
        f"{fmt(scores['auroc_loglik_gain_vs_kind'])}; Spearman between them "
        f"{fmt(scores['spearman_attention_loglik_gain'])}.",
    ]
    for name, metric in settings["conditional_runs"].items():
        chosen = scores.get("selections", {}).get(name, scores)
        rows.append(
            f"Indicator on the top {settings['percentile']}% by {metric} ({name}): {chosen['records_chosen']} chats "
            f"(precision {fmt(chosen['precision_vs_kind'])}, recall {fmt(chosen['recall_vs_kind'])} against kind == "
            "context)."
        )
    titles = {
        "counterfactual": "Counterfactual QA (world; context rate / memory rate / prefers context: counterfactual "
        "items; acc: all items)",
        "knowledge_conflict": "Knowledge conflict (capitals the model names closed-book; rates over those)",
    }
    for measure, title in titles.items():
        if measure in r:
            rows += ["", title, "", *conflict_table(r[measure], runs)]
    general = r["general"]
    columns = [key.replace("_", " ") for key in general]
    rows += [
        "",
        "| model | " + " | ".join(columns) + " | context mass (chat) | NIAH plain | NIAH chat |",
        "|---|" + "---|" * (len(columns) + 3),
    ]
    for name in ("base", "vanilla", *(n for r_name in runs for n in (r_name, f"{r_name}_indicator"))):
        niah = r["niah"][name]
        cells = [
            *(values.get(name) for values in general.values()),
            r["attention_context_mass_chat"].get(name),
            niah["plain"],
            niah["chat"],
        ]
        rows.append(f"| {name.replace('_indicator', ' + indicator')} | " + " | ".join(map(fmt, cells)) + " |")
    rows += ["", "| target | value | goal | pass |", "|---|---|---|---|"]
    rows += [f"| {k} | {fmt(v['value'])} | {v['target']} | {v['pass']} |" for k, v in summary["targets"].items()]
    rows += ["", "Step wall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in summary["timings_s"].items())]
    text = "\n".join(rows) + "\n"
    (out / "context_science.md").write_text(text)
    return text


def run_settings(args) -> dict:
    """The run's settings as the JSON records them: every option but --out, the indicator and the conditional runs."""
    return {k: v for k, v in vars(args).items() if k != "out"} | {
        "indicator": INDICATOR,
        "conditional_runs": conditionals(args),
    }


def main() -> None:
    args = parse_args()
    out = output_folder(args.out)
    os.environ.setdefault("OMP_NUM_THREADS", "2")  # several processes share the CPU cores
    start = time.time()
    runs = conditionals(args)
    timings = {}
    if chats := write_chat_set(args, out):
        timings["chats"] = time.time() - start
    # Three phases of independent steps: the vanilla run, the scores and the base model's evaluations; then the
    # conditional runs (they need the scores) beside vanilla's evaluations; then the conditional models'.
    jobs = {
        f"score_{metric}" if len(runs) > 1 else "score": (score_command(args, out, name), None)
        for name, metric in runs.items()
    }
    jobs = {key: (command, out / f"{key}.log") for key, (command, _) in jobs.items()}
    jobs["vanilla"] = (sft_command(args, out, "vanilla"), out / "vanilla.log")
    timings |= run_all(jobs | model_evaluations(args, out, "base"), args.workers)
    jobs = {name: (sft_command(args, out, name), out / f"{name}.log") for name in runs}
    timings |= run_all(jobs | model_evaluations(args, out, "vanilla"), args.workers)
    conditional = {key: job for name in runs for key, job in model_evaluations(args, out, name).items()}
    timings |= run_all(conditional, args.workers)
    timings["total"] = time.time() - start
    names = [*model_evaluations(args, out, "base"), *model_evaluations(args, out, "vanilla"), *conditional]
    results = collect(args, out, names) | ({"chats": chats} if chats else {})
    plot_allocation(out, ("base", "vanilla", *runs), out / "attention_allocation.png")
    summary = {
        "command": command_line(),
        "git_tree": git_commit() or None,
        "settings": run_settings(args),
        "targets": setup_targets(args, results),
        "results": results,
        "timings_s": timings,
    }
    (out / "context_science.json").write_text(json.dumps(summary, indent=2))
    print(write_report(out, summary))


if __name__ == "__main__":
    main()
