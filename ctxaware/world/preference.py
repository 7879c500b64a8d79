"""Posts with key facts and reference summaries, the world's ground-truth preference over summaries, and labelled
comparison pairs.

Schemas: `summarization` -> {"post", "key_facts": [str, ...], "reference"}, prompt with `SUMMARY_PROMPT`;
`preference_pairs` -> {"prompt", "chosen", "rejected", "post_id"}, where `chosen`/`rejected` start with a space so
`prompt + chosen` is the corpus's format, and `post_id` = "<split>-<index>" indexes `summarization(world, split)`.

A key fact is "<Name> <clause>"; its salient terms are the numbers, capitalised words and attribute words (the world's
lower-case values: animals, items, professions, ...) after the first word (the values a summary must carry). The
preference rewards covering key facts, penalises salient terms absent from the post (unfaithful: a wrong name, number
or attribute, such as a goat for the post's cat) and words beyond the reference's length (brevity).
"""

import random
import re

from ctxaware.world.entities import PRODUCTS, PROFESSIONS, SPECIALTIES, World, check_split
from ctxaware.world.names import make_name
from ctxaware.world.tasks import split_rng


SUMMARY_PROMPT = "{post}\nTL;DR:"
ANIMALS = ["cat", "dog", "goat", "parrot", "rabbit", "horse"]
ITEMS = ["lamp", "coat", "bicycle", "kettle", "clock", "rug", "violin"]
# (sentence in the post, clause of the key fact and the reference); fields are filled per post, distinct values
# per event so that each key fact has salient terms of its own.
EVENTS = [
    ("Big news: last month I packed everything and moved to {city}.", "moved to {city}"),
    ("I finally started my new job at {company} as a {profession}.", "started working at {company}"),
    ("We adopted a {animal} and named it {pet}.", "adopted a {animal} named {pet}"),
    ("On Sunday I ran {number} kilometres without stopping.", "ran {number} kilometres"),
    ("At the market I bought a {item} for {price} coins.", "bought a {item} for {price} coins"),
    ("My sister and I spent a week visiting {place}.", "visited {place}"),
    ("At the station I ran into {person}, an old friend from school.", "met {person}"),
    ("I lost my {gift} somewhere near {town}.", "lost a {gift} near {town}"),
]
FILLERS = [
    "The weather has been grey all week.",
    "I keep forgetting to water my plants.",
    "Honestly I did not sleep much.",
    "My neighbours are painting their fence again.",
    "Tea helps, as always.",
    "Not sure why I am writing this at midnight.",
    "Anyway, that is enough about me.",
    "Some days just feel longer than others.",
    "I should cook more often.",
    "The bus was late twice.",
]
# Lower-case values of the world: a summary naming one the post lacks has made a detail up, as with a wrong name.
ATTRIBUTE_VOCABULARIES = (ANIMALS, ITEMS, PROFESSIONS, PRODUCTS, SPECIALTIES)
ATTRIBUTE_WORDS = {word for vocabulary in ATTRIBUTE_VOCABULARIES for word in vocabulary}
STOPWORDS = {"I", "The", "A", "An", "He", "She", "They", "We", "In", "On", "At", "And", "But", "My", "TL", "DR"}
WORD = re.compile(r"[A-Za-z]+|\d+")


def salient_terms(text: str, skip_first: bool = False) -> set[str]:
    words = WORD.findall(text)[1 if skip_first else 0 :]
    return {w for w in words if (w.isdigit() or w[0].isupper() or w in ATTRIBUTE_WORDS) and w not in STOPWORDS}


def key_fact_coverage(record: dict, summary: str) -> float:
    """Fraction of the record's key facts whose salient terms all appear in `summary` (0 when it has none)."""
    present = set(WORD.findall(summary))
    facts = record["key_facts"]
    return sum(salient_terms(fact, skip_first=True) <= present for fact in facts) / len(facts) if facts else 0.0


def unfaithful_terms(post: str, summary: str) -> set[str]:
    """The summary's salient terms that the post never mentions (case-insensitively): made-up details."""
    post_words = {w.lower() for w in WORD.findall(post)}
    return {term for term in salient_terms(summary) if term.lower() not in post_words}


