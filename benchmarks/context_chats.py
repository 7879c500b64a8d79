"""The mixed chat set of the context check on a real model (`context_science.py --model smollm2-135m`).

The synthetic world's knowledge-aligned chats are no such thing for a model that never saw the world: their passage
holds the answer, so every chat depends on the user's text and the labels say nothing (on SmolLM2 both scores' AUROC
against them fell below 0.5). This set keeps the world's context-dependent chats (the answer is only in the user's
passage, which is new or contradicts the world) and makes the knowledge-aligned ones from facts the model does know:
the training facts (`known_facts/train_facts.jsonl`: capitals and continents of countries outside the
knowledge-conflict evaluation) that it completes closed-book (the `knowledge_conflict` probe), asked in the format of
the world's context chats after a passage chosen by `knowledge_passage` (`KNOWLEDGE_PASSAGES`):
- `agrees`: the fact's own passage, which states the answer. Every chat of the set then rewards reading the passage.
- `unrelated`: the passage of another known fact, of the same relation where one fits, that names neither the asked
  subject nor its answer: the assistant answers from memory, and copying the passage's capital or continent is wrong.
  The asked facts are those of `agrees` (the passages come from a generator of their own).
Rows: `messages`, `kind` (`context` or `knowledge`), `context` (the passage).
"""

import json
import random
from pathlib import Path


KNOWLEDGE_PASSAGES = {
    "agrees": "after a passage that agrees",
    "unrelated": "after a passage about another fact, answered from memory",
}


def known_facts(model_name: str, *, batch_size: int = 64) -> list[dict]:
    """The training facts whose answer the model gives closed-book."""
    from ctxaware.eval import knowledge_conflict
    from ctxaware.eval.model import EvalModel
    from ctxaware.models import load_model

    model, tokenizer = load_model(model_name)
    lm = EvalModel(model, tokenizer, batch_size=batch_size, progress=False)
    return knowledge_conflict.known_facts(lm, knowledge_conflict.load_train_facts())


def knowledge_chat(fact: dict, passage: str) -> dict:
    from ctxaware.world.tasks import CONTEXT_INSTRUCTION

    user = f"{CONTEXT_INSTRUCTION}\n\n{passage}\n\nQuestion: {fact['question']}"
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": fact["answer"]}]
    return {"messages": messages, "kind": "knowledge", "context": passage}


def unrelated_passage(fact: dict, known: list[dict], rng: random.Random) -> str:
    """The passage of another known fact that names neither `fact`'s subject nor its answer (case-insensitive), of
    the same relation when one fits."""

    def apart(other: dict) -> bool:
        text = other["passage"].lower()
        return fact["subject"].lower().removeprefix("the ") not in text and fact["answer"].lower() not in text

    candidates = [other for other in known if other["subject"] != fact["subject"] and apart(other)]
    if not candidates:
        raise ValueError(f"no known fact's passage leaves out {fact['subject']} and {fact['answer']}: none unrelated")
    same = [other for other in candidates if other["relation"] == fact["relation"]]
    return rng.choice(same or candidates)["passage"]


def mixed_chats(
    known: list[dict], n: int, context_rate: float, seed: int = 0, knowledge_passage: str = "agrees"
) -> list[dict]:
    """`n` chats, each context-dependent with probability `context_rate` (the world's train split), else about a
    known fact, after the passage `knowledge_passage` names."""
    from ctxaware.world import build_world, chat_sft

    if knowledge_passage not in KNOWLEDGE_PASSAGES:
        raise ValueError(f"knowledge_passage must be one of {list(KNOWLEDGE_PASSAGES)}, got {knowledge_passage!r}")
    if not known:
        raise ValueError("the model knows none of the training facts closed-book: no knowledge-aligned chats")
    rng = random.Random(f"context_chats/{seed}")
    passages = random.Random(f"context_chats/{seed}/{knowledge_passage}")
    kinds = ["context" if rng.random() < context_rate else "knowledge" for _ in range(n)]
    context = iter(chat_sft(build_world(seed), "train", n=kinds.count("context") or 1, context_rate=1.0))
    chats = []
    for kind in kinds:
        if kind == "context":
            chats.append(next(context))
            continue
        fact = rng.choice(known)
        passage = fact["passage"] if knowledge_passage == "agrees" else unrelated_passage(fact, known, passages)
        chats.append(knowledge_chat(fact, passage))
    return chats


def write_chats(path: Path, model_name: str, n: int, context_rate: float, knowledge_passage: str) -> dict:
    """Writes the set as JSONL; returns what it holds."""
    known = known_facts(model_name)
    chats = mixed_chats(known, n, context_rate, knowledge_passage=knowledge_passage)
    path.write_text("".join(json.dumps(chat) + "\n" for chat in chats))
    return {
        "path": str(path),
        "records": len(chats),
        "context_chats": sum(c["kind"] == "context" for c in chats),
        "knowledge_passage": knowledge_passage,
        "known_facts": [f"{f['relation']}: {f['subject']} -> {f['answer']}" for f in known],
    }
