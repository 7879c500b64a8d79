"""LoFiT's scientific check on the embedded tiny model, in one command on one GPU:

    python benchmarks/lofit_science.py --out runs/lofit_science

Runs `recipes/lofit.py` on its default config (world/truthful_qa, the world's analogue of LoFiT's TruthfulQA: a
passage states a false version of a memorised fact, the answer is the true fact; the base repeats the passage and
scores 0) with `--method lofit` (K = 5% of the heads), `all_heads` and `lora` at once, then `random_heads` (same K and
training seed, several draws among the heads LoFiT did not pick, so no draw repeats its selection), each at its own
learning rate (offsets 0.1, LoRA 2e-3), on the same records, steps and seed; each run scores the base and the tuned
model on the same held-out questions (its `results.json`). Targets: LoFiT's gain >= 90% of LoRA's, with >= 20x fewer
trained parameters, at <= 5% of the heads, and above every random draw. Writes `lofit_science.json` and
`lofit_science.md` to --out; the stage-1 head scores plot is `lofit/head_scores.png` there. `--config chat_qa.yaml`
runs the same check on the chat-format task of the previous GPU run; `--config known_facts_truthful.yaml --model
smollm2-135m` on facts SmolLM2 knows (a passage contradicts one, the answer is the true fact; the config gives the
full command). `--model smollm2-135m --test_split validation
--extra_eval_split test --one_at_a_time` runs it on a real model, scoring validation (for choices) and test, one run
at a time (CPU). `--smoke` runs the same pipeline at toy sizes on
CPU (checks the pipeline, not the method).
"""

import json
import math
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from science_common import RECIPES, at_least, at_most, command_line, launch_recipe, output_folder, run, science_parser


CONFIGS = RECIPES / "configs" / "lofit"
TARGET_GAIN_SHARE, TARGET_PARAM_RATIO, TARGET_HEAD_SHARE = 0.9, 20.0, 0.05


