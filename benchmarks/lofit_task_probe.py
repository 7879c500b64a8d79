"""The base model's score on candidate tasks of `recipes/lofit.py` (forward passes only), to choose one on which a
model starts low: scored with the recipe's own records and `score` (greedy, first line starts with the answer).

    python benchmarks/lofit_task_probe.py --model smollm2-135m --split validation --limit 48 \
        --tasks world/context_qa,world/arithmetic,world/truthful_qa,world/chat_qa --out FILE.json

known_facts/truthful keeps the facts the model completes closed-book (its `*_records` count them; `train_facts`: the
training facts kept, which its training records cycle through). `--replies` also keeps every reply, and for tasks with
integer answers counts the wrong replies that are a bare number (a wrong result) apart from the others (wrong format,
e.g. the problem restated and cut at the scorer's token limit).
"""

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch
from science_common import RECIPES, command_line
from transformers import AutoModelForCausalLM

from ctxaware.models import load_tokenizer, resolve_model_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--limit", type=int, default=48, help="records scored per task")
    parser.add_argument("--tasks", default="world/context_qa,world/arithmetic,world/truthful_qa,world/chat_qa")
    parser.add_argument("--replies", action="store_true", help="keep every reply and count the wrong ones' forms")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    sys.path.insert(0, str(RECIPES))
    import lofit as recipe

    path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tasks = {}
    for task in args.tasks.split(","):
        start = time.time()
        options = recipe.LoFiTArguments(task=task)
        records = recipe.with_bos(recipe.load_records(options, args.split, tokenizer, model), tokenizer)
        train = recipe.load_records(options, "train", tokenizer, model)
        scored = records[: args.limit]
        replies = recipe.sft_replies(model, tokenizer, scored)
        correct = [recipe.is_correct(reply, record) for reply, record in zip(replies, scored)]
        tasks[task] = {
            "score": sum(correct) / len(scored),
            "scored": len(scored),
            f"{args.split}_records": len(records),
            "train_records": len(train),
            "example": scored[0],
            "seconds": round(time.time() - start, 1),
        }
        if "fact" in train[0]:
            tasks[task]["train_facts"] = recipe.distinct_facts(train)
        if args.replies:
            tasks[task].update(reply_forms(scored, replies, correct))
        print(task, json.dumps(tasks[task]), flush=True)
    summary = {"command": command_line(), "model": args.model, "split": args.split, "tasks": tasks}
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")


def reply_forms(records: list[dict], replies: list[str], correct: list[bool]) -> dict:
    """Every reply with its record and verdict; with integer answers, the wrong replies whose first line is a bare
    integer (a wrong result) and the others (a wrong format)."""
    kept = [
        {"prompt": r["prompt"], "answer": r["completion"].strip(), "reply": reply, "correct": ok}
        for r, reply, ok in zip(records, replies, correct)
    ]
    forms = {"replies": kept}
    if all(re.fullmatch(r"-?\d+", r["completion"].strip()) for r in records):
        wrong = [reply.strip().split("\n")[0].strip() for reply, ok in zip(replies, correct) if not ok]
        bare = sum(re.fullmatch(r"-?\d+", line) is not None for line in wrong)
        forms.update(wrong=len(wrong), wrong_bare_integer=bare, wrong_other_form=len(wrong) - bare)
    return forms


if __name__ == "__main__":
    main()
