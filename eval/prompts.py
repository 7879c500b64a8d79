"""Prompt formats shared by the tasks: one plain (pretraining-style) and one chat rendering of each question."""

from ctxaware.eval.registry import EvalOptions


def template_variants(options: EvalOptions, lm, *, default: str) -> list[bool]:
    """The chat-template settings to run: `--chat_template` when given, else the task's `default` (on/off/both)."""
    choice = options.chat_template or default
    if choice == "both":
        return [False, True] if lm.has_chat_template else [False]
    if choice not in ("on", "off"):
        raise ValueError(f"--chat_template must be on or off, got {choice!r}.")
    return [choice == "on"]


def variant_name(chat: bool) -> str:
    return "chat" if chat else "plain"


def with_indicator(question: str, indicator: str | None) -> str:
    return f"{question} {indicator}" if indicator else question


def qa_text(context: str | None, question: str, *, chat: bool) -> str:
    """The user-visible text of a (context) question; plain prompts end in `Answer:` so a base model completes it."""
    if chat:
        return f"{context}\n\n{question}" if context else question
    prefix = f"Context: {context}\n" if context else ""
    return f"{prefix}Question: {question}\nAnswer:"


def qa_prompt(lm, context: str | None, question: str, *, chat: bool) -> list[int]:
    return lm.encode(qa_text(context, question, chat=chat), chat=chat)


def summary_prompt(lm, post: str, *, chat: bool) -> list[int]:
    text = f"Summarize this post in one sentence.\n\n{post}" if chat else f"{post}\nTL;DR:"
    return lm.encode(text, chat=chat)
