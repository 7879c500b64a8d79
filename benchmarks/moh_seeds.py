"""MoH's targets over seeds that ran apart: reads the moh_science.json of several `benchmarks/moh_science.py` runs with
the same settings, each with its own --seeds (e.g. one device lane per seed), and writes moh_science.json and .md as
one run over all their seeds would (per-seed tables, the targets' mean, sd and standard error over the seeds).

    python benchmarks/moh_seeds.py --runs SEED0/moh_science.json SEED1/moh_science.json SEED2/moh_science.json --out DIR

`seconds` sums the runs' own (they may have run side by side); `runs` lists every run's command, tree and seconds.
"""

import argparse
import json
from pathlib import Path

from moh_science import ALLOWED_DROP, drop_targets, ppl_targets, write_summary
from science_common import command_line, output_folder


SAME = ("model", "split", "git")  # and every setting but the seeds


def merged(parts: list[dict], parser: argparse.ArgumentParser) -> dict:
    """One summary of runs that differ only in their seeds; a clear error where they differ in anything else."""
    first = parts[0]
    for part in parts[1:]:
        for key in SAME:
            if part[key] != first[key]:
                parser.error(f"--runs differ in {key}: {first[key]!r} and {part[key]!r}; merge runs of one setting")
        for key in first["settings"].keys() | part["settings"].keys():
            if key not in ("seeds", "workers") and first["settings"].get(key) != part["settings"].get(key):
                parser.error(f"--runs differ in setting {key}; merge runs of one setting")
    seeds = [seed for part in parts for seed in part["settings"]["seeds"]]
    if len(set(seeds)) != len(seeds):
        parser.error(f"--runs repeat a seed ({seeds}); pass each seed's run once")
    summary = {key: first[key] for key in SAME}
    summary |= {
        "command": command_line(),
        "runs": [{"command": part["command"], "git": part["git"], "seconds": part["seconds"]} for part in parts],
        "settings": first["settings"] | {"seeds": seeds},
        "seconds": {stage: sum(part["seconds"][stage] for part in parts) for stage in ("train", "eval")},
    }
    for key in ("task_scores", "training"):
        summary[key] = {seed: by_run for part in parts for seed, by_run in part[key].items()}
    summary["book_ppl"] = (
        {seed: by_run for part in parts for seed, by_run in part["book_ppl"].items()} if first["book_ppl"] else None
    )
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", nargs="+", required=True, help="moh_science.json of each run")
    parser.add_argument("--out", required=True, help="folder for the merged moh_science.json and .md")
    args = parser.parse_args()
    parts = []
    for path in args.runs:
        if not Path(path).is_file():
            parser.error(f"--runs {path}: no such file; pass the moh_science.json each run wrote")
        parts.append(json.loads(Path(path).read_text()))
    summary = merged(parts, parser)
    runs = {name: (flags, ALLOWED_DROP.get(name)) for name, flags in summary["settings"]["runs"].items()}
    targets = drop_targets(summary["task_scores"], runs)
    summary["targets"] = ppl_targets(targets, summary["book_ppl"]) if summary["book_ppl"] else targets
    write_summary(output_folder(args.out), summary, runs, summary["settings"]["tasks"])


if __name__ == "__main__":
    main()
