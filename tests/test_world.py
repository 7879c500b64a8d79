"""The synthetic world: determinism from its seed, disjoint splits, record schemas, the ground-truth preference, and
long-context examples at the requested length and depth."""

import hashlib
import itertools
import json
import random
import re

import pytest

from ctxaware.texts import read_text
from ctxaware.tokenizer import train_tokenizer
from ctxaware.world import (
    SPLITS,
    SUMMARY_PROMPT,
    arithmetic,
    build_world,
    chat_sft,
    closed_book_qa,
    context_qa,
    mediocre_references,
    needle_example,
    passkey_example,
    policy_comparisons,
    preference_pairs,
    preference_score,
    pretraining_corpus,
    render_chat,
    repeated_fact_pairs,
    repeats_a_fact,
    summarization,
    unfaithful_terms,
)
from ctxaware.world.longctx import (
    PASSKEY_INTRO,
    PASSKEY_NEEDLE,
    PASSKEY_QUESTION,
    sentences_from_random_start,
    text_sentences,
)
from ctxaware.world.preference import WORD, candidate_summaries
from ctxaware.world.tasks import ARITHMETIC_OPS, arithmetic_pairs, arithmetic_records
from tests import long_documents
from tests.world_splits import entity_splits, wrong_split_subjects


# sha256 of the first 50 facts and the first 30 corpus documents of the world of seed 0. It changes only when the
# generator changes, and then the shipped model no longer matches its world: retrain it and update this digest.
WORLD_0_DIGEST = "1e3864d0da058cead5e94e4b04738ba138ee5dc9d9eea13570b28878d0ac6a0b"


def world_slice(seed: int) -> list:
    world = build_world.__wrapped__(seed)  # bypass the cache: really regenerate
    facts = [(f.subject, f.relation, f.object, f.split) for f in world.facts[:50]]
    return [facts, [doc["text"] for doc in pretraining_corpus(world, 30, seed=0)]]


@pytest.fixture(scope="module")
def world():
    return build_world(0)


@pytest.fixture(scope="module")
def tokenizer(world):
    return train_tokenizer([doc["text"] for doc in pretraining_corpus(world, 1500, seed=7)], vocab_size=1024)


def test_world_regenerates_identically_from_its_seed():
    first = world_slice(0)
    assert world_slice(0) == first
    assert hashlib.sha256(json.dumps(first).encode()).hexdigest() == WORLD_0_DIGEST
    assert world_slice(1) != first


def test_world_is_consistent(world):
    capital_of = {f.subject: f.object for f in world.facts if f.relation == "capital"}
    country_of = {f.subject: f.object for f in world.facts if f.relation == "in_country"}
    assert all(country_of[city] == country for country, city in capital_of.items())
    names = [name for kind in world.entities.values() for name in kind]
    novel = [name for pool in world.novel_names.values() for name in pool]
    assert len(set(names)) == len(names) and not set(names) & set(novel)
    assert {f.split for f in world.facts} == set(SPLITS)


SPLIT_GENERATORS = {
    "closed_book_qa": closed_book_qa,
    "context_qa": lambda world, split: context_qa(world, split, n=300),
    "arithmetic": lambda world, split: arithmetic(world, split, n_per_cell=20),
    "summarization": summarization,
    "chat_sft": lambda world, split: chat_sft(world, split, n=300),
    "chat_sft_passage": lambda world, split: chat_sft(world, split, n=300, knowledge_form="passage"),
    "preference_pairs": preference_pairs,
    "arithmetic_records": lambda world, split: arithmetic_records(
        world, split, ops=ARITHMETIC_OPS, templates=("plain", "question", "word"), n_per_cell=10
    ),
    "arithmetic_pairs": lambda world, split: arithmetic_pairs(
        world, split, 60, ops=ARITHMETIC_OPS, templates=("plain", "word"), corruption="any"
    ),
}


@pytest.mark.parametrize("generator", SPLIT_GENERATORS)
def test_each_split_s_records_are_about_that_split_s_entities_only(world, generator):
    """Every entity belongs to one split, so this also makes the splits' subjects disjoint: no validation or test
    record asks about an entity whose questions, passages, posts or chats the training split (and pretraining) has."""
    splits = entity_splits(world)
    kind = generator.removesuffix("_passage")
    for split in SPLITS:
        records = SPLIT_GENERATORS[generator](world, split)
        assert records, (generator, split)
        wrong = {
            i: why for i, record in enumerate(records) if (why := wrong_split_subjects(kind, record, split, splits))
        }
        assert not wrong, (
            f"{generator}/{split}: {len(wrong)} of {len(records)} records, e.g. {next(iter(wrong.items()))}"
        )


