"""RLHF summarisation's scientific check, in one command on one GPU:

    python benchmarks/rlhf_science.py --out runs/rlhf_science                      # the embedded tiny model
    python benchmarks/rlhf_science.py --model smollm2-135m --split validation --out runs/rlhf_smollm2_validation
    python benchmarks/rlhf_science.py --model smollm2-135m --split test --out runs/rlhf_smollm2_test \
        --validated_by runs/rlhf_smollm2_validation/rlhf_science.json

`recipes/rlhf_summarize.py` stage by stage (sft -> compare -> reward -> rl (RLOO), dpo beside reward and rl -> eval),
on the world's posts with mediocre training references (`--mediocre_reference_rate`: a key fact left out, a filler
sentence in its place, as TL;DR's human summaries are imperfect), so SFT imitates imperfect summaries. The reward
model and DPO learn from the world's hand-made comparisons plus, as in the paper, labelled comparisons of the SFT
policy's own samples (`--comparison_samples` per post: the tiny model makes up details, such as an item the post never
mentions, and the hand-made candidates alone do not show a reward model those mistakes); all labels come from the
ground-truth preference with the labeller's noise. `--repeat_negatives` adds comparisons of a training post's
reference over the same reference with one fact stated twice (the RL policy's reward hacking on SmolLM2); the reward
model's accuracy on such held-out pairs is reported whatever it trained on. Then `ctxaware eval` on the RL policy as
a cross-check of the recipe's win rate. Targets: reward-model pairwise accuracy on held-out noise-free pairs >= 0.70;
the RL policy's ground-truth win rate against the SFT policy >= 0.65 (ties count 1/2, as the harness counts them) at
a mean length within 20% of SFT's; DPO reported beside it; reward hacking (the reward model and the ground truth
disagreeing on which of RL and SFT is better) reported with an example, each policy's summaries that name a detail
their post lacks, and those that state a fact twice. Writes `rlhf_science.json` and `rlhf_science.md` to --out.
`--smoke` runs the same pipeline at toy sizes on CPU.

`--model smollm2-135m`: SmolLM2-135M-Instruct, fully fine-tuned, with `recipes/configs/rlhf_summarize/smollm2.yaml`'s
sizes and rates (about 5 minutes on one H100), scored on 240 posts; two more targets: at least 200 posts scored and no
reward hacking flagged. `--split validation` (that model's default) scores the world's validation posts and pairs,
to choose and inspect settings; `--split test` (the tiny model's default, as its reported runs did) scores the test
posts, once: an --out folder that holds a test result is refused, and `--validated_by` names the validation run
whose settings and judge the test run must share (checked before anything runs). The JSON records the split, the
commit, the judge's source hash and every setting. Rates given here (`--beta`, ...) and flags this script does not
know (`--sft_learning_rate 3e-5`, `--reward_max_steps 300`, ...) go to every stage of the recipe and are recorded.
"""

import argparse
import hashlib
import inspect
import json
import shutil
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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

from ctxaware.outputs import RUN_CONFIG_NAME


CONFIG = RECIPES / "configs" / "rlhf_summarize" / "default.yaml"
SPLITS = ("validation", "test")
POLICIES = ("sft", "rl", "dpo")
RL_LOG_KEYS = (
    "reward",
    "rewards/reward_model/mean",
    "rewards/eos_penalty/mean",
    "kl",
    "completions/mean_length",
    "completions/clipped_ratio",
    "entropy",
)
TARGETS = {"reward_accuracy": 0.70, "win_rate": 0.65, "length_tolerance": 0.20}

