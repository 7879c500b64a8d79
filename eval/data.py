"""Where task records come from: the synthetic world shipped with ctxaware (the default), or a real data set by name.

Every loader returns plain dicts in the world's schema, so tasks never see where a record came from. Real data sets go
through `datasets.load_dataset` plus a column mapping that is tested on a tiny local `Dataset`.
"""

import functools
import importlib


def _world_module():
    try:
        return importlib.import_module("ctxaware.world")
    except ImportError as error:
        raise ImportError(
            f"The synthetic world (`ctxaware.world`) could not be imported ({error}); the default data of this task "
            "needs it. Reinstall ctxaware, or pass `--dataset NAME` for a task that supports a real data set."
        ) from error


@functools.cache
def world(seed: int):
    """The synthetic world of `seed` (cached: building it is deterministic)."""
    return _world_module().build_world(seed)


def world_records(generator: str, seed: int, split: str, limit: int | None = None) -> list[dict]:
    """Records of `ctxaware.world.<generator>(world, split)`, at most `limit` of them."""
    records = getattr(_world_module(), generator)(world(seed), split)
    out = []
    for record in records:
        if limit is not None and len(out) >= limit:
            break
        out.append(dict(record))
    return out


def world_function(name: str):
    """A function of the world module (needle_example, passkey_example, preference_score, ...)."""
    return getattr(_world_module(), name)


# Real data sets: name -> (load_dataset arguments, split, row mapping into the task's schema).
def squad_row(row: dict) -> dict:
    answers = row["answers"]["text"]
    return {"context": row["context"], "question": row["question"], "answer": answers[0], "answers": list(answers)}


def tldr_row(row: dict) -> dict:
    """trl-lib/tldr prompts end with `TL;DR:` already; the harness adds its own, so keep only the post."""
    from ctxaware.methods.rlhf import post_from_prompt

    return {"post": post_from_prompt(row["prompt"]), "reference": row["completion"].strip(), "key_facts": []}


def pg19_row(row: dict) -> dict:
    return {"text": row["text"]}


REAL_DATASETS: dict[str, dict[str, tuple[tuple, str, object]]] = {
    "extractive_qa": {"squad": (("rajpurkar/squad",), "validation", squad_row)},
    "summarization": {"tldr": (("trl-lib/tldr",), "test", tldr_row)},
    "long_ppl": {"pg19": (("emozilla/pg19-test",), "test", pg19_row)},
}


def real_records(task: str, name: str, limit: int | None, dataset=None) -> list[dict]:
    """Records of the real data set `name` for `task`; `dataset` (a loaded `datasets.Dataset`) skips the download."""
    known = REAL_DATASETS.get(task, {})
    if name not in known:
        options = ", ".join(known) or "none (this task uses the synthetic world only)"
        raise ValueError(f"Task {task} has no data set {name!r}; known: {options}.")
    args, split, mapping = known[name]
    if dataset is None:
        from datasets import load_dataset

        dataset = load_dataset(*args, split=split)
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    try:
        return [mapping(row) for row in dataset]
    except KeyError as error:
        raise KeyError(
            f"Data set {name} for {task} lacks the column {error}; it must have the columns of {args[0]}."
        ) from error
