"""Long documents with something to retrieve: passkeys, needles in a haystack, key-value lists.

`passkey_example` and `needle_example` build evaluation records at an exact token length with the key at a relative
depth; the `*_document` functions build the pretraining versions, whose length is measured in characters because the
corpus exists before the tokenizer.

Schemas: `passkey_example` -> {"text", "answer"} (the text ends right before the answer);
`needle_example` -> {"context", "question", "answer"} (format with `tasks.CONTEXT_QA_PROMPT`).
"""

import itertools
import random
import re
from collections.abc import Callable, Iterator

from ctxaware.world.entities import World, build_world
from ctxaware.world.names import make_name
from ctxaware.world.tasks import CONTEXT_QA_PROMPT


PASSKEY_INTRO = "There is a pass key hidden inside a lot of irrelevant text. Find it and remember it.\n"
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"
NEEDLE = "The secret word of {name} is {word}."
NEEDLE_QUESTION = "What is the secret word of {name}?"
CHARS_PER_TOKEN = 3.4  # the corpus averages 3.5 with the 4096-token tokenizer; lower keeps long docs in a row


def filler_sentences(world: World, rng: random.Random) -> Iterator[str]:
    """Endless true statements of the world's facts: haystack that never contradicts memory."""
    while True:
        yield rng.choice(world.facts).statement(rng.randrange(5))


def _fill(sentences: Iterator[str], budget: int, count: Callable[[list[str]], list[int]]) -> list[str]:
    """Sentences whose sizes sum to at least `budget` (measured in batches, since tokenizing one by one is slow)."""
    chosen, total = [], 0
    while total < budget:
        batch = list(itertools.islice(sentences, 64))
        if not batch:
            raise ValueError(
                f"the haystack text holds about {total} tokens, fewer than the {budget} needed: pass a longer text or "
                "ask for fewer tokens."
            )
        for sentence, size in zip(batch, count([" " + s for s in batch])):
            if total >= budget:
                break
            chosen.append(sentence)
            total += size
    return chosen


def text_sentences(text: str) -> list[str]:
    """`text`'s sentences in order, each with its whitespace runs folded to one space."""
    parts = re.split(r"(?<=[.!?])\s+", text.strip())
    return [" ".join(part.split()) for part in parts if part.strip()]


def sentences_from_random_start(sentences: list[str], rng: random.Random) -> Iterator[str]:
    """`sentences` endlessly, from one drawn by `rng` on and around again from the first: each document that draws
    its haystack this way reads its own stretch of the text."""
    if not sentences:
        raise ValueError("the haystack text holds no sentence: pass a longer text.")
    start = rng.randrange(len(sentences))
    return itertools.chain(itertools.islice(sentences, start, None), itertools.cycle(sentences))


def _haystack_sentences(haystack_text: str | None, world: World | None, rng: random.Random) -> Iterator[str]:
    """`haystack_text`'s sentences from its start (whitespace runs folded to one space), or the world's filler."""
    if haystack_text is None:
        return filler_sentences(world or build_world(0), rng)
    return iter(text_sentences(haystack_text))


