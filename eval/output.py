"""Results in lm-evaluation-harness's shape, their schema check, the stdout table, and the JSON / JSONL writers.

Layout under `--output_path DIR`: `DIR/<model>/results_<time>.json` (time to the microsecond, and never a name
already taken, so runs sharing a folder keep every result), `samples_<task>_<time>.jsonl` and
`<task>_<plot>_<time>.png` side by side. Metric keys are `"<metric>,<filter>"` with the filter `none`; standard
errors are `"<metric>_stderr,none"` (the string "N/A" where undefined, as lm-evaluation-harness writes).
"""

import json
import math
import subprocess
from pathlib import Path

from ctxaware.io import atomic_file, write_json  # noqa: F401 (the harness writes JSON through this)


FILTER = "none"


def metric_key(metric: str) -> str:
    return f"{metric},{FILTER}"


def stderr_key(metric: str) -> str:
    return f"{metric}_stderr,{FILTER}"


def json_number(value):
    return None if value is None or (isinstance(value, float) and not math.isfinite(value)) else value


def task_results(task: str, metrics: dict, stderrs: dict) -> dict:
    row = {"alias": task}
    for metric, value in metrics.items():
        row[metric_key(metric)] = json_number(value)
        if metric in stderrs:
            stderr = json_number(stderrs[metric])
            row[stderr_key(metric)] = "N/A" if stderr is None else stderr
    return row


def git_hash() -> str | None:
    for where in (Path(__file__).resolve().parent, Path.cwd()):
        try:
            out = subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0:
            return out.stdout.strip()
    return None


_TOP_LEVEL = {
    "results": dict,
    "configs": dict,
    "versions": dict,
    "n-samples": dict,
    "higher_is_better": dict,
    "config": dict,
    "date": (int, float),
    "ctxaware_version": str,
    "transformers_version": str,
    "torch_version": str,
    "total_evaluation_time_seconds": str,
}


def validate_results(results: dict) -> None:
    """Raises ValueError listing every way `results` departs from the schema of this tool's results JSON."""
    problems = []
    for key, kind in _TOP_LEVEL.items():
        if key not in results:
            problems.append(f"missing top-level key {key!r}")
        elif not isinstance(results[key], kind):
            problems.append(f"{key!r} should be {kind}, got {type(results[key]).__name__}")
    if "git_hash" not in results or not isinstance(results["git_hash"], str | None):
        problems.append("'git_hash' must be present, a string or null")
    for key in ("model", "batch_size", "limit", "seed", "chat_template", "generation_hooks"):
        if key not in results.get("config", {}):
            problems.append(f"config lacks {key!r}")
    for task, row in results.get("results", {}).items():
        if not isinstance(row, dict) or row.get("alias") != task:
            problems.append(f"results[{task!r}] must be a dict with alias {task!r}")
            continue
        metrics = [k for k in row if k != "alias" and "_stderr," not in k]
        if not metrics:
            problems.append(f"results[{task!r}] has no metric")
        for key in metrics:
            name, sep, filt = key.partition(",")
            if not sep or not name or not filt:
                problems.append(f"results[{task!r}] key {key!r} is not 'metric,filter'")
            if row[key] is not None and not isinstance(row[key], int | float):
                problems.append(f"results[{task!r}][{key!r}] must be a number or null")
            if name not in results.get("higher_is_better", {}).get(task, {}):
                problems.append(f"higher_is_better[{task!r}] lacks {name!r}")
        for key in row:
            if "_stderr," in key:
                base = key.replace("_stderr,", ",")
                if base not in row:
                    problems.append(f"results[{task!r}] has {key!r} without {base!r}")
                if not (row[key] == "N/A" or isinstance(row[key], int | float)):
                    problems.append(f"results[{task!r}][{key!r}] must be a number or 'N/A'")
        for section in ("configs", "versions", "n-samples", "higher_is_better"):
            if task not in results.get(section, {}):
                problems.append(f"{section!r} lacks task {task!r}")
        counts = results.get("n-samples", {}).get(task, {})
        if not (
            isinstance(counts, dict)
            and isinstance(counts.get("original"), int)
            and isinstance(counts.get("effective"), int)
        ):
            problems.append(f"n-samples[{task!r}] must hold integer 'original' and 'effective'")
    if problems:
        raise ValueError("Results do not match the schema:\n  " + "\n  ".join(problems))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    with atomic_file(path) as tmp, tmp.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, default=str) + "\n")
    return path


def format_table(results: dict) -> str:
    """A markdown table like lm-evaluation-harness's: one row per task and metric."""
    header = ["Task", "Version", "Filter", "Metric", "", "Value", "", "Stderr"]
    rows = []
    for task, row in results["results"].items():
        first = True
        for key, value in row.items():
            if key == "alias" or "_stderr," in key:
                continue
            metric, _, filt = key.partition(",")
            arrow = "↑" if results["higher_is_better"][task].get(metric, True) else "↓"
            stderr = row.get(key.replace(",", "_stderr,", 1))
            rows.append(
                [
                    task if first else "",
                    str(results["versions"][task]),
                    filt,
                    metric,
                    arrow,
                    "nan" if value is None else f"{value:.4f}",
                    "±" if stderr is not None else "",
                    "" if stderr is None else (stderr if isinstance(stderr, str) else f"{stderr:.4f}"),
                ]
            )
            first = False
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) if rows else len(header[i]) for i in range(len(header))]
    lines = ["|" + "|".join(f"{h:<{w}}" for h, w in zip(header, widths)) + "|"]
    lines.append("|" + "|".join("-" * w for w in widths) + "|")
    lines += ["|" + "|".join(f"{c:<{w}}" for c, w in zip(r, widths)) + "|" for r in rows]
    return "\n".join(lines)