def preference_score(record: dict, summary: str) -> float:
    """Ground-truth quality of `summary` for `record`: key-fact coverage (0..1), minus 0.25 per unfaithful term (a
    number, name or attribute word not in the post), minus 0.02 per word beyond the reference's length. The reference
    scores 1; a made-up detail costs its fact's coverage and the penalty, so it loses to leaving that fact out."""
    excess = max(0, len(WORD.findall(summary)) - len(WORD.findall(record["reference"])))
    return key_fact_coverage(record, summary) - 0.25 * len(unfaithful_terms(record["post"], summary)) - 0.02 * excess


def _join_clauses(clauses: list[str]) -> str:
    return clauses[0] if len(clauses) == 1 else ", ".join(clauses[:-1]) + " and " + clauses[-1]


def post_record(rng: random.Random, world: World, split: str) -> dict:
    """A first-person post with 2-4 events among filler sentences; the key facts are the events."""
    name = rng.choice(world.entities_in("person", split))
    city, place, town = rng.sample(world.entities["city"], 3)
    item, gift = rng.sample(ITEMS, 2)
    values = {
        "city": city,
        "place": place,
        "town": town,
        "gift": gift,
        "price": str(rng.randrange(100, 1000)),
        "company": rng.choice(world.entities["company"]),
        "profession": rng.choice(PROFESSIONS),
        "animal": rng.choice(ANIMALS),
        "pet": make_name(rng, 2),
        "number": str(rng.randrange(2, 100)),
        "item": item,
        "person": rng.choice([p for p in world.entities["person"] if p != name]),
    }
    events = rng.sample(EVENTS, rng.randrange(2, 5))
    sentences = [sentence.format(**values) for sentence, _ in events]
    sentences += rng.sample(FILLERS, rng.randrange(2, 5))
    rng.shuffle(sentences)
    clauses = [clause.format(**values) for _, clause in events]
    post = f"Hi all, {name} here. " + " ".join(sentences)
    return {
        "post": post,
        "key_facts": [f"{name} {clause}" for clause in clauses],
        "reference": f"{name} {_join_clauses(clauses)}.",
    }


def summarization(world: World, split: str, n: int | None = None) -> list[dict]:
    """`n` posts per split (default: three per person of the split), distinct within and across splits."""
    check_split(split)
    rng = split_rng(world.seed, "summarization", split)
    n = 3 * len(world.entities_in("person", split)) if n is None else n
    records, seen = [], set()
    while len(records) < n:
        record = post_record(rng, world, split)
        if record["post"] not in seen:
            seen.add(record["post"])
            records.append(record)
    return records


def mediocre_summary(rng: random.Random, record: dict) -> str:
    """A hurried human's summary: one key fact (at random) left out and a filler sentence of the post put in its
    place. Faithful, but it loses coverage and (the filler being longer than most clauses) some brevity."""
    name = record["key_facts"][0].split()[0]
    clauses = [fact[len(name) + 1 :] for fact in record["key_facts"]]
    clauses.pop(rng.randrange(len(clauses)))
    fillers = [filler for filler in FILLERS if filler in record["post"]]
    return f"{name} {_join_clauses(clauses)}. {rng.choice(fillers)}"


