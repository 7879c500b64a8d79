"""Compare patching attributions of one model on different prompts (e.g. the question template against word
problems): how concentrated each is, heads against MLPs, and how much the heads they rank first agree.

    python benchmarks/arith_attribution_compare.py --runs question=DIR/attribution/activation_corrupted_into_clean.json \
        word=OTHER/attribution/activation_corrupted_into_clean.json --top 14 --exclude_mlps 0 --out FILE.json

Each run is a `PatchingResult` JSON (what `recipes/arith_heads.py` saves under `attribution/`), or a results file
holding one under `ranked` (`benchmarks/results/arith_smollm2_attribution.json`). Top heads are ranked by signed
effect (the recipe's default `selection_sign: positive`); the rank correlation covers every head. Writes FILE.json and
FILE.png (one heat map per run, on a common colour scale).
"""

import argparse
import itertools
import json
from pathlib import Path

import torch
from science_common import command_line, git_commit

from ctxaware.heads import top_heads
from ctxaware.methods.context_scoring import spearman
from ctxaware.methods.patching import PatchingResult


def load_run(path: Path) -> PatchingResult:
    data = json.loads(path.read_text())
    if "head_effects" not in data and isinstance(data.get("ranked"), dict):
        data = data["ranked"]  # a results file that carries the patching run
    if "head_effects" not in data:
        raise SystemExit(f"{path}: no head_effects; pass a PatchingResult JSON from a run's attribution/ folder")
    return PatchingResult.from_dict(data)


def summary(result: PatchingResult, top: int, exclude_mlps: list[int]) -> dict:
    mlps = [abs(v) for i, v in enumerate(result.mlp_effects.tolist()) if i not in exclude_mlps]
    return {
        "num_pairs": result.num_pairs,
        "clean_logit_diff": result.clean_logit_diff,
        "corrupted_logit_diff": result.corrupted_logit_diff,
        "concentration": result.concentration(),
        "summed_abs_effect": {"heads": result.head_effects.abs().sum().item(), "mlps": sum(mlps)},
        "top_heads": [list(head) for head in top_heads(result.head_effects, top)],
    }


def positive_share(effects: torch.Tensor, heads: list) -> float:
    """The share of the summed positive head effect that `heads` carry."""
    positive = effects.clamp(min=0)
    return sum(positive[layer, head].item() for layer, head in heads) / positive.sum().item()


def compare(a: PatchingResult, b: PatchingResult, top: int) -> dict:
    a_top, b_top = top_heads(a.head_effects, top), top_heads(b.head_effects, top)
    shared = set(a_top) & set(b_top)
    return {
        "top_heads_shared": len(shared),
        "shared": [list(head) for head in sorted(shared)],
        # how much of one run's positive head effect the other run's top heads carry
        "first_top_share_of_second": positive_share(b.head_effects, a_top),
        "second_top_share_of_first": positive_share(a.head_effects, b_top),
        "spearman_heads": spearman(a.head_effects.flatten().tolist(), b.head_effects.flatten().tolist()),
        "spearman_mlps": spearman(a.mlp_effects.tolist(), b.mlp_effects.tolist()),
    }


def plot(path: Path, runs: dict[str, PatchingResult], top: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    scale = max(r.head_effects.abs().max().item() for r in runs.values())
    fig, axes = plt.subplots(1, len(runs), figsize=(4 * len(runs) + 1, 8), squeeze=False)
    for ax, (name, result) in zip(axes[0], runs.items()):
        image = ax.imshow(
            result.head_effects.numpy(), aspect="auto", cmap="RdBu_r", origin="lower", vmin=-scale, vmax=scale
        )
        for layer, head in top_heads(result.head_effects, top):
            ax.add_patch(Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=1.2))
        ax.set_title(f"{name} ({result.num_pairs} pairs)")
        ax.set_xlabel("head")
    axes[0][0].set_ylabel("layer")
    fig.colorbar(image, ax=axes[0].tolist(), label="normalised LD effect (top heads outlined)")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", nargs="+", required=True, help="NAME=PATH, two or more")
    parser.add_argument("--top", type=int, default=14, help="heads compared (the recipe's num_heads)")
    parser.add_argument("--exclude_mlps", type=int, nargs="*", default=[0], help="MLPs left out of the sums")
    parser.add_argument("--out", required=True, help="FILE.json; the heat maps go to FILE.png")
    args = parser.parse_args()
    if len(args.runs) < 2 or any("=" not in run for run in args.runs):
        parser.error("--runs takes two or more NAME=PATH")
    paths = dict(run.split("=", 1) for run in args.runs)
    runs = {name: load_run(Path(path)) for name, path in paths.items()}
    shapes = {tuple(r.head_effects.shape) for r in runs.values()}
    if len(shapes) > 1:
        parser.error(f"the runs patch models of different shapes {sorted(shapes)}: compare runs of one model")
    out = Path(args.out)
    result = {
        "command": command_line(),
        "tree": git_commit(),
        "runs": {name: {"path": paths[name], **summary(r, args.top, args.exclude_mlps)} for name, r in runs.items()},
        "pairs": {f"{a} vs {b}": compare(runs[a], runs[b], args.top) for a, b in itertools.combinations(runs, 2)},
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(out.with_suffix(".png"), runs, args.top)
    for name, r in result["runs"].items():
        c = r["concentration"]
        print(
            f"{name}: {r['num_pairs']} pairs, 50% in {c['heads_for_50pct']['heads']} heads, 80% in "
            f"{c['heads_for_80pct']['heads']}; summed |effect| heads {r['summed_abs_effect']['heads']:.2f}, "
            f"MLPs {r['summed_abs_effect']['mlps']:.2f}"
        )
    for pair, c in result["pairs"].items():
        print(
            f"{pair}: top {args.top} shared {c['top_heads_shared']}, each one's top heads carry "
            f"{c['first_top_share_of_second']:.0%} / {c['second_top_share_of_first']:.0%} of the other's positive "
            f"head effect, Spearman heads {c['spearman_heads']:.3f}"
        )


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