def test_split_check_sees_a_training_entity_in_a_test_record(world):
    """The check above is not vacuous: it names a training subject, and a record where it finds no subject."""
    splits = entity_splits(world)
    train_person, test_person = world.entities_in("person", "train")[0], world.entities_in("person", "test")[0]
    record = summarization(world, "test")[0]
    poster = record["post"].split(" here.")[0].removeprefix("Hi all, ")
    assert splits[poster] == "test"
    leaked = {**record, "post": record["post"].replace(poster, train_person)}
    assert wrong_split_subjects("summarization", leaked, "test", splits) == [f"{train_person} is train"]
    question = {"question": f"Where does {test_person} live?"}
    assert wrong_split_subjects("context_qa", question, "test", splits) == []
    assert wrong_split_subjects("context_qa", {"question": "Where does nobody live?"}, "test", splits) == [
        "no world entity found"
    ]


def test_pretraining_corpus_holds_no_held_out_record(world):
    text = "\n".join(doc["text"] for doc in pretraining_corpus(world, 3000, seed=0))
    lines = set(text.split("\n"))
    for split in ("validation", "test"):
        assert not any(r["question"] in text for r in closed_book_qa(world, split))
        assert not any(f"{r['prompt']} {r['answer']}" in lines for r in arithmetic(world, split) if r["op"] in "+-*")
        assert not any(r["post"] in text for r in summarization(world, split)[:50])
        assert not any(r["context"] in text for r in context_qa(world, split, n=50))
    # every fact, whatever its split, is stated in the corpus: that is the model's memory
    test_subjects = {f.subject for f in world.facts_in("test")}
    assert all(subject in text for subject in test_subjects)


def test_record_schemas(world, tokenizer):
    assert set(closed_book_qa(world, "test")[0]) == {"question", "answer"}
    for record in context_qa(world, "test", n=200):
        assert set(record) == {"context", "question", "answer", "memory_answer", "counterfactual"}
        assert record["answer"] in record["context"]
        if record["counterfactual"]:
            assert record["memory_answer"] not in (None, record["answer"])
        elif record["memory_answer"] is not None:
            assert record["memory_answer"] == record["answer"]
    assert {r["memory_answer"] is None for r in context_qa(world, "test")} == {True, False}
    records = arithmetic(42, "test")
    assert {r["op"] for r in records} == {"+", "-", "*", "word+", "word-", "word*"}
    assert {r["digits"] for r in records} == {1, 2, 3}
    for record in records:
        assert set(record) == {"prompt", "answer", "op", "digits"}
        if record["op"] in "+-*":
            assert str(eval(record["prompt"].rstrip("="))) == record["answer"]
    for record in summarization(world, "test"):
        assert set(record) == {"post", "key_facts", "reference"} and record["key_facts"]
    for record in chat_sft(world, "test", n=100):
        assert set(record) == {"messages", "kind", "context"}
        assert [m["role"] for m in record["messages"]] == ["user", "assistant"]
        if record["kind"] == "context":
            assert record["context"] in record["messages"][0]["content"]
        else:
            assert record["kind"] == "knowledge" and record["context"] is None
    pair = preference_pairs(world, "test")[0]
    assert set(pair) == {"prompt", "chosen", "rejected", "post_id"} and pair["chosen"].startswith(" ")
    assert set(passkey_example(tokenizer, 200, 0.5, 0)) == {"text", "answer"}
    assert set(needle_example(tokenizer, 200, 0.5, 0)) == {"context", "question", "answer"}


def test_render_chat_matches_the_tokenizer_template(tokenizer):
    messages = [{"role": "user", "content": "Where does Bako live?"}, {"role": "assistant", "content": "In Vorn."}]
    assert render_chat(messages) == tokenizer.apply_chat_template(messages, tokenize=False)


