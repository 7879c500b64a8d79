"""Prompt formats shared by the tasks: one plain (pretraining-style) and one chat rendering of each question."""

from ctxaware.eval.registry import EvalOptions
from ctxaware.world.preference import SUMMARY_PROMPT
from ctxaware.world.tasks import CONTEXT_INSTRUCTION, CONTEXT_QA_PROMPT, QA_PROMPT


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
    """A (context) question in the world's formats: the pretraining corpus's plain prompt, which ends in `Answer:`
    so a base model completes it, or the user turn of the world's chat SFT data."""
    if chat:
        return f"{CONTEXT_INSTRUCTION}\n\n{context}\n\nQuestion: {question}" if context else question
    return (
        CONTEXT_QA_PROMPT.format(context=context, question=question)
        if context
        else QA_PROMPT.format(question=question)
    )


def qa_prompt(lm, context: str | None, question: str, *, chat: bool) -> list[int]:
    return lm.encode(qa_text(context, question, chat=chat), chat=chat)


def summary_prompt(lm, post: str, *, chat: bool) -> list[int]:
    text = f"Summarize this post in one sentence.\n\n{post}" if chat else SUMMARY_PROMPT.format(post=post)
    return lm.encode(text, chat=chat)