# The reward model underfit at 300 steps of 32 pairs on ~5,800 pairs (3 hand-made and 3 of SFT samples per post):
# its training accuracy only reached 0.70 (loss 0.64 -> 0.59 as the lr decayed to 0), level with its held-out 0.66, so
# it learns from 10 hand-made and up to 10 sampled pairs per training post (`train_pairs_per_post`; held-out pairs stay
# at `pairs_per_post` 3), 64 pairs a step for 800 steps (about 4 epochs of ~13,000 pairs). That also evens out a
# length shortcut: labelled pairs of SFT samples favour the shorter summary (0.67 of those differing in length; a
# filler is the usual difference), hand-made ones the longer (0.58), so the 3 + 3 mix favoured brevity (0.54) and
# the RM under-rewarded coverage; the 10 + 10 mix is 0.50 (CPU SFT samples). GPU seconds of the last run
# (reward 300 steps of 32 at 11 it/s): sft 55, compare 44, dpo 41 (beside reward -> rl), reward 54, rl 99 (120 steps),
# eval 55, cross-check 20, total 327; the longer reward stage adds about a minute.
GPU_SIZES = {
    "sft_max_steps": 60,
    "reward_max_steps": 800,
    "reward_batch_size": 64,
    "max_steps": 120,
    "dpo_max_steps": 120,
    "per_device_train_batch_size": 32,
    "pairs_per_post": 3,
    "train_pairs_per_post": 10,
    "eval_limit": 120,
    "eval_batch_size": 64,
    "normalization_limit": 256,
    "kl_samples_per_prompt": 4,
}
SMOKE_SIZES = {
    "sft_max_steps": 2,
    "reward_max_steps": 2,
    "max_steps": 2,
    "dpo_max_steps": 2,
    "per_device_train_batch_size": 8,
    "eval_limit": 8,
    "eval_batch_size": 8,
    "train_limit": 64,
    "normalization_limit": 16,
    "kl_samples_per_prompt": 1,
}


# The tiny model's rates and lengths for this check (defaults of the flags below; another model keeps its config's).
TINY_SETTINGS = {
    "mediocre_reference_rate": 0.75,
    "comparison_samples": 4,
    "reward_learning_rate": 1e-4,
    "learning_rate": 3e-5,
    "beta": 0.2,
    "num_generations": 4,
    "temperature": 0.7,
    "missing_eos_penalty": -1.0,
    "max_completion_length": 48,
}
# SmolLM2 on a CPU: every stage runs, on a handful of posts, one or two steps each.
SMOLLM2_SMOKE_SIZES = {
    "sft_max_steps": 2,
    "reward_max_steps": 2,
    "max_steps": 2,
    "dpo_max_steps": 2,
    "per_device_train_batch_size": 4,
    "reward_batch_size": 4,
    "train_limit": 8,
    "comparison_samples": 2,
    "eval_limit": 4,
    "eval_batch_size": 4,
    "normalization_limit": 4,
    "kl_samples_per_prompt": 1,
}
# SmolLM2's GPU sizes are its config's (smollm2.yaml). Not yet timed on a GPU; estimated for one H100 from the tiny
# run's stage seconds (launch, imports and loading ~15-20 s a stage) and per-step costs of a 30-layer model: sft 25 s,
# compare 35 s (3,840 samples, 256 a batch), reward 60 s (400 steps of 32 pairs), rl 100 s (60 steps, each one batched
# generation of 64 x 48 tokens at ~20 ms a token), dpo ~30 s beside reward -> rl, eval 50 s (240 posts x 3 policies,
# the KL samples batched), cross-check 25 s: ~300 s, ~350 s on a shared GPU.
# model -> its recipe config, the sizes this check puts over it (GPU, --smoke), its own settings, and the least number
# of posts its win rate must be measured on (None: no such target).
MODELS = {
    "ctxaware-tiny": {
        "config": CONFIG,
        "sizes": GPU_SIZES,
        "smoke": SMOKE_SIZES,
        "own": TINY_SETTINGS,
        "min_posts": None,
    },
    "smollm2-135m": {
        "config": RECIPES / "configs" / "rlhf_summarize" / "smollm2.yaml",
        "sizes": {},
        "smoke": SMOLLM2_SMOKE_SIZES,
        "own": {},
        "min_posts": 200,
    },
}
# The flags of this script that set a recipe setting (flag -> the recipe's name for it).
RATE_FLAGS = {
    "mediocre_reference_rate": "mediocre_reference_rate",
    "comparison_samples": "comparison_samples",
    "repeat_negatives": "repeat_negatives",
    "reward_learning_rate": "reward_learning_rate",
    "rl_learning_rate": "learning_rate",
    "beta": "beta",
}


