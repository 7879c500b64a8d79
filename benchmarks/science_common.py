"""Shared plumbing of the scientific checks (`benchmarks/*_science.py`): run a step with its log, read harness output.

Each check drives the recipes and `ctxaware eval` as subprocesses, the way a user would, from a folder outside the
checkout so that `python -m ctxaware.cli` imports the installed package (with `ctxaware.eval`), not `./ctxaware`.
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


RECIPES = Path(__file__).resolve().parents[1] / "recipes"


# Scores are fractions k/n, and differences of them: float rounding must not fail a target the exact numbers meet
# (0.26 - 0.25 is 0.010000000000000009), so thresholds are compared with this much slack.
ROUNDING = 1e-9


def at_least(value: float | None, threshold: float) -> bool:
    """`value >= threshold` up to float rounding; False for a missing value (None)."""
    return value is not None and value >= threshold - ROUNDING


def at_most(value: float | None, threshold: float) -> bool:
    """`value <= threshold` up to float rounding; False for a missing value (None)."""
    return value is not None and value <= threshold + ROUNDING


def spread(values: list[float]) -> dict:
    """Mean, sample sd and standard error of the mean (None for one value), and the count."""
    sd = statistics.stdev(values) if len(values) > 1 else None
    stderr = None if sd is None else sd / math.sqrt(len(values))
    return {"mean": statistics.fmean(values), "sd": sd, "stderr": stderr, "n": len(values)}


def science_parser(name: str, doc: str) -> argparse.ArgumentParser:
    """The options every check has: `--out` (default runs/<name>_science) and `--smoke`. No abbreviations, so a
    check can pass options it does not know on to the recipes."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--out", default=f"runs/{name}_science")
    parser.add_argument("--smoke", action="store_true", help="toy sizes on CPU: checks the pipeline, not the method")
    return parser


def output_folder(path: str) -> Path:
    """`--out` as an absolute path (the steps run from folders under it), created if missing."""
    out = Path(path).resolve()
    out.mkdir(parents=True, exist_ok=True)
    return out


def run(command: list[str], log: Path) -> None:
    """Runs `command` with its output in `log` (cwd: the log's folder); stops the check with the log's tail on failure."""
    start = time.time()
    with log.open("w") as handle:
        result = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ}, cwd=log.parent)
    print(f"[{time.time() - start:6.1f}s] exit {result.returncode}: {' '.join(command)}", flush=True)
    if result.returncode:
        print(log.read_text()[-4000:], flush=True)
        raise SystemExit(f"failed: {' '.join(command)} (log: {log})")


def run_parallel(jobs: list[tuple[list[str], Path]], workers: int | None = None) -> None:
    """Runs independent (command, log) pairs with `run`, `workers` at a time (None: all at once; small models leave
    most of a GPU idle); stops the check naming the failed logs once all have ended."""
    with ThreadPoolExecutor(workers or max(len(jobs), 1)) as pool:
        futures = [pool.submit(run, command, log) for command, log in jobs]
    failed = [str(log) for future, (_, log) in zip(futures, jobs) if future.exception()]
    if failed:
        raise SystemExit(f"failed: see {', '.join(failed)}")


def launch_recipe(recipe: str, *args: str) -> list[str]:
    """The command line of `accelerate launch recipes/<recipe>.py ARGS` on one process."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "1",
        str(RECIPES / f"{recipe}.py"),
        *args,
    ]


def eval_command(*args: str) -> list[str]:
    """The command line of `ctxaware eval ARGS`."""
    return [sys.executable, "-m", "ctxaware.cli", "eval", *args]


def harness_metrics(results_dir: Path) -> dict:
    """{task: {metric: value}} from the newest results JSON of a `ctxaware eval --output_path` folder."""
    (path,) = sorted(results_dir.glob("*/results_*.json"))[-1:]
    results = json.loads(path.read_text())["results"]
    return {
        task: {
            key.split(",")[0]: value
            for key, value in metrics.items()
            if isinstance(value, float) and "stderr" not in key
        }
        for task, metrics in results.items()
    }


def git_commit() -> str:
    """The benchmarked commit: CTXAWARE_GIT_COMMIT where the tree travelled without its repository (a `git archive`
    copy on the GPU machine), else `git rev-parse HEAD`; empty when neither is known."""
    if commit := os.environ.get("CTXAWARE_GIT_COMMIT"):
        return commit
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        )
    except OSError:  # no git on the machine
        return ""
    return result.stdout.strip()


def command_line() -> str:
    """How this check was started, for its results file."""
    return " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
