"""Summaries that state one fact twice: the detector, and comparisons that show a reward model the repeat is worse.

An RL policy whose reward model scores a repeated fact up learns to write "Kobebo ran 34 kilometres, moved to Doshin
and ran 34 kilometres."; `preference_score` charges only the extra words. `repeated_fact_pairs` pairs a post's
reference (chosen) with the same reference with one of its facts stated again as its last clause (rejected), the
way such a policy repeats. Kept apart from `preference.py`, whose source identifies the ground-truth judge.
"""

import random
import re

from ctxaware.world.entities import World
from ctxaware.world.preference import SUMMARY_PROMPT, _join_clauses, salient_terms, summarization


CLAUSE = re.compile(r",|\band\b")
# Every post has at least two key facts: at most this many comparisons per post, each repeating a different fact.
MAX_REPEATS_PER_POST = 2


def repeats_a_fact(summary: str) -> bool:
    """Whether a summary states one fact twice: a clause (split at commas and "and") whose salient terms (names,
    numbers, attribute words; the subject's name left out) are those of an earlier clause."""
    subject = set(summary.split()[:1])
    seen = set()
    for clause in CLAUSE.split(summary.rstrip(".")):
        terms = frozenset(salient_terms(clause) - subject)
        if terms in seen:
            return True
        if terms:
            seen.add(terms)
    return False


def repeated_fact_summary(record: dict, fact: int) -> str:
    """The record's reference with its key fact number `fact` stated again as the last clause."""
    name = record["key_facts"][0].split()[0]
    clauses = [key_fact[len(name) + 1 :] for key_fact in record["key_facts"]]
    return f"{name} {_join_clauses([*clauses, clauses[fact]])}."


def check_repeats_per_post(per_post: float) -> None:
    if not 0.0 <= per_post <= MAX_REPEATS_PER_POST:
        raise ValueError(
            f"repeat_negatives={per_post} must lie in [0, {MAX_REPEATS_PER_POST}]: it is the number of repeated-fact "
            f"comparisons per post (0.5: half the posts get one; {MAX_REPEATS_PER_POST}: each post two, repeating "
            "two different facts)."
        )


def repeated_fact_pairs(
    world: World, split: str, per_post: float, seed: int = 0, n_posts: int | None = None
) -> list[dict]:
    """Comparisons of the first `n_posts` posts of `summarization(world, split)` (default: all): each post gets
    `int(per_post)` of them, plus one more with probability `per_post - int(per_post)`, each repeating a different
    key fact (chosen at random). Chosen: the reference; rejected: `repeated_fact_summary`. Unlike the labelled
    comparisons they carry no label noise: `preference_score` always prefers the reference (same facts, fewer words).
    Rows as `preference_pairs`' ({"prompt", "chosen", "rejected", "post_id"}, summaries after a space); own RNG
    `"<world seed>/repeated_fact_pairs/<split>/<seed>"`."""
    check_repeats_per_post(per_post)
    rng = random.Random(f"{world.seed}/repeated_fact_pairs/{split}/{seed}")
    whole, share = int(per_post), per_post - int(per_post)
    pairs = []
    for index, record in enumerate(summarization(world, split)[:n_posts]):
        count = whole + (rng.random() < share)
        for fact in rng.sample(range(len(record["key_facts"])), count):
            rejected = repeated_fact_summary(record, fact)
            if repeats_a_fact(record["reference"]) or not repeats_a_fact(rejected):
                raise ValueError(
                    f"Post {split}-{index}: the reference {record['reference']!r} or its repeat {rejected!r} is "
                    "misread by `repeats_a_fact`; the world's key facts must carry salient terms of their own."
                )
            pairs.append(
                {
                    "prompt": SUMMARY_PROMPT.format(post=record["post"]),
                    "chosen": " " + record["reference"],
                    "rejected": " " + rejected,
                    "post_id": f"{split}-{index:05d}",
                }
            )
    return pairs
