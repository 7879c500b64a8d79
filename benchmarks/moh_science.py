"""MoH's scientific check, in one command on one GPU, on the embedded tiny model or on SmolLM2-135M-Instruct:

    python benchmarks/moh_science.py --out runs/moh_science
    python benchmarks/moh_science.py --model smollm2-135m --split validation --out runs/moh_smollm2   # then test

1. `recipes/moh.py` three times on the same data, steps and seed (and again for every seed of `--seeds`; one run's
   noise is a few points, so the targets hold the mean drop over the seeds): about 75% of heads active, about 50%, and
   the dense control. MoH with the recipe's defaults (router at 0.01x the learning rate) except the calibration:
   shared heads and the router's start from head importance measured on `--calibration_rows` training rows, and
   `--off_head_bias` (none: a routed head left out adds nothing; mean: its mean output on the dense model), and
   `--distill_coef` (> 0: the MoH runs also learn from a frozen teacher, knowledge distillation: with
   `--distill_teacher base` the dense model before conversion; with `dense_control` the seed's dense control, trained
   first: the MoH runs of a seed start once its control has finished).
   - tiny (`recipes/configs/moh/default.yaml`): 4 shared + top 2 of 4 routed (75%), 2 shared + top 2 of 6 (50%);
     1200 steps of 16 rows of 512 tokens of the world's corpus (the model's length, the longest pass key evaluated),
     128 calibration rows; every run at once;
   - smollm2-135m (`recipes/configs/moh/smollm2.yaml`, 9 query heads per layer): 4 shared + top 3 of 5 (7/9 active),
     3 shared + top 2 of 6 (5/9); 200 steps of 8 rows of 1024 tokens in bf16: 400 rows of the `books` training portion
     (`--text_rows`) and the rest from the world's corpus (its tasks' training shard), 16 calibration rows;
     `--train_workers` trainings at a time (3: about 13 GB of GPU memory each), `--eval_workers` evaluations (9);
   `--moh75 S,K` / `--moh50 S,K` set the shared heads and top k of each (to choose them on validation).
2. `ctxaware eval` of each on the task suite of `--split` (the MoH models with their trained routers, `--moh on`),
   plain prompts: tiny: counterfactual and extractive QA, arithmetic, pass key at 256 and 512; smollm2: gsm8k (5-shot),
   counterfactual and extractive QA, pass key at 4k in the split's book, `--limit` records each; and held-out book
   perplexity (`long_ppl` on the split's `books` portion, `--ppl_windows` windows of `--ppl_length` tokens).
3. the targets, each seed against its own dense control, averaged over seeds (mean, sd, standard error and every
   seed reported): the mean task score of MoH at 75% within 1 point of the dense control, at 50% within 3 points; on
   smollm2 also the 75% model's book perplexity within 2% of the dense control's (50%'s reported). Also the routed
   heads' load (share of tokens over the fair share; 1 is balanced).
Writes `moh_science.json` (the command, git tree, settings, every per-seed number, the targets) and `moh_science.md` to
--out. `--smoke` runs the pipeline at toy sizes on CPU. Other flags go to the MoH runs after the check's own (so they
override them, e.g. `--balance_coef 0.001` or `--router_lr_ratio 0.1`; the dense control has no router to take them);
`--runs` picks runs. Settings are chosen with `--split validation`; `--split test` scores the chosen ones once.
"""

import json
import time
from dataclasses import dataclass

from bench_common import git_commit
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
    spread,
)


ALLOWED_DROP = {"moh75": 1.0, "moh50": 3.0}  # points of the mean task score below the dense control's
ALLOWED_PPL_RISE = {"moh75": 0.02}  # held-out book perplexity over the dense control's, as a fraction


def moh_runs(shapes: dict[str, tuple[int, int]]) -> dict:
    """{run: (recipe arguments, allowed drop in points)} for MoH runs of (shared heads, top k), and the dense control."""
    runs = {
        name: (["--num_shared_heads", str(shared), "--top_k", str(top_k)], ALLOWED_DROP[name])
        for name, (shared, top_k) in shapes.items()
    }
    return runs | {"dense": (["--dense_control", "true"], None)}


