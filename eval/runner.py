"""Runs tasks on an `EvalModel` and assembles, validates and writes the results."""

import dataclasses
import re
import time
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

from ctxaware.eval import data, output
from ctxaware.eval.registry import EvalOptions, get_task
from ctxaware.io import atomic_file


def check_dataset(task_names: list[str], dataset: str | None) -> None:
    from ctxaware.datafiles import is_local_file

    if dataset and is_local_file(dataset) and any(data.REAL_DATASETS.get(t) for t in task_names):
        return
    if dataset and not any(dataset in data.REAL_DATASETS.get(t, {}) for t in task_names):
        known = {t: list(d) for t, d in data.REAL_DATASETS.items()}
        raise ValueError(f"No selected task knows data set {dataset!r}. Data sets by task: {known}.")


def _task_takes_dataset(task: str, dataset: str) -> bool:
    from ctxaware.datafiles import is_local_file

    known = data.REAL_DATASETS.get(task, {})
    return dataset in known or bool(known and is_local_file(dataset))


def evaluate(lm, task_names: list[str], options: EvalOptions, *, config: dict) -> tuple[dict, dict]:
    """Runs each task; returns (results in lm-evaluation-harness's shape, {task: TaskResult})."""
    import torch
    import transformers

    from ctxaware import __version__

    tasks = {name: get_task(name) for name in task_names}
    check_dataset(task_names, options.dataset)
    start = time.time()
    results = {
        "results": {},
        "configs": {},
        "versions": {},
        "n-samples": {},
        "higher_is_better": {},
        "extra": {},
        "config": {
            **config,
            "batch_size": options.batch_size,
            "limit": options.limit,
            "seed": options.seed,
            "chat_template": options.chat_template or "task default",
        },
        "git_hash": output.git_hash(),
        "date": start,
        "ctxaware_version": __version__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
    }
    # Every task's records load before any task runs, so bad data input fails in seconds, not after other tasks.
    loaded = {}
    for name, task in tasks.items():
        task_options = dataclasses.replace(options, limit=options.limit or task.default_limit)
        if options.dataset and not _task_takes_dataset(name, options.dataset):
            task_options = dataclasses.replace(task_options, dataset=None)
        try:
            records = task.load(lm, task_options)
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from error
        if not records:
            raise ValueError(f"Task {name} loaded no records: check --split and the data set.")
        loaded[name] = (records, task_options)
    outcomes = {}
    for name, task in tasks.items():
        records, task_options = loaded[name]
        torch.manual_seed(options.seed)
        outcome = task.evaluate(lm, records, task_options)
        outcomes[name] = outcome
        results["results"][name] = output.task_results(name, outcome.metrics, outcome.stderrs)
        results["configs"][name] = {**task.config(task_options), "limit": task_options.limit}
        results["versions"][name] = task.version
        results["n-samples"][name] = {"original": len(records), "effective": len(records)}
        results["higher_is_better"][name] = {m: task.higher_is_better_for(m) for m in outcome.metrics}
        if outcome.extra:
            results["extra"][name] = outcome.extra
    results["total_evaluation_time_seconds"] = str(time.time() - start)
    output.validate_results(results)
    return results, outcomes


def unique_stamp(folder: Path) -> str:
    """The write time to the microsecond, as lm-evaluation-harness names its files, made unique in `folder` by
    claiming its results file name (runs in the same folder and microsecond get `-1`, `-2`, ...)."""
    folder.mkdir(parents=True, exist_ok=True)
    base = datetime.now().strftime("%Y-%m-%dT%H-%M-%S.%f")
    for n in range(10_000):
        stamp = base if n == 0 else f"{base}-{n}"
        if (folder / f"results_{stamp}.json").exists():
            continue
        try:
            (folder / f".results_{stamp}.claim").open("x").close()  # exclusive create: no other run gets this name
        except FileExistsError:
            continue
        return stamp
    raise FileExistsError(f"{folder} holds 10,000 results files written in the same microsecond")


def write_outputs(results: dict, outcomes: dict, output_path: str | Path) -> dict[str, Path]:
    """Writes results JSON, one samples JSONL per task and the plots; returns what was written, by name."""
    model = re.sub(r"[^A-Za-z0-9_.-]+", "__", str(results["config"]["model"])).strip("_") or "model"
    folder = Path(output_path) / model
    stamp = unique_stamp(folder)
    written = {}
    results = {**results, "samples_files": {}, "plots": {}}
    for task, outcome in outcomes.items():
        path = output.write_jsonl(folder / f"samples_{task}_{stamp}.jsonl", outcome.samples)
        results["samples_files"][task] = path.name
        written[f"samples/{task}"] = path
        for plot_name, writer in outcome.plots.items():
            path = folder / f"{task}_{plot_name}_{stamp}.png"
            with atomic_file(path) as tmp:
                writer(tmp)
            results["plots"].setdefault(task, {})[plot_name] = path.name
            written[f"plot/{task}/{plot_name}"] = path
    written["results"] = output.write_json(folder / f"results_{stamp}.json", results)
    (folder / f".results_{stamp}.claim").unlink(missing_ok=True)
    return written


class InProcessRun(NamedTuple):
    results: dict  # in lm-evaluation-harness's shape
    outcomes: dict  # {task: TaskResult}
    written: dict[str, Path]  # what `write_outputs` wrote, by name; empty without an output path
    options: EvalOptions  # the options the tasks ran with


def evaluate_in_process(
    model,
    tokenizer,
    task_names: list[str],
    *,
    config: dict,
    batch_size: int,
    progress: bool = False,
    output_path: str | Path | None = None,
    **options,
) -> InProcessRun:
    """The harness on a model already in memory, as a recipe or benchmark runs it: `task_names` with
    `EvalOptions(batch_size=..., progress=..., **options)`, `config` recorded in the results (with the generation
    hooks, none here), and the outputs written under `output_path` when one is given."""
    from ctxaware.eval.model import EvalModel

    eval_options = EvalOptions(batch_size=batch_size, progress=progress, **options)
    lm = EvalModel(model, tokenizer, batch_size=batch_size, progress=progress)
    results, outcomes = evaluate(
        lm, list(task_names), eval_options, config={**config, "generation_hooks": lm.setup.applied}
    )
    written = write_outputs(results, outcomes, output_path) if output_path is not None else {}
    return InProcessRun(results, outcomes, written, eval_options)
