"""Rows of a data set by name: a local file (.json / .jsonl / .parquet / .csv / .txt), a local folder, a named text
source (`books`, see `ctxaware.texts`) or a Hub id, through one function, so every recipe and task accepts each.

A single file is one split (`train`, or a slice of it such as `train[:90%]`); a folder holds one file per split,
named as `datasets` infers them (`train.jsonl`, `validation.jsonl`, `test.jsonl`, ...)."""

from __future__ import annotations

from pathlib import Path


LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}


def is_local_file(name: str) -> bool:
    return Path(name).suffix in LOCAL_BUILDERS or Path(name).is_file()


def is_local(name: str) -> bool:
    """A local file or folder (as opposed to a Hub id or a named source)."""
    return is_local_file(name) or Path(name).is_dir()


def load_rows(name: str, *, config: str | None = None, split: str = "train", streaming: bool = False):
    """A `datasets.Dataset` (or `IterableDataset` when `streaming`) of `name`'s `split`.

    A `.txt` file gives one row per line in a `text` column; `books` gives one row per book of that split, column
    `text`; a folder is read by `datasets` (split files by name).
    """
    from datasets import Dataset, load_dataset

    from ctxaware import texts

    if name in texts.TEXT_SOURCES:
        return Dataset.from_dict({"text": list(texts.book_documents(split))})
    if is_local_file(name):
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"Data file {name} does not exist: pass an existing file or a Hub data set id.")
        if path.suffix not in LOCAL_BUILDERS:
            raise ValueError(f"{name}: unsupported file type; use one of {', '.join(LOCAL_BUILDERS)}.")
        if path.stat().st_size == 0:
            raise ValueError(f"Data file {name} is empty.")
        if split != "train" and not split.startswith("train["):
            raise ValueError(
                f"{name} is a single file, which holds one split, and split {split!r} was asked for: pass a folder "
                "with one file per split (train.jsonl, test.jsonl, ...) or a slice such as train[90%:]."
            )
        try:
            return load_dataset(LOCAL_BUILDERS[path.suffix], data_files=str(path), split=split, streaming=streaming)
        except Exception as error:  # datasets raises many types for unreadable files; name the file
            raise ValueError(f"Could not read {name} as {LOCAL_BUILDERS[path.suffix]}: {error}") from error
    return load_dataset(name, config, split=split, streaming=streaming)