def recipe_settings(args, extra: list[str]) -> dict:
    """Everything the check sets over the model's recipe config, the same for every stage and either split: the sizes,
    the model's own settings, the rate flags given, the flags this script does not know (recorded as given), and no
    checkpoints. The split is not a setting: the test run must share every setting of its validation run."""
    model = MODELS[args.model]
    given = {name: getattr(args, flag) for flag, name in RATE_FLAGS.items() if getattr(args, flag) is not None}
    settings = {**(model["smoke"] if args.smoke else model["sizes"]), **model["own"], **given}
    if args.smoke or args.model == "ctxaware-tiny":
        settings["logging_steps"] = 1 if args.smoke else 10
    settings["save_strategy"] = "no"  # no checkpoints: each stage's final folder is what the check needs
    if args.smoke and args.model != "ctxaware-tiny":
        settings["bf16"] = False  # CPU
    return {
        "model": args.model,
        "config": model["config"].relative_to(RECIPES.parent).as_posix(),
        "config_sha256": hashlib.sha256(model["config"].read_bytes()).hexdigest(),
        "recipe": settings,
        "extra_flags": extra,
        "smoke": args.smoke,
    }


def judge() -> dict:
    """The ground-truth judge, identified by its module's source: a test run must use the one validation used."""
    from ctxaware.world import preference

    return {
        "function": "ctxaware.world.preference_score",
        "source_sha256": hashlib.sha256(inspect.getsource(preference).encode()).hexdigest(),
    }


def check_frozen(settings: dict, judged_by: dict, validation: dict, source: str) -> None:
    """A test run's settings and judge must be those of the validation run in `source` (its report, `validation`)."""
    if validation.get("split") != "validation":
        raise SystemExit(f"--validated_by {source} is not a validation run (split {validation.get('split')!r}).")
    there, here = _flat(validation["settings"]), _flat(settings)
    differences = [
        f"{key}: {there.get(key)!r} there, {here.get(key)!r} here"
        for key in sorted(there.keys() | here.keys())
        if there.get(key) != here.get(key)
    ]
    if validation.get("judge") != judged_by:
        differences.append("the judge's source changed")
    if differences:
        raise SystemExit(
            f"--validated_by {source}: settings differ from that validation run ({'; '.join(differences)})."
        )


def _flat(settings: dict) -> dict:
    """`settings` with the recipe's settings as `recipe.<name>` keys, so a difference names the one setting."""
    return {
        **{key: value for key, value in settings.items() if key != "recipe"},
        **{f"recipe.{key}": value for key, value in settings.get("recipe", {}).items()},
    }


def check_not_scored(out: Path) -> None:
    """The test posts are scored once per configuration: an --out that holds a test result is refused."""
    path = out / "rlhf_science.json"
    if path.is_file() and json.loads(path.read_text()).get("split") == "test":
        raise SystemExit(f"{path} already holds a test result: the test posts are scored once; choose another --out.")


def run_stages(run_dir: Path, settings: dict, split: str, seed: int) -> dict[str, float]:
    """Each stage as its own launch, so the log shows where the time goes; DPO needs only the SFT policy and the
    comparisons, so it runs beside reward -> rl (the small models leave most of the GPU idle), in a folder of its own
    (a run's folder takes one process at a time) whose policy then joins the others for the eval stage. Returns wall
    seconds per stage."""
    recipe = settings["recipe"]
    flags = [item for key, value in recipe.items() for item in (f"--{key}", str(value))]
    flags += [*settings["extra_flags"], "--eval_split", split, "--seed", str(seed)]
    seconds = {}

    def launch(stage: str, folder: Path = run_dir, *more: str) -> None:
        start = time.time()
        command = launch_recipe(
            "rlhf_summarize",
            "--config",
            str(RECIPES.parent / settings["config"]),
            "--output_dir",
            str(folder),
            *flags,
            *more,
            "--stage",
            stage,
            "--overwrite_stages",
            "true",
        )
        run(command, run_dir.parent / f"{stage}.log")
        seconds[stage] = round(time.time() - start, 1)

    launch("sft")
    launch("compare")
    dpo_dir = run_dir.parent / "run_dpo"
    beside_flags = ("--sft_model_path", str(run_dir / "sft"), "--comparisons_dir", str(run_dir / "compare"))
    with ThreadPoolExecutor(max_workers=1) as beside:
        dpo = beside.submit(launch, "dpo", dpo_dir, *beside_flags)
        launch("reward")
        launch("rl")
        dpo.result()  # re-raises a failed DPO launch
    shutil.rmtree(run_dir / "dpo", ignore_errors=True)  # an earlier run's, in this --out
    (dpo_dir / "dpo").rename(run_dir / "dpo")
    launch("eval")
    return seconds


