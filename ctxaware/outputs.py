"""The output folder a recipe owns for its run: a lock against a second run, a check that it holds no other run's
results, complete checkpoints, and the clean-up of what a killed run left behind (atomic writes: `ctxaware.io`)."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from ctxaware.io import write_json


RUN_CONFIG_NAME = "run_config.json"
LOCK_NAME = ".ctxaware.lock"
TRAINER_STATE_NAME = "trainer_state.json"  # transformers writes it last into a checkpoint
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# What ctxaware.io's atomic writes leave when killed (`.name.<hex>.tmp` / `.old`), and what earlier versions left.
_STALE = re.compile(r"^\..+(\.tmp|\.old|-tmp-.+|-old)$")
# Settings that never change what a run computes: a folder's earlier run may have had other values.
BOOKKEEPING_KEYS = frozenset(
    {
        "output_dir",
        "overwrite_output_dir",
        "resume_from_checkpoint",
        "logging_dir",
        "logging_steps",
        "report_to",
        "run_name",
        "push_to_hub",
        "hub_model_id",
        "hub_token",
        "hub_private_repo",
        "disable_tqdm",
        "dataloader_num_workers",
    }
)
_HELD: dict[Path, int] = {}  # output folders this process has locked: folder -> open descriptor


def is_main_process() -> bool:
    """Rank 0 of a launch (or a plain process): the one that owns the output folder."""
    return int(os.environ.get("RANK", "0")) == 0


def lock_output_dir(folder: str | Path) -> Path:
    """Takes an exclusive lock on `folder` for the rest of this process (the kernel drops it when the process ends,
    however it ends); raises if another process holds it, naming that process."""
    folder = Path(folder).resolve()
    if folder in _HELD:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise ValueError(
            f"{folder} is in use by a running job ({holder}): wait for it to finish, or pass another --output_dir"
        ) from None
    os.ftruncate(fd, 0)
    command = " ".join(Path(sys.argv[0]).name if i == 0 else a for i, a in enumerate(sys.argv))[:300]
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {started}: {command}\n".encode(), 0)
    _HELD[folder] = fd
    return folder


def unlock_output_dir(folder: str | Path) -> None:
    fd = _HELD.pop(Path(folder).resolve(), None)
    if fd is not None:
        os.close(fd)


def checkpoints(folder: str | Path) -> list[Path]:
    """The `checkpoint-N` folders anywhere under `folder`, newest (highest N) first."""
    found = [p for p in Path(folder).rglob("checkpoint-*") if p.is_dir() and _CHECKPOINT.match(p.name)]
    return sorted(found, key=lambda p: int(_CHECKPOINT.match(p.name).group(1)), reverse=True)


def is_complete_checkpoint(folder: Path) -> bool:
    """A checkpoint is complete once its trainer state, the last file the Trainer writes, reads back whole."""
    try:
        json.loads((folder / TRAINER_STATE_NAME).read_text())
    except (OSError, ValueError):
        return False
    return True


def latest_complete_checkpoint(folder: str | Path) -> Path | None:
    """The newest complete checkpoint directly in `folder` (an interrupted save is skipped), or None."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = [p for p in checkpoints(folder) if p.parent == folder]
    return next((p for p in found if is_complete_checkpoint(p)), None)


def saved_run_config(checkpoint: Path) -> dict | None:
    """The run configuration a checkpoint was trained with: its own copy, else that of the output folder it is in."""
    for folder in (checkpoint, *list(checkpoint.parents)[:3]):
        path = folder / RUN_CONFIG_NAME
        if path.is_file():
            return json.loads(path.read_text())
    return None


def config_differences(saved: dict, current: dict, may_differ: Iterable[str] = ()) -> list[str]:
    """`key: saved, now current` for each key outside `may_differ` whose value differs."""
    current = json.loads(json.dumps(current, sort_keys=True, default=str))
    ignored = set(may_differ)
    keys = sorted(k for k in saved.keys() | current.keys() if k not in ignored and saved.get(k) != current.get(k))
    return [f"{k}: {saved.get(k)!r}, now {current.get(k)!r}" for k in keys]


def remove_leftovers(folder: Path) -> list[Path]:
    """Deletes what killed runs leave: hidden temporary files and folders, and checkpoints whose save never
    finished. Call only while holding the folder's lock."""
    removed = [p for p in folder.iterdir() if _STALE.match(p.name)]
    removed += [p for p in checkpoints(folder) if not is_complete_checkpoint(p)]
    for path in removed:
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    return removed


def claim_output_dir(
    folder: str | Path,
    run_config: dict,
    *,
    overwrite: bool = False,
    resume: bool | str | None = False,
    may_differ: Iterable[str] = (),
    resumable: bool = True,
) -> Path:
    """Makes `folder` this run's: locks it, removes leftovers of killed runs, and refuses to mix this run's outputs
    with another run's. A folder holding files but no run configuration, or another run's configuration (keys in
    `may_differ` aside), is refused unless `overwrite` (which deletes its checkpoints); so are checkpoints of an
    earlier run unless this run resumes (`resumable`: the recipe can). Then `run_config.json` records this run. Only the
    main process acts."""
    folder = Path(folder)
    if not is_main_process():
        return folder
    lock_output_dir(folder)
    remove_leftovers(folder)
    config_path = folder / RUN_CONFIG_NAME
    saved = json.loads(config_path.read_text()) if config_path.is_file() else None
    if overwrite:
        for checkpoint in checkpoints(folder):
            shutil.rmtree(checkpoint)
    elif saved is None:
        contents = sorted(p.name for p in folder.iterdir() if p.name != LOCK_NAME)
        if contents:
            raise ValueError(
                f"--output_dir {folder} already holds files of another run ({', '.join(contents[:5])}): pass "
                "--overwrite_output_dir true to replace them, or choose another --output_dir"
            )
    else:
        differences = config_differences(saved, run_config, BOOKKEEPING_KEYS | set(may_differ))
        if differences:
            raise ValueError(
                f"--output_dir {folder} holds a run with other settings ({'; '.join(differences[:6])}): pass "
                "--overwrite_output_dir true to replace it, or choose another --output_dir"
            )
        if (not resumable or resume in (None, False, "", "false", "False")) and checkpoints(folder):
            advice = "--resume_from_checkpoint true to continue it, or " if resumable else ""
            raise ValueError(
                f"--output_dir {folder} holds checkpoints of an earlier run with these settings: pass "
                f"{advice}--overwrite_output_dir true to start over"
            )
    write_json(config_path, json.loads(json.dumps(run_config, sort_keys=True, default=str)))
    return folder
