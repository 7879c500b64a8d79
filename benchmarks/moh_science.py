"""MoH's scientific check on the embedded tiny model (issue 9), in one command on one GPU:

    python benchmarks/moh_science.py --out runs/moh_science

1. `recipes/moh.py` three times on the same data, steps and seed, trained at the same time: 75% of heads active
   (4 shared + top 2 of 4 routed), 50% active (2 shared + top 2 of 6 routed), and the dense control; MoH with the
   recipe's defaults: shared heads and the router's start from measured head importance, router at 0.1x the
   learning rate; rows of 512 tokens (the model's length, the longest pass key evaluated);
2. `ctxaware eval` of each on the world's tasks (counterfactual and extractive QA, arithmetic, pass key), the MoH
   models with their trained routers (`--moh on`);
3. the targets: the mean task score of MoH at 75% within 1 point of the dense control, at 50% within 3 points,
   and the routed heads' load (share of tokens over the fair share; 1 is balanced).
Writes `moh_science.json` and `moh_science.md` to --out. `--smoke` runs the pipeline at toy sizes on CPU. Other flags
go to the MoH runs (e.g. `--balance_coef 0.001`; the dense control has no router to take them); `--runs` picks runs.
"""

import json
import time

from science_common import (
    RECIPES,
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
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--learning_rate", type=float, default=3e-4)
    parser.add_argument("--limit", type=int, default=200, help="records per task (per length for passkey)")
    parser.add_argument("--seed", type=int, default=0, help="training seed of every run (the data stay the same)")
    parser.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of " + ", ".join(RUNS))
    args, moh_args = parser.parse_known_args()
    if unknown := set(args.runs.split(",")) - set(RUNS):
        parser.error(f"--runs: unknown {', '.join(sorted(unknown))}; choose among {', '.join(RUNS)}")
    runs = {name: RUNS[name] for name in args.runs.split(",")}  # without dense: scores only, no targets
    out = output_folder(args.out)
    steps, batch, seq_len, limit = args.steps, args.batch_size, args.seq_len, args.limit
    if args.smoke:
        steps, batch, seq_len, limit = 2, 2, 128, 2

    started = time.perf_counter()
    run_parallel([
        (launch_recipe("moh", "--config", str(RECIPES / "configs" / "moh" / "default.yaml"),
                       *recipe_args, *(moh_args if name != "dense" else []), "--max_steps", str(steps),
                       "--per_device_train_batch_size", str(batch), "--num_train_rows", str(steps * batch),
                       "--seq_len", str(seq_len), "--calibration_rows", str(min(16, steps * batch)),
                       "--learning_rate", str(args.learning_rate), "--seed", str(args.seed),
                       "--logging_steps", str(max(steps // 20, 1)), "--output_dir", str(out / name)),
         out / f"{name}.log")
        for name, (recipe_args, _) in runs.items()
    ])  # fmt: skip
    seconds = {"train": time.perf_counter() - started}
    evals = []
    for name in runs:
        model_args = ["--model", str(out / name / "model")]
        if name != "dense":
            model_args += ["--adapter", str(out / name / "adapter"), "--moh", "on"]
        evals.append((eval_command(*model_args, "--tasks", ",".join(TASK_METRICS), "--chat_template", "off",
                                   "--lengths", "256,512", "--limit", str(limit), "--no_progress",
                                   "--output_path", str(out / f"eval_{name}")), out / f"eval_{name}.log"))  # fmt: skip
    run_parallel(evals)
    seconds["eval"] = time.perf_counter() - started - seconds["train"]

    scores, training = {}, {}
    for name in runs:
        metrics = harness_metrics(out / f"eval_{name}")
        scores[name] = {task: 100 * metrics[task][metric] for task, metric in TASK_METRICS.items()}
        scores[name]["mean"] = sum(scores[name].values()) / len(TASK_METRICS)
        training[name] = json.loads((out / name / "results.json").read_text())
    targets = {}
    for name, (_, allowed) in runs.items():
        if allowed is not None and "dense" in scores:
            drop = scores["dense"]["mean"] - scores[name]["mean"]
            targets[name] = {"drop_points": drop, "allowed_points": allowed, "met": drop <= allowed}
    summary = {
        "command": command_line(),
        "settings": {
            "steps": steps,
            "batch_size": batch,
            "seq_len": seq_len,
            "learning_rate": args.learning_rate,
            "limit": limit,
            "seed": args.seed,
            "moh_args": moh_args,
        },
        "seconds": seconds,
        "task_scores": scores,
        "training": training,
        "targets": targets,
    }
    (out / "moh_science.json").write_text(json.dumps(summary, indent=2))
    report = (
        table(scores, training, targets) + f"\nSeconds: train {seconds['train']:.0f}, eval {seconds['eval']:.0f}\n"
    )
    (out / "moh_science.md").write_text(report)
    print(report)


def table(scores: dict, training: dict, targets: dict) -> str:
    """One row per run in `scores` (the runs that ran)."""
    header = [
        "model",
        "active",
        *TASK_METRICS,
        "mean",
        "drop vs dense (allowed)",
        "held-out loss (step 0)",
        "load max/min",
    ]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in scores:
        result = training[name]
        active = result.get("active_fraction", 1.0)
        target = targets.get(name)
        drop = "-"
        if target:
            drop = f"{target['drop_points']:+.1f} ({target['allowed_points']:.0f}): {'met' if target['met'] else 'missed'}"
        load = f"{result['load_max']:.2f} / {result['load_min']:.2f}" if "load_max" in result else "-"
        cells = [name, f"{active:.0%}", *(f"{scores[name][task]:.1f}" for task in [*TASK_METRICS, "mean"])]
        step0 = result.get("step0_eval_loss", result["dense_eval_loss"])
        cells += [drop, f"{result['eval_loss']:.3f} ({step0:.3f})", load]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    main()