def samples_file(run_dir: Path, policy: str) -> Path:
    """The summarization samples the recipe's eval stage wrote for `policy` (the newest, should there be several)."""
    return sorted((run_dir / "eval" / policy).glob("samples_summarization_*.jsonl"))[-1]


def samples(run_dir: Path, policy: str) -> list[dict]:
    return [json.loads(line) for line in samples_file(run_dir, policy).read_text().splitlines() if line.strip()]


def win_counts(rows: list[dict]) -> dict:
    """The harness's per-post `win` (1 better, 0.5 tie, 0 worse under the ground truth) as counts, and the win rate
    among decided posts."""
    wins, ties = sum(r["win"] == 1.0 for r in rows), sum(r["win"] == 0.5 for r in rows)
    losses = len(rows) - wins - ties
    return {
        "wins": wins,
        "ties": ties,
        "losses": losses,
        "win_rate_without_ties": wins / (wins + losses) if wins + losses else None,
    }


def hacking_report(sft: list[dict], rl: list[dict], bias: float) -> dict:
    """Where the reward model and the ground truth disagree on RL vs SFT, post by post. Hacking is flagged when the
    reward model sees RL improve on average while the ground truth does not."""
    pairs = list(zip(sft, rl, strict=True))
    reward_gain = statistics.fmean(b["reward"] - a["reward"] for a, b in pairs)
    truth_gain = statistics.fmean(b["preference"] - a["preference"] for a, b in pairs)
    disagree = [(a, b) for a, b in pairs if b["reward"] > a["reward"] and b["preference"] < a["preference"]]
    everything = [*sft, *rl]
    report = {
        "reward_gain_rl_minus_sft": reward_gain,
        "ground_truth_gain_rl_minus_sft": truth_gain,
        "rm_prefers_rl_but_truth_prefers_sft": len(disagree),
        "n_posts": len(pairs),
        "rm_vs_truth_correlation": _correlation(
            [r["reward"] for r in everything], [r["preference"] for r in everything]
        ),
        "flagged": reward_gain > 0 and truth_gain <= 0,
    }
    if disagree:
        a, b = max(disagree, key=lambda pair: pair[1]["reward"] - pair[0]["reward"])
        report["example"] = {
            "post": b["post"],
            "reference": b["reference"],
            "sft": {"summary": a["summary"], "reward": a["reward"] - bias, "ground_truth": a["preference"]},
            "rl": {"summary": b["summary"], "reward": b["reward"] - bias, "ground_truth": b["preference"]},
        }
    return report


def made_up_details(policy_samples: dict[str, list[dict]]) -> dict:
    """Per policy, how many summaries name a detail (name, number, attribute word) that their post lacks, with one
    example: the content drift the ground truth penalises and a reward model may miss."""
    from ctxaware.world import unfaithful_terms

    report = {}
    for name, rows in policy_samples.items():
        made_up = [(row, sorted(unfaithful_terms(row["post"], row["summary"]))) for row in rows]
        made_up = [(row, terms) for row, terms in made_up if terms]
        report[name] = {"count": len(made_up), "n_posts": len(rows)}
        if made_up:
            row, terms = made_up[0]
            report[name]["example"] = {"summary": row["summary"], "made_up": terms}
    return report


def repeated_facts(policy_samples: dict[str, list[dict]]) -> dict:
    """Per policy, how many summaries state a fact twice (`repeats_a_fact`), with one example. The ground truth
    charges only the extra words, so a reward model that likes a fact named twice is not caught by the hacking flag."""
    from ctxaware.world import repeats_a_fact

    report = {}
    for name, rows in policy_samples.items():
        repeating = [row["summary"] for row in rows if repeats_a_fact(row["summary"])]
        report[name] = {"count": len(repeating), "n_posts": len(rows)}
        if repeating:
            report[name]["example"] = repeating[0]
    return report


def _correlation(xs: list[float], ys: list[float]) -> float | None:
    try:
        return statistics.correlation(xs, ys)
    except statistics.StatisticsError:  # constant scores (a smoke run)
        return None


