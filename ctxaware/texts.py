"""Named sources of real long text, with fixed train / validation / test portions.

`books`: public-domain books shipped in `ctxaware.data` (`data/books/`, Project Gutenberg license headers kept in
the files and cut away here, so only the books' own text is read):
- train: Ainsworth's *Jack Sheppard*, first and second epochs, and tiny-shakespeare (karpathy/char-rnn);
- validation: *Jack Sheppard*, third epoch (never trained on);
- test: Austen's *Pride and Prejudice*, a book no training portion touches.

Anything that is not a name is read as a UTF-8 text file, so `--haystack_file` takes a name or a path.
"""

from __future__ import annotations

import functools
from pathlib import Path

from ctxaware.data import DATA_DIR


BOOKS_DIR = DATA_DIR / "books"
SPLITS = ("train", "validation", "test")
_JACK_SHEPPARD_SPLIT = "END OF THE SECOND EPOCH."
# split -> (file, portion): portion "all", "before" / "after" the marker above.
BOOK_PORTIONS: dict[str, list[tuple[str, str]]] = {
    "train": [("jack_sheppard.txt", "before"), ("tinyshakespeare.txt", "all")],
    "validation": [("jack_sheppard.txt", "after")],
    "test": [("pride_and_prejudice.txt", "all")],
}
TEXT_SOURCES = ("books",)


def book_body(text: str) -> str:
    """The text between Project Gutenberg's `*** START OF` and `*** END OF` lines (the whole text if it has none)."""
    lines = text.splitlines()
    start = next((i + 1 for i, line in enumerate(lines) if line.startswith("*** START OF")), 0)
    end = next(
        (
            i
            for i, line in enumerate(lines)
            if line.startswith(("*** END OF", "End of Project Gutenberg", "End of the Project Gutenberg"))
        ),
        len(lines),
    )
    return "\n".join(lines[start:end]).strip() + "\n"


@functools.cache
def book_documents(split: str) -> tuple[str, ...]:
    """The books' portions of `split`, one string per book."""
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r} of `books`: choose one of {', '.join(SPLITS)}.")
    documents = []
    for filename, portion in BOOK_PORTIONS[split]:
        path = BOOKS_DIR / filename
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: reinstall ctxaware (the books ship as package data).")
        body = book_body(path.read_text(encoding="utf-8"))
        if portion != "all":
            head, marker, tail = body.partition(_JACK_SHEPPARD_SPLIT)
            if not marker:
                raise ValueError(f"{path} lacks the line {_JACK_SHEPPARD_SPLIT!r} that splits it.")
            body = (head + marker if portion == "before" else tail).strip() + "\n"
        documents.append(body)
    return tuple(documents)


def read_text(name_or_path: str | Path, *, split: str = "test", what: str = "Text file") -> str:
    """A named source's `split` (its books joined by blank lines), or the contents of a UTF-8 text file."""
    from ctxaware.datafiles import read_text as read_text_file

    if str(name_or_path) in TEXT_SOURCES:
        return "\n\n".join(book_documents(split))
    if not Path(name_or_path).is_file():
        raise FileNotFoundError(
            f"{what} {name_or_path} does not exist: pass the path of a UTF-8 text file or a named source "
            f"({', '.join(TEXT_SOURCES)})."
        )
    return read_text_file(name_or_path, what)


def is_text_source(name_or_path: str | Path) -> bool:
    """Whether `name_or_path` is a named source or an existing file."""
    return str(name_or_path) in TEXT_SOURCES or Path(name_or_path).is_file()