def mediocre_references(world: World, split: str, rate: float, seed: int = 0) -> list[str]:
    """One reference per record of `summarization(world, split)`, each replaced with probability `rate` by a
    `mediocre_summary` (TL;DR's references are such human summaries). Own RNG: the records, the comparisons and
    `preference_score` are unchanged, so the ground truth still says what is better."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate={rate} must lie in [0, 1]: it is the share of references made mediocre.")
    rng = random.Random(f"{world.seed}/mediocre_references/{split}/{seed}")
    return [
        mediocre_summary(rng, record) if rng.random() < rate else record["reference"]
        for record in summarization(world, split)
    ]


def candidate_summaries(rng: random.Random, world: World, record: dict) -> list[str]:
    """Summaries of graded quality: the reference, one fact dropped, a name or number swapped for a false city, an
    attribute swapped for another of its kind (when the reference has one), a mediocre human summary, padded with a
    filler sentence, and the post's lead. The swaps teach that a made-up detail is worse than a missing one."""
    name = record["key_facts"][0].split()[0]
    clauses = [fact[len(name) + 1 :] for fact in record["key_facts"]]
    dropped = clauses[:]
    dropped.pop(rng.randrange(len(dropped)))
    reference = record["reference"]
    terms = sorted(salient_terms(reference, skip_first=True))
    values = [term for term in terms if term not in ATTRIBUTE_WORDS]
    false_city = rng.choice([city for city in world.entities["city"] if city not in record["post"]])
    candidates = [
        reference,
        f"{name} {_join_clauses(dropped)}.",
        _swap_word(reference, rng.choice(values), false_city),
    ]
    attributes = [term for term in terms if term in ATTRIBUTE_WORDS]
    if attributes:
        attribute = rng.choice(attributes)
        (vocabulary,) = [v for v in ATTRIBUTE_VOCABULARIES if attribute in v]
        post_words = set(WORD.findall(record["post"]))
        false_attribute = rng.choice([word for word in vocabulary if word not in post_words])
        candidates.append(_swap_word(reference, attribute, false_attribute))
    sentences = re.split(r"(?<=[.!?])\s+", record["post"])
    return [
        *candidates,
        mediocre_summary(rng, record),
        f"{reference} {rng.choice([f for f in FILLERS if f in record['post']])}",
        " ".join(sentences[:2]),
    ]


def _swap_word(text: str, word: str, replacement: str) -> str:
    return re.sub(rf"\b{re.escape(word)}\b", replacement, text)


def preference_pairs(world: World, split: str, noise: float = 0.1, seed: int = 0, pairs_per_post: int = 2):
    """Comparisons among `candidate_summaries`, labelled by `preference_score`, each flipped with probability `noise`
    (the labeller's errors)."""
    rng = random.Random(f"{world.seed}/preference_pairs/{split}/{seed}")
    records = summarization(world, split)
    return _labelled_pairs(
        rng, split, records, lambda i: candidate_summaries(rng, world, records[i]), noise, pairs_per_post
    )


def policy_comparisons(
    world: World, split: str, summaries: list[list[str]], noise: float = 0.1, seed: int = 0, pairs_per_post: int = 2
):
    """Comparisons among a policy's own summaries, `summaries[i]` being several of record i of `summarization(world,
    split)`, labelled like `preference_pairs`: the paper's labelled comparisons of policy samples, so that a reward
    model learns what the truth says about the mistakes this policy makes (such as made-up details), not only about
    hand-made candidates."""
    records = summarization(world, split)
    if len(summaries) > len(records):
        raise ValueError(f"{len(summaries)} lists of summaries for the {len(records)} posts of split {split!r}.")
    rng = random.Random(f"{world.seed}/policy_comparisons/{split}/{seed}")
    return _labelled_pairs(rng, split, records[: len(summaries)], summaries.__getitem__, noise, pairs_per_post)


def _labelled_pairs(rng, split, records, summaries_of, noise, pairs_per_post) -> list[dict]:
    """Up to `pairs_per_post` pairs per record among its summaries (`summaries_of(index)`) of distinct
    `preference_score`, at random; the better one is `chosen` unless the labeller errs (probability `noise`)."""
    if not 0.0 <= noise <= 0.5:
        raise ValueError(f"noise={noise} must lie in [0, 0.5]: it is the probability a label is flipped.")
    pairs = []
    for index, record in enumerate(records):
        scored = [(preference_score(record, c), c) for c in dict.fromkeys(summaries_of(index))]
        options = [(a, b) for a in scored for b in scored if a[0] > b[0]]
        for better, worse in rng.sample(options, min(pairs_per_post, len(options))):
            if rng.random() < noise:
                better, worse = worse, better
            pairs.append(
                {
                    "prompt": SUMMARY_PROMPT.format(post=record["post"]),
                    "chosen": " " + better[1],
                    "rejected": " " + worse[1],
                    "post_id": f"{split}-{index:05d}",
                }
            )
    return pairs
