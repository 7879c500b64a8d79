"""Metrics shared by the tasks: answer normalisation, exact match, containment, ROUGE-L, means with standard errors."""

import math
import re
import string
from collections.abc import Sequence


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCT))
    return " ".join(text.split())


def exact_match(prediction: str, answers: str | Sequence[str]) -> float:
    answers = [answers] if isinstance(answers, str) else answers
    return float(any(normalize_answer(prediction) == normalize_answer(a) for a in answers))


def contains_answer(prediction: str, answers: str | Sequence[str]) -> float:
    """1.0 when a normalised answer occurs in the normalised prediction as whole words."""
    answers = [answers] if isinstance(answers, str) else answers
    padded = f" {normalize_answer(prediction)} "
    return float(any(normalize_answer(a) and f" {normalize_answer(a)} " in padded for a in answers))


def first_token_match(tokenizer, prediction: str, answer: str) -> float:
    """1.0 when the prediction's first token (after a space, as a reply begins) is the answer's first token: the
    model found what it was asked for, whether or not it then copies the whole answer."""

    def first(text: str) -> int | None:  # the first token that is not whitespace alone (some tokenizers split " ")
        ids = tokenizer(" " + text.strip(), add_special_tokens=False)["input_ids"]
        return next((i for i in ids if tokenizer.decode([i]).strip()), None)

    return float(bool(answer.strip()) and first(prediction) == first(answer))


def first_line(text: str) -> str:
    """The answer part of a generation: its first non-empty line, stripped."""
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, in O(len(a) * len(b)) time and O(len(b)) memory."""
    if not a or not b:
        return 0
    previous = [0] * (len(b) + 1)
    for token_a in a:
        current = [0]
        for j, token_b in enumerate(b):
            current.append(previous[j] + 1 if token_a == token_b else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (beta = 1) over lower-cased word tokens (punctuation removed), as in the `rouge-score` package."""
    pred = re.findall(r"[a-z0-9]+", prediction.lower())
    ref = re.findall(r"[a-z0-9]+", reference.lower())
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def mean_stderr(values: Sequence[float]) -> float:
    """Standard error of the mean (sample standard deviation / sqrt(n)), as lm-evaluation-harness reports it."""
    n = len(values)
    if n < 2:
        return float("nan")
    mu = mean(values)
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1) / n)


def add_mean(result_metrics: dict, stderrs: dict, name: str, values: Sequence[float]) -> None:
    """Stores the mean of per-sample `values` under `name`, and its standard error."""
    result_metrics[name] = mean(values)
    stderrs[name] = mean_stderr(values)
