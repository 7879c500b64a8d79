"""The mixed chat set of the context check on a real model (`context_science.py --model smollm2-135m`).

The synthetic world's knowledge-aligned chats are no such thing for a model that never saw the world: their passage
holds the answer, so every chat depends on the user's text and the labels say nothing (on SmolLM2 both scores' AUROC
against them fell below 0.5). This set keeps the world's context-dependent chats (the answer is only in the user's
passage, which is new or contradicts the world) and makes the knowledge-aligned ones from facts the model does know:
the training facts (`known_facts/train_facts.jsonl`: capitals and continents of countries outside the
knowledge-conflict evaluation) that it completes closed-book (the `knowledge_conflict` probe), asked after a passage
that agrees with it, in the format of the world's context chats. Rows: `messages`, `kind` (`context` or `knowledge`),
`context` (the passage).
"""

import json
import random
from pathlib import Path


def known_facts(model_name: str, *, batch_size: int = 64) -> list[dict]:
    """The training facts whose answer the model gives closed-book."""
    from ctxaware.eval import knowledge_conflict
    from ctxaware.eval.model import EvalModel
    from ctxaware.models import load_model

    model, tokenizer = load_model(model_name)
    lm = EvalModel(model, tokenizer, batch_size=batch_size, progress=False)
    return knowledge_conflict.known_facts(lm, knowledge_conflict.load_train_facts())


def knowledge_chat(fact: dict) -> dict:
    from ctxaware.world.tasks import CONTEXT_INSTRUCTION

    user = f"{CONTEXT_INSTRUCTION}\n\n{fact['passage']}\n\nQuestion: {fact['question']}"
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": fact["answer"]}]
    return {"messages": messages, "kind": "knowledge", "context": fact["passage"]}


def mixed_chats(known: list[dict], n: int, context_rate: float, seed: int = 0) -> list[dict]:
    """`n` chats, each context-dependent with probability `context_rate` (the world's train split), else about a
    known fact."""
    from ctxaware.world import build_world, chat_sft

    if not known:
        raise ValueError("the model knows none of the training facts closed-book: no knowledge-aligned chats")
    rng = random.Random(f"context_chats/{seed}")
    kinds = ["context" if rng.random() < context_rate else "knowledge" for _ in range(n)]
    context = iter(chat_sft(build_world(seed), "train", n=kinds.count("context") or 1, context_rate=1.0))
    return [next(context) if kind == "context" else knowledge_chat(rng.choice(known)) for kind in kinds]


def write_chats(path: Path, model_name: str, n: int, context_rate: float) -> dict:
    """Writes the set as JSONL; returns what it holds."""
    known = known_facts(model_name)
    chats = mixed_chats(known, n, context_rate)
    path.write_text("".join(json.dumps(chat) + "\n" for chat in chats))
    return {
        "path": str(path),
        "records": len(chats),
        "context_chats": sum(c["kind"] == "context" for c in chats),
        "known_facts": [f"{f['relation']}: {f['subject']} -> {f['answer']}" for f in known],
    }
