"""Context awareness's scientific check on the embedded tiny model, in one command on one GPU:

    python benchmarks/context_science.py --out runs/context_science

1. `ctxaware score` on the world's chat data: AUROC of both metrics (`attention`, `loglik_gain`) against the
   generator's labels (`kind`), their Spearman agreement, and the turns chosen for the indicator.
2. `recipes/context_sft.py` twice on the same data, steps and seed: vanilla SFT, and conditional SFT whose indicator
   goes on the turns chosen in 1.
3. `ctxaware eval` on the base model, vanilla and conditional SFT: counterfactual QA, extractive QA and attention
   allocation under the chat template (the trained models' allocation plotted against the base model's);
   counterfactual QA and arithmetic without it; NIAH with and without it; the conditional model again with the
   indicator appended to the questions (counterfactual QA and NIAH, with and without the template).
4. Targets: vanilla SFT lowers counterfactual-QA context accuracy under the chat template against the base model
   (the drop, > 0); conditional SFT with the indicator recovers >= 70% of it; conditional SFT's general skill
   (arithmetic, plain prompts: under the chat template every model scores 0, none was taught it) stays within 1
   point of vanilla's; both scores separate context-dependent from knowledge-aligned chats (AUROC >= 0.8).

The world's knowledge-aligned chats come in the `passage` form (`chat_sft(knowledge_form="passage")`): the user
pastes true facts about a known entity, the asked one among them, and the assistant answers in the sentence it
memorised. With the `bare` form (a question alone, the form the tiny model saw in pretraining), SFT has nothing to
learn (loss ~0.003 from the first step) and context use does not move. Writes `context_science.json`,
`context_science.md` and `attention_allocation.png` to --out; `--smoke` runs the pipeline at toy sizes on CPU.
"""

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from science_common import (
    RECIPES,
    at_least,
    at_most,
    command_line,
    eval_command,
    harness_metrics,
    launch_recipe,
    output_folder,
    run,
    science_parser,
)


CONFIG = RECIPES / "configs" / "context_sft" / "default.yaml"
INDICATOR = "<|context|>"
MODEL = "ctxaware-tiny"
CHAT_TASKS = "counterfactual_qa,extractive_qa,attention_allocation"
PLAIN_TASKS = "counterfactual_qa,arithmetic"  # arithmetic under the template is 0 for every model: never taught
RECOVERY_TARGET, GENERAL_TOLERANCE, AUROC_TARGET = 0.7, 0.01, 0.8


def parse_args() -> argparse.Namespace:
    parser = science_parser("context", __doc__)
    parser.add_argument("--records", type=int, default=2000, help="world chat records (scored and trained on)")
    parser.add_argument("--context_rate", type=float, default=0.25, help="share of context-dependent chats")
    parser.add_argument("--knowledge_form", choices=["bare", "passage"], default="passage")
    parser.add_argument("--select_by", choices=["attention", "loglik_gain"], default="loglik_gain")
    parser.add_argument("--percentile", type=float, default=25.0, help="top P%% of turns get the indicator")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--limit", type=int, default=500, help="eval records per task (counterfactual QA has 300)")
    parser.add_argument("--niah_limit", type=int, default=2, help="NIAH samples per length x depth cell")
    parser.add_argument("--workers", type=int, default=4, help="steps run at the same time")
    args = parser.parse_args()
    if args.smoke:
        args.records, args.epochs, args.limit, args.niah_limit, args.workers = 32, 1.0, 20, 1, 2
    return args


def world_flags(args) -> list[str]:
    return ["--world_context_rate", str(args.context_rate), "--world_knowledge_form", args.knowledge_form]