def _insert(haystack: list[str], needle: str, depth: float, sizes: list[int]) -> list[str]:
    """`needle` placed at the sentence boundary nearest `depth` of the haystack's size."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} must lie in [0, 1] (0 = start of the haystack, 1 = its end).")
    target, running, cut = depth * sum(sizes), 0, 0
    best = abs(target)
    for index, size in enumerate(sizes, start=1):
        running += size
        if abs(running - target) < best:
            best, cut = abs(running - target), index
    return [*haystack[:cut], needle, *haystack[cut:]]


def _token_counter(tokenizer) -> Callable[[list[str]], list[int]]:
    return lambda texts: [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _exact_haystack(tokenizer, sentences: list[str], budget: int) -> tuple[list[str], list[int]]:
    """Trims the last sentence (by tokens) so the haystack holds exactly `budget` tokens, give or take a merge."""
    count = _token_counter(tokenizer)
    sizes = count([" " + s for s in sentences])
    while sentences and sum(sizes) > budget:
        excess = sum(sizes) - budget
        last_ids = tokenizer(" " + sentences[-1], add_special_tokens=False)["input_ids"]
        if excess >= len(last_ids):
            sentences, sizes = sentences[:-1], sizes[:-1]
            continue
        sentences[-1] = tokenizer.decode(last_ids[: len(last_ids) - excess]).strip()
        sizes[-1] = len(last_ids) - excess
    return sentences, sizes


def passkey_example(
    tokenizer, n_tokens: int, depth: float, seed: int, haystack_text: str | None = None, world: World | None = None
) -> dict:
    """A text of `n_tokens` tokens (without BOS) hiding a 5-digit pass key at relative `depth`, ending right before the
    key is to be repeated. The haystack is `haystack_text` (its sentences from the start) or true statements from
    `world` (default: the world of seed 0)."""
    rng = random.Random(f"passkey/{seed}")
    key = str(rng.randrange(10000, 100000))
    needle = PASSKEY_NEEDLE.format(key=key)
    count = _token_counter(tokenizer)
    overhead = sum(count([PASSKEY_INTRO, " " + needle, PASSKEY_QUESTION]))
    if n_tokens < overhead + 8:
        raise ValueError(f"n_tokens={n_tokens} is too short for a pass key prompt: use at least {overhead + 8}.")
    sentences = _fill(_haystack_sentences(haystack_text, world, rng), n_tokens - overhead, count)
    sentences, sizes = _exact_haystack(tokenizer, sentences, n_tokens - overhead)
    body = " ".join(_insert(sentences, needle, depth, sizes))
    return {"text": PASSKEY_INTRO + body + PASSKEY_QUESTION, "answer": key}


def needle_example(
    tokenizer, n_tokens: int, depth: float, seed: int, haystack_text: str | None = None, world: World | None = None
) -> dict:
    """A context of `n_tokens` tokens with one needle sentence at relative `depth`, and the question it answers.

    The haystack is `haystack_text` (split into sentences, used from its start) or true statements from `world`.
    """
    rng = random.Random(f"needle/{seed}")
    name, word = make_name(rng, 2), make_name(rng, 2).lower()
    needle = NEEDLE.format(name=name, word=word)
    count = _token_counter(tokenizer)
    budget = n_tokens - count([" " + needle])[0]
    sentences = _fill(_haystack_sentences(haystack_text, world, rng), budget, count)
    sentences, sizes = _exact_haystack(tokenizer, sentences, budget)
    context = " ".join(_insert(sentences, needle, depth, sizes))
    return {"context": context, "question": NEEDLE_QUESTION.format(name=name), "answer": word}


def _char_counter(texts: list[str]) -> list[int]:
    return [max(1, round(len(text) / CHARS_PER_TOKEN)) for text in texts]


def _document_filler(rng: random.Random, world: World, haystack: list[str] | None, budget: int) -> list[str]:
    """The filler of a pretraining document, about `budget` tokens: the world's true statements, or `haystack`'s
    sentences from a random one on. The statements are drawn either way, so that `rng` advances alike and a corpus
    with another haystack keeps every other draw of the world's (document kinds, keys, depths, other documents); the
    start in `haystack` comes from a generator seeded with `rng`'s state, which does not advance it."""
    statements = _fill(filler_sentences(world, rng), budget, _char_counter)
    if haystack is None:
        return statements
    return _fill(sentences_from_random_start(haystack, random.Random(str(rng.getstate()))), budget, _char_counter)


def passkey_document(rng: random.Random, world: World, max_tokens: int, haystack: list[str] | None = None) -> str:
    """A pretraining pass key document of up to about `max_tokens` tokens, answer included; its filler is the world's
    true statements or `haystack`'s sentences (see `text_sentences`) from a random one on."""
    key = str(rng.randrange(10000, 100000))
    needle = PASSKEY_NEEDLE.format(key=key)
    sentences = _document_filler(rng, world, haystack, rng.randrange(16, max(17, max_tokens - 60)))
    body = " ".join(_insert(sentences, needle, rng.random(), _char_counter(sentences)))
    return f"{PASSKEY_INTRO}{body}{PASSKEY_QUESTION} {key}"


def needle_document(rng: random.Random, world: World, max_tokens: int, haystack: list[str] | None = None) -> str:
    """A pretraining needle-in-a-haystack document with its question and answer; its filler as `passkey_document`'s."""
    name, word = rng.choice(world.novel_names["train"]), make_name(rng, 2).lower()
    sentences = _document_filler(rng, world, haystack, rng.randrange(16, max(17, max_tokens - 40)))
    context = " ".join(_insert(sentences, NEEDLE.format(name=name, word=word), rng.random(), _char_counter(sentences)))
    return CONTEXT_QA_PROMPT.format(context=context, question=NEEDLE_QUESTION.format(name=name)) + f" {word}"


def key_value_document(rng: random.Random, world: World, max_tokens: int) -> str:
    """A list of made-up keys with numeric values, then one value asked back."""
    n_pairs = rng.randrange(4, max(5, max_tokens // 10))
    keys = rng.sample(world.novel_names["train"], min(n_pairs, len(world.novel_names["train"])))
    values = [str(rng.randrange(100, 10000)) for _ in keys]
    lines = "\n".join(f"{key}: {value}" for key, value in zip(keys, values))
    asked = rng.randrange(len(keys))
    return f"Here is a list of codes.\n{lines}\nThe code of {keys[asked]} is {values[asked]}."
