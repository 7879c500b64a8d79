"""Knowledge conflict on facts a real model knows: capitals it names closed-book, then the same question after a
passage that states another city. Does the answer follow the passage or the memory, with and without the chat
template?

Which facts the model knows is probed once, by plain sentence completion (`The capital of France is` -> ` Paris`;
an instruction-tuned model may answer the QA format's bare `Answer:` with an end of turn): a fact is known when the
completion contains the true capital. The conflict rates are over the known facts only, since a model cannot
override a fact it does not hold. Metrics: `known_rate`, then per template (`plain`, `chat`) over known facts
`context_rate` / `memory_rate` (the reply with the passage contains the passage's / the true capital) and
`prefers_context` (log p(passage's city) > log p(true city)).
Data: `ctxaware/data/known_facts/capitals.jsonl` (`--split validation` or `test`); `train_facts.jsonl` holds facts
about other countries (capital, continent; each with its probe and a passage that agrees) for training data
(`load_train_facts`, with `known_facts` to keep those a model knows; `contradicting` restates their passages with a
false answer, and `states_truth` scores a reply against it: LoFiT's `known_facts/truthful` task).
"""

import json
import random

from ctxaware.data import DATA_DIR
from ctxaware.eval.metrics import add_mean, contains_answer, first_line
from ctxaware.eval.prompts import qa_prompt, template_variants, variant_name, with_indicator
from ctxaware.eval.registry import EvalOptions, Task, TaskResult, register_task


FACTS_FILE = DATA_DIR / "known_facts" / "capitals.jsonl"
TRAIN_FACTS_FILE = DATA_DIR / "known_facts" / "train_facts.jsonl"
SPLITS = ("validation", "test")
REPLY_TOKENS = 16  # room for a sentence that names the answer, not only the bare answer


def load_facts(split: str) -> list[dict]:
    if split not in SPLITS:
        raise ValueError(f"knowledge_conflict has the splits {', '.join(SPLITS)}, not {split!r}: pass --split test.")
    rows = [json.loads(line) for line in FACTS_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [row for row in rows if row["split"] == split]


def load_train_facts() -> list[dict]:
    """Facts about countries outside both evaluation splits (`subject`, `relation`, `question`, `answer`, `probe`,
    `passage`), for training data."""
    return [json.loads(line) for line in TRAIN_FACTS_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]


def contradicting(facts: list[dict], n: int, seed: int = 0) -> list[dict]:
    """`n` training facts, `facts` in turn, each with a `counterfactual_answer` (another training fact's answer of the
    same relation, drawn with `seed`) that its `passage` states in place of the true answer."""
    pools = {}
    for fact in load_train_facts():
        pools.setdefault(fact["relation"], set()).add(fact["answer"])
    rng = random.Random(f"contradicting/{seed}")
    rows = []
    for i in range(n):
        fact = facts[i % len(facts)]
        false = rng.choice(sorted(pools[fact["relation"]] - {fact["answer"]}))
        passage = fact["passage"].replace(fact["answer"], false)
        rows.append({**fact, "counterfactual_answer": false, "passage": passage})
    return rows


def states_truth(reply: str, answer: str, counterfactual_answer: str) -> bool:
    """The reply's first line contains the true answer and not the passage's false one."""
    line = first_line(reply)
    return bool(contains_answer(line, answer)) and not contains_answer(line, counterfactual_answer)


def known_facts(lm, facts: list[dict]) -> list[dict]:
    """The facts whose answer the model gives closed-book (`closed_book`)."""
    return [facts[i] for i in closed_book(lm, facts)[1]]


def closed_book(lm, records: list[dict], max_new_tokens: int = REPLY_TOKENS) -> tuple[list[str], list[int]]:
    """Each fact's closed-book reply (first line) to its `probe` (default `The capital of X is`) and the indices of the
    facts whose answer it contains."""
    probes = [lm.encode(r.get("probe") or f"The capital of {r['subject']} is", chat=False) for r in records]
    outputs = [first_line(o) for o in lm.generate(probes, max_new_tokens=max_new_tokens, desc="kc/closed-book")]
    return outputs, [i for i, (r, o) in enumerate(zip(records, outputs)) if contains_answer(o, r["answer"])]


@register_task
class KnowledgeConflict(Task):
    name = "knowledge_conflict"
    description = "Passages contradicting facts the model knows (capitals): follows the passage or its memory?"
    higher_is_better = {"memory_rate_plain": False, "memory_rate_chat": False}

    def config(self, options: EvalOptions) -> dict:
        return {**super().config(options), "split": options.split, "data": str(FACTS_FILE.name)}

    def load(self, lm, options: EvalOptions) -> list[dict]:
        return load_facts(options.split)[: options.limit]

    def evaluate(self, lm, records: list[dict], options: EvalOptions) -> TaskResult:
        metrics, stderrs, samples = {}, {}, []
        new_tokens = options.max_new_tokens or REPLY_TOKENS
        closed_out, known = closed_book(lm, records, new_tokens)
        add_mean(metrics, stderrs, "known_rate", [float(i in known) for i in range(len(records))])
        for chat in template_variants(options, lm, default="both"):
            variant = variant_name(chat)
            question = [with_indicator(records[i]["question"], options.indicator) for i in known]
            prompts = [qa_prompt(lm, records[i]["passage"], q, chat=chat) for i, q in zip(known, question)]
            outputs = [first_line(o) for o in lm.generate(prompts, max_new_tokens=new_tokens, desc=f"kc/{variant}")]
            follows_context = [contains_answer(o, records[i]["counterfactual_answer"]) for i, o in zip(known, outputs)]
            follows_memory = [contains_answer(o, records[i]["answer"]) for i, o in zip(known, outputs)]
            sep = "" if chat else " "  # the answer continues "Answer:" (plain) or starts the assistant turn (chat)
            requests = []
            for i, prompt in zip(known, prompts):
                requests.append((prompt, lm.encode_continuation(sep + records[i]["counterfactual_answer"])))
                requests.append((prompt, lm.encode_continuation(sep + records[i]["answer"])))
            logliks = lm.loglikelihood(requests, desc=f"kc/{variant}") if requests else []
            prefers = [float(logliks[2 * n][0] > logliks[2 * n + 1][0]) for n in range(len(known))]
            if known:
                add_mean(metrics, stderrs, f"context_rate_{variant}", follows_context)
                add_mean(metrics, stderrs, f"memory_rate_{variant}", follows_memory)
                add_mean(metrics, stderrs, f"prefers_context_{variant}", prefers)
            with_passage = dict(zip(known, zip(outputs, follows_context, follows_memory, prefers)))
            for i, (r, closed_answer) in enumerate(zip(records, closed_out)):
                reply, fc, fm, pc = with_passage.get(i, (None, None, None, None))
                samples.append(
                    {
                        "doc_id": i,
                        "template": variant,
                        "question": r["question"],
                        "answer": r["answer"],
                        "counterfactual_answer": r["counterfactual_answer"],
                        "closed_book": closed_answer,
                        "known": i in with_passage,
                        "response": reply,
                        "follows_context": fc,
                        "follows_memory": fm,
                        "prefers_context": pc,
                    }
                )
        return TaskResult(metrics, samples, stderrs)
