"""Where task records come from: the synthetic world shipped with ctxaware (the default), or a real data set by name.

Every loader returns plain dicts in the world's schema, so tasks never see where a record came from. Real data sets go
through `datasets.load_dataset` plus a column mapping that is tested on a tiny local `Dataset`.
"""

import functools
import importlib
import zlib


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


def sample_seed(seed: int, split: str) -> int:
    """Seed of the records a task draws itself (passkey keys, NIAH needles, their depths): the world seed on the test
    split, so reported test records stay what they were, and a fixed other stream per other split, so keys used to
    choose settings on validation never repeat the test's."""
    return seed if split == "test" else zlib.crc32(f"{split}:{seed}".encode())


def world_records(generator: str, seed: int, split: str, limit: int | None = None, **options) -> list[dict]:
    """Records of `ctxaware.world.<generator>(world, split, **options)`, at most `limit` of them."""
    records = getattr(_world_module(), generator)(world(seed), split, **options)
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


def gsm8k_row(row: dict) -> dict:
    from ctxaware.eval.gsm8k import gsm8k_row as row_of

    return row_of(row)


REAL_DATASETS: dict[str, dict[str, tuple[tuple, str, object]]] = {
    "extractive_qa": {"squad": (("rajpurkar/squad",), "validation", squad_row)},
    "gsm8k": {"openai/gsm8k": (("openai/gsm8k", "main"), "test", gsm8k_row)},
    "summarization": {"tldr": (("trl-lib/tldr",), "test", tldr_row)},
    "long_ppl": {"pg19": (("emozilla/pg19-test",), "test", pg19_row)},
}


def real_records(task: str, name: str, limit: int | None, dataset=None) -> list[dict]:
    """Records of the real data set `name` for `task` (a known name, or a local file with that data set's columns);
    `dataset` (a loaded `datasets.Dataset`) skips the loading."""
    from ctxaware.datafiles import is_local_file, load_rows

    known = REAL_DATASETS.get(task, {})
    local = is_local_file(name)
    if not known or (name not in known and not local):
        options = ", ".join(known) + ", or a local file with their columns" if known else "none"
        raise ValueError(f"Task {task} has no data set {name!r}; known: {options}.")
    args, split, mapping = known[name] if name in known else next(iter(known.values()))
    if dataset is None:
        dataset = (
            load_rows(name) if local else load_rows(args[0], config=args[1] if len(args) > 1 else None, split=split)
        )
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    rows = []
    for index, row in enumerate(dataset):
        try:
            rows.append(mapping(row))
        except (KeyError, TypeError) as error:
            raise KeyError(
                f"Data set {name} for {task}: row {index} lacks the column {error}; it must have the columns of "
                f"{args[0]}."
            ) from error
    return rows
