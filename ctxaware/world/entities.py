"""The world itself: entities of several kinds, their attributes and relations, and the split each belongs to.

Every entity belongs to one split (`train`, `validation`, `test`); a fact belongs to its subject's split. All facts are
stated in the pretraining corpus (they are the model's memory), but questions about held-out entities never are, so
closed-book QA on the test split measures recall of facts learned from statements alone. Built only from
`random.Random(seed)`: the same seed gives the same world on every machine.
"""

import functools
import random
from dataclasses import dataclass, field

from ctxaware.world.names import unique_names


SPLITS = ("train", "validation", "test")
SPLIT_FRACTIONS = {"train": 0.8, "validation": 0.1, "test": 0.1}
KINDS = ("person", "city", "company", "country")

PROFESSIONS = [
    "baker",
    "farmer",
    "doctor",
    "painter",
    "sailor",
    "teacher",
    "miner",
    "weaver",
    "singer",
    "potter",
    "builder",
    "tailor",
    "hunter",
    "judge",
    "poet",
]
PRODUCTS = [
    "boats",
    "lamps",
    "shoes",
    "bread",
    "rope",
    "glass",
    "clocks",
    "paper",
    "salt",
    "tea",
    "bells",
    "carpets",
    "bricks",
    "soap",
    "kites",
]
SPECIALTIES = [
    "bridges",
    "cheese",
    "towers",
    "music",
    "gardens",
    "fish",
    "markets",
    "horses",
    "wine",
    "statues",
    "honey",
    "festivals",
]
YEARS = [str(year) for year in range(1940, 2010)]


@dataclass(frozen=True)
class Relation:
    """A relation: who has it, where its objects come from, how it is stated and asked."""

    name: str
    subject_kind: str
    object_pool: str  # an entity kind, or one of the value lists above
    statements: tuple[str, ...]  # paraphrases with {s} and {o}
    questions: tuple[str, ...]  # with {s}; the answer is the object


RELATIONS = {
    relation.name: relation
    for relation in [
        Relation(
            "lives_in",
            "person",
            "city",
            (
                "{s} lives in {o}.",
                "{s} is a resident of {o}.",
                "The home of {s} is in the city of {o}.",
                "The city where {s} lives is {o}.",
                "{s} has a house in {o}.",
            ),
            ("Where does {s} live?", "In which city does {s} live?"),
        ),
        Relation(
            "works_at",
            "person",
            "company",
            (
                "{s} works at {o}.",
                "{s} is employed by {o}.",
                "The employer of {s} is {o}.",
                "{s} has a job at {o}.",
                "The company {s} works for is {o}.",
            ),
            ("Where does {s} work?", "Which company employs {s}?"),
        ),
        Relation(
            "job",
            "person",
            "profession",
            (
                "{s} is a {o}.",
                "{s} works as a {o}.",
                "By trade, {s} is a {o}.",
                "The profession of {s} is {o}.",
                "{s} earns a living as a {o}.",
            ),
            ("What is the profession of {s}?", "What does {s} do for a living?"),
        ),
        Relation(
            "born_in",
            "person",
            "year",
            (
                "{s} was born in {o}.",
                "The birth year of {s} is {o}.",
                "{s} was born in the year {o}.",
                "In {o}, {s} was born.",
                "{s} came into the world in {o}.",
            ),
            ("When was {s} born?", "In which year was {s} born?"),
        ),
        Relation(
            "in_country",
            "city",
            "country",
            (
                "{s} is a city in {o}.",
                "The city of {s} lies in {o}.",
                "{s} is located in {o}.",
                "The country of {s} is {o}.",
                "{s} belongs to {o}.",
            ),
            ("In which country is {s}?", "Where is the city of {s}?"),
        ),
        Relation(
            "famous_for",
            "city",
            "specialty",
            (
                "{s} is famous for its {o}.",
                "The city of {s} is known for its {o}.",
                "People visit {s} for its {o}.",
                "What {s} is best known for is its {o}.",
                "{s} is renowned for its {o}.",
            ),
            ("What is {s} famous for?", "What is the city of {s} known for?"),
        ),
        Relation(
            "headquarters",
            "company",
            "city",
            (
                "{s} has its headquarters in {o}.",
                "The company {s} is based in {o}.",
                "{s} is headquartered in {o}.",
                "The main office of {s} is in {o}.",
                "{s} runs its business from {o}.",
            ),
            ("Where is {s} based?", "In which city is {s} headquartered?"),
        ),
        Relation(
            "makes",
            "company",
            "product",
            (
                "{s} makes {o}.",
                "The company {s} produces {o}.",
                "{s} is a maker of {o}.",
                "The main product of {s} is {o}.",
                "{s} sells {o}.",
            ),
            ("What does {s} make?", "What is the main product of {s}?"),
        ),
        Relation(
            "founder",
            "company",
            "person",
            (
                "{s} was founded by {o}.",
                "The founder of {s} is {o}.",
                "{o} founded {s}.",
                "{o} started the company {s}.",
                "{s} was started by {o}.",
            ),
            ("Who founded {s}?", "Who is the founder of {s}?"),
        ),
        Relation(
            "capital",
            "country",
            "city",
            (
                "The capital of {s} is {o}.",
                "{o} is the capital of {s}.",
                "The capital city of {s} is {o}.",
                "{s} has {o} as its capital.",
                "{s} is governed from its capital, {o}.",
            ),
            ("What is the capital of {s}?", "Which city is the capital of {s}?"),
        ),
    ]
}
VALUE_POOLS = {"profession": PROFESSIONS, "product": PRODUCTS, "specialty": SPECIALTIES, "year": YEARS}


