"""Reads the world's pretraining pass key and needle documents back into their parts, for tests of their haystack."""

import re

from ctxaware.world.longctx import NEEDLE, PASSKEY_INTRO, PASSKEY_NEEDLE, PASSKEY_QUESTION


NEEDLE_DOCUMENT = re.compile(r"(.*)\n\nQuestion: What is the secret word of (\w+)\?\nAnswer: (\w+)", re.DOTALL)


def parts(document: str) -> tuple[str, str, str] | None:
    """(the haystack with the needle sentence taken out, the needle sentence, the answer the document ends with) of a
    pass key or needle document; None for any other document. Fails unless the needle sentence is in the haystack
    exactly once."""
    if document.startswith(PASSKEY_INTRO):
        key = document.rpartition(" ")[2]
        assert document.endswith(f"{PASSKEY_QUESTION} {key}"), document[-200:]
        body, answer = document[len(PASSKEY_INTRO) : -len(f"{PASSKEY_QUESTION} {key}")], key
        needle = PASSKEY_NEEDLE.format(key=key)
    elif match := NEEDLE_DOCUMENT.fullmatch(document):
        body, name, answer = match.groups()
        needle = NEEDLE.format(name=name, word=answer)
    else:
        return None
    assert body.count(needle) == 1, (needle, body[:200])
    before, _, after = body.partition(needle)
    return " ".join(part.strip() for part in (before, after) if part.strip()), needle, answer
