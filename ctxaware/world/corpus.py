"""The pretraining corpus: a seeded stream of `{"text"}` documents mixing every kind of text the world offers.

What each kind teaches: encyclopedic statements (several paraphrases of every fact, all splits: the model's memory),
closed-book QA on train-split facts only (how to answer from memory), reading comprehension with counterfactual and
novel passages on train-split entities (how to answer from context, even against memory), arithmetic on train-split
problems, long documents with pass keys / needles / key-value lists up to the training length, posts with TL;DR
summaries, and chat-formatted turns. Nothing from the validation or test splits of the QA, arithmetic, summarisation or
chat tasks appears.
"""

import random
from collections.abc import Iterator

from ctxaware.world.entities import RELATIONS, World
from ctxaware.world.longctx import key_value_document, needle_document, passkey_document, text_sentences
from ctxaware.world.preference import SUMMARY_PROMPT, post_record
from ctxaware.world.tasks import (
    ARITHMETIC_OPS,
    CONTEXT_QA_PROMPT,
    QA_PROMPT,
    WORD_PROBLEMS,
    arithmetic_problem,
    arithmetic_split,
    chat_record,
    context_record,
    render_chat,
)


# Documents per kind, relative; tuned so facts are seen hundreds of times and reading comprehension is common.
DEFAULT_MIX = {
    "facts": 0.30,
    "closed_qa": 0.12,
    "reading": 0.24,
    "arithmetic": 0.12,
    "passkey": 0.03,
    "needle": 0.02,
    "key_value": 0.02,
    "post": 0.08,
    "chat": 0.07,
}


def facts_document(rng: random.Random, world: World) -> str:
    """An entity's facts, each in two random paraphrases, in shuffled order (the augmentation that lets QA reach
    facts learned only from statements)."""
    subject = rng.choice(list(world.facts_by_subject))
    facts = world.facts_by_subject[subject]
    sentences = [fact.statement(i) for fact in facts for i in rng.sample(range(5), 2)]
    rng.shuffle(sentences)
    return " ".join(sentences)


def closed_qa_document(rng: random.Random, world: World) -> str:
    facts = rng.sample(world.facts_in("train"), rng.randrange(3, 7))
    pairs = [
        QA_PROMPT.format(question=rng.choice(RELATIONS[f.relation].questions).format(s=f.subject)) + f" {f.object}"
        for f in facts
    ]
    return "\n\n".join(pairs)


def reading_document(rng: random.Random, world: World) -> str:
    record = context_record(rng, world, "train", novel=rng.random() < 0.3, counterfactual=rng.random() < 0.5)
    return CONTEXT_QA_PROMPT.format(context=record["context"], question=record["question"]) + f" {record['answer']}"


def arithmetic_document(rng: random.Random, world: World) -> str:
    names = world.entities_in("person", "train")
    lines = []
    while len(lines) < rng.randrange(4, 10):
        op = rng.choice([*ARITHMETIC_OPS, *ARITHMETIC_OPS, *WORD_PROBLEMS])
        digits = rng.choice((1, 2, 3) if op in ARITHMETIC_OPS else (1, 2))
        a, b, record = arithmetic_problem(rng, op, digits, names)
        if arithmetic_split(a, op, b) == "train":
            lines.append(f"{record['prompt']} {record['answer']}")
    return "\n".join(lines)


def post_document(rng: random.Random, world: World) -> str:
    record = post_record(rng, world, "train")
    return SUMMARY_PROMPT.format(post=record["post"]) + f" {record['reference']}"


def chat_document(rng: random.Random, world: World) -> str:
    return render_chat(chat_record(rng, world, "train", rng.choice(["knowledge", "context"]))["messages"])


def pretraining_corpus(
    world: World,
    n_docs: int = 200_000,
    seed: int = 0,
    mix: dict[str, float] | None = None,
    max_tokens: int = 512,
    haystack_text: str | None = None,
) -> Iterator[dict]:
    """`n_docs` documents `{"text"}` drawn by `mix` (default `DEFAULT_MIX`); long documents stay under about
    `max_tokens` tokens (estimated from characters). Different `seed`s give independent shards. The pass key and
    needle documents hide their key in `haystack_text` (each in its own stretch, from a random sentence on) when
    given, else in the world's true statements; everything else (document kinds, keys, depths, the other documents)
    is the same either way."""
    mix = mix or DEFAULT_MIX
    unknown = set(mix) - set(DEFAULT_MIX)
    if unknown:
        raise ValueError(f"Unknown document kinds {sorted(unknown)} in mix; known: {', '.join(DEFAULT_MIX)}.")
    haystack = None if haystack_text is None else text_sentences(haystack_text)
    makers = {
        "facts": lambda r: facts_document(r, world),
        "closed_qa": lambda r: closed_qa_document(r, world),
        "reading": lambda r: reading_document(r, world),
        "arithmetic": lambda r: arithmetic_document(r, world),
        "passkey": lambda r: passkey_document(r, world, max_tokens, haystack),
        "needle": lambda r: needle_document(r, world, max_tokens, haystack),
        "key_value": lambda r: key_value_document(r, world, max_tokens),
        "post": lambda r: post_document(r, world),
        "chat": lambda r: chat_document(r, world),
    }
    rng = random.Random(f"{world.seed}/corpus/{seed}")
    kinds, weights = list(mix), list(mix.values())
    for _ in range(n_docs):
        yield {"text": makers[rng.choices(kinds, weights)[0]](rng)}
