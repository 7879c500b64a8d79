"""Per-layer attention on the user's context, from `ctxaware eval --tasks attention_allocation` runs side by side:

    ctxaware eval --model smollm2-135m --tasks attention_allocation --split validation --limit 40 --output_path A
    ctxaware eval --model smollm2-135m --tasks attention_allocation --split validation --limit 40 \
        --chat_template off --output_path B
    python benchmarks/attention_by_layer.py --run chat=A/smollm2-135m/results_*.json \
        --run plain=B/smollm2-135m/results_*.json --out DIR --name context_attention_smollm2

For each run: the share of the question's attention (rows after the context) on each label (context, instruction,
question, other: BOS, role markers, system prompt), per layer (mean over heads) and overall. Writes NAME.json, NAME.md
and NAME.png (context share per layer, one line per run).
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from bench_common import git_commit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", action="append", required=True, help="LABEL=results JSON of attention_allocation")
    parser.add_argument("--out", required=True)
    parser.add_argument("--name", default="attention_by_layer")
    args = parser.parse_args()
    runs = {}
    for item in args.run:
        label, _, path = item.partition("=")
        if not path:
            parser.error(f"--run {item!r}: use LABEL=PATH")
        record = json.loads(Path(path).read_text())
        extra = record["extra"]["attention_allocation"]
        mass = {name: np.asarray(values) for name, values in extra["mass"].items()}  # (layers, heads) each
        runs[label] = {
            "results_file": Path(path).name,
            "model": record["config"]["model"],
            "split": record["configs"]["attention_allocation"].get("split"),
            "samples": record["n-samples"]["attention_allocation"]["effective"],
            "template": extra["template"],
            "overall": {name: float(m.mean()) for name, m in mass.items()},
            "per_layer": {name: m.mean(1).round(4).tolist() for name, m in mass.items()},
        }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python", "benchmarks/attention_by_layer.py", *sys.argv[1:]])
    summary = {"command": command, "git_hash": git_commit() or None, "runs": runs}
    (out / f"{args.name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    labels = list(next(iter(runs.values()))["overall"])
    rows = ["| run | template | samples | " + " | ".join(labels) + " |", "|---|---|---|" + "---|" * len(labels)]
    for label, run in runs.items():
        cells = " | ".join(f"{run['overall'][name]:.3f}" for name in labels)
        rows.append(f"| {label} | {'chat' if run['template'] else 'plain'} | {run['samples']} | {cells} |")
    (out / f"{args.name}.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for label, run in runs.items():
        ax.plot(run["per_layer"]["context"], marker="o", markersize=3, label=label)
    ax.set_xlabel("layer")
    ax.set_ylabel("share of attention on the context")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"{args.name}.png", dpi=120)


if __name__ == "__main__":
    main()
