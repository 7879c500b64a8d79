"""MoH's scientific check on the embedded tiny model, in one command on one GPU:

    python benchmarks/moh_science.py --out runs/moh_science

1. `recipes/moh.py` three times on the same data, steps and seed, trained at the same time (and again for every seed
   of `--seeds`, all at once; one run's noise is a few points, so the targets hold the mean drop over the seeds): 75%
   of heads active (4 shared + top 2 of 4 routed), 50% active (2 shared + top 2 of 6 routed), and the dense control;
   MoH with the recipe's defaults (router at 0.01x the learning rate) except the calibration: shared heads and the
   router's start from head importance measured on 128 rows; 1200 steps of 16 rows of 512 tokens (the model's length,
   the longest pass key evaluated);
2. `ctxaware eval` of each on the world's tasks (counterfactual and extractive QA, arithmetic, pass key), the MoH
   models with their trained routers (`--moh on`);
3. the targets: the mean task score of MoH at 75% within 1 point of the dense control, at 50% within 3 points
   (each seed against its own dense control, averaged over seeds), and the routed heads' load (share of tokens over
   the fair share; 1 is balanced).
Writes `moh_science.json` and `moh_science.md` to --out. `--smoke` runs the pipeline at toy sizes on CPU. Other flags
go to the MoH runs after the check's own (so they override them, e.g. `--balance_coef 0.001` or `--router_lr_ratio
0.1`; the dense control has no router to take them); `--runs` picks runs.
"""

import json
import statistics
import time

from science_common import (
    RECIPES,
    at_most,
    command_line,
    eval_command,
    harness_metrics,
    launch_recipe,
    output_folder,
    run_parallel,
    science_parser,
)


RUNS = {  # name: (recipe arguments, allowed drop of the mean task score against the dense control, in points)
    "moh75": (["--num_shared_heads", "4", "--top_k", "2"], 1.0),
    "moh50": (["--num_shared_heads", "2", "--top_k", "2"], 3.0),
    "dense": (["--dense_control", "true"], None),
}
# The headline metric of each task (counterfactual QA: answers the context, without the chat template).
TASK_METRICS = {
    "counterfactual_qa": "acc_plain",
    "extractive_qa": "exact_match",
    "arithmetic": "acc",
    "passkey": "acc",
}