@dataclass(frozen=True)
class Fact:
    subject: str
    relation: str
    object: str
    split: str

    def statement(self, template_index: int = 0) -> str:
        templates = RELATIONS[self.relation].statements
        return templates[template_index % len(templates)].format(s=self.subject, o=self.object)


@dataclass
class World:
    """Entities by kind, their facts, each entity's split, and fresh names (per split) for context-only entities."""

    seed: int
    entities: dict[str, list[str]]
    facts: list[Fact]
    split_of: dict[str, str]
    novel_names: dict[str, list[str]]
    facts_by_subject: dict[str, list[Fact]] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        for fact in self.facts:
            self.facts_by_subject.setdefault(fact.subject, []).append(fact)

    def facts_in(self, split: str) -> list[Fact]:
        check_split(split)
        return [fact for fact in self.facts if fact.split == split]

    def entities_in(self, kind: str, split: str) -> list[str]:
        check_split(split)
        return [name for name in self.entities[kind] if self.split_of[name] == split]

    def objects(self, relation: str) -> list[str]:
        """Every value the relation's object may take: the candidates for counterfactuals and distractors."""
        pool = RELATIONS[relation].object_pool
        return self.entities[pool] if pool in self.entities else VALUE_POOLS[pool]


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}: use one of {', '.join(SPLITS)}.")


def _assign_splits(rng: random.Random, names: list[str]) -> dict[str, str]:
    order = list(names)
    rng.shuffle(order)
    n_train = round(len(order) * SPLIT_FRACTIONS["train"])
    n_validation = max(1, round(len(order) * SPLIT_FRACTIONS["validation"]))
    splits = {}
    for index, name in enumerate(order):
        splits[name] = "train" if index < n_train else "validation" if index < n_train + n_validation else "test"
    return splits


@functools.cache
def build_world(
    seed: int = 0, n_people: int = 400, n_cities: int = 80, n_companies: int = 60, n_countries: int = 12
) -> World:
    """The world of `seed` (cached). Sizes are small on purpose: every fact must be seen many times in pretraining."""
    rng = random.Random(seed)
    taken: set[str] = set()
    entities = {
        "country": unique_names(rng, n_countries, taken),
        "city": unique_names(rng, n_cities, taken),
        "company": unique_names(rng, n_companies, taken),
        "person": unique_names(rng, n_people, taken),
    }
    novel_names = {split: unique_names(rng, 400, taken) for split in SPLITS}
    split_of = {}
    for kind in KINDS:
        split_of.update(_assign_splits(rng, entities[kind]))

    objects: dict[tuple[str, str], str] = {}
    country_of = {city: rng.choice(entities["country"]) for city in entities["city"]}
    for country in entities["country"]:  # every country needs a city to be its capital
        if country not in country_of.values():
            country_of[rng.choice(entities["city"])] = country
    for city in entities["city"]:
        objects[city, "in_country"] = country_of[city]
        objects[city, "famous_for"] = rng.choice(SPECIALTIES)
    for country in entities["country"]:
        objects[country, "capital"] = rng.choice(sorted(c for c in entities["city"] if country_of[c] == country))
    for company in entities["company"]:
        objects[company, "headquarters"] = rng.choice(entities["city"])
        objects[company, "makes"] = rng.choice(PRODUCTS)
        objects[company, "founder"] = rng.choice(entities["person"])
    for person in entities["person"]:
        objects[person, "lives_in"] = rng.choice(entities["city"])
        objects[person, "works_at"] = rng.choice(entities["company"])
        objects[person, "job"] = rng.choice(PROFESSIONS)
        objects[person, "born_in"] = rng.choice(YEARS)
    facts = [Fact(subject, relation, obj, split_of[subject]) for (subject, relation), obj in objects.items()]
    return World(seed=seed, entities=entities, facts=facts, split_of=split_of, novel_names=novel_names)


def invent_facts(rng: random.Random, world: World, subject: str, kind: str, split: str) -> list[Fact]:
    """Facts about an entity that is not in the world (a novel name): only a context can tell the model about them."""
    return [
        Fact(subject, relation.name, rng.choice(world.objects(relation.name)), split)
        for relation in RELATIONS.values()
        if relation.subject_kind == kind
    ]
