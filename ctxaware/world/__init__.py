"""A seeded synthetic world (entities, attributes, relations) and every data set built from it.

`build_world(seed)` makes the world; the functions below turn it into records whose schemas are documented in their
modules and in `data/DATASHEET.md`. Splits `train` / `validation` / `test` never overlap.
"""

from ctxaware.world.corpus import DEFAULT_MIX, pretraining_corpus
from ctxaware.world.entities import RELATIONS, SPLITS, Fact, World, build_world
from ctxaware.world.longctx import needle_example, passkey_example
from ctxaware.world.preference import (
    SUMMARY_PROMPT,
    mediocre_references,
    policy_comparisons,
    preference_pairs,
    preference_score,
    summarization,
    unfaithful_terms,
)
from ctxaware.world.repeats import repeated_fact_pairs, repeats_a_fact
from ctxaware.world.tasks import (
    ARITHMETIC_PROMPT,
    CONTEXT_QA_PROMPT,
    QA_PROMPT,
    WORD_PROBLEM_PROMPT,
    arithmetic,
    chat_sft,
    closed_book_qa,
    context_qa,
    render_chat,
)


__all__ = [
    "ARITHMETIC_PROMPT",
    "CONTEXT_QA_PROMPT",
    "DEFAULT_MIX",
    "QA_PROMPT",
    "RELATIONS",
    "SPLITS",
    "SUMMARY_PROMPT",
    "WORD_PROBLEM_PROMPT",
    "Fact",
    "World",
    "arithmetic",
    "build_world",
    "chat_sft",
    "closed_book_qa",
    "context_qa",
    "mediocre_references",
    "needle_example",
    "passkey_example",
    "policy_comparisons",
    "pretraining_corpus",
    "preference_pairs",
    "preference_score",
    "render_chat",
    "repeated_fact_pairs",
    "repeats_a_fact",
    "summarization",
    "unfaithful_terms",
]
