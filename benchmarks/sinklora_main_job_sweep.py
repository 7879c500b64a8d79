"""Runs the SinkLoRA main job (`recipes/sinklora.py` on the embedded tiny model, CPU) with one set of flags and appends
the command, its before/after evaluation and its CPU cost to a JSON list, so every configuration tried is on record:

    python benchmarks/sinklora_main_job_sweep.py --out benchmarks/results/sinklora_main_job_sweep.json \\
        --name yarn_lr1e-3 -- --rope_scaling yarn --learning_rate 1e-3

Runs under `/usr/bin/time -v` (where present) for wall and user + system CPU seconds; on a shared machine the CPU
seconds divided by the cores used are the fairer budget, so the load average before the run is recorded too.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON list to append to")
    parser.add_argument("--name", required=True)
    parser.add_argument("--note", default="")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("recipe_args", nargs="*", help="flags for recipes/sinklora.py, after --")
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    with tempfile.TemporaryDirectory() as scratch:
        output_dir = Path(scratch) / "run"
        recipe = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu"]
        recipe += ["recipes/sinklora.py", "--output_dir", str(output_dir), *args.recipe_args]
        timed = ["/usr/bin/time", "-v", *recipe] if Path("/usr/bin/time").exists() else recipe
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
        load_before = os.getloadavg()
        start = time.perf_counter()
        run = subprocess.run(timed, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        log = run.stdout + run.stderr
        if run.returncode:
            sys.exit(f"the recipe failed:\n{log[-4000:]}")
        results = json.loads((output_dir / "adapter" / "eval_results.json").read_text())
        metadata = json.loads((output_dir / "adapter" / "sinklora.json").read_text())
    entry = {
        "name": args.name,
        "note": args.note,
        "command": f"OMP_NUM_THREADS={args.threads} accelerate launch recipes/sinklora.py "
        + " ".join(args.recipe_args),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "git": commit.stdout.strip(),  # the tree the run started from
        "cost": {**time_v(log), "wall_s_measured": round(wall, 1), "load_average_before": load_before},
        "train_runtime_s": _number(r"'train_runtime': '?([\d.]+)", log),
        "before": results.get("before", {}),
        "trained": results["summary"],
        "attention_ran": metadata.get("attention_ran"),
        "table": [line for line in log.splitlines() if line.startswith("|")],
    }
    out = Path(args.out)
    entries = json.loads(out.read_text()) if out.is_file() else []
    entries = [e for e in entries if e["name"] != args.name] + [entry]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(entries, indent=2) + "\n")
    tmp.replace(out)
    print("\n".join(entry["table"]))
    print(json.dumps(entry["cost"]), "train_runtime_s", entry["train_runtime_s"])


def time_v(log: str) -> dict:
    """Wall, user and system seconds and peak memory from `/usr/bin/time -v`'s report."""
    user, system = _number(r"User time \(seconds\): ([\d.]+)", log), _number(r"System time \(seconds\): ([\d.]+)", log)
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", log)
    wall_s = None
    if wall:
        hours, minutes, seconds = wall.groups()
        wall_s = int(hours or 0) * 3600 + int(minutes) * 60 + float(seconds)
    rss = _number(r"Maximum resident set size \(kbytes\): (\d+)", log)
    cpu = None if user is None or system is None else round(user + system, 1)
    return {"wall_s": wall_s, "user_s": user, "sys_s": system, "cpu_s": cpu, "max_rss_mb": rss and round(rss / 1024)}


def _number(pattern: str, text: str) -> float | None:
    match = re.search(pattern, text)
    return float(match.group(1)) if match else None


if __name__ == "__main__":
    main()
