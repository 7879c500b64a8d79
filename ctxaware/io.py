"""Writes that are all or nothing: a reader (or a run cut short) never sees a half-written file or folder.

    with atomic_file(path) as tmp:          # write tmp; it becomes `path` only if the block completes
        fig.savefig(tmp, format="png")
    write_text(path, json.dumps(results))   # the same for a string
    with atomic_directory(folder) as tmp:   # a whole folder (a model, an adapter), swapped in at the end
        model.save_pretrained(tmp)

The temporary path is a hidden sibling of the target (same file system, so the final rename is atomic) and is removed
when the block raises. Temporary names end in `.tmp`, so patterns such as `results_*.json` never match them; writers
that infer a format from the extension need it given explicitly (matplotlib's `format="png"`).
"""

import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _sibling(path: Path, role: str) -> Path:
    """A fresh hidden name beside `path` (created by the caller with the process umask, unlike `tempfile`'s 0600)."""
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.{role}")


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside `path` for the block to write; renames it onto `path` (replacing any file there)
    when the block completes, removes it when the block raises. Creates `path`'s folder if missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> Path:
    """Writes `text` to `path` through a temporary file; returns `path`."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | Path, obj) -> Path:
    """`obj` as indented JSON (anything JSON cannot hold as its `str`), through a temporary file; returns `path`."""
    return write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yields an empty temporary folder beside `path` for the block to fill; it replaces `path` (an existing folder is
    removed) when the block completes and is removed when the block raises. If the swap itself fails, the previous
    folder is put back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        old = _sibling(path, "old")
        if path.exists():
            path.rename(old)
        try:
            tmp.rename(path)
        except BaseException:
            if old.exists():
                old.rename(path)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