def main() -> None:
    parser = science_parser("moh", __doc__)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--calibration_rows", type=int, default=128, help="rows head importance is measured on")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--learning_rate", type=float, default=3e-4)
    parser.add_argument("--limit", type=int, default=400, help="records per task (per length for passkey)")
    parser.add_argument(
        "--seeds",
        default="0,1,2",
        help="training seeds, comma-separated: every run once per seed, all "
        "at once; the targets hold the drop averaged over seeds (the data stay the same)",
    )
    parser.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of " + ", ".join(RUNS))
    args, moh_args = parser.parse_known_args()
    if unknown := set(args.runs.split(",")) - set(RUNS):
        parser.error(f"--runs: unknown {', '.join(sorted(unknown))}; choose among {', '.join(RUNS)}")
    runs = {name: RUNS[name] for name in args.runs.split(",")}  # without dense: scores only, no targets
    seeds = [int(seed) for seed in args.seeds.split(",")]
    out = output_folder(args.out)
    steps, batch, seq_len, limit = args.steps, args.batch_size, args.seq_len, args.limit
    if args.smoke:
        steps, batch, seq_len, limit = 2, 2, 128, 2
    folders = {(seed, name): out / f"seed{seed}" / name for seed in seeds for name in runs}
    for folder in folders.values():
        folder.parent.mkdir(exist_ok=True)

    moh_flags = ["--calibration_rows", str(args.calibration_rows), *moh_args]  # last: passed-on flags override
    started = time.perf_counter()
    run_parallel(
        [
            (
                launch_recipe(
                    "moh",
                    "--config",
                    str(RECIPES / "configs" / "moh" / "default.yaml"),
                    *runs[name][0],
                    "--max_steps",
                    str(steps),
                    "--per_device_train_batch_size",
                    str(batch),
                    "--num_train_rows",
                    str(steps * batch),
                    "--seq_len",
                    str(seq_len),
                    "--learning_rate",
                    str(args.learning_rate),
                    "--seed",
                    str(seed),
                    "--logging_steps",
                    str(max(steps // 20, 1)),
                    "--output_dir",
                    str(folder),
                    *(moh_flags if name != "dense" else []),
                ),
                folder.with_suffix(".log"),
            )
            for (seed, name), folder in folders.items()
        ]
    )
    seconds = {"train": time.perf_counter() - started}
    evals = []
    for (_, name), folder in folders.items():
        model_args = ["--model", str(folder / "model")]
        if name != "dense":
            model_args += ["--adapter", str(folder / "adapter"), "--moh", "on"]
        evals.append(
            (
                eval_command(
                    *model_args,
                    "--tasks",
                    ",".join(TASK_METRICS),
                    "--chat_template",
                    "off",
                    "--lengths",
                    "256,512",
                    "--limit",
                    str(limit),
                    "--no_progress",
                    "--output_path",
                    str(folder.parent / f"eval_{name}"),
                ),
                folder.parent / f"eval_{name}.log",
            )
        )
    run_parallel(evals)
    seconds["eval"] = time.perf_counter() - started - seconds["train"]

    scores, training = {seed: {} for seed in seeds}, {seed: {} for seed in seeds}
    for (seed, name), folder in folders.items():
        scores[seed][name] = task_scores(harness_metrics(folder.parent / f"eval_{name}"))
        training[seed][name] = json.loads((folder / "results.json").read_text())
    targets = drop_targets(scores, runs)
    summary = {
        "command": command_line(),
        "settings": {
            "steps": steps,
            "batch_size": batch,
            "seq_len": seq_len,
            "learning_rate": args.learning_rate,
            "limit": limit,
            "seeds": seeds,
            "calibration_rows": args.calibration_rows,
            "moh_args": moh_args,
        },
        "seconds": seconds,
        "task_scores": scores,
        "training": training,
        "targets": targets,
    }
    (out / "moh_science.json").write_text(json.dumps(summary, indent=2))
    report = "\n".join(f"Seed {seed}:\n\n" + table(scores[seed], training[seed], runs) for seed in seeds)
    report += "\n" + targets_table(targets) + f"\nSeconds: train {seconds['train']:.0f}, eval {seconds['eval']:.0f}\n"
    (out / "moh_science.md").write_text(report)
    print(report)


def task_scores(metrics: dict) -> dict:
    """{task: headline metric in points} of one run's harness metrics, and their unweighted mean."""
    scores = {task: 100 * metrics[task][metric] for task, metric in TASK_METRICS.items()}
    return scores | {"mean": sum(scores.values()) / len(scores)}


def drop_targets(scores: dict, runs: dict) -> dict:
    """Per MoH run with an allowance: the mean task score's drop against the dense control of the same seed, averaged
    over the seeds of `scores` ({seed: {run: task_scores}}), and whether it stays within the allowance. No targets
    without the dense control."""
    if "dense" not in runs:
        return {}
    targets = {}
    for name, (_, allowed) in runs.items():
        if allowed is not None:
            drops = [by_run["dense"]["mean"] - by_run[name]["mean"] for by_run in scores.values()]
            mean = statistics.fmean(drops)
            targets[name] = {
                "drop_points": mean,
                "drops_per_seed": drops,
                "allowed_points": allowed,
                "met": at_most(mean, allowed),
            }
    return targets


def table(scores: dict, training: dict, runs: dict) -> str:
    """One seed's runs: task scores, drop of the mean against that seed's dense control, loss and load."""
    header = ["model", "active", *TASK_METRICS, "mean", "drop vs dense", "held-out loss (step 0)", "load max/min"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in scores:
        result = training[name]
        active = result.get("active_fraction", 1.0)
        drop = "-"
        if runs[name][1] is not None and "dense" in scores:
            drop = f"{scores['dense']['mean'] - scores[name]['mean']:+.1f}"
        load = f"{result['load_max']:.2f} / {result['load_min']:.2f}" if "load_max" in result else "-"
        cells = [name, f"{active:.0%}", *(f"{scores[name][task]:.1f}" for task in [*TASK_METRICS, "mean"])]
        step0 = result.get("step0_eval_loss", result["dense_eval_loss"])
        cells += [drop, f"{result['eval_loss']:.3f} ({step0:.3f})", load]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def targets_table(targets: dict) -> str:
    """The targets on the drop averaged over seeds, with each seed's drop and their spread."""
    if not targets:
        return "No targets: the dense control did not run.\n"
    rows = ["| model | drop per seed | mean drop | sd | allowed | met |", "|---|---|---|---|---|---|"]
    for name, target in targets.items():
        drops = target["drops_per_seed"]
        spread = f"{statistics.stdev(drops):.1f}" if len(drops) > 1 else "-"
        rows.append(
            f"| {name} | {' / '.join(f'{d:+.1f}' for d in drops)} | {target['drop_points']:+.1f} | {spread} "
            f"| {target['allowed_points']:.0f} | {'yes' if target['met'] else 'no'} |"
        )
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    main()
