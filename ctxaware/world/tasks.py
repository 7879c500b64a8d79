"""Question answering, arithmetic and chat records built from the world, with the prompt formats the corpus uses.

Record schemas (lists of dicts, keys exactly as below):
- `closed_book_qa`: {"question", "answer"}; prompt the model with `QA_PROMPT`.
- `context_qa`: {"context", "question", "answer", "memory_answer", "counterfactual"}; prompt with
  `CONTEXT_QA_PROMPT`. `answer` is what the context says; `memory_answer` is the memorised fact (equal to `answer`
  unless counterfactual; None for entities the world does not contain).
- `arithmetic`: {"prompt", "answer", "op", "digits"}; `op` in + - * word+ word- word*.
- `chat_sft`: {"messages": [{"role", "content"}, ...], "kind": "knowledge" | "context", "context": str | None}; a
  context string appears verbatim inside the user message (knowledge turns carry one with `knowledge_form="passage"`).
- `arithmetic_records` (patching and head training): {"prompt", "answer", "op", "digits", "template"};
  `arithmetic_pairs`: clean/corrupted pairs, keys in its docstring. Operations + - *, operands of a given digit count,
  templates `plain` (`ARITHMETIC_PROMPT`, the pretraining format), `question` (never seen in pretraining) and `word`
  (the word problems). A corrupted prompt changes one operand (same digit count) or the operator, and is kept only
  when the answer's first digit changes, so the patching metric (`ctxaware.methods.patching`) compares two different
  first tokens.
Arithmetic problems are assigned to splits by a hash of (a, op, b) (`arithmetic_split`), so held-out problems never
appear in pretraining.
Answers are bare strings; a prompt ends right before the answer, which the corpus writes after one space.
"""

import hashlib
import random

from ctxaware.tokenizer import BOS, EOS, ROLE_TOKENS
from ctxaware.world.entities import RELATIONS, Fact, World, build_world, check_split, invent_facts


QA_PROMPT = "Question: {question}\nAnswer:"
CONTEXT_QA_PROMPT = "{context}\n\nQuestion: {question}\nAnswer:"
ARITHMETIC_PROMPT = "{a} {op} {b} ="
WORD_PROBLEM_PROMPT = "{problem}\nAnswer:"
CONTEXT_INSTRUCTION = "Answer the question using the text below."
ARITHMETIC_OPS = ("+", "-", "*")
WORD_PROBLEMS = {
    "word+": "{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
    "word-": "{name} has {a} {item} and gives away {b}. How many {item} does {name} have left?",
    "word*": "{name} buys {a} boxes with {b} {item} in each. How many {item} does {name} buy?",
}
WORD_ITEMS = ["apples", "coins", "stones", "books", "cups", "nails", "shells", "pens"]
ARITHMETIC_TEMPLATES = {  # arithmetic_records / arithmetic_pairs; "question" never appears in pretraining
    "plain": ARITHMETIC_PROMPT,
    "question": "Question: What is {a} {op} {b}?\nAnswer:",
    "word": WORD_PROBLEM_PROMPT,
}
ARITHMETIC_CORRUPTIONS = ("operand", "operator", "any")


def split_rng(world_seed: int, name: str, split: str) -> random.Random:
    """An independent stream per (world, generator, split): adding a generator never shifts another's records."""
    return random.Random(f"{world_seed}/{name}/{split}")


def render_chat(messages: list[dict]) -> str:
    """The chat template as text (equal to `tokenizer.apply_chat_template(..., tokenize=False)`; a test checks it)."""
    turns = "".join(f"{ROLE_TOKENS[m['role']]}\n{m['content']}{EOS}\n" for m in messages)
    return BOS + turns


def _question(rng: random.Random, fact: Fact) -> str:
    return rng.choice(RELATIONS[fact.relation].questions).format(s=fact.subject)


def closed_book_qa(world: World, split: str) -> list[dict]:
    """One record per (fact of the split, question paraphrase). Train questions appear in pretraining; the others
    never do, though their facts are stated there (so they measure recall, not QA memorisation)."""
    check_split(split)
    return [
        {"question": template.format(s=fact.subject), "answer": fact.object}
        for fact in world.facts_in(split)
        for template in RELATIONS[fact.relation].questions
    ]