def rl_training_trace(run_dir: Path) -> dict:
    """First and last logged value of each RL quantity (reward per function, KL to SFT, length, no-EOS share)."""
    log = [entry for entry in json.loads((run_dir / "rl" / "training_log.json").read_text()) if "reward" in entry]
    return {key: {"first": log[0].get(key), "last": log[-1].get(key)} for key in RL_LOG_KEYS} if log else {}


def cross_check(run_dir: Path, out: Path, config: dict) -> dict:
    """The RL policy through `ctxaware eval` against the recipe's SFT samples: the same win rate, independently."""
    command = eval_command(
        "--model",
        str(run_dir / "rl"),
        "--tasks",
        "summarization",
        "--dtype",
        "float32",
        "--split",
        config["eval_split"],
        "--limit",
        str(config["eval_limit"]),
        "--batch_size",
        str(config["eval_batch_size"]),
        "--max_new_tokens",
        str(config["max_completion_length"]),
        "--reward_model",
        str(run_dir / "reward"),
        "--baseline_samples",
        str(samples_file(run_dir, "sft")),
        "--output_path",
        str(out / "harness_rl"),
        "--no_progress",
    )
    start = time.time()
    run(command, out / "harness_rl.log")
    return {**harness_metrics(out / "harness_rl")["summarization"], "seconds": round(time.time() - start, 1)}


def targets(
    summary: dict, *, hacking: dict | None = None, n_posts: int | None = None, min_posts: int | None = None
) -> dict:
    """Reward-model accuracy on held-out pairs, RL's ground-truth win rate against SFT, and RL's length against SFT's,
    from the recipe's eval summary; with `hacking` (`hacking_report`), no reward hacking flagged; with `min_posts`, the
    win rate measured on at least that many posts (`n_posts`)."""
    accuracy, win_rate = summary["reward_model"]["pairwise_accuracy"], summary["rl"]["win_rate_vs_sft"]
    sft_words = summary["sft"]["mean_words"]
    length_ratio = summary["rl"]["mean_words"] / sft_words if sft_words else None
    length_off = None if length_ratio is None else abs(length_ratio - 1)
    checks = {
        "reward_accuracy": {
            "value": accuracy,
            "target": ">= 0.70",
            "pass": at_least(accuracy, TARGETS["reward_accuracy"]),
        },
        "rl_win_rate_vs_sft": {
            "value": win_rate,
            "target": ">= 0.65 (ties 1/2)",
            "pass": at_least(win_rate, TARGETS["win_rate"]),
        },
        "rl_length_vs_sft": {
            "value": length_ratio,
            "target": "within 20% of SFT's mean words",
            "pass": at_most(length_off, TARGETS["length_tolerance"]),
        },
    }
    if hacking is not None:
        checks["reward_hacking_flagged"] = {
            "value": hacking["flagged"],
            "target": "False (flagged: the RM sees RL gain over SFT, the ground truth does not)",
            "pass": not hacking["flagged"],
        }
    if min_posts is not None:
        checks["posts_scored"] = {
            "value": n_posts,
            "target": f">= {min_posts}",
            "pass": n_posts is not None and n_posts >= min_posts,
        }
    return checks