@dataclass(frozen=True)
class Profile:
    """What the check runs on one model: the recipe config, MoH shapes, sizes and the evaluation."""

    config: str  # file in recipes/configs/moh
    shapes: dict[str, tuple[int, int]]  # run: (shared heads, top k)
    tasks: dict[str, str]  # task: its headline metric (counterfactual QA: answers the context, no chat template)
    sizes: dict  # the check's defaults: steps, batch_size, seq_len, learning_rate, limit, calibration_rows, ...
    smoke: dict  # sizes under --smoke
    eval_flags: tuple[str, ...] = ()  # more `ctxaware eval` flags of the task run
    text_rows: bool = False  # the config trains on a named text data set (rows: --text_rows, the rest world rows)
    ppl: bool = False  # held-out book perplexity (long_ppl on the split's `books` portion)
    split: str | None = None  # --split default (None: ctxaware eval's own)
    train_workers: int | None = None  # trainings at a time (None: all)
    eval_workers: int | None = None  # evaluations at a time (None: all)


PROFILES = {
    "ctxaware-tiny": Profile(
        config="default.yaml",
        shapes={"moh75": (4, 2), "moh50": (2, 2)},
        tasks={
            "counterfactual_qa": "acc_plain",
            "extractive_qa": "exact_match",
            "arithmetic": "acc",
            "passkey": "acc",
        },
        sizes={
            "steps": 1200,
            "batch_size": 16,
            "seq_len": 512,
            "learning_rate": 3e-4,
            "limit": 400,
            "calibration_rows": 128,
            "lengths": "256,512",
        },
        smoke={"steps": 2, "batch_size": 2, "seq_len": 128, "limit": 2},
    ),
    "smollm2-135m": Profile(
        config="smollm2.yaml",
        shapes={"moh75": (4, 3), "moh50": (3, 2)},
        tasks={
            "gsm8k": "exact_match",
            "counterfactual_qa": "acc_plain",
            "extractive_qa": "exact_match",
            "passkey": "acc",
        },
        sizes={
            "steps": 200,
            "batch_size": 8,
            "seq_len": 1024,
            "learning_rate": 1e-4,
            "limit": 200,
            "calibration_rows": 16,
            "lengths": "4096",
            "text_rows": 400,
            "ppl_length": 1024,
            "ppl_windows": 100,
            "eval_batch_size": 32,
        },
        smoke={
            "steps": 2,
            "batch_size": 2,
            "seq_len": 128,
            "limit": 4,
            "calibration_rows": 1,  # head importance costs 30 layers x 10 forwards per batch: minutes on a CPU
            "lengths": "256",
            "text_rows": 2,
            "ppl_length": 128,
            "ppl_windows": 4,
            "eval_batch_size": 4,
        },
        eval_flags=("--haystack_file", "books"),
        text_rows=True,
        ppl=True,
        split="validation",
        train_workers=3,
        eval_workers=9,
    ),
}
RUNS = moh_runs(PROFILES["ctxaware-tiny"].shapes)  # the tiny model's runs
TASK_METRICS = PROFILES["ctxaware-tiny"].tasks