def test_preference_ranks_reference_above_worse_summaries(world):
    rng = random.Random(0)
    with_attribute = 0
    for record in summarization(world, "test")[:50]:
        reference, dropped, swapped, *attribute, mediocre, padded, lead = candidate_summaries(rng, world, record)
        with_attribute += len(attribute)
        best = preference_score(record, reference)
        assert best == pytest.approx(1.0)
        for worse in (dropped, swapped, *attribute, mediocre, padded, lead, " ".join(reference.split()[:3])):
            assert preference_score(record, worse) < best
        # a made-up detail (a false name or number, a wrong animal or item) is worse than leaving its fact out
        for made_up in (swapped, *attribute):
            assert preference_score(record, made_up) < preference_score(record, dropped)
    assert 20 < with_attribute < 50  # posts whose events carry an animal or an item
    pairs = preference_pairs(world, "test", noise=0.0)
    records = summarization(world, "test")
    for pair in pairs:
        record = records[int(pair["post_id"].split("-")[1])]
        assert preference_score(record, pair["chosen"]) > preference_score(record, pair["rejected"])
    noisy = preference_pairs(world, "test", noise=0.3, seed=1)
    flipped = sum(
        preference_score(records[int(p["post_id"].split("-")[1])], p["chosen"])
        < preference_score(records[int(p["post_id"].split("-")[1])], p["rejected"])
        for p in noisy
    )
    assert 0.15 < flipped / len(noisy) < 0.45


def test_policy_comparisons_label_a_policy_s_own_summaries(world):
    records = summarization(world, "train")[:3]
    summaries = [
        [r["reference"], r["reference"].replace(r["key_facts"][0].split()[-1], "Vorn"), "Nothing."] for r in records
    ]
    pairs = policy_comparisons(world, "train", summaries, noise=0.0, pairs_per_post=3)
    assert [p["post_id"] for p in pairs] == ["train-00000"] * 3 + ["train-00001"] * 3 + ["train-00002"] * 3
    for pair in pairs:
        record = records[int(pair["post_id"].split("-")[1])]
        assert pair["prompt"] == SUMMARY_PROMPT.format(post=record["post"]) and pair["chosen"].startswith(" ")
        assert preference_score(record, pair["chosen"]) > preference_score(record, pair["rejected"])
    assert policy_comparisons(world, "train", [["Same.", "Same."]]) == []  # no pair without a preference
    with pytest.raises(ValueError, match="lists of summaries"):
        policy_comparisons(world, "test", [["a"]] * 1000)


def test_preference_penalises_a_made_up_attribute_as_a_made_up_name():
    post = (
        "Hi all, Nuteki here. I lost my clock somewhere near Dupenol. Anyway, that is enough about me. We adopted a "
        "cat and named it Butol. At the market I bought a rug for 120 coins."
    )
    record = {
        "post": post,
        "key_facts": ["Nuteki adopted a cat named Butol", "Nuteki lost a clock near Dupenol"],
        "reference": "Nuteki adopted a cat named Butol and lost a clock near Dupenol.",
    }
    faithful = preference_score(record, record["reference"])
    assert faithful == pytest.approx(1.0)
    # a goat the post never mentions: the fact is not covered and the animal is unfaithful
    goat = preference_score(record, "Nuteki adopted a goat named Butol and lost a clock near Dupenol.")
    assert goat == pytest.approx(0.5 - 0.25)
    assert unfaithful_terms(post, "Nuteki adopted a goat named Butol. Tea helps, at 120 Coins.") == {"goat", "Tea"}
    assert goat == preference_score(record, "Nuteki adopted a cat named Vorn and lost a clock near Dupenol.")
    # the rug is in the post, so naming it is faithful, but it is not what was lost: the fact is not covered
    assert preference_score(record, "Nuteki adopted a cat named Butol and lost a rug near Dupenol.") == 0.5
    assert preference_score(record, "Nuteki adopted a goat named Butol.") < preference_score(record, "Nuteki.")


def test_mediocre_references_lose_a_fact_stay_faithful_and_leave_the_records_alone(world):
    records = summarization(world, "train")
    mediocre = mediocre_references(world, "train", rate=1.0, seed=0)
    assert len(mediocre) == len(records) and summarization(world, "train") == records
    for record, summary in zip(records, mediocre):
        n_facts = len(record["key_facts"])
        excess = max(0, len(WORD.findall(summary)) - len(WORD.findall(record["reference"])))
        # faithful: the score is coverage minus the brevity term, with no penalty for a term absent from the post
        assert preference_score(record, summary) == pytest.approx((n_facts - 1) / n_facts - 0.02 * excess)
        assert summary.split(". ", 1)[1] in record["post"]  # the filler comes from the post
        assert preference_score(record, summary) < preference_score(record, record["reference"])
    assert mediocre_references(world, "train", rate=0.0) == [r["reference"] for r in records]
    half = mediocre_references(world, "train", rate=0.5, seed=3)
    share = sum(m != r["reference"] for m, r in zip(half, records)) / len(records)
    assert 0.4 < share < 0.6 and half == mediocre_references(world, "train", rate=0.5, seed=3)
    assert half != mediocre_references(world, "train", rate=0.5, seed=4)
    with pytest.raises(ValueError, match="rate"):
        mediocre_references(world, "train", rate=1.5)


