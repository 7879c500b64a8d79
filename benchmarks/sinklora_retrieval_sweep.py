"""Chooses SinkLoRA's training settings for retrieval at 4x on validation keys, then scores the choice once on test.

    python benchmarks/sinklora_retrieval_sweep.py --out DIR --rope yarn \\
        --setting steps16_lr1e-3="--steps 16 --learning_rate 1e-3" \\
        --setting steps150_lr2e-4="--steps 150 --learning_rate 2e-4"

Each setting runs `benchmarks/sinklora_science.py --split validation --variants sf` (all settings side by side);
`RULE`, fixed before any result is read, picks one, which then runs once with `--split test` and every attention
(full, S^2, SF), the check's own report. Writes `retrieval_sweep.json` (every validation result, the choice, the test
summary) to --out.
"""

import json
import shlex
import sys
from pathlib import Path

from bench_common import git_commit
from science_common import command_line, output_folder, run, run_parallel, science_parser


SCIENCE = str(Path(__file__).resolve().parent / "sinklora_science.py")
RULE = (
    "the highest mean of passkey and NIAH accuracy at 4x among settings whose SF perplexity at 4x is below the "
    "untrained RoPE-scaled model's; ties to the lower perplexity"
)


def main() -> None:
    parser = science_parser("sinklora_retrieval_sweep", __doc__)
    parser.add_argument("--rope", default="yarn", help="one RoPE method")
    parser.add_argument("--setting", action="append", required=True, help='NAME="flags for sinklora_science.py"')
    parser.add_argument("common", nargs="*", help="flags every run gets, after --")
    args = parser.parse_args()
    out = output_folder(args.out)
    settings = dict(parse_setting(text) for text in args.setting)
    base = [sys.executable, SCIENCE, "--rope", args.rope, "--skip_kv", *args.common] + (
        ["--smoke"] if args.smoke else []
    )
    jobs = [
        ([*base, *flags, "--split", "validation", "--variants", "sf", "--out", str(out / name)], out / f"{name}.log")
        for name, flags in settings.items()
    ]
    run_parallel(jobs)
    validation = {name: json.loads((out / name / "sinklora_science.json").read_text()) for name in settings}
    chosen = choose(validation, args.rope)
    record = {
        "command": command_line(),
        "tree": git_commit(),
        "rope": args.rope,
        "settings": settings,
        "rule": RULE,
    }
    record |= {"validation": {name: scores(summary, args.rope) for name, summary in validation.items()}}
    record["chosen"] = chosen
    (out / "retrieval_sweep.json").write_text(json.dumps(record, indent=2))
    if chosen is None:
        raise SystemExit("no setting beat the untrained scaled model's perplexity on validation: nothing to test")
    test = out / f"test_{chosen}"
    run([*base, *settings[chosen], "--split", "test", "--out", str(test)], out / f"test_{chosen}.log")
    record["test"] = json.loads((test / "sinklora_science.json").read_text())
    (out / "retrieval_sweep.json").write_text(json.dumps(record, indent=2))
    print(json.dumps({"chosen": chosen, "validation": record["validation"]}, indent=2))


def parse_setting(text: str) -> tuple[str, list[str]]:
    name, separator, flags = text.partition("=")
    if not separator or not name:
        raise SystemExit(f'--setting {text!r}: write NAME="--steps 50 --learning_rate 5e-4"')
    return name, shlex.split(flags)


def scores(summary: dict, rope: str) -> dict:
    """SF's retrieval at 4x (mean of passkey and NIAH), its perplexity at 4x and the untrained scaled model's."""
    target = 4 * summary["settings"]["original_length"]
    sf, untrained = summary["results"][f"{rope}_sf"], summary["results"].get(f"{rope}_untrained", {})
    passkey = sf["passkey"][f"acc_len{target}"]
    niah = sf["niah"][f"acc_plain_len{target}"]
    return {
        "passkey": passkey,
        "niah": niah,
        "retrieval": (passkey + niah) / 2,
        "ppl": sf["long_ppl"][f"ppl_len{target}"],
        "untrained_ppl": untrained.get("long_ppl", {}).get(f"ppl_len{target}"),
    }


def choose(validation: dict, rope: str) -> str | None:
    """The setting `RULE` picks; None when no setting beats the untrained scaled model's perplexity."""
    eligible = {
        name: s
        for name, s in ((name, scores(summary, rope)) for name, summary in validation.items())
        if s["untrained_ppl"] is not None and s["ppl"] < s["untrained_ppl"]
    }
    return min(eligible, key=lambda name: (-eligible[name]["retrieval"], eligible[name]["ppl"]), default=None)


if __name__ == "__main__":
    main()
