"""LoFiT against random heads over training seeds: reads the run folders of several `benchmarks/lofit_science.py`
runs (or folders holding the same recipe runs: `lofit/` and `random_heads_*/`, each with its `results.json`), one per
seed, and writes each seed's gain differences and their mean, sd and standard error over seeds.

    python benchmarks/lofit_seeds.py --runs DIR_SEED0 DIR_SEED1 DIR_SEED2 --split test --out FILE.json

`--split test` reads the runs' `test_gain` (their `extra_eval_split`); without it, `gain` (their held-out split).
"""

import argparse
import json
import statistics
from pathlib import Path

from science_common import command_line, spread


def seed_row(folder: Path, key: str) -> dict:
    """One seed's LoFiT gain, its random draws' gains and the differences (and LoRA's gain where the folder has it)."""
    lofit = json.loads((folder / "lofit" / "results.json").read_text())
    draws = {p.parent.name: json.loads(p.read_text())[key] for p in sorted(folder.glob("random_heads_*/results.json"))}
    if not draws:
        raise SystemExit(f"{folder}: no random_heads_*/results.json; run the random draws first")
    row = {
        "folder": str(folder),
        "seed": json.loads((folder / "lofit" / "run_config.json").read_text()).get("seed"),
        "lofit_gain": lofit[key],
        "random_gains": draws,
        "lofit_minus_best_random": lofit[key] - max(draws.values()),
        "lofit_minus_mean_random": lofit[key] - statistics.mean(draws.values()),
    }
    lora = folder / "lora" / "results.json"
    if lora.is_file():
        row["share_of_lora_gain"] = lofit[key] / json.loads(lora.read_text())[key]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", nargs="+", required=True, help="one run folder per seed")
    parser.add_argument("--split", default=None, help="the runs' extra_eval_split to read (e.g. test)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    key = f"{args.split}_gain" if args.split else "gain"
    rows = [seed_row(Path(folder), key) for folder in args.runs]
    summary = {
        name: spread([row[name] for row in rows])
        for name in ("lofit_gain", "lofit_minus_best_random", "lofit_minus_mean_random", "share_of_lora_gain")
        if all(name in row for row in rows)
    }
    result = {"command": command_line(), "gain": key, "seeds": rows, "over_seeds": summary}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for name, s in summary.items():
        print(f"{name}: mean {s['mean']:+.3f}, sd {s['sd']}, standard error {s['stderr']}")


if __name__ == "__main__":
    main()
