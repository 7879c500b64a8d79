"""SinkLoRA's scientific check, in one command on one GPU (the embedded tiny model by default, any model by name):

    python benchmarks/sinklora_science.py --out runs/sinklora_science
    python benchmarks/sinklora_science.py --model PATH_OR_NAME --text heldout.txt --train_text train.txt --out DIR

For each RoPE method (`--rope`, linear and YaRN by default) `recipes/sinklora.py` trains `full`, `s2` and `sf`
attention with the same rows, steps and seed, and evaluates with full attention: perplexity at L, 2L, 4L (L: the
model's context) on held-out text (`--text`, default: the world's long documents drawn with another seed than the
training rows), passkey and needle-in-a-haystack at 4L. The first variant of each RoPE method also evaluates the
original model and the RoPE-scaled model before any step (the untrained references). The training text is the
world's documents in `--train_mix` proportions (pass keys weighted up: retrieval at 4L is what the mix teaches), or
`--train_text` (a `--train_text_share` of the rows, the rest the world's; `--train_retrieval_text` hides the world's
pass keys and needles in that text's train portion instead of the world's statements). Then H2O and its own baseline
inside the original context: passkey and streamed perplexity at L with the full cache, H2O (`h2o:B`) and sinks +
recent window (`window:B`) at 50% and 20%, with the K/V bytes each holds.
Writes `sinklora_science.json` and `.md` to --out: each variant's perplexity relative to full attention's, its training
tokens/s (and relative to full attention's) and peak GPU memory as the recipe measured them, and the targets, met or
missed. `--smoke` (or `--tiny`) runs the same pipeline at toy sizes on CPU.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

from bench_common import git_commit
from science_common import (
    command_line,
    eval_command,
    harness_metrics,
    launch_recipe,
    output_folder,
    run_parallel,
    science_parser,
)

from ctxaware.eval.metrics import mean, mean_stderr


VARIANTS = ("full", "s2", "sf")
KV_BUDGETS = ("full", "h2o:0.5", "h2o:0.2", "window:0.5", "window:0.2")
RETRIEVAL_TARGET = 0.9  # passkey and NIAH accuracy at 4L after the SF recipe
PPL_TOLERANCE = 1.03  # SF's perplexity at 4L within 3% of full attention's


def main() -> None:
    parser = science_parser("sinklora", __doc__)
    parser.add_argument("--tiny", dest="smoke", action="store_true", help="the same as --smoke")
    parser.add_argument("--model", default="ctxaware-tiny", help="model name, folder or Hub id (the loaders' names)")
    parser.add_argument("--text", help="held-out text file for perplexity (default: the world's held-out documents)")
    parser.add_argument(
        "--train_text", help="training text: a file or `books` (its train portion; default: the world's documents)"
    )
    parser.add_argument(
        "--train_text_share",
        type=float,
        default=1.0,
        help="share of --train_text documents in the training rows; the rest are the world's --train_mix documents",
    )
    parser.add_argument(
        "--train_retrieval_text",
        help="haystack of the pass key and needle training documents of the world's mix: a text file or `books` (its "
        "train portion, never the validation or test one), each document from its own seeded stretch; needs "
        "--train_text with --train_text_share below 1 (default: the world's true statements)",
    )
    parser.add_argument(
        "--retrieval_text",
        help="haystack of passkey and NIAH: a text file or `books` (default: the world's true statements)",
    )
    parser.add_argument(
        "--retrieval_at_every_length",
        action="store_true",
        help="passkey and NIAH at 1x, 2x and 4x the context (default: 4x only)",
    )
    parser.add_argument("--train_mix", nargs="+", default=["passkey:2", "needle:1", "key_value:0.5", "reading:1"])
    parser.add_argument("--rope", default="linear,yarn", help="comma-separated RoPE methods, each a row group")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--learning_rate", type=float, default=2e-4)
    parser.add_argument("--limit", type=int, default=20, help="passkey samples and NIAH samples per depth")
    parser.add_argument("--ppl_windows", type=int, default=10, help="perplexity windows per length")
    parser.add_argument("--dtype", default="float32", help="training and evaluation dtype (bfloat16 for real models)")
    parser.add_argument(
        "--kv_limit",
        type=int,
        help="passkey samples and ppl windows for the KV caches (default: --limit"
        " and --ppl_windows); each streams L tokens one decode step at a time",
    )
    parser.add_argument(
        "--sequential",
        action="store_true",
        help="train the variants one after another, each with the GPU to itself, so their tokens/s compare (default: "
        "side by side, faster for a small model, each variant's tokens/s measured while the others run)",
    )
    parser.add_argument("--skip_kv", action="store_true", help="skip the KV-cache comparison")
    parser.add_argument(
        "--skip_kv_passkey", action="store_true", help="KV-cache comparison: streamed perplexity only, no passkey"
    )
    parser.add_argument(
        "--kv_length", type=int, help="window length of the KV-cache comparison (default: L, the model's context)"
    )
    parser.add_argument(
        "--kv_workers",
        type=int,
        help="KV-cache evaluations run at once (default: all; the evicting caches start first, the full cache last)",
    )
    parser.add_argument("--skip_training", action="store_true", help="only the KV-cache comparison")
    parser.add_argument("--eval_batch_size", type=int, default=8, help="1 for a real vocabulary at 32k")
    parser.add_argument(
        "--split",
        choices=("validation", "test"),
        default="test",
        help="evaluation split: validation while choosing steps / lr / RoPE (other held-out documents, other passkey "
        "and NIAH keys), test once for the report",
    )
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="comma-separated attentions to train, among " + ", ".join(VARIANTS),
    )
    parser.add_argument(
        "--kv_budgets",
        default=",".join(KV_BUDGETS),
        help="comma-separated KV caches to compare (the full cache always runs: it is the reference)",
    )
    args = parser.parse_args()
    variants = [v for v in VARIANTS if v in args.variants.split(",")]
    kv_budgets = ["full", *(b for b in KV_BUDGETS if b != "full" and b in args.kv_budgets.split(","))]
    unknown = set(args.variants.split(",")) - set(VARIANTS) or set(args.kv_budgets.split(",")) - set(KV_BUDGETS)
    if unknown or not variants:
        parser.error(f"unknown or no variants / KV caches {sorted(unknown)}: use {VARIANTS} and {KV_BUDGETS}")
    if args.train_retrieval_text and not (args.train_text and args.train_text_share < 1):
        parser.error(
            "--train_retrieval_text fills the world's documents of the rows: pass --train_text with "
            "--train_text_share below 1"
        )
    out = output_folder(args.out)
    python = sys.executable
    model, steps, batch, limit, windows = args.model, args.steps, args.batch_size, args.limit, args.ppl_windows
    ropes = [] if args.skip_training else args.rope.split(",")
    if args.smoke:  # a tiny random model with a 64-token context stands in for the real one
        model, steps, batch, limit, windows = str(out / "smoke-base"), 2, 1, 1, 1
        subprocess.run([python, "-c", SMOKE_MODEL.format(path=model)], check=True)
    original = context_length(model)
    lengths = [original, 2 * original, 4 * original]
    target = lengths[-1]
    text_file = args.text
    if text_file is None:
        text_file = str(out / "heldout_long_documents.txt")
        seed = HELDOUT_SEEDS[args.split]
        subprocess.run(
            [python, "-c", HELDOUT_TEXT.format(path=text_file, max_tokens=target, seed=seed)], check=True, cwd=out
        )
    settings = {
        "model": model,
        "original_length": original,
        "steps": steps,
        "batch_size": batch,
        "learning_rate": args.learning_rate,
        "limit": limit,
        "kv_limit": args.kv_limit or limit,
        "kv_length": args.kv_length or original,
        "ppl_windows": windows,
        "ropes": ropes,
        "train": train_settings(args),
        "dtype": args.dtype,
        "heldout_text": text_file,
        "split": args.split,
        "variants": variants,
        "variants_side_by_side": not args.sequential,
        "retrieval": {"text": args.retrieval_text or "world facts", "every_length": args.retrieval_at_every_length},
    }

    train_file = None
    if args.train_text:
        train_file = str(out / "train_documents.jsonl")
        subprocess.run(
            [
                python,
                "-c",
                TRAIN_TEXT.format(
                    path=train_file,
                    source=args.train_text,
                    share=args.train_text_share,
                    mix=args.train_mix,
                    max_tokens=target,
                    rows=steps * batch,
                    retrieval=args.train_retrieval_text,
                ),
            ],
            check=True,
        )

    for rope in (
        [] if args.skip_training else ropes
    ):  # one rope at a time; its variants side by side (a small model leaves the GPU idle) unless --sequential
        jobs = []
        for index, attention in enumerate(variants):
            folder = out / f"{rope}_{attention}"  # the recipe claims it: nothing of ours goes inside
            recipe = [
                "--model_name_or_path",
                model,
                "--attention",
                attention,
                "--rope_scaling",
                rope,
                "--output_dir",
                str(folder),
                "--max_length",
                str(target),
                "--max_steps",
                str(steps),
                "--num_train_rows",
                str(steps * batch),
                "--per_device_train_batch_size",
                str(batch),
                "--learning_rate",
                str(args.learning_rate),
                "--warmup_steps",
                str(min(20, steps // 10)),
                "--save_steps",
                str(10**6),
                "--logging_steps",
                "25",
                "--seed",
                "0",
                "--eval_limit",
                str(windows),
                "--eval_passkey_limit",
                str(limit),
                "--eval_niah",
                "true",
                "--eval_baselines",
                str(index == 0).lower(),
                "--eval_batch_size",
                str(args.eval_batch_size),
                "--eval_text_file",
                text_file,
                "--eval_ppl_lengths",
                *map(str, lengths),
                "--eval_passkey_lengths",
                *map(str, lengths if args.retrieval_at_every_length else [target]),
                "--dtype",
                args.dtype,
                "--eval_split",
                args.split,
            ]
            if args.retrieval_text:
                recipe += ["--eval_retrieval_text", args.retrieval_text]
            if train_file:
                recipe += ["--dataset_name", train_file, "--dataset_text_field", "text"]
            else:
                recipe += ["--train_mix", *args.train_mix]
            jobs.append((launch_recipe("sinklora", *recipe), folder.with_suffix(".log")))
        run_parallel(jobs, workers=1 if args.sequential else None)
    results, speeds = collect(out, ropes, variants)

    summary = {
        "command": command_line(),
        "tree": git_commit(),
        "settings": settings,
        "results": results,
        "ppl_relative_to_full": relative_to_full(results, ropes, lengths),
        "training_speed": speeds,
        "tokens_per_s_relative_to_full": speed_relative_to_full(speeds, ropes),
    }
    if not args.skip_kv:
        summary["kv_cache_at_L"] = kv_comparison(
            out, model, args, args.kv_length or original, text_file, args.kv_limit or limit, kv_budgets
        )
        if {"h2o:0.2", "window:0.2"} <= set(kv_budgets):
            summary["kv_paired_windows"] = kv_paired(summary["kv_cache_at_L"])
    summary["targets"] = targets(results, ropes, target, summary.get("kv_cache_at_L"), variants)
    (out / "sinklora_science.json").write_text(json.dumps(summary, indent=2))
    rows = report(summary, ropes, lengths)
    (out / "sinklora_science.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


def train_settings(args) -> dict:
    """The training rows' settings as the run's JSON records them."""
    return {
        "text": args.train_text,
        "text_share": args.train_text_share,
        "world_mix": args.train_mix,
        # the world's pass key / needle haystack: None (its true statements) or the text whose train portion it is
        "retrieval_text": args.train_retrieval_text,
    }


def kv_comparison(out, model: str, args, length: int, text_file: str, limit: int, budgets: list[str]) -> dict:
    """Passkey and streamed perplexity at `length` (L by default) for the full cache, H2O and the sinks + window cache
    (`KV_BUDGETS`)."""
    eval_cli = [
        *eval_command("--model", model, "--dtype", args.dtype, "--no_progress", "--limit", str(limit)),
        "--batch_size",
        str(args.eval_batch_size),
        "--tasks",
        "long_ppl" if args.skip_kv_passkey else "passkey,long_ppl",
        "--lengths",
        str(length),
        "--haystack_file",
        text_file,
        "--split",
        args.split,
    ]
    jobs = []
    for budget in sorted(budgets, key=lambda budget: budget == "full"):  # the streaming caches take longest
        name = kv_name(budget)
        (out / name).mkdir(exist_ok=True)
        jobs.append(([*eval_cli, "--kv_cache", budget, "--output_path", str(out / name)], out / name / "eval.log"))
    run_parallel(jobs, args.kv_workers)
    metrics = {budget: harness_metrics(out / kv_name(budget)) for budget in budgets}
    return kv_table(metrics, length, {budget: ppl_windows(out / kv_name(budget), length) for budget in budgets})


def collect(out: Path, ropes: list[str], variants: list[str]) -> tuple[dict, dict]:
    """From each trained variant's `eval_results.json`: ({model: {task: {metric: value}}}, the untrained references
    included; {variant: its training_speed})."""
    results, speeds = {}, {}
    for rope in ropes:
        for attention in variants:
            recorded = json.loads((out / f"{rope}_{attention}" / "adapter" / "eval_results.json").read_text())
            results[f"{rope}_{attention}"] = recorded["summary"]
            # absent from adapters trained before the recipe recorded it
            if (speed := recorded.get("training_speed")) is not None:
                speeds[f"{rope}_{attention}"] = speed
            for name, summary in recorded.get("before", {}).items():
                results["original" if name == "original" else f"{rope}_untrained"] = summary
    return results, speeds


def context_length(model: str) -> int:
    """The model's own context (its config's `max_position_embeddings`): L, the length training extends 4x."""
    from transformers import AutoConfig

    from ctxaware.models import resolve_model_path

    return AutoConfig.from_pretrained(resolve_model_path(model)).max_position_embeddings


def kv_name(budget: str) -> str:
    return f"kv_{budget.replace(':', '_')}"


def relative_to_full(results: dict, ropes: list[str], lengths: list[int]) -> dict:
    """{rope: {variant: {ppl_len{L}: ppl / full attention's ppl}}}, variants including the untrained reference."""
    table = {}
    for rope in (rope for rope in ropes if f"{rope}_full" in results):
        full = results[f"{rope}_full"]["long_ppl"]
        table[rope] = {
            variant: {f"ppl_len{n}": results[name]["long_ppl"][f"ppl_len{n}"] / full[f"ppl_len{n}"] for n in lengths}
            for variant in ("untrained", *VARIANTS)
            if (name := f"{rope}_{variant}") in results
        }
    return table


def speed_relative_to_full(speeds: dict, ropes: list[str]) -> dict:
    """{rope: {variant: training tokens/s / full attention's}} for each RoPE method whose full variant ran."""
    return {
        rope: {
            variant: speeds[name]["tokens_per_s"] / speeds[f"{rope}_full"]["tokens_per_s"]
            for variant in VARIANTS
            if (name := f"{rope}_{variant}") in speeds
        }
        for rope in ropes
        if f"{rope}_full" in speeds
    }


def retrieval(result: dict, target: int) -> tuple[float | None, float | None]:
    """(passkey, niah) accuracy at `target` tokens; None where not evaluated."""
    passkey = result.get("passkey", {}).get(f"acc_len{target}")
    niah = result.get("niah", {}).get(f"acc_plain_len{target}")
    return passkey, niah


def targets(
    results: dict, ropes: list[str], target: int, kv: dict | None = None, variants=("full", "s2", "sf")
) -> dict[str, bool]:
    """Each target, met (True) or missed (False), per RoPE method; a missing number misses its target. A comparison
    with a variant the run did not ask for (`variants`) is not judged: a run of SF alone has no full attention."""
    met = {}
    key = f"ppl_len{target}"
    for rope in ropes:
        sf, full, s2 = (results.get(f"{rope}_{v}", {}) for v in ("sf", "full", "s2"))
        untrained = results.get(f"{rope}_untrained", {})
        sf_ppl, full_ppl = sf.get("long_ppl", {}).get(key), full.get("long_ppl", {}).get(key)
        passkey, niah = retrieval(sf, target)
        met[f"{rope}: sf passkey@{target} >= {RETRIEVAL_TARGET}"] = passkey is not None and passkey >= RETRIEVAL_TARGET
        met[f"{rope}: sf niah@{target} >= {RETRIEVAL_TARGET}"] = niah is not None and niah >= RETRIEVAL_TARGET
        if "full" in variants:
            met[f"{rope}: sf ppl@{target} within {PPL_TOLERANCE - 1:.0%} of full"] = (
                sf_ppl is not None and full_ppl is not None and sf_ppl <= PPL_TOLERANCE * full_ppl
            )
        s2_ppl = s2.get("long_ppl", {}).get(key)
        if "s2" in variants:
            met[f"{rope}: s2 ppl@{target} no better than sf"] = (
                s2_ppl is not None and sf_ppl is not None and s2_ppl >= sf_ppl
            )
        untrained_ppl = untrained.get("long_ppl", {}).get(key)
        met[f"{rope}: sf ppl@{target} below the untrained scaled model's"] = (
            untrained_ppl is not None and sf_ppl is not None and sf_ppl < untrained_ppl
        )
    if kv:
        met["kv: every cache holds at most its budget"] = all(row["within_budget"] for row in kv.values())
        if "h2o:0.2" in kv and "window:0.2" in kv:
            full_ppl = kv["full"]["ppl"]
            met["kv: h2o:0.2 raises ppl less than window:0.2"] = (
                kv["h2o:0.2"]["ppl"] - full_ppl < kv["window:0.2"]["ppl"] - full_ppl
            )
    return met


def ppl_windows(results_dir: Path, length: int) -> list[dict]:
    """Each long_ppl window of `length` tokens of the newest `ctxaware eval --output_path` run in `results_dir`, in
    text order: {"window": its index in the text, "tokens": tokens scored, "ppl": its perplexity}."""
    (path,) = sorted(results_dir.glob("*/results_*.json"))[-1:]
    samples = path.parent / json.loads(path.read_text())["samples_files"]["long_ppl"]
    rows = [json.loads(line) for line in samples.read_text().splitlines() if line.strip()]
    return [
        {"window": row["doc_id"], "tokens": row["tokens_scored"], "ppl": row["ppl"]}
        for row in sorted(rows, key=lambda row: row["doc_id"])
        if row["length"] == length
    ]


def pooled_ppl(windows: list[dict]) -> float:
    """The perplexity of all the windows' tokens together: the exp of their token-weighted mean log-perplexity."""
    return math.exp(sum(w["tokens"] * math.log(w["ppl"]) for w in windows) / sum(w["tokens"] for w in windows))


def kv_paired(kv: dict, first: str = "h2o:0.2", second: str = "window:0.2") -> dict:
    """Window by window (the same text through every cache): each cache's increase in streamed perplexity over the
    full cache's, and `second`'s minus `first`'s with its mean, standard deviation and standard error; `first` lower
    by more than two standard errors is `separated`."""
    full = [w["ppl"] for w in kv["full"]["windows"]]
    rises = {b: [w["ppl"] - f for w, f in zip(kv[b]["windows"], full, strict=True)] for b in (first, second)}
    differences = [b - a for a, b in zip(rises[first], rises[second], strict=True)]
    mu, se = mean(differences), mean_stderr(differences)
    return {
        "windows": [w["window"] for w in kv["full"]["windows"]],
        "increase_over_full": {
            b: {"per_window": r, "mean": mean(r), "stderr": mean_stderr(r)} for b, r in rises.items()
        },
        f"{second} - {first}": {
            "per_window": differences,
            "mean": mu,
            "sd": se * math.sqrt(len(differences)),
            "stderr": se,
            "separated": mu > 2 * se,
        },
    }


def kv_table(metrics: dict, length: int, windows: dict[str, list[dict]]) -> dict:
    """Per KV cache: passkey, streamed perplexity (pooled, and per window for paired comparisons) and cache bytes at
    `length`; the full cache's bytes are those of a cache holding every token the evicting runs fed (the full-cache
    perplexity is one pass, equal to streaming it)."""
    evicting = next(budget for budget in metrics if budget != "full")
    full_bytes = metrics[evicting]["long_ppl"][f"kv_full_bytes_len{length}"]
    table = {}
    for budget, result in metrics.items():
        held = result["long_ppl"].get(f"kv_bytes_len{length}", full_bytes)
        kept = math.ceil(float(budget.partition(":")[2] or 1) * length)  # entries the budget allows
        ppl = result["long_ppl"][f"ppl_len{length}"]
        if not math.isclose(pooled_ppl(windows[budget]), ppl, rel_tol=1e-9):
            raise ValueError(f"{budget}: the per-window perplexities do not pool to the run's ppl_len{length} {ppl}")
        table[budget] = {
            "passkey": result["passkey"]["acc"] if "passkey" in result else None,
            "ppl": ppl,
            "windows": windows[budget],
            "kv_bytes": held,
            "kv_full_bytes": full_bytes,
            "memory_saved": 1 - held / full_bytes,
            # full_bytes covers the L - 1 tokens fed (the last one predicts nothing); integer-valued, so exact
            "within_budget": held <= full_bytes and held * (length - 1) <= full_bytes * kept,
        }
    return table


def report(summary: dict, ropes: list[str], lengths: list[int]) -> list[str]:
    results, relative, target = summary["results"], summary["ppl_relative_to_full"], lengths[-1]
    speeds, speed_relative = summary["training_speed"], summary["tokens_per_s_relative_to_full"]
    rows = [
        f"| model | ppl@{lengths[0]} | ppl@{lengths[1]} | ppl@{target} | ppl@{target} / full | passkey@{target} | "
        f"niah@{target} | train tokens/s | tokens/s / full | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    names = ["original"] + [f"{rope}_{v}" for rope in ropes for v in ("untrained", *VARIANTS)]
    for name in (n for n in names if n in results):
        rope, _, variant = name.partition("_")
        ratio = relative.get(rope, {}).get(variant, {}).get(f"ppl_len{target}")
        passkey, niah = retrieval(results[name], target)
        cells = [f"{results[name]['long_ppl'][f'ppl_len{n}']:.2f}" for n in lengths]
        cells += [f"{ratio:.3f}" if ratio is not None else "-"]
        cells += [f"{value:.2f}" if value is not None else "-" for value in (passkey, niah)]
        speed, speed_ratio = speeds.get(name), speed_relative.get(rope, {}).get(variant)
        peak = speed and speed["peak_memory_gib"]  # None on a CPU
        cells += [
            f"{speed['tokens_per_s']:.0f}" if speed else "-",
            f"{speed_ratio:.2f}" if speed_ratio is not None else "-",
            f"{peak:.1f}" if peak is not None else "-",
        ]
        rows.append(f"| {name.replace('_', ' ')} | " + " | ".join(cells) + " |")
    if speeds and summary["settings"]["variants_side_by_side"]:
        rows += [
            "",
            "Training tokens/s: each RoPE method's variants trained side by side, sharing one GPU (--sequential "
            "trains them one at a time).",
        ]
    rows += (
        []
        if "kv_cache_at_L" not in summary
        else [
            "",
            f"| KV cache (base model, {summary['settings'].get('kv_length', lengths[0])} tokens) | passkey | ppl (streamed) | K/V bytes per sample | saved |",
            "|---|---|---|---|---|",
        ]
    )
    for budget, row in summary.get("kv_cache_at_L", {}).items():
        rows.append(
            f"| {budget} | {'-' if row['passkey'] is None else format(row['passkey'], '.2f')} | {row['ppl']:.2f} | {row['kv_bytes']:,.0f} | "
            f"{row['memory_saved']:.0%} |"
        )
    rows += ["", "Targets:"] + [f"- {name}: {'met' if ok else 'MISSED'}" for name, ok in summary["targets"].items()]
    return rows


# Long documents (passkeys, needles, key-value lists) drawn with another seed than the recipe's training rows (seed 0),
# so perplexity at 4L measures the use of distant context on text the adapters never saw.
HELDOUT_SEEDS = {"test": 9999, "validation": 9998}  # documents of neither split are in the training rows (seed 0)
HELDOUT_TEXT = """
from ctxaware.world import build_world, pretraining_corpus
mix = {{"passkey": 1.0, "needle": 1.0, "key_value": 0.5}}
docs = pretraining_corpus(build_world(0), 200, seed={seed}, mix=mix, max_tokens={max_tokens})
open({path!r}, "w").write("\\n\\n".join(doc["text"] for doc in docs))
"""

# Training documents: --train_text's (`books`: its train portion, cut into documents of about a row each) and the
# world's --train_mix documents, interleaved so a `share` of them are the text's; seed 0, as the recipe's rows. With
# `retrieval` (--train_retrieval_text), the world's pass key and needle documents hide their key in that text's train
# portion instead of the world's statements.
TRAIN_TEXT = """
import itertools, json, random
from ctxaware.texts import read_text
from ctxaware.world import build_world, pretraining_corpus
text = read_text({source!r}, split="train", what="--train_text")
piece = 4 * {max_tokens}  # characters: about one row of tokens
texts = [text[i : i + piece] for i in range(0, len(text), piece)]
share, rows, retrieval = {share!r}, {rows!r}, {retrieval!r}
mix = {{kind: float(w) for kind, _, w in (e.partition(":") for e in {mix!r})}}
haystack = read_text(retrieval, split="train", what="--train_retrieval_text") if retrieval else None
corpus = pretraining_corpus(
    build_world(0), 10**9, seed=0, mix=mix, max_tokens={max_tokens}, haystack_text=haystack
) if share < 1 else []
world = [d["text"] for d in itertools.islice(corpus, 4 * rows)]
rng, docs = random.Random(0), []
for _ in range(4 * rows):
    docs.append(texts[len(docs) % len(texts)] if not world or rng.random() < share else world[len(docs) % len(world)])
with open({path!r}, "w") as handle:
    handle.writelines(json.dumps({{"text": d}}) + "\\n" for d in docs)
"""

SMOKE_MODEL = """
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from ctxaware.models import resolve_model_path
tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("ctxaware-tiny"))
torch.manual_seed(0)
config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64, tie_word_embeddings=True,
    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
LlamaForCausalLM(config).save_pretrained({path!r})
tokenizer.save_pretrained({path!r})
"""


if __name__ == "__main__":
    main()