def sft_command(args, out: Path, mode: str) -> list[str]:
    scores = ["--scores_path", str(out / "scores")] if mode == "conditional" else []
    smoke = ["--max_steps", "2"] if args.smoke else []
    return launch_recipe(
        "context_sft",
        "--config",
        str(CONFIG),
        "--mode",
        mode,
        "--model_name_or_path",
        MODEL,
        "--dataset",
        "world",
        "--dataset_limit",
        str(args.records),
        *world_flags(args),
        "--num_train_epochs",
        str(args.epochs),
        "--per_device_train_batch_size",
        str(args.batch_size),
        "--learning_rate",
        str(args.learning_rate),
        "--seed",
        "0",
        "--logging_steps",
        "25",
        "--merge",
        "true",
        "--output_dir",
        str(out / mode),
        *scores,
        *smoke,
    )


def evaluation(args, out: Path, name: str, model: str, *flags: str) -> tuple[list[str], Path]:
    """(command, log) of one `ctxaware eval` whose results land in out/name."""
    batch = "8" if args.smoke else "64"
    command = eval_command(
        "--model", model, "--batch_size", batch, "--no_progress", "--output_path", str(out / name), *flags
    )
    return command, out / f"{name}.log"


def model_evaluations(args, out: Path, name: str) -> dict[str, tuple[list[str], Path]]:
    """One model's runs: context tasks and the allocation plot under the chat template (the trained models against
    the base model's allocation), counterfactual QA and arithmetic without it, NIAH with and without it."""
    model = MODEL if name == "base" else str(out / name / "merged")
    limit = ["--limit", str(args.limit)]
    baseline = [] if name == "base" else ["--attention_baseline", str(results_file(out / "base_chat"))]
    niah = ["--tasks", "niah", "--limit", str(args.niah_limit), *(["--lengths", "128"] if args.smoke else [])]
    runs = {
        f"{name}_chat": evaluation(
            args, out, f"{name}_chat", model, "--tasks", CHAT_TASKS, "--chat_template", "on", *limit, *baseline
        ),
        f"{name}_plain": evaluation(
            args, out, f"{name}_plain", model, "--tasks", PLAIN_TASKS, "--chat_template", "off", *limit
        ),
        f"{name}_niah": evaluation(args, out, f"{name}_niah", model, *niah),
    }
    if name == "conditional":  # the indicator appended to the questions, with and without the template
        indicator = ["--indicator", INDICATOR]
        runs |= {
            "conditional_indicator": evaluation(
                args, out, "conditional_indicator", model, "--tasks", "counterfactual_qa", *limit, *indicator
            ),
            "conditional_indicator_niah": evaluation(
                args, out, "conditional_indicator_niah", model, *niah, *indicator
            ),
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


def counterfactual(metrics: dict, variant: str) -> dict:
    cfqa = metrics["counterfactual_qa"]
    return {key: cfqa.get(f"{key}_{variant}") for key in ("context_rate", "memory_rate", "prefers_context", "acc")}


def target(value, goal: str, passed: bool) -> dict:
    return {"value": value, "target": goal, "pass": bool(passed)}


def targets(results: dict) -> dict:
    """The issue's targets (context rate: the share of counterfactual items whose answer follows the context)."""
    rates = {name: row["context_rate"] for name, row in results["counterfactual"].items()}
    base, vanilla, indicator = rates["base_chat"], rates["vanilla_chat"], rates["conditional_indicator_chat"]
    drop = None if None in (base, vanilla) else base - vanilla
    recovery = (indicator - vanilla) / drop if drop and drop > 0 and indicator is not None else None
    arithmetic = results["general"]["arithmetic_plain"]
    gap = arithmetic["conditional"] - arithmetic["vanilla"]
    aurocs = {m: results["scores"][f"auroc_{m}_vs_kind"] for m in ("attention", "loglik_gain")}
    return {
        "vanilla_drop_in_context_rate_chat": target(drop, "> 0", drop is not None and drop > 0),
        "recovery_with_indicator": target(recovery, f">= {RECOVERY_TARGET}", at_least(recovery, RECOVERY_TARGET)),
        "arithmetic_conditional_minus_vanilla": target(
            gap, f"|x| <= {GENERAL_TOLERANCE}", at_most(abs(gap), GENERAL_TOLERANCE)
        ),
        **{
            f"auroc_{metric}_vs_kind": target(value, f">= {AUROC_TARGET}", at_least(value, AUROC_TARGET))
            for metric, value in aurocs.items()
        },
    }


def collect(out: Path, names: list[str]) -> dict:
    metrics = {name: harness_metrics(out / name) for name in names}
    summary = json.loads((out / "scores" / "summary.json").read_text())
    models = ("base", "vanilla", "conditional")
    rows = {f"{m}_{v}": counterfactual(metrics[f"{m}_{v}"], v) for m in models for v in ("chat", "plain")}
    rows |= {
        f"conditional_indicator_{v}": counterfactual(metrics["conditional_indicator"], v) for v in ("chat", "plain")
    }
    return {
        "scores": {k: v for k, v in summary.items() if k != "config"} | selection_quality(out / "scores/scores.jsonl"),
        "counterfactual": rows,
        "general": {
            "arithmetic_plain": {m: metrics[f"{m}_plain"]["arithmetic"]["acc"] for m in models},
            "extractive_qa_chat_contains": {m: metrics[f"{m}_chat"]["extractive_qa"]["contains"] for m in models},
        },
        "attention_context_mass_chat": {
            m: metrics[f"{m}_chat"]["attention_allocation"]["context_mass"] for m in models
        },
        "niah": {
            name: {v: metrics[f"{name}_niah"]["niah"].get(f"acc_{v}") for v in ("plain", "chat")}
            for name in (*models, "conditional_indicator")
        },
        "training": {m: json.loads((out / m / "context_sft.json").read_text()) for m in ("vanilla", "conditional")},
        "raw": metrics,
    }


def plot_allocation(out: Path, path: Path) -> None:
    """Context mass per layer and head (chat template) of base, vanilla and conditional SFT, and per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = ("base", "vanilla", "conditional")
    masses = {}
    for name in names:
        extra = json.loads(results_file(out / f"{name}_chat").read_text())["extra"]["attention_allocation"]
        masses[name] = np.asarray(extra["mass"]["context"])
    fig, axes = plt.subplots(1, 4, figsize=(18, 0.35 * masses["base"].shape[0] + 2.5))
    for ax, name in zip(axes, names):
        image = ax.imshow(masses[name], vmin=0, vmax=1, aspect="auto", cmap="viridis")
        ax.set(title=f"{name}: context mass", xlabel="head", ylabel="layer")
    fig.colorbar(image, ax=axes[2])
    for name in names:
        axes[3].plot(masses[name].mean(1), marker="o", label=name)
    axes[3].set(title="mean over heads", xlabel="layer", ylabel="attention mass on the user's context")
    axes[3].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fmt(value, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


COUNTERFACTUAL_ROWS = {
    "base_chat": ("base", "chat", "-"),
    "base_plain": ("base", "plain", "-"),
    "vanilla_chat": ("vanilla SFT", "chat", "-"),
    "vanilla_plain": ("vanilla SFT", "plain", "-"),
    "conditional_chat": ("conditional SFT", "chat", "no"),
    "conditional_plain": ("conditional SFT", "plain", "no"),
    "conditional_indicator_chat": ("conditional SFT", "chat", "yes"),
    "conditional_indicator_plain": ("conditional SFT", "plain", "yes"),
}


def write_report(out: Path, summary: dict) -> str:
    r, settings = summary["results"], summary["settings"]
    scores = r["scores"]
    rows = [
        f"Scores of {scores['records']} world chats ({settings['knowledge_form']} knowledge form, context rate "
        f"{settings['context_rate']}): AUROC vs the generator's labels: attention "
        f"{fmt(scores['auroc_attention_vs_kind'])}, loglik_gain {fmt(scores['auroc_loglik_gain_vs_kind'])}; Spearman "
        f"between them {fmt(scores['spearman_attention_loglik_gain'])}. Indicator on the top {settings['percentile']}%"
        f" by {scores['select_by']}: {scores['records_chosen']} chats (precision {fmt(scores['precision_vs_kind'])}, "
        f"recall {fmt(scores['recall_vs_kind'])} against kind == context).",
        "",
        "Counterfactual QA (context rate / memory rate / prefers context: counterfactual items; acc: all items)",
        "",
        "| model | template | indicator | context rate | memory rate | prefers context | acc |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, (model, template, indicator) in COUNTERFACTUAL_ROWS.items():
        c = r["counterfactual"][key]
        rows.append(
            f"| {model} | {template} | {indicator} | {fmt(c['context_rate'])} | {fmt(c['memory_rate'])} | "
            f"{fmt(c['prefers_context'])} | {fmt(c['acc'])} |"
        )
    rows += [
        "",
        "| model | arithmetic (plain) | extractive QA (chat) | context mass (chat) | NIAH plain | NIAH chat |",
        "|---|---|---|---|---|---|",
    ]
    general = r["general"]
    for name in ("base", "vanilla", "conditional", "conditional_indicator"):
        niah = r["niah"][name]
        cells = [
            general["arithmetic_plain"].get(name),
            general["extractive_qa_chat_contains"].get(name),
            r["attention_context_mass_chat"].get(name),
            niah["plain"],
            niah["chat"],
        ]
        rows.append(f"| {name.replace('_', ' + ')} | " + " | ".join(map(fmt, cells)) + " |")
    rows += ["", "| target | value | goal | pass |", "|---|---|---|---|"]
    rows += [f"| {k} | {fmt(v['value'])} | {v['target']} | {v['pass']} |" for k, v in summary["targets"].items()]
    rows += ["", "Step wall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in summary["timings_s"].items())]
    text = "\n".join(rows) + "\n"
    (out / "context_science.md").write_text(text)
    return text


def main() -> None:
    args = parse_args()
    out = output_folder(args.out)
    os.environ.setdefault("OMP_NUM_THREADS", "2")  # several processes share the CPU cores
    start = time.time()
    score = [
        sys.executable,
        "-m",
        "ctxaware.cli",
        "score",
        "--model",
        MODEL,
        "--dataset",
        "world",
        "--limit",
        str(args.records),
        *world_flags(args),
        "--select_by",
        args.select_by,
        "--percentile",
        str(args.percentile),
        "--batch_size",
        "32",
        "--no_progress",
        "--output",
        str(out / "scores"),
    ]
    # Three phases of independent steps: the vanilla run, the scores and the base model's evaluations; then the
    # conditional run (it needs the scores) beside vanilla's evaluations; then the conditional model's.
    jobs = {"score": (score, out / "score.log"), "vanilla": (sft_command(args, out, "vanilla"), out / "vanilla.log")}
    timings = run_all(jobs | model_evaluations(args, out, "base"), args.workers)
    jobs = {"conditional": (sft_command(args, out, "conditional"), out / "conditional.log")}
    timings |= run_all(jobs | model_evaluations(args, out, "vanilla"), args.workers)
    conditional = model_evaluations(args, out, "conditional")
    timings |= run_all(conditional, args.workers)
    timings["total"] = time.time() - start
    names = [*model_evaluations(args, out, "base"), *model_evaluations(args, out, "vanilla"), *conditional]
    results = collect(out, names)
    plot_allocation(out, out / "attention_allocation.png")
    summary = {
        "command": command_line(),
        "settings": {k: v for k, v in vars(args).items() if k != "out"} | {"model": MODEL, "indicator": INDICATOR},
        "targets": targets(results),
        "results": results,
        "timings_s": timings,
    }
    (out / "context_science.json").write_text(json.dumps(summary, indent=2))
    print(write_report(out, summary))


if __name__ == "__main__":
    main()
