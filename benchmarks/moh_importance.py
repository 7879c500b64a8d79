"""Which heads MoH's conversion would share, by statistic of the per-token head-ablation KL and by calibration size.

    python benchmarks/moh_importance.py --out benchmarks/results --rows 16 32 64 128

Measures `ctxaware.methods.moh.calibration.head_ablation_kl` once on the largest row count of ctxaware-tiny's MoH
training rows (the recipe's data, `--seq_len` tokens each, the rows the recipe calibrates on) and, for each prefix of
`--rows` rows and each statistic over tokens (the mean, as the recipe ranks, and high quantiles), the `--num_shared`
heads of each layer with the largest value. A statistic whose choice changes with the row count picks shared heads by
sampling noise (the check's score followed those changes through the pass key). Writes `moh_importance.json`
and `moh_importance.md` to --out. CPU: 26 min at 128 rows of 512 tokens on 2 cores (before ablated forwards started at
their layer, which cut the recipe's conversion from about 9 to 7.5 min).
"""

import argparse
import importlib.util
import json
import time

import torch
from science_common import RECIPES, output_folder
from transformers import AutoModelForCausalLM, AutoTokenizer

from ctxaware.methods.moh.calibration import head_ablation_kl
from ctxaware.models import resolve_model_path


STATISTICS = {"mean": None, "q0.99": 0.99, "q0.999": 0.999}


def load_recipe():
    spec = importlib.util.spec_from_file_location("moh_recipe", RECIPES / "moh.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shared_heads(token_kl: torch.Tensor, quantile: float | None, num_shared: int) -> list[list[int]]:
    """Per layer of a (layers, tokens, heads) KL tensor, the `num_shared` heads with the largest statistic, sorted."""
    values = token_kl.mean(1) if quantile is None else torch.quantile(token_kl, quantile, dim=1)
    return [sorted(layer.topk(num_shared).indices.tolist()) for layer in values]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/moh_importance")
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--num_shared", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=4)
    args = parser.parse_args()
    out = output_folder(args.out)

    recipe = load_recipe()
    total = max(args.rows)
    path = resolve_model_path("ctxaware-tiny")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    rows = recipe.packed_rows(recipe.MoHArguments(seq_len=args.seq_len), tokenizer, "train", total, "text")
    batches = [torch.tensor(rows[i : i + args.batch_size]) for i in range(0, total, args.batch_size)]
    started = time.perf_counter()
    token_kl = torch.stack([kl for _, kl in head_ablation_kl(model, batches)])  # (layers, tokens, heads)
    seconds = time.perf_counter() - started

    choices = {
        name: {n: shared_heads(token_kl[:, : n * args.seq_len], q, args.num_shared) for n in args.rows}
        for name, q in STATISTICS.items()
    }
    changed = {
        name: {n: sum(a != b for a, b in zip(by_rows[n], by_rows[total])) for n in args.rows}
        for name, by_rows in choices.items()
    }
    mean_kl = token_kl.mean(1)
    summary = {
        "rows": args.rows,
        "seq_len": args.seq_len,
        "num_shared": args.num_shared,
        "seconds": seconds,
        "shared_heads": choices,
        "layers_differing_from_all_rows": changed,
        "mean_kl": mean_kl.tolist(),
    }
    (out / "moh_importance.json").write_text(json.dumps(summary, indent=1))

    lines = [
        f"`python benchmarks/moh_importance.py --rows {' '.join(map(str, args.rows))} --seq_len {args.seq_len}` "
        f"(ctxaware-tiny, {args.num_shared} shared heads per layer; {seconds:.0f} s for the ablations)",
        "",
        "| statistic | rows | shared heads per layer | layers that differ from the choice on all rows |",
        "|---|---|---|---|",
    ]
    for name, by_rows in choices.items():
        for n in args.rows:
            lines.append(f"| {name} | {n} | {by_rows[n]} | {changed[name][n]} |")
    lines += [
        "",
        "Mean KL per head (all rows), x 1e3:",
        "",
        "| layer | " + " | ".join(map(str, range(mean_kl.shape[1]))) + " |",
        "|---" * (mean_kl.shape[1] + 1) + "|",
    ]
    lines += [
        f"| {layer} | " + " | ".join(f"{1e3 * v:.1f}" for v in values.tolist()) + " |"
        for layer, values in enumerate(mean_kl)
    ]
    (out / "moh_importance.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