def main() -> None:
    args = parse_args()
    if args.smoke:
        args.train_samples, args.stage1_steps, args.eval_limit, args.head_seeds = 16, 2, 8, "0,1"
    out = output_folder(args.out)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # parallel runs on shared cores; the GPU does the arithmetic

    first, controls = planned_runs(args, out)
    start = time.time()
    walls = run_all(first, out, args.one_at_a_time)  # lofit, all_heads, lora at once; draws need lofit's heads
    walls |= run_all(controls, out, args.one_at_a_time)
    runs = {**first, **controls}
    print(f"[{time.time() - start:6.1f}s] all {len(runs)} runs done", flush=True)

    results = {name: collect(out, name, walls[name]) for name in runs}
    targets = evaluate_targets(results)
    if args.extra_eval_split:
        targets |= {
            f"{args.extra_eval_split}/{k}": v for k, v in evaluate_targets(results, args.extra_eval_split).items()
        }
    summary = {
        "command": command_line(),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "results": results,
        "targets": targets,
        "all_targets_met": all(t["passed"] for t in targets.values()),
        "head_scores_plot": "lofit/head_scores.png",
        "wall_s": round(time.time() - start, 1),
    }
    (out / "lofit_science.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = markdown(results, targets, summary)
    (out / "lofit_science.md").write_text(table)
    print(table)


def parse_args(argv: list[str] | None = None):
    parser = science_parser("lofit", __doc__)
    parser.add_argument("--config", default="default.yaml", help="a config of recipes/configs/lofit/ (its task)")
    parser.add_argument("--model", default=None, help="base model (embedded name, path or Hub id); default: config's")
    parser.add_argument("--test_split", default=None, help="held-out split scored per run; default: config's")
    parser.add_argument("--extra_eval_split", default=None, help="a second split scored per run (e.g. test)")
    parser.add_argument("--merge", action="store_true", help="the lofit run also writes its merged plain model")
    parser.add_argument("--one_at_a_time", action="store_true", help="runs in sequence (CPU), not at once")
    parser.add_argument("--train_samples", type=int, default=2000, help="training records (truthful_qa has 2,000)")
    parser.add_argument("--epochs", type=float, default=2.0, help="stage 2 (and LoRA, baselines) epochs")
    parser.add_argument(
        "--stage1_steps",
        type=int,
        default=800,
        help="LoFiT stage 1 (scales on all heads) steps: "
        "enough for the scales to fit the task, or their norms rank the wrong heads",
    )
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--offset_lr", type=float, default=0.1, help="offsets' learning rate (lofit, random_heads)")
    parser.add_argument("--all_heads_lr", type=float, default=0.1, help="64 heads' offsets add up: 1.0 diverges")
    parser.add_argument("--lora_lr", type=float, default=2e-3)
    parser.add_argument("--num_heads", type=float, default=0.05, help="K, a count or a fraction of the heads")
    parser.add_argument("--head_seeds", default="0,1,2", help="random_heads draws (the training seed is --seed)")
    parser.add_argument("--seed", type=int, default=0, help="training seed of every run (the data stay the same)")
    parser.add_argument(
        "--eval_limit", type=int, default=300, help="held-out records scored per run (truthful_qa: 300, chat_qa: 390)"
    )
    return parser.parse_args(argv)


def planned_runs(args, out: Path) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """({run name: recipe command} of lofit, all_heads and lora; of the random draws, which avoid lofit's heads): the
    same data, steps and training seed for every method."""
    common = [
        "--config",
        str(CONFIGS / args.config),
        "--max_train_samples",
        str(args.train_samples),
        "--eval_limit",
        str(args.eval_limit),
        "--num_heads",
        str(args.num_heads),
        "--per_device_train_batch_size",
        str(args.batch_size),
        "--num_train_epochs",
        str(args.epochs),
        "--stage1_max_steps",
        str(args.stage1_steps),
        "--seed",
        str(args.seed),
        "--disable_tqdm",
        "true",
        "--logging_steps",
        "50",
    ]
    if args.smoke:  # two optimizer steps per stage
        common += ["--max_steps", "2"]
    for option, value in (
        ("--model_name_or_path", args.model),
        ("--dataset_test_split", args.test_split),
        ("--extra_eval_split", args.extra_eval_split),
    ):
        common += [option, value] if value else []
    offsets = ["--learning_rate", str(args.offset_lr)]
    first = {
        "lofit": ["--method", "lofit", *offsets, *(["--merge", "true"] if args.merge else [])],
        "all_heads": ["--method", "all_heads", "--learning_rate", str(args.all_heads_lr)],
        "lora": ["--method", "lora", "--lora_learning_rate", str(args.lora_lr)],
    }
    avoid = ["--exclude_heads", str(out / "lofit" / "head_selection.json")]
    controls = {
        f"random_heads_{seed}": ["--method", "random_heads", "--head_seed", seed, *avoid, *offsets]
        for seed in args.head_seeds.split(",")
    }
    return tuple(
        {name: launch_recipe("lofit", *common, *extra, "--output_dir", name) for name, extra in runs.items()}
        for runs in (first, controls)
    )


def run_all(runs: dict[str, list[str]], out: Path, one_at_a_time: bool = False) -> dict[str, float]:
    """Runs every command at once (tiny models leave most of the GPU idle), or in sequence; {run name: wall s}."""
    with ThreadPoolExecutor(1 if one_at_a_time else len(runs)) as pool:
        return dict(zip(runs, pool.map(lambda name: timed_run(runs[name], out / f"{name}.log"), runs)))


def timed_run(command: list[str], log: Path) -> float:
    start = time.time()
    run(command, log)
    return round(time.time() - start, 1)


def collect(out: Path, name: str, wall_s: float) -> dict:
    """The run's results.json, its head selection, and where its time went (stage train_runtime from the log)."""
    result = json.loads((out / name / "results.json").read_text())
    selection = out / name / "head_selection.json"
    if selection.is_file():
        chosen = json.loads(selection.read_text())
        result |= {"selected_heads": chosen["heads"], "total_heads": chosen["total_heads"]}
    runtimes = re.findall(r"'train_runtime': '([\d.]+)'", (out / f"{name}.log").read_text())
    return result | {"wall_s": wall_s, "train_runtime_s": [float(t) for t in runtimes]}


def evaluate_targets(results: dict, split: str | None = None) -> dict:
    """Each target's value, threshold and pass/fail on the runs' held-out split, or on `split` (their
    `extra_eval_split`). LoFiT must beat the best random draw, not just their mean, by more than two standard errors
    of the difference of the two scores (binomial, unpaired: sqrt(p1 (1 - p1) / n + p2 (1 - p2) / n))."""
    key = f"{split}_" if split else ""
    lofit, lora = results["lofit"], results["lora"]
    randoms = [r for name, r in results.items() if name.startswith("random_heads")]
    random_gains = [r[key + "gain"] for r in randoms]
    share = lofit[key + "gain"] / lora[key + "gain"] if lora[key + "gain"] > 0 else None
    ratio = lora["trained_parameters"] / lofit["trained_parameters"]
    heads = lofit["heads"] / lofit["total_heads"]
    best = randoms[random_gains.index(max(random_gains))]
    margin = lofit[key + "gain"] - best[key + "gain"]
    p, q, n = lofit[key + "score"], best[key + "score"], lofit[key + "eval_records"]
    two_se = 2 * math.sqrt((p * (1 - p) + q * (1 - q)) / n)
    return {
        "gain_share_of_lora": target(share, TARGET_GAIN_SHARE, at_least(share, TARGET_GAIN_SHARE)),
        "lora_to_lofit_parameters": target(ratio, TARGET_PARAM_RATIO, at_least(ratio, TARGET_PARAM_RATIO)),
        "head_share": target(heads, TARGET_HEAD_SHARE, at_most(heads, TARGET_HEAD_SHARE)),
        "lofit_minus_best_random_gain": target(margin, two_se, margin > two_se, random_gains=random_gains),
    }


def target(value, threshold, passed: bool, **extra) -> dict:
    return {"value": value, "threshold": threshold, "passed": bool(passed), **extra}


def markdown(results: dict, targets: dict, summary: dict) -> str:
    lora_gain = results["lora"]["gain"]
    extra = summary["settings"].get("extra_eval_split")
    extra_head = f" {extra} base | {extra} score | {extra} gain |" if extra else ""
    rows = [
        "| run | heads | trained parameters | base score | score | gain | share of LoRA's gain |"
        + extra_head
        + " train s | wall s |",
        "|---|---|---|---|---|---|---|" + ("---|---|---|" if extra else "") + "---|---|",
    ]
    for name, r in results.items():
        share = f"{r['gain'] / lora_gain:.2f}" if lora_gain > 0 else "n/a"
        heads = r["heads"] if r["heads"] is not None else "-"
        train = " + ".join(f"{t:.0f}" for t in r["train_runtime_s"])  # stage 1 + stage 2 for lofit
        extra_cells = (
            f" {r[extra + '_base_score']:.3f} | {r[extra + '_score']:.3f} | {r[extra + '_gain']:+.3f} |"
            if extra
            else ""
        )
        rows.append(
            f"| {name} | {heads} | {r['trained_parameters']:,} | {r['base_score']:.3f} | {r['score']:.3f} | "
            f"{r['gain']:+.3f} | {share} |{extra_cells} {train} | {r['wall_s']:.0f} |"
        )
    rows += ["", "| target | value | threshold | met |", "|---|---|---|---|"]
    for name, t in targets.items():
        value = "n/a" if t["value"] is None else f"{t['value']:.3g}"
        rows.append(f"| {name} | {value} | {t['threshold']:.3g} | {'yes' if t['passed'] else 'no'} |")
    rows += [
        "",
        f"LoFiT's heads (layer, head): {results['lofit'].get('selected_heads')}; stage-1 scores plot: "
        f"`{summary['head_scores_plot']}`. Settings: {json.dumps(summary['settings'])}. "
        f"Wall: {summary['wall_s']:.0f} s.",
    ]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    main()