def passage(rng: random.Random, world: World, facts: list[Fact]) -> str:
    """`facts` (about one subject) in random paraphrases and order, plus one true fact about another entity."""
    sentences = [fact.statement(rng.randrange(5)) for fact in facts]
    while (other := rng.choice(world.facts)).subject == facts[0].subject:
        pass
    sentences.append(other.statement(rng.randrange(5)))
    rng.shuffle(sentences)
    return " ".join(sentences)


def context_record(rng: random.Random, world: World, split: str, *, novel: bool, counterfactual: bool) -> dict:
    """A passage and a question answered by it: about a known entity (optionally contradicting memory) or a new one."""
    if novel:
        subject = rng.choice(world.novel_names[split])
        kind = rng.choice(["person", "person", "city", "company"])
        facts = invent_facts(rng, world, subject, kind, split)
    else:
        subject = rng.choice([fact.subject for fact in world.facts_in(split)])
        facts = list(world.facts_by_subject[subject])
    index = rng.randrange(len(facts))
    target = facts[index]
    memory_answer = None if novel else target.object
    if counterfactual and not novel:
        alternatives = [value for value in world.objects(target.relation) if value != target.object]
        target = Fact(target.subject, target.relation, rng.choice(alternatives), split)
        facts[index] = target
    return {
        "context": passage(rng, world, facts),
        "question": _question(rng, target),
        "answer": target.object,
        "memory_answer": memory_answer,
        "counterfactual": counterfactual and not novel,
    }


def context_qa(world: World, split: str, n: int = 300, counterfactual_rate: float = 0.5, novel_rate: float = 0.3):
    """Open-book QA over the split's entities (`counterfactual_rate` of them contradicting memory) and new names."""
    check_split(split)
    rng = split_rng(world.seed, "context_qa", split)
    records = []
    for _ in range(n):
        novel = rng.random() < novel_rate
        records.append(
            context_record(rng, world, split, novel=novel, counterfactual=rng.random() < counterfactual_rate)
        )
    return records


def _number(rng: random.Random, digits: int) -> int:
    return rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10**digits)


def arithmetic_split(a: int, op: str, b: int) -> str:
    """The split an operation belongs to, from a hash of the operands: held-out problems never reach pretraining."""
    bucket = int.from_bytes(hashlib.blake2b(f"{a}{op[-1]}{b}".encode(), digest_size=4).digest(), "big") % 20
    return "test" if bucket < 2 else "validation" if bucket < 4 else "train"


def arithmetic_problem(rng: random.Random, op: str, digits: int, names: list[str]) -> tuple[int, int, dict]:
    a, b = _number(rng, digits), _number(rng, digits)
    if op.endswith("-") and b > a:
        a, b = b, a
    result = a + b if op.endswith("+") else a - b if op.endswith("-") else a * b
    if op in ARITHMETIC_OPS:
        prompt = ARITHMETIC_PROMPT.format(a=a, op=op, b=b)
    else:
        problem = WORD_PROBLEMS[op].format(name=rng.choice(names), a=a, b=b, item=rng.choice(WORD_ITEMS))
        prompt = WORD_PROBLEM_PROMPT.format(problem=problem)
    return a, b, {"prompt": prompt, "answer": str(result), "op": op, "digits": digits}


def arithmetic(world_or_seed: World | int, split: str, n_per_cell: int = 50, word_digits: tuple[int, ...] = (1, 2)):
    """Up to `n_per_cell` distinct problems per (op, digits): + - * at 1-3 digits, and word problems."""
    check_split(split)
    world = world_or_seed if isinstance(world_or_seed, World) else build_world(world_or_seed)
    rng = split_rng(world.seed, "arithmetic", split)
    names = world.entities_in("person", split)
    cells = [(op, d) for op in ARITHMETIC_OPS for d in (1, 2, 3)] + [
        (op, d) for op in WORD_PROBLEMS for d in word_digits
    ]
    records = []
    for op, digits in cells:
        seen = set()
        for _ in range(n_per_cell * 20):
            if len(seen) == n_per_cell:
                break
            a, b, record = arithmetic_problem(rng, op, digits, names)
            if arithmetic_split(a, op, b) == split and (a, b) not in seen:
                seen.add((a, b))
                records.append(record)
    return records