def markdown(report: dict) -> str:
    summary, wins = report["summary"], report["wins_vs_sft"]
    validated = report.get("validated_by")
    rows = [
        f"Model {report['settings']['model']}, {report['n_posts']} {report['split']} posts: {report['mode']}. Commit "
        f"{report['tree'] or 'unknown'}; judge `{report['judge']['function']}` (source sha256 "
        f"{report['judge']['source_sha256'][:12]})"
        + (f"; settings checked equal to the validation run {validated}." if validated else ".")
        + (" Smoke run: toy sizes, the numbers mean nothing." if report["settings"]["smoke"] else ""),
        "",
        "| policy | ground truth | win vs SFT (ties 1/2) | W/T/L vs SFT | win vs reference | RM reward (norm.) | "
        "KL to SFT | mean words | ROUGE-L |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in POLICIES:
        m = summary[name]
        record = wins.get(name)
        wtl = f"{record['wins']}/{record['ties']}/{record['losses']}" if record else "-"
        rows.append(
            f"| {name} | {m['preference']:.3f} | {_fmt(m.get('win_rate_vs_sft'))} | {wtl} | "
            f"{m['win_rate_vs_reference']:.3f} | {m['reward_normalized']:.3f} | {_fmt(m.get('kl_to_sft'))} | "
            f"{m['mean_words']:.1f} | {m['rouge_l']:.3f} |"
        )
    rm = summary["reward_model"]
    rows += [
        "",
        f"Reward model: pairwise accuracy {rm['pairwise_accuracy']:.3f} on {rm['n_pairs']} held-out "
        f"noise-free pairs (bias {rm['bias']:.3f} subtracted)"
        + "".join(
            f"; {kind} {v['accuracy']:.3f} ({v['n_pairs']})"
            for kind, v in rm.get("accuracy_by_difference", {}).items()
        )
        + " (by what makes the rejected summary worse: a made-up detail, fewer key facts, or only length/filler)"
        + (
            f"; the reference over itself with a fact stated twice {repeats['accuracy']:.3f} ({repeats['n_pairs']})."
            if (repeats := rm.get("repeated_fact_accuracy"))  # absent from reports written before it was measured
            else "."
        ),
        "",
        "| target | value | pass |",
        "|---|---|---|",
    ]
    rows += [
        f"| {name} {t['target']} | {_fmt(t['value'])} | {'yes' if t['pass'] else 'NO'} |"
        for name, t in report["targets"].items()
    ]
    trace = report["rl_training"]
    rows += ["", "| RL training (first -> last logged step) | value |", "|---|---|"]
    rows += [f"| {key} | {_fmt(v['first'])} -> {_fmt(v['last'])} |" for key, v in trace.items()]
    hacking = report["reward_hacking"]
    rows += [
        "",
        f"Reward model vs ground truth: RL - SFT reward {hacking['reward_gain_rl_minus_sft']:+.3f}, ground "
        f"truth {hacking['ground_truth_gain_rl_minus_sft']:+.3f}; the RM prefers RL where the truth prefers SFT on "
        f"{hacking['rm_prefers_rl_but_truth_prefers_sft']} of {hacking['n_posts']} posts; correlation "
        f"{_fmt(hacking['rm_vs_truth_correlation'])}; reward hacking flagged: {hacking['flagged']}.",
    ]
    if "example" in hacking:
        ex = hacking["example"]
        rows += [
            "",
            "Largest disagreement:",
            f"- post: {ex['post']}",
            f"- SFT: {ex['sft']['summary']} (reward {ex['sft']['reward']:.2f}, truth {ex['sft']['ground_truth']:.2f})",
            f"- RL: {ex['rl']['summary']} (reward {ex['rl']['reward']:.2f}, truth {ex['rl']['ground_truth']:.2f})",
        ]
    made_up = report["made_up_details"]
    rows += [
        "",
        "Summaries naming a detail their post lacks: "
        + ", ".join(
            f"{name} {m['count']}/{m['n_posts']}"
            + (f" (e.g. {', '.join(m['example']['made_up'])}: {m['example']['summary']})" if "example" in m else "")
            for name, m in made_up.items()
        ),
    ]
    if repeated := report.get("repeated_facts"):  # absent from reports written before it was measured
        rows += [
            "",
            "Summaries stating a fact twice: "
            + ", ".join(
                f"{name} {r['count']}/{r['n_posts']}" + (f" (e.g. {r['example']})" if "example" in r else "")
                for name, r in repeated.items()
            ),
        ]
    if report.get("harness_cross_check"):
        check = report["harness_cross_check"]
        rows += [
            "",
            f"`ctxaware eval` on the RL policy: win rate {_fmt(check.get('win_rate'))}, ground truth "
            f"{_fmt(check.get('preference'))}, raw reward-model score {_fmt(check.get('reward'))}.",
        ]
    rows += [
        "",
        "Seconds per stage (dpo ran beside reward -> rl): "
        + ", ".join(f"{k} {v}" for k, v in report["seconds"].items()),
    ]
    return "\n".join(rows) + "\n"


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def parse_args() -> tuple[argparse.Namespace, list[str]]:
    parser = science_parser("rlhf", __doc__)
    parser.add_argument("--model", choices=sorted(MODELS), default="ctxaware-tiny")
    parser.add_argument(
        "--split",
        choices=SPLITS,
        help="posts and held-out pairs scored: validation to choose settings, test to report (default: test for the "
        "tiny model, as its reported runs, validation for another model)",
    )
    parser.add_argument(
        "--validated_by",
        type=Path,
        help="test split: the validation run's rlhf_science.json whose settings and judge this run must share",
    )
    parser.add_argument(
        "--mediocre_reference_rate", type=float, help="share of SFT references made mediocre (tiny model: 0.75)"
    )
    parser.add_argument(
        "--comparison_samples",
        type=int,
        help="SFT samples per training post compared by the labeller (0: hand-made comparisons only; tiny model: 4)",
    )
    parser.add_argument(
        "--repeat_negatives",
        type=float,
        help="comparisons per training post of its reference over the reference with one fact stated twice, for the "
        "reward model and DPO (0.5: half the posts get one; at most 2; default 0: none): a setting, chosen on "
        "validation",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="training seed of every stage: a replicate, not a setting, so a test run may use another seed than "
        "the validation run it repeats",
    )
    parser.add_argument("--reward_learning_rate", type=float, help="tiny model: 1e-4")
    parser.add_argument("--rl_learning_rate", type=float, help="tiny model: 3e-5")
    # KL coefficient: at 0.05 the penalty (KL 3.1 x 0.05) is small next to the reward the policy gains (+0.75), and RL
    # cuts the tiny model's summaries to 0.75x SFT's length; 0.2 keeps them at 0.94x and still wins 0.70 (RESULTS.md).
    parser.add_argument("--beta", type=float, help="RL's KL coefficient to the SFT policy (tiny model: 0.2)")
    args, extra = parser.parse_known_args()
    if args.split is None:
        args.split = "test" if args.model == "ctxaware-tiny" else "validation"
    if args.validated_by and args.split != "test":
        parser.error("--validated_by goes with --split test: it names the validation run the test run repeats")
    return args, extra


def main() -> None:
    args, extra = parse_args()
    out = output_folder(args.out)
    settings, judged_by = recipe_settings(args, extra), judge()
    if args.split == "test":
        check_not_scored(out)
        if args.validated_by:
            check_frozen(settings, judged_by, json.loads(args.validated_by.read_text()), str(args.validated_by))
    run_dir = out / "run"
    start = time.time()
    seconds = run_stages(run_dir, settings, args.split, args.seed)
    config = json.loads((run_dir / RUN_CONFIG_NAME).read_text())
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    policy_samples = {name: samples(run_dir, name) for name in POLICIES}
    check = cross_check(run_dir, out, config)
    seconds["harness_cross_check"] = check.pop("seconds")
    seconds["total"] = round(time.time() - start, 1)
    hacking = hacking_report(policy_samples["sft"], policy_samples["rl"], summary["reward_model"]["bias"])
    min_posts = MODELS[args.model]["min_posts"]
    report = {
        "command": command_line(),
        "tree": git_commit(),
        "split": args.split,
        "seed": args.seed,
        "n_posts": len(policy_samples["rl"]),
        "mode": "choosing settings, not a reported result"
        if args.split == "validation"
        else "the test posts scored once, settings frozen",
        "validated_by": str(args.validated_by) if args.validated_by else None,
        "judge": judged_by,
        "settings": settings,
        "recipe_config": config,
        "summary": summary,
        "win_rate_rule": "per post 1 if ground truth(policy) > ground truth(SFT), 1/2 if equal, 0 if lower",
        "wins_vs_sft": {name: win_counts(policy_samples[name]) for name in ("rl", "dpo")},
        "rl_training": rl_training_trace(run_dir),
        "reward_hacking": hacking,
        "made_up_details": made_up_details(policy_samples),
        "repeated_facts": repeated_facts(policy_samples),
        "harness_cross_check": check,
        "targets": targets(
            summary,
            hacking=hacking if min_posts else None,
            n_posts=len(policy_samples["rl"]),
            min_posts=min_posts,
        ),
        "seconds": seconds,
    }
    report["all_targets_met"] = all(t["pass"] for t in report["targets"].values())
    (out / "rlhf_science.json").write_text(json.dumps(report, indent=2))
    (out / "rlhf_science.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
