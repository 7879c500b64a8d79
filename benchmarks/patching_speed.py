"""Patching speed: one forward per component against several components a forward (`rows_per_forward`), on a model's
arithmetic pairs, at a few batch sizes; the two ways' scores must agree.

    python benchmarks/patching_speed.py --model smollm2-135m --batch 2 16 --heads 45 --repeats 2 --out FILE.json

Timed in alternation in one process (wall clock, `torch.set_num_threads` as given), on the first batch of kept
question-template pairs (2-digit + - *, validation split), cut to each batch size.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from science_common import command_line, git_commit

from ctxaware.heads import HeadLayout
from ctxaware.methods.patching import (
    PatchingBatch,
    build_batches,
    keep_answered,
    patched_logit_differences,
    run_with_cache,
)
from ctxaware.models import load_model
from ctxaware.world.tasks import arithmetic_pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, nargs="+", default=[2, 16], help="pairs a batch")
    parser.add_argument("--heads", type=int, default=45, help="heads patched (every third layer's, in order)")
    parser.add_argument("--rows_per_forward", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    model.eval()
    layout = HeadLayout.from_model(model)
    pairs = arithmetic_pairs(0, "validation", 64, ops=("+", "-", "*"), digits=(2,), templates=("question",))
    first = keep_answered(model, build_batches(pairs, tokenizer))[0]
    heads = [("head", layer, head) for layer in range(0, layout.num_layers, 3) for head in range(layout.num_heads)]
    heads = heads[: args.heads]
    rows = []
    for size in args.batch:
        if size > first.clean_ids.shape[0]:
            parser.error(f"--batch {size}: the first batch of kept pairs holds {first.clean_ids.shape[0]}")
        batch = PatchingBatch(*(t[:size] for t in vars(first).values()))
        _, clean = run_with_cache(model, batch.clean_ids)
        _, corrupted = run_with_cache(model, batch.corrupted_ids)
        times, scores = {"one_a_forward": [], "grouped": []}, {}
        for _ in range(args.repeats):
            for name, per_forward in (("one_a_forward", size), ("grouped", args.rows_per_forward)):
                start = time.perf_counter()
                scores[name] = patched_logit_differences(
                    model, batch.clean_ids, clean, corrupted, batch, heads, layout=layout, rows_per_forward=per_forward
                )
                times[name].append(time.perf_counter() - start)
        rows.append(
            {
                "pairs": size,
                "tokens": first.clean_ids.shape[1],
                "seconds": times,
                "speedup_median": statistics.median(times["one_a_forward"]) / statistics.median(times["grouped"]),
                "max_abs_score_difference": (scores["one_a_forward"] - scores["grouped"]).abs().max().item(),
            }
        )
        print(rows[-1])
    result = {
        "command": command_line(),
        "tree": git_commit(),
        "threads": args.threads,
        "heads": len(heads),
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
