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
runs the same check on the chat-format task of the previous GPU run. `--smoke` runs the same pipeline at toy sizes on
CPU (checks the pipeline, not the method).
"""

import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from science_common import RECIPES, at_least, at_most, command_line, launch_recipe, output_folder, run, science_parser


CONFIGS = RECIPES / "configs" / "lofit"
TARGET_GAIN_SHARE, TARGET_PARAM_RATIO, TARGET_HEAD_SHARE = 0.9, 20.0, 0.05


def main() -> None:
    parser = science_parser("lofit", __doc__)
    parser.add_argument("--config", default="default.yaml", help="a config of recipes/configs/lofit/ (its task)")
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
    parser.add_argument("--head_seeds", default="0,1,2", help="random_heads draws (training seed stays 0)")
    parser.add_argument(
        "--eval_limit", type=int, default=300, help="held-out records scored per run (truthful_qa: 300, chat_qa: 390)"
    )
    args = parser.parse_args()
    if args.smoke:
        args.train_samples, args.stage1_steps, args.eval_limit, args.head_seeds = 16, 2, 8, "0,1"
    out = output_folder(args.out)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # parallel runs on shared cores; the GPU does the arithmetic

    first, controls = planned_runs(args, out)
    start = time.time()
    walls = run_all(first, out)  # lofit, all_heads, lora at once; the random draws need lofit's selection
    walls |= run_all(controls, out)
    runs = {**first, **controls}
    print(f"[{time.time() - start:6.1f}s] all {len(runs)} runs done", flush=True)

    results = {name: collect(out, name, walls[name]) for name in runs}
    targets = evaluate_targets(results)
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
        "0",
        "--disable_tqdm",
        "true",
        "--logging_steps",
        "50",
    ]
    if args.smoke:  # two optimizer steps per stage
        common += ["--max_steps", "2"]
    offsets = ["--learning_rate", str(args.offset_lr)]
    first = {
        "lofit": ["--method", "lofit", *offsets],
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


def run_all(runs: dict[str, list[str]], out: Path) -> dict[str, float]:
    """Runs every command at once (tiny models leave most of the GPU idle); {run name: wall seconds}."""
    with ThreadPoolExecutor(len(runs)) as pool:
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


def evaluate_targets(results: dict) -> dict:
    """Each target's value, threshold and pass/fail (LoFiT must beat the best random draw, not just their mean)."""
    lofit, lora = results["lofit"], results["lora"]
    random_gains = [r["gain"] for name, r in results.items() if name.startswith("random_heads")]
    share = lofit["gain"] / lora["gain"] if lora["gain"] > 0 else None
    ratio = lora["trained_parameters"] / lofit["trained_parameters"]
    heads = lofit["heads"] / lofit["total_heads"]
    margin = lofit["gain"] - max(random_gains)
    return {
        "gain_share_of_lora": target(share, TARGET_GAIN_SHARE, at_least(share, TARGET_GAIN_SHARE)),
        "lora_to_lofit_parameters": target(ratio, TARGET_PARAM_RATIO, at_least(ratio, TARGET_PARAM_RATIO)),
        "head_share": target(heads, TARGET_HEAD_SHARE, at_most(heads, TARGET_HEAD_SHARE)),
        "lofit_minus_best_random_gain": target(margin, 0.0, margin > 0, random_gains=random_gains),
    }


def target(value, threshold, passed: bool, **extra) -> dict:
    return {"value": value, "threshold": threshold, "passed": bool(passed), **extra}


def markdown(results: dict, targets: dict, summary: dict) -> str:
    lora_gain = results["lora"]["gain"]
    rows = [
        "| run | heads | trained parameters | base score | score | gain | share of LoRA's gain | train s | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        share = f"{r['gain'] / lora_gain:.2f}" if lora_gain > 0 else "n/a"
        heads = r["heads"] if r["heads"] is not None else "-"
        train = " + ".join(f"{t:.0f}" for t in r["train_runtime_s"])  # stage 1 + stage 2 for lofit
        rows.append(
            f"| {name} | {heads} | {r['trained_parameters']:,} | {r['base_score']:.3f} | {r['score']:.3f} | "
            f"{r['gain']:+.3f} | {share} | {train} | {r['wall_s']:.0f} |"
        )
    rows += ["", "| target | value | threshold | met |", "|---|---|---|---|"]
    for name, t in targets.items():
        value = "n/a" if t["value"] is None else f"{t['value']:.3g}"
        rows.append(f"| {name} | {value} | {t['threshold']} | {'yes' if t['passed'] else 'no'} |")
    rows += [
        "",
        f"LoFiT's heads (layer, head): {results['lofit'].get('selected_heads')}; stage-1 scores plot: "
        f"`{summary['head_scores_plot']}`. Settings: {json.dumps(summary['settings'])}. "
        f"Wall: {summary['wall_s']:.0f} s.",
    ]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    main()