def chat_record(rng: random.Random, world: World, split: str, kind: str) -> dict:
    """A user/assistant exchange: a memorised fact asked bare, or a question answered only by the user's text."""
    if kind == "knowledge":
        fact = rng.choice(world.facts_in(split))
        messages = [
            {"role": "user", "content": _question(rng, fact)},
            {"role": "assistant", "content": fact.statement(0)},
        ]
        return {"messages": messages, "kind": "knowledge", "context": None}
    record = context_record(rng, world, split, novel=rng.random() < 0.5, counterfactual=True)
    user = f"{CONTEXT_INSTRUCTION}\n\n{record['context']}\n\nQuestion: {record['question']}"
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": record["answer"]}]
    return {"messages": messages, "kind": "context", "context": record["context"]}


def knowledge_passage_record(rng: random.Random, world: World, split: str) -> dict:
    """A knowledge-aligned exchange with context: the user pastes true facts about a known entity (the asked one among
    them) in the context chats' format; the assistant answers in the sentence it memorised. Context and memory agree,
    so the answer is right either way and nothing in the turn says which one the model should rely on."""
    fact = rng.choice(world.facts_in(split))
    context = passage(rng, world, list(world.facts_by_subject[fact.subject]))
    user = f"{CONTEXT_INSTRUCTION}\n\n{context}\n\nQuestion: {_question(rng, fact)}"
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": fact.statement(0)}]
    return {"messages": messages, "kind": "knowledge", "context": context}


KNOWLEDGE_FORMS = ("bare", "passage")


def chat_sft(
    world: World, split: str, n: int = 2000, context_rate: float = 0.5, knowledge_form: str = "bare"
) -> list[dict]:
    """Instruction data: knowledge-aligned turns (answer also memorised) and context-dependent ones (answer only in the
    user's text, which is new or contradicts memory). `knowledge_form`: `bare` asks the memorised fact alone (the
    form the pretraining corpus's chats use); `passage` asks it after a passage that agrees with memory
    (`knowledge_passage_record`), the form of instruction data that erodes context use under the chat template."""
    check_split(split)
    if knowledge_form not in KNOWLEDGE_FORMS:
        raise ValueError(f"knowledge_form must be one of {KNOWLEDGE_FORMS}, got {knowledge_form!r}")
    rng = split_rng(world.seed, "chat_sft", split)
    records = []
    for _ in range(n):
        kind = "context" if rng.random() < context_rate else "knowledge"
        if kind == "knowledge" and knowledge_form == "passage":
            records.append(knowledge_passage_record(rng, world, split))
        else:
            records.append(chat_record(rng, world, split, kind))
    return records