def test_repeated_fact_pairs_prefer_the_reference_to_itself_with_a_fact_stated_twice(world):
    records = summarization(world, "train")
    pairs = repeated_fact_pairs(world, "train", per_post=2, seed=0)
    assert [p["post_id"] for p in pairs] == [f"train-{i:05d}" for i in range(len(records)) for _ in range(2)]
    for first, second in zip(pairs[::2], pairs[1::2]):
        record = records[int(first["post_id"].split("-")[1])]
        assert first["rejected"] != second["rejected"]  # two different facts repeated
        for pair in (first, second):
            chosen, rejected = pair["chosen"].strip(), pair["rejected"].strip()
            assert pair["prompt"] == SUMMARY_PROMPT.format(post=record["post"]) and chosen == record["reference"]
            assert repeats_a_fact(rejected) and not repeats_a_fact(chosen)
            assert preference_score(record, chosen) > preference_score(record, rejected)
            # as the RL policy repeats: the reference's clauses, then one of them again as the last clause
            clauses = [fact.split(" ", 1)[1] for fact in record["key_facts"]]
            parts = re.split(r", | and ", rejected.rstrip("."))
            assert parts[:-1] == re.split(r", | and ", chosen.rstrip(".")) and parts[-1] in clauses
    assert repeated_fact_pairs(world, "test", per_post=0) == []
    half = repeated_fact_pairs(world, "train", per_post=0.5, seed=3, n_posts=400)
    assert 0.4 < len(half) / 400 < 0.6 and {int(p["post_id"].split("-")[1]) for p in half} <= set(range(400))
    assert half == repeated_fact_pairs(world, "train", per_post=0.5, seed=3, n_posts=400)
    assert half != repeated_fact_pairs(world, "train", per_post=0.5, seed=4, n_posts=400)
    with pytest.raises(ValueError, match="repeat_negatives=3"):
        repeated_fact_pairs(world, "train", per_post=3)


def _relative_position(tokenizer, text: str, needle_at: int) -> float:
    return len(tokenizer(text[:needle_at], add_special_tokens=False)["input_ids"]) / len(
        tokenizer(text, add_special_tokens=False)["input_ids"]
    )


@pytest.mark.parametrize("n_tokens", [256, 1024])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_length_and_depth(tokenizer, n_tokens, depth):
    example = passkey_example(tokenizer, n_tokens, depth, seed=3)
    ids = tokenizer(example["text"], add_special_tokens=False)["input_ids"]
    assert abs(len(ids) - n_tokens) <= 3
    assert example["text"].endswith("The pass key is") and example["answer"].isdigit()

    # depth is relative to the haystack, between the intro and the question
    def count(text):
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    needle = PASSKEY_NEEDLE.format(key=example["answer"])
    before = count(example["text"][: example["text"].index(needle)]) - count(PASSKEY_INTRO)
    haystack = len(ids) - count(PASSKEY_INTRO) - count(" " + needle) - count(PASSKEY_QUESTION)
    assert abs(before / haystack - depth) < 0.05
    assert example == passkey_example(tokenizer, n_tokens, depth, seed=3)
    assert example != passkey_example(tokenizer, n_tokens, depth, seed=4)


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.75, 1.0])
def test_needle_length_and_depth(tokenizer, depth):
    example = needle_example(tokenizer, 1024, depth, seed=5)
    assert abs(len(tokenizer(example["context"], add_special_tokens=False)["input_ids"]) - 1024) <= 3
    assert example["answer"] in example["context"] and example["question"].endswith("?")
    position = _relative_position(tokenizer, example["context"], example["context"].index(example["answer"]))
    assert abs(position - depth) < 0.05