def parse_args():
    parser = science_parser("moh", __doc__)
    parser.add_argument("--model", default="ctxaware-tiny", choices=PROFILES, help="the model (and its settings)")
    parser.add_argument("--split", help="split evaluated: validation to choose settings, test to report")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--calibration_rows", type=int, help="rows head importance is measured on")
    parser.add_argument("--batch_size", type=int)
    parser.add_argument("--seq_len", type=int)
    parser.add_argument("--learning_rate", type=float)
    parser.add_argument("--limit", type=int, help="records per task (per length for passkey)")
    parser.add_argument("--lengths", help="pass-key lengths, comma-separated")
    parser.add_argument("--text_rows", type=int, help="smollm2: training rows of `books` (the rest: world rows)")
    parser.add_argument("--ppl_length", type=int, help="smollm2: tokens per perplexity window")
    parser.add_argument("--ppl_windows", type=int, help="smollm2: perplexity windows of the split's book")
    parser.add_argument("--eval_batch_size", type=int)
    parser.add_argument("--moh75", help="shared heads and top k of the ~75%% run, e.g. 4,3")
    parser.add_argument("--moh50", help="shared heads and top k of the ~50%% run, e.g. 3,2")
    parser.add_argument(
        "--off_head_bias",
        default="none",
        choices=("none", "mean"),
        help="MoH runs: a routed head left out adds nothing (none) or its mean output on the dense model (mean)",
    )
    parser.add_argument(
        "--distill_coef",
        type=float,
        default=0.0,
        help="MoH runs: weight of the KL divergence from a frozen teacher (--distill_teacher) to the MoH model's "
        "next-token distributions, added to the training loss (0: none; the dense control is never distilled)",
    )
    parser.add_argument(
        "--distill_temperature", type=float, default=1.0, help="MoH runs: temperature of the distillation loss"
    )
    parser.add_argument(
        "--distill_teacher",
        default="base",
        choices=("base", "dense_control"),
        help="MoH runs' teacher: the dense model before conversion (base), or the same seed's dense control "
        "(dense_control: the controls train first, then the MoH runs)",
    )
    parser.add_argument("--train_workers", type=int, help="trainings at a time (default: the model's)")
    parser.add_argument("--eval_workers", type=int, help="evaluations at a time (default: the model's)")
    parser.add_argument(
        "--seeds",
        default="0,1,2",
        help="training seeds, comma-separated: every run once per seed; the targets hold the drop averaged over "
        "seeds (the data stay the same)",
    )
    parser.add_argument("--runs", default="moh75,moh50,dense", help="comma-separated subset of moh75, moh50, dense")
    args, moh_args = parser.parse_known_args()
    profile = PROFILES[args.model]
    sizes = profile.sizes | (profile.smoke if args.smoke else {})
    for key, value in sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    shapes = dict(profile.shapes)
    for name in shapes:
        if (given := getattr(args, name)) is not None:
            try:
                shared, top_k = (int(x) for x in given.split(","))
            except ValueError:
                parser.error(f"--{name} {given!r}: pass shared heads and top k, e.g. 4,3")
            shapes[name] = (shared, top_k)
    runs = moh_runs(shapes)
    if unknown := set(args.runs.split(",")) - set(runs):
        parser.error(f"--runs: unknown {', '.join(sorted(unknown))}; choose among {', '.join(runs)}")
    args.runs = {name: runs[name] for name in args.runs.split(",")}  # without dense: scores only, no targets
    args.split = args.split or profile.split
    args.train_workers = args.train_workers or profile.train_workers
    args.eval_workers = args.eval_workers or profile.eval_workers
    if args.distill_teacher == "dense_control" and not (args.distill_coef > 0 and "dense" in args.runs):
        parser.error("--distill_teacher dense_control: pass --distill_coef > 0 and keep dense in --runs")
    if profile.text_rows and not 0 < args.text_rows <= args.steps * args.batch_size:
        parser.error(f"--text_rows {args.text_rows}: choose 1 to steps x batch_size ({args.steps * args.batch_size})")
    return args, moh_args, profile


def moh_flags(args, moh_args: list[str]) -> list[str]:
    """The flags of the MoH runs (not the dense control's): the check's MoH options, then the passed-on flags, which
    override them."""
    return [
        "--calibration_rows",
        str(args.calibration_rows),
        "--off_head_bias",
        args.off_head_bias,
        "--distill_coef",
        str(args.distill_coef),
        "--distill_temperature",
        str(args.distill_temperature),
        *moh_args,
    ]


