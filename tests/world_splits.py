"""Helpers, not tests: which world entities a record is about, so that tests can check that a split's records use
only that split's entities (a test record about a training entity measures memorised QA, not the skill).

A record's subjects: whose fact a question asks, who writes a post, who is in a word problem. Passages also state one
fact about another entity, and posts name other people and places: those are world knowledge that pretraining states
for every split, not what the record asks about.
"""

import re

from ctxaware.world.tasks import ARITHMETIC_OPS, arithmetic_split


NAME = re.compile(r"[A-Z][a-z]+")


def entity_splits(world) -> dict[str, str]:
    """Every name of the world -> its split: entities by `split_of`, context-only (novel) names by their pool."""
    splits = dict(world.split_of)
    for split, names in world.novel_names.items():
        splits.update(dict.fromkeys(names, split))
    return splits


def subject_text(generator: str, record: dict) -> str:
    """The part of a record of `ctxaware.world.<generator>` that names its subjects."""
    if generator in ("closed_book_qa", "context_qa"):
        return record["question"]
    if generator == "chat_sft":
        return record["messages"][0]["content"].rsplit("Question:", 1)[-1]
    if generator == "arithmetic_pairs":
        return record["clean"]  # the corrupted prompt names the same person
    if generator in ("arithmetic", "arithmetic_records"):
        return record["prompt"]
    if generator in ("summarization", "preference_pairs"):
        post = record["post"] if generator == "summarization" else record["prompt"]
        return post.split(" here.", 1)[0]  # "Hi all, <Name> here. ..."
    raise ValueError(f"no subject rule for generator {generator!r}")


def wrong_split_subjects(generator: str, record: dict, split: str, splits: dict[str, str]) -> list[str]:
    """Why `record` does not belong to `split` (empty when it does): subjects of other splits, no subject found
    where there must be one, or (arithmetic; of a pair, the clean prompt) operands whose hash puts the problem in another split."""
    problems = []
    if generator.startswith("arithmetic"):
        a, b = map(int, re.findall(r"\d+", subject_text(generator, record)))
        if arithmetic_split(a, record["op"], b) != split:
            problems.append(f"operands {a} {record['op']} {b} are {arithmetic_split(a, record['op'], b)}")
        if record["op"] in ARITHMETIC_OPS and record.get("template") != "word":  # bare problems name nobody
            return problems
    names = {word for word in NAME.findall(subject_text(generator, record)) if word in splits}
    if not names:
        problems.append("no world entity found")
    problems += [f"{name} is {splits[name]}" for name in sorted(names) if splits[name] != split]
    return problems