def test_needle_in_given_haystack_and_too_short_haystack(tokenizer):
    haystack = " ".join(f"Line {i} of a long and boring story went on." for i in range(200))
    example = needle_example(tokenizer, 300, 0.5, seed=0, haystack_text=haystack)
    assert example["context"].startswith("Line 0") and example["answer"] in example["context"]
    with pytest.raises(ValueError, match="longer text"):
        needle_example(tokenizer, 300, 0.5, seed=0, haystack_text="Too short. Far too short.")


def test_bad_arguments_fail_clearly(world, tokenizer):
    with pytest.raises(ValueError, match="Unknown split"):
        closed_book_qa(world, "dev")
    with pytest.raises(ValueError, match="depth"):
        passkey_example(tokenizer, 300, 1.5, 0)
    with pytest.raises(ValueError, match="noise"):
        preference_pairs(world, "test", noise=0.9)
    with pytest.raises(ValueError, match="Unknown document kinds"):
        next(pretraining_corpus(world, 1, mix={"poetry": 1.0}))


# sha256 of 40 documents of the long-context training mix (seed 0, max_tokens 400), written before the pass key and
# needle documents could take another haystack than the world's statements: without one they must stay these bytes.
LONG_MIX_DIGEST = "c47ae93b86beb2d79ab7f1cfaeeaa2e139f3a7c7387d574318960c1f5ea7787b"
LONG_MIX = {"passkey": 2.0, "needle": 1.0, "key_value": 0.5, "reading": 1.0}


def test_long_documents_without_a_haystack_text_are_unchanged(world):
    docs = [doc["text"] for doc in pretraining_corpus(world, 40, seed=0, mix=LONG_MIX, max_tokens=400)]
    assert hashlib.sha256("\n".join(docs).encode()).hexdigest() == LONG_MIX_DIGEST


def test_long_documents_hide_their_key_in_the_given_text_each_in_its_own_stretch(world):
    train, test = read_text("books", split="train"), read_text("books", split="test")
    in_order = " ".join(text_sentences(train))
    docs = [
        doc["text"]
        for doc in pretraining_corpus(
            world, 16, seed=0, mix={"passkey": 1.0, "needle": 1.0}, max_tokens=2000, haystack_text=train
        )
    ]
    kinds = {doc.startswith(PASSKEY_INTRO) for doc in docs}
    assert kinds == {True, False}  # both pass key and needle documents
    test_prose = " ".join(text_sentences(test))
    fillers = []
    for doc in docs:
        filler, needle, answer = long_documents.parts(doc)
        assert answer in needle and doc.endswith(f" {answer}")  # the key where the format puts it, then its answer
        assert filler in f"{in_order} {in_order}"  # consecutive sentences of the train text (wrapping at its end)
        assert filler not in test_prose
        fillers.append(filler)
    assert min(map(len, fillers)) > 200
    assert len({filler[:100] for filler in fillers}) == len(fillers)  # each document its own stretch


def test_a_haystack_text_changes_only_the_filler_of_the_long_documents(world):
    mix = {"passkey": 2.0, "needle": 1.0, "key_value": 0.5, "reading": 1.0}
    plain = [doc["text"] for doc in pretraining_corpus(world, 40, seed=0, mix=mix, max_tokens=400)]
    train = read_text("books", split="train")
    books = [
        doc["text"] for doc in pretraining_corpus(world, 40, seed=0, mix=mix, max_tokens=400, haystack_text=train)
    ]
    found = [long_documents.parts(doc) for doc in plain]
    assert 0 < sum(part is None for part in found) < len(found)
    for world_doc, book_doc, parts in zip(plain, books, found, strict=True):
        if parts is None:  # the same key-value and reading documents in the same places
            assert book_doc == world_doc
        else:  # the same kind, needle and answer; another filler
            assert long_documents.parts(book_doc)[1:] == parts[1:] and book_doc != world_doc


def test_sentences_from_random_start_wrap_around_and_need_a_sentence():
    sentences = ["One.", "Two.", "Three."]
    starts = set()
    for seed in range(12):
        first = list(itertools.islice(sentences_from_random_start(sentences, random.Random(seed)), 5))
        start = sentences.index(first[0])
        assert first == (sentences * 3)[start : start + 5]
        starts.add(start)
    assert starts == {0, 1, 2}
    with pytest.raises(ValueError, match="no sentence"):
        sentences_from_random_start([], random.Random(0))
