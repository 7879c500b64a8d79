"""Helpers, not tests: a hand-made stand-in for `ctxaware.world` and a stub model whose answers are known, for exact
metric checks (named test_eval_* so that it sits with the eval tests)."""

import re
from types import SimpleNamespace

from ctxaware.eval.model import EvalModel


CONTEXT_QA = [
    {
        "context": "Alna lives in Bero.",
        "question": "Where does Alna live?",
        "answer": "Bero",
        "memory_answer": "Tarn",
        "counterfactual": True,
    },
    {
        "context": "Corin lives in Dask.",
        "question": "Where does Corin live?",
        "answer": "Dask",
        "memory_answer": "Dask",
        "counterfactual": False,
    },
    {
        "context": "Emet works at Fiol.",
        "question": "Where does Emet work?",
        "answer": "Fiol",
        "memory_answer": "Gant",
        "counterfactual": True,
    },
    {
        "context": "Hira works at Ivel.",
        "question": "Where does Hira work?",
        "answer": "Ivel",
        "memory_answer": None,
        "counterfactual": False,
    },
]

ARITHMETIC = [
    {"prompt": "3 + 4 =", "answer": "7", "op": "+", "digits": 1},
    {"prompt": "12 + 30 =", "answer": "42", "op": "+", "digits": 2},
    {"prompt": "9 - 5 =", "answer": "4", "op": "-", "digits": 1},
    {"prompt": "40 - 11 =", "answer": "29", "op": "-", "digits": 2},
    {"prompt": "3 * 3 =", "answer": "9", "op": "*", "digits": 1},
    {"prompt": "12 * 11 =", "answer": "132", "op": "*", "digits": 2},
]

SUMMARIZATION = [
    {
        "post": "Hi all, Alna here. I moved to Bero. The bus was late.",
        "key_facts": ["Alna moved to Bero"],
        "reference": "Alna moved to Bero.",
    },
    {
        "post": "Hi all, Corin here. I adopted a cat named Mip. Tea helps.",
        "key_facts": ["Corin adopted a cat named Mip"],
        "reference": "Corin adopted a cat named Mip.",
    },
]

FILLER = "The grass is green. The sky is blue. "


def needle_example(tokenizer, n_tokens, depth, seed, haystack_text=None, world=None):
    """The needle sits at character fraction `depth` of the context; the context length grows with `n_tokens`."""
    word = f"w{seed % 1000:03d}"
    filler = (haystack_text or FILLER * 40)[: 2 * n_tokens]
    cut = int(depth * len(filler))
    needle = f" The secret word of Xo is {word}. "
    return {
        "context": filler[:cut] + needle + filler[cut:],
        "question": "What is the secret word of Xo?",
        "answer": word,
    }


def passkey_example(tokenizer, n_tokens, depth, seed, haystack_text=None, world=None):
    key = str(10000 + seed % 90000)
    return {
        "text": f"[len={n_tokens}] {FILLER} The pass key is {key}. {FILLER}\nWhat is the pass key? The pass key is",
        "answer": key,
    }


def preference_score(record, summary):
    """Share of the reference's words present in the summary."""
    words = set(re.findall(r"\w+", record["reference"]))
    return len(words & set(re.findall(r"\w+", summary))) / len(words)


def fake_world_module():
    return SimpleNamespace(
        build_world=lambda seed: f"world-{seed}",
        context_qa=lambda world, split: [dict(r) for r in CONTEXT_QA],
        arithmetic=lambda world, split: [dict(r) for r in ARITHMETIC],
        summarization=lambda world, split, n=None: [dict(r) for r in SUMMARIZATION][:n],
        needle_example=needle_example,
        passkey_example=passkey_example,
        preference_score=preference_score,
    )


def install_fake_world(monkeypatch):
    from ctxaware.eval import data

    monkeypatch.setattr(data, "_world_module", fake_world_module)
    monkeypatch.setattr(data, "world", fake_world_module().build_world)  # leaves the real world's cache alone


class StubLM(EvalModel):
    """Generates `answer(prompt_text)` and scores continuations with `score(context_text, continuation_text)`."""

    def __init__(self, tokenizer, answer, score=None):
        super().__init__(None, tokenizer, progress=False)
        self.answer, self.score = answer, score
        self.prompts: list[str] = []

    def generate(self, prompts, *, max_new_tokens, desc="", stop_strings=None):
        texts = [self.tokenizer.decode(p) for p in prompts]
        self.prompts += texts
        return [self.answer(text) for text in texts]

    def loglikelihood(self, requests, *, desc=""):
        return [(self.score(self.tokenizer.decode(c), self.tokenizer.decode(x)), False) for c, x in requests]


def by_question(mapping: dict[str, str], default: str = "none"):
    """An answer function: the value of the first key found in the prompt's last question."""

    def answer(text: str) -> str:
        question = text[text.rfind("Question") :] if "Question" in text else text
        return next((value for key, value in mapping.items() if key in question), default)

    return answer