def recipe_command(args, profile: Profile, name: str, seed: int, folder, moh_flags: list[str]) -> list[str]:
    rows = args.steps * args.batch_size
    data = ["--num_train_rows", str(rows)]
    if profile.text_rows:  # the named text's rows, the rest from the world's corpus
        data = ["--num_train_rows", str(args.text_rows), "--num_world_rows", str(rows - args.text_rows)]
    return launch_recipe(
        "moh",
        "--config",
        str(RECIPES / "configs" / "moh" / profile.config),
        *args.runs[name][0],
        "--max_steps",
        str(args.steps),
        "--per_device_train_batch_size",
        str(args.batch_size),
        *data,
        "--seq_len",
        str(args.seq_len),
        "--learning_rate",
        str(args.learning_rate),
        "--seed",
        str(seed),
        "--logging_steps",
        str(max(args.steps // 20, 1)),
        "--output_dir",
        str(folder),
        *(moh_flags if name != "dense" else []),
    )


def eval_commands(args, profile: Profile, name: str, folder) -> list[tuple[list[str], object]]:
    """The task run (`eval_NAME`) and, where the profile has it, the book perplexity run (`ppl_NAME`) of one model."""
    model = ["--model", str(folder / "model")]
    if name != "dense":
        model += ["--adapter", str(folder / "adapter"), "--moh", "on"]
    common = ["--split", args.split] if args.split else []
    if args.eval_batch_size:
        common += ["--batch_size", str(args.eval_batch_size)]
    tasks = [
        *model,
        "--tasks",
        ",".join(profile.tasks),
        "--chat_template",
        "off",
        "--lengths",
        args.lengths,
        *profile.eval_flags,
        "--limit",
        str(args.limit),
        *common,
        "--no_progress",
        "--output_path",
        str(folder.parent / f"eval_{name}"),
    ]
    commands = [(eval_command(*tasks), folder.parent / f"eval_{name}.log")]
    if profile.ppl:
        ppl = [
            *model,
            "--tasks",
            "long_ppl",
            "--haystack_file",
            "books",
            "--lengths",
            str(args.ppl_length),
            "--limit",
            str(args.ppl_windows),
            *common,
            "--no_progress",
            "--output_path",
            str(folder.parent / f"ppl_{name}"),
        ]
        commands.append((eval_command(*ppl), folder.parent / f"ppl_{name}.log"))
    return commands


def train(args, profile: Profile, folders: dict, flags: list[str]) -> None:
    """Every (seed, run) training of `folders`, `--train_workers` at a time; with `--distill_teacher dense_control`,
    the dense controls first, then the MoH runs, each distilled from its seed's control."""
    if args.distill_teacher == "base":
        phases = [list(folders)]
    else:
        phases = [[key for key in folders if key[1] == "dense"], [key for key in folders if key[1] != "dense"]]
    for phase in phases:
        jobs = []
        for seed, name in phase:
            teacher = ["--distill_teacher", str(folders[seed, "dense"])] if args.distill_teacher != "base" else []
            command = recipe_command(args, profile, name, seed, folders[seed, name], [*teacher, *flags])
            jobs.append((command, folders[seed, name].with_suffix(".log")))
        run_parallel(jobs, workers=args.train_workers)


def main() -> None:
    args, moh_args, profile = parse_args()
    runs, seeds = args.runs, [int(seed) for seed in args.seeds.split(",")]
    out = output_folder(args.out)
    folders = {(seed, name): out / f"seed{seed}" / name for seed in seeds for name in runs}
    for folder in folders.values():
        folder.parent.mkdir(exist_ok=True)

    started = time.perf_counter()
    train(args, profile, folders, moh_flags(args, moh_args))
    seconds = {"train": time.perf_counter() - started}
    evals = [job for (_, name), folder in folders.items() for job in eval_commands(args, profile, name, folder)]
    run_parallel(evals, workers=args.eval_workers)
    seconds["eval"] = time.perf_counter() - started - seconds["train"]

    scores, training, ppl = {seed: {} for seed in seeds}, {seed: {} for seed in seeds}, {seed: {} for seed in seeds}
    for (seed, name), folder in folders.items():
        scores[seed][name] = task_scores(harness_metrics(folder.parent / f"eval_{name}"), profile.tasks)
        training[seed][name] = json.loads((folder / "results.json").read_text())
        if profile.ppl:
            ppl[seed][name] = harness_metrics(folder.parent / f"ppl_{name}")["long_ppl"][f"ppl_len{args.ppl_length}"]
    targets = drop_targets(scores, runs)
    if profile.ppl:
        targets = ppl_targets(targets, ppl)
    summary = {
        "command": command_line(),
        "git": git_commit(),
        "model": args.model,
        "split": args.split,
        "settings": {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "learning_rate": args.learning_rate,
            "limit": args.limit,
            "seeds": seeds,
            "calibration_rows": args.calibration_rows,
            "off_head_bias": args.off_head_bias,
            "distill_coef": args.distill_coef,
            "distill_temperature": args.distill_temperature,
            "distill_teacher": args.distill_teacher,
            "moh_args": moh_args,
            "runs": {name: run[0] for name, run in runs.items()},
            "tasks": profile.tasks,
            "pass_key_lengths": args.lengths,
            "workers": {"train": args.train_workers, "eval": args.eval_workers},
        }
        | (
            {"text_rows": args.text_rows, "world_rows": args.steps * args.batch_size - args.text_rows}
            if profile.text_rows
            else {}
        )
        | ({"ppl_length": args.ppl_length, "ppl_windows": args.ppl_windows} if profile.ppl else {}),
        "seconds": seconds,
        "task_scores": scores,
        "book_ppl": ppl if profile.ppl else None,
        "training": training,
        "targets": targets,
    }
    write_summary(out, summary, runs, profile.tasks)


def write_summary(out, summary: dict, runs: dict, tasks: dict) -> None:
    """moh_science.json and moh_science.md (each seed's table, the targets over seeds) to folder `out`."""
    (out / "moh_science.json").write_text(json.dumps(summary, indent=2))
    scores, training, ppl = summary["task_scores"], summary["training"], summary["book_ppl"]
    report = (
        f"Command: `{summary['command']}` (tree {summary['git'][:10]}, split {summary['split'] or 'eval default'})"
    )
    report += "\n\n" + "\n".join(
        f"Seed {seed}:\n\n" + table(scores[seed], training[seed], runs, tasks, ppl[seed] if ppl else None)
        for seed in scores
    )
    seconds = summary["seconds"]
    report += (
        "\n"
        + targets_table(summary["targets"])
        + f"\nSeconds: train {seconds['train']:.0f}, eval {seconds['eval']:.0f}\n"
    )
    (out / "moh_science.md").write_text(report)
    print(report)


def task_scores(metrics: dict, tasks: dict | None = None) -> dict:
    """{task: headline metric in points} of one run's harness metrics (`tasks`: {task: metric}, default the tiny
    model's), and their unweighted mean."""
    tasks = tasks or TASK_METRICS
    scores = {task: 100 * metrics[task][metric] for task, metric in tasks.items()}
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
            stats = spread(drops)
            targets[name] = {
                "drop_points": stats["mean"],
                "drop_sd": stats["sd"],
                "drop_stderr": stats["stderr"],
                "drops_per_seed": drops,
                "allowed_points": allowed,
                "met": at_most(stats["mean"], allowed),
            }
    return targets


def ppl_targets(targets: dict, ppl: dict) -> dict:
    """`drop_targets`' targets with each run's held-out book perplexity over the dense control's of the same seed (a
    fraction; ppl: {seed: {run: perplexity}}), averaged over seeds, and where the run has an allowance, whether it
    stays within it (`ppl_met`) and both targets are met (`met_both`)."""
    merged = {}
    for name, target in targets.items():
        rises = [by_run[name] / by_run["dense"] - 1 for by_run in ppl.values()]
        stats = spread(rises)
        target = target | {
            "ppl_rise": stats["mean"],
            "ppl_rise_sd": stats["sd"],
            "ppl_rise_stderr": stats["stderr"],
            "ppl_rises_per_seed": rises,
        }
        if (allowed := ALLOWED_PPL_RISE.get(name)) is not None:
            met = at_most(stats["mean"], allowed)
            target |= {"allowed_ppl_rise": allowed, "ppl_met": met, "met_both": target["met"] and met}
        merged[name] = target
    return merged


def table(scores: dict, training: dict, runs: dict, tasks: dict | None = None, ppl: dict | None = None) -> str:
    """One seed's runs: task scores, drop of the mean against that seed's dense control, book perplexity, loss and
    load."""
    tasks = tasks or TASK_METRICS
    header = ["model", "active", *tasks, "mean", "drop vs dense"]
    header += ["book ppl"] if ppl else []
    header += ["held-out loss (step 0)", "load max/min"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in scores:
        result = training[name]
        active = result.get("active_fraction", 1.0)
        drop = "-"
        if runs[name][1] is not None and "dense" in scores:
            drop = f"{scores['dense']['mean'] - scores[name]['mean']:+.1f}"
        load = f"{result['load_max']:.2f} / {result['load_min']:.2f}" if "load_max" in result else "-"
        cells = [name, f"{active:.0%}", *(f"{scores[name][task]:.1f}" for task in [*tasks, "mean"]), drop]
        cells += [f"{ppl[name]:.3f}"] if ppl else []
        step0 = result.get("step0_eval_loss", result["dense_eval_loss"])
        cells += [f"{result['eval_loss']:.3f} ({step0:.3f})", load]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def targets_table(targets: dict) -> str:
    """The targets on the drop averaged over seeds, with each seed's drop, their sd and standard error (and the book
    perplexity's rise where measured)."""
    if not targets:
        return "No targets: the dense control did not run.\n"
    with_ppl = any("ppl_rise" in target for target in targets.values())

    def number(value, spec):
        return "-" if value is None else format(value, spec)

    header = "| model | drop per seed | mean drop | sd | stderr | allowed | met |"
    if with_ppl:
        header += " ppl rise per seed | mean rise | sd | stderr | allowed | met | both met |"
    rows = [header, "|" + "---|" * (header.count("|") - 1)]
    for name, target in targets.items():
        drops = target["drops_per_seed"]
        row = (
            f"| {name} | {' / '.join(f'{d:+.1f}' for d in drops)} | {target['drop_points']:+.1f} "
            f"| {number(target['drop_sd'], '.1f')} | {number(target['drop_stderr'], '.1f')} "
            f"| {target['allowed_points']:.0f} | {'yes' if target['met'] else 'no'} |"
        )
        if with_ppl:
            rises = target["ppl_rises_per_seed"]
            allowed = target.get("allowed_ppl_rise")
            row += (
                f" {' / '.join(f'{r:+.2%}' for r in rises)} | {target['ppl_rise']:+.2%} "
                f"| {number(target['ppl_rise_sd'], '.2%')} | {number(target['ppl_rise_stderr'], '.2%')} "
                f"| {number(allowed, '.0%')} | {'-' if allowed is None else ('yes' if target['ppl_met'] else 'no')} "
                f"| {'yes' if target.get('met_both', target['met']) else 'no'} |"
            )
        rows.append(row)
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    main()
