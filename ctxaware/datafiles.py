"""The user's own data: rows of a data set by name (a local file or folder, a named text source, a Hub id) through
`load_rows`, and reading .txt / .json / .jsonl files and model weights with errors that name the file, the row and
the fix.

`load_rows` takes a local .json / .jsonl / .parquet / .csv / .txt file, a local folder, a named text source (`books`,
see `ctxaware.texts`) or a Hub id, so every recipe and task accepts each. A single file is one split (`train`, or a
slice of it such as `train[:90%]`); a folder holds one file per split, named as `datasets` infers them
(`train.jsonl`, `validation.jsonl`, `test.jsonl`, ...)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path


def read_text(path: str | Path, what: str = "text file") -> str:
    """The file's text; raises if it is missing, not UTF-8 (naming the line) or empty."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist: pass the path of a UTF-8 text file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise ValueError(
            f"{what} {path} is not UTF-8 text (byte {error.start}, line {line}): convert it, e.g. "
            f"`iconv -f latin1 -t utf-8 {path.name}`"
        ) from None
    if not text.strip():
        raise ValueError(f"{what} {path} is empty: pass a file that holds text")
    return text


def read_records(path: str | Path, what: str = "data file") -> list[dict]:
    """The rows of a .jsonl file (one JSON object a line) or a .json file (a list of objects); raises naming the row
    that is not an object, or the file if it is empty."""
    path = Path(path)
    text = read_text(path, what)
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as error:
                    raise ValueError(
                        f"{what} {path}, line {number}: not valid JSON ({error}); fix that line"
                    ) from None
        numbered = list(enumerate(rows, 1))
    else:
        try:
            rows = json.loads(text)
        except ValueError as error:
            raise ValueError(f"{what} {path} is not valid JSON ({error})") from None
        rows = rows if isinstance(rows, list) else [rows]
        numbered = list(enumerate(rows, 1))
    for number, row in numbered:
        if not isinstance(row, dict):
            raise ValueError(f"{what} {path}, row {number}: expected a JSON object, got {type(row).__name__}")
    return rows


def require_column(rows: Iterable[dict], column: str, source: str, fix: str) -> None:
    """Raises naming the first row (1-based) that lacks `column` or holds null there."""
    for number, row in enumerate(rows, 1):
        if row.get(column) is None:
            raise ValueError(
                f"{source}, row {number}: no value in column {column!r} (columns: {', '.join(sorted(row))}); {fix}"
            )


def check_safetensors(folder: str | Path) -> None:
    """Raises naming the first `*.safetensors` file in `folder` (or that file) that is truncated or corrupt: its size
    must be what its header describes. Costs one small read per file, so it runs before a load that would fail with
    an error that names no file."""
    folder = Path(folder)
    files = [folder] if folder.suffix == ".safetensors" else sorted(folder.glob("*.safetensors"))
    for path in files:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            try:
                header = json.loads(handle.read(length)) if 0 < length <= size - 8 else None
                ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
                expected = 8 + length + max(ends, default=0)
            except (TypeError, ValueError, KeyError, AttributeError, IndexError):
                expected = None
        if expected != size:
            described = f", its header describes {expected}" if expected is not None else ", its header is unreadable"
            raise ValueError(
                f"{path} is truncated or corrupt ({size} bytes{described}): save it again, or download it again"
            )


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
        if path.suffix in (".json", ".jsonl"):
            read_records(path, "data file")  # an empty, non-UTF-8 or broken file: named with its line
        elif path.suffix == ".txt":
            read_text(path, "data file")
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
