"""`ctxaware score`: scores each user turn of a chat data set by how much its response depends on the user's context.

ctxaware score --model ctxaware-tiny --dataset world --limit 200 --output runs/scores
ctxaware score --model meta-llama/Meta-Llama-3-8B-Instruct --dataset HuggingFaceH4/ultrachat_200k \
    --split train_sft --limit 20000 --layer 15 --threshold 0.6 --output runs/ultrachat-scores

The metrics (`attention` at one layer, `--layer N`, or averaged over all; `loglik_gain`) are defined in
`ctxaware.methods.context_scoring`, which this command runs. Turns are chosen by `--select_by` above `--threshold` or
in the top `--percentile`; the output folder gets `scores.jsonl` (the records with `context_scores` per turn,
`context_score`, `context_dependent`), `summary.json` (Spearman agreement of the two metrics, AUROC against a `kind`
column when the data has one), `heads.json` (per layer and head, mean context mass on chosen turns minus the others:
the heads that `ctxaware eval --steer pasta:heads_from=...` steers) and `histogram.png`.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import ExitStack
from pathlib import Path

from ctxaware.io import atomic_file
from ctxaware.methods.context_scoring import (
    METRICS,
    WORLD_DATASET,
    example_score,
    heads_report,
    load_chat_records,
    score_records,
    select_turns,
    summarize,
)


OUTPUT_FILES = ("scores.jsonl", "summary.json", "heads.json", "histogram.png")


def register(subparsers) -> None:
    from ctxaware.models import EMBEDDED_MODEL_NAME

    parser = subparsers.add_parser(
        "score",
        help="score chat examples' context dependency (attention mass and log-likelihood gain)",
        description="Score each user turn of a chat data set by how much its response depends on the user's context.",
    )
    parser.add_argument("--model", default=EMBEDDED_MODEL_NAME, help="probe model: embedded name, folder or Hub id")
    parser.add_argument("--adapter", help="PEFT adapter folder or Hub id applied to the probe model")
    parser.add_argument(
        "--dataset",
        default=WORLD_DATASET,
        help="`world` (the synthetic world's chat_sft), a .jsonl/.json file, or a Hub data set name",
    )
    parser.add_argument("--split", default="train", help="data set split (e.g. train_sft for UltraChat)")
    parser.add_argument("--limit", type=int, help="score the first N records")
    parser.add_argument("--world_seed", type=int, default=0, help="seed of the synthetic world (for --dataset world)")
    parser.add_argument("--world_context_rate", type=float, default=0.5, help="--dataset world: context-chat share")
    parser.add_argument(
        "--world_knowledge_form",
        choices=["bare", "passage"],
        default="bare",
        help="--dataset world: knowledge chats ask the fact alone, or after a passage agreeing with it",
    )
    parser.add_argument(
        "--messages_column", help="column with the conversation (default: messages, or ShareGPT conversations)"
    )
    parser.add_argument(
        "--span",
        choices=["user", "context"],
        default="user",
        help="user: the whole user message (the paper); context: the record's `context` string",
    )
    parser.add_argument("--layer", default="all", help="layer index for the attention metric, or `all` (mean)")
    parser.add_argument("--select_by", choices=METRICS, default="attention", help="metric that chooses turns")
    parser.add_argument("--threshold", type=float, help="choose turns scoring >= this (the paper: attention 0.6)")
    parser.add_argument("--percentile", type=float, help="choose the top P%% of turns (default 50 without threshold)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=2048, help="tokens per conversation; later turns unscored")
    parser.add_argument("--output", required=True, help="output folder (scores.jsonl, summary.json, heads.json, png)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    parser.add_argument("--no_progress", action="store_true", help="hide progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        layer = _parse_layer(args.layer)
        if args.threshold is not None and args.percentile is not None:
            raise ValueError("pass --threshold or --percentile, not both")
        percentile = 50.0 if args.threshold is None and args.percentile is None else args.percentile
        if percentile is not None and not 0 < percentile < 100:
            raise ValueError(f"--percentile must be in (0, 100), got {percentile}")
        for name in ("limit", "batch_size", "max_length"):
            if getattr(args, name) is not None and getattr(args, name) <= 0:
                raise ValueError(f"--{name} must be a positive integer, got {getattr(args, name)}")
        records = load_chat_records(
            args.dataset,
            split=args.split,
            limit=args.limit,
            messages_column=args.messages_column,
            world_seed=args.world_seed,
            world_context_rate=args.world_context_rate,
            world_knowledge_form=args.world_knowledge_form,
        )
        from ctxaware.models import load_model

        model, tokenizer = load_model(args.model, adapter=args.adapter, dtype=args.dtype, device=args.device)
        turns, heads = score_records(
            model,
            tokenizer,
            records,
            layer=layer,
            span=args.span,
            batch_size=args.batch_size,
            max_length=args.max_length,
            progress=not args.no_progress,
        )
        threshold = select_turns(turns, args.select_by, threshold=args.threshold, percentile=percentile)
        summary = summarize(records, turns, select_by=args.select_by, threshold=threshold)
        summary["config"] = {k: v for k, v in vars(args).items() if k != "func"}
        write_outputs(
            args.output, records, turns, summary, heads_report(turns, heads, layer), threshold, args.select_by
        )
    except (ValueError, FileNotFoundError, IndexError) as error:
        print(f"ctxaware score: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2))
    print(f"\nScores: {Path(args.output) / 'scores.jsonl'}")
    return 0


def _parse_layer(value: str) -> int | None:
    if value == "all":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"--layer must be a layer index or `all`, got {value!r}") from None


def _histogram(path: Path, records, turns, threshold: float, select_by: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({str(r.get("kind")) for r in records}) if any(r.get("kind") for r in records) else [None]
    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 3.5))
    for ax, metric in zip(axes, METRICS):
        for kind in kinds:
            values = [
                t[metric]
                for r, rt in zip(records, turns)
                for t in rt
                if t[metric] is not None and (kind is None or str(r.get("kind")) == kind)
            ]
            ax.hist(values, bins=30, alpha=0.6, label=kind or "turns")
        if metric == select_by:
            ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.3g}")
        ax.set_xlabel(metric)
        ax.set_ylabel("turns")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def write_outputs(output: str | Path, records, turns, summary: dict, heads: dict, threshold: float, select_by: str):
    """Writes the four files into `output` (other files there are left alone), each through a temporary file; none
    is renamed into place before all are written, so a failure leaves the previous outputs as they were."""
    output = Path(output)
    with ExitStack() as stack:
        tmp = {name: stack.enter_context(atomic_file(output / name)) for name in OUTPUT_FILES}
        with open(tmp["scores.jsonl"], "w") as handle:
            for record, record_turns in zip(records, turns):
                row = {
                    **record,
                    "context_scores": record_turns,
                    "context_score": example_score(record_turns, select_by),
                    "context_dependent": any(t.get("chosen", False) for t in record_turns),
                }
                handle.write(json.dumps(row) + "\n")
        tmp["summary.json"].write_text(json.dumps(summary, indent=2, default=str) + "\n")
        tmp["heads.json"].write_text(json.dumps(heads) + "\n")
        _histogram(tmp["histogram.png"], records, turns, threshold, select_by)
    return output