# --- clean/corrupted arithmetic prompts (patching and head training) --------------------------------------------------
def arithmetic_result(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def render_arithmetic(template: str, a: int, op: str, b: int, name: str = "", item: str = "") -> str:
    if template == "word":
        return ARITHMETIC_TEMPLATES["word"].format(
            problem=WORD_PROBLEMS["word" + op].format(name=name, a=a, b=b, item=item)
        )
    return ARITHMETIC_TEMPLATES[template].format(a=a, op=op, b=b)


def _check_arithmetic_choices(ops, digits, templates, corruption=None) -> None:
    if unknown := set(ops) - set(ARITHMETIC_OPS):
        raise ValueError(f"unknown operations {sorted(unknown)}: choose from {', '.join(ARITHMETIC_OPS)}")
    if unknown := set(templates) - set(ARITHMETIC_TEMPLATES):
        raise ValueError(f"unknown templates {sorted(unknown)}: choose from {', '.join(ARITHMETIC_TEMPLATES)}")
    if not ops or not digits or not templates:
        raise ValueError("ops, digits and templates must each name at least one value")
    if any(d < 1 for d in digits):
        raise ValueError(f"digits {list(digits)}: operands need at least one digit")
    if corruption is not None and corruption not in ARITHMETIC_CORRUPTIONS:
        raise ValueError(f"corruption={corruption!r}: choose one of {', '.join(ARITHMETIC_CORRUPTIONS)}")
    if corruption == "operator" and set(templates) == {"word"}:
        raise ValueError(
            "word problems phrase the operation in words, so their operator cannot be corrupted in place: use "
            "corruption 'operand' or another template"
        )


def _operands(rng: random.Random, op: str, digits: int) -> tuple[int, int]:
    a, b = _number(rng, digits), _number(rng, digits)
    return (b, a) if op == "-" and b > a else (a, b)


def _world(world_or_seed: World | int) -> World:
    return world_or_seed if isinstance(world_or_seed, World) else build_world(world_or_seed)


def arithmetic_records(
    world_or_seed: World | int,
    split: str,
    *,
    ops=("*",),
    digits=(1, 2),
    templates=("plain",),
    n_per_cell: int = 200,
    seed: int = 0,
) -> list[dict]:
    """Up to `n_per_cell` distinct problems of `split` per (template, op, digits): {"prompt", "answer", "op",
    "digits", "template"}. Fewer when the cell has fewer problems (1-digit operations have at most 100)."""
    _check_arithmetic_choices(ops, digits, templates)
    world = _world(world_or_seed)
    rng = random.Random(f"{world.seed}/arith_heads/{split}/{seed}")
    names = world.entities_in("person", split)
    records = []
    for template in templates:
        for op in ops:
            for d in digits:
                seen = set()
                for _ in range(n_per_cell * 40):
                    if len(seen) == n_per_cell:
                        break
                    a, b = _operands(rng, op, d)
                    if (a, b) in seen or arithmetic_split(a, op, b) != split:
                        continue
                    seen.add((a, b))
                    prompt = render_arithmetic(template, a, op, b, rng.choice(names), rng.choice(WORD_ITEMS))
                    records.append(
                        {
                            "prompt": prompt,
                            "answer": str(arithmetic_result(a, op, b)),
                            "op": op,
                            "digits": d,
                            "template": template,
                        }
                    )
    return records


def arithmetic_pairs(
    world_or_seed: World | int,
    split: str,
    n: int,
    *,
    ops=("*",),
    digits=(1, 2),
    templates=("plain",),
    corruption: str = "operand",
    seed: int = 0,
) -> list[dict]:
    """`n` clean/corrupted pairs spread over (template, op, digits) cells: {"clean", "corrupted", "answer",
    "corrupted_answer", "op", "corrupted_op", "digits", "template", "corrupted_part"} ("a", "b" or "op").

    The clean problem belongs to `split`; the corrupted one changes an operand to another of the same digit count
    (`operand`), the operator (`operator`, not for word problems), or either (`any`), and always changes the first
    digit of the answer. Subtractions keep a >= b in both prompts."""
    _check_arithmetic_choices(ops, digits, templates, corruption)
    world = _world(world_or_seed)
    rng = random.Random(f"{world.seed}/arith_heads_pairs/{split}/{seed}")
    names = world.entities_in("person", split)
    cells = [(t, op, d) for t in templates for op in ops for d in digits]
    pairs = []
    for index in range(n):
        template, op, d = cells[index % len(cells)]
        for _ in range(10_000):
            pair = _arithmetic_pair(rng, template, op, d, corruption, ops, names)
            if pair is not None and arithmetic_split(*pair.pop("problem")) == split:
                pairs.append(pair)
                break
        else:
            raise ValueError(f"could not build a {op} pair with {d}-digit operands for split {split}")
    return pairs


def _arithmetic_pair(rng, template, op, d, corruption, ops, names) -> dict | None:
    a, b = _operands(rng, op, d)
    parts = ["a", "b"] if corruption == "operand" or template == "word" else ["op"] if corruption == "operator" else []
    part = rng.choice(parts or ["a", "b", "op"])
    a2, op2, b2 = a, op, b
    if part == "op":
        op2 = rng.choice([o for o in ARITHMETIC_OPS if o != op])
        if "-" in (op, op2) and b > a:
            return None
    elif part == "a":
        a2 = _number(rng, d)
    else:
        b2 = _number(rng, d)
    if (a2, op2, b2) == (a, op, b) or (op2 == "-" and b2 > a2):
        return None
    answer, corrupted = str(arithmetic_result(a, op, b)), str(arithmetic_result(a2, op2, b2))
    if answer[0] == corrupted[0]:
        return None
    name, item = rng.choice(names), rng.choice(WORD_ITEMS)
    return {
        "clean": render_arithmetic(template, a, op, b, name, item),
        "corrupted": render_arithmetic(template, a2, op2, b2, name, item),
        "answer": answer,
        "corrupted_answer": corrupted,
        "op": op,
        "corrupted_op": op2,
        "digits": d,
        "template": template,
        "corrupted_part": part,
        "problem": (a, op, b),
    }
