"""Step-0 cost of MoH's conversion with the heads the router leaves out zero-ablated (`off_head_bias none`) or
mean-ablated (`off_head_bias mean`): held-out LM loss of the converted model before any training and its logit change
against the dense model, per shape, as `recipes/moh.py` measures them at step 0 (`step0_eval_loss`,
`step0_logit_change`).

    python benchmarks/moh_off_head_bias.py --out benchmarks/results                                   # ctxaware-tiny
    python benchmarks/moh_off_head_bias.py --model smollm2-135m --shapes 4,3 3,2 --calibration_rows 2 \
        --seq_len 512 --num_eval_rows 8 --out benchmarks/results

Data and conversion follow the recipe's config (`recipes/configs/moh/default.yaml` for ctxaware-tiny, `smollm2.yaml`
for smollm2-135m; flags override it): the first `--calibration_rows` training rows calibrate, the held-out rows are the
config's evaluation split (training rows are built at the calibration size, a named text's mixed one to one with
world rows as in the configs, unless `--num_train_rows` / `--num_world_rows` say otherwise). Per option and shape
(shared heads, top k) one adapter is converted as the recipe would. Head importance depends on the option (`mean`
measures the cost of mean-ablating a head, `none` of zeroing it) but not on the shape: it is measured once per option
and that option's conversions reuse it. With `none`, `mean_on_zero_router` also reports the same router with its off
heads mean-ablated. Writes
`moh_off_head_bias_step0_<model>[_<suffix>].json` (command, git commit, settings, every number) and `.md` to --out.
"""

import argparse
import json
import time
from dataclasses import fields
from unittest import mock

import torch
import yaml
from bench_common import write_results
from moh_importance import load_recipe
from science_common import RECIPES, command_line, git_commit, output_folder
from transformers import AutoModelForCausalLM

import ctxaware.methods.moh.adapter as moh_adapter
from ctxaware.methods.moh.adapter import MoHAdapter, logit_change
from ctxaware.methods.moh.calibration import head_ablation_kl, head_output_means, off_head_rows
from ctxaware.models import load_tokenizer, resolve_model_path


CONFIGS = {"ctxaware-tiny": "default.yaml", "smollm2-135m": "smollm2.yaml"}
OVERRIDES = ("calibration_rows", "num_eval_rows", "seq_len", "shared_heads", "router_init", "variant")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="ctxaware-tiny", choices=CONFIGS)
    parser.add_argument("--shapes", nargs="+", default=["4,2", "2,2"], help="shared heads,top k per shape")
    parser.add_argument("--options", nargs="+", default=["none", "mean"], choices=("none", "mean"))
    parser.add_argument("--calibration_rows", type=int)
    parser.add_argument("--num_eval_rows", type=int)
    parser.add_argument("--seq_len", type=int)
    parser.add_argument("--shared_heads", choices=("first", "importance"))
    parser.add_argument("--router_init", choices=("random", "importance"))
    parser.add_argument("--variant", choices=("learned", "query_norm"))
    parser.add_argument("--num_train_rows", type=int, help="training rows built (the calibration rows are the first)")
    parser.add_argument("--num_world_rows", type=int, help="world rows shuffled into a named text's training rows")
    parser.add_argument("--kl_rows", type=int, default=8, help="held-out rows of the logit change (the recipe's 8)")
    parser.add_argument("--batch_size", type=int, default=4, help="rows per forward")
    parser.add_argument("--seed", type=int, default=0, help="seed of a random router")
    parser.add_argument("--suffix", default="", help="appended to the output file names")
    parser.add_argument("--out", default="runs/moh_off_head_bias")
    return parser.parse_args()


def recipe_arguments(recipe, args):
    """The recipe's `MoHArguments` from the model's config, with the flags given here."""
    config = yaml.safe_load((RECIPES / "configs" / "moh" / CONFIGS[args.model]).read_text())
    known = {field.name for field in fields(recipe.MoHArguments)}
    values = {key: value for key, value in config.items() if key in known}
    for key in OVERRIDES:
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    # only the calibration rows are read: built at that size, a named text's rows mixed with as many world rows (the
    # configs' one to one) unless the flags say otherwise
    values["num_train_rows"] = args.num_train_rows or values["calibration_rows"]
    if values.get("num_world_rows"):
        values["num_world_rows"] = values["num_train_rows"] if args.num_world_rows is None else args.num_world_rows
    return recipe.MoHArguments(**values)


def measure(model, adapter, recipe, eval_rows, kl_rows, batch_size) -> dict:
    return {
        "step0_eval_loss": recipe.lm_loss(model, eval_rows, batch_size),
        "step0_logit_change": logit_change(model, adapter, torch.tensor(eval_rows[:kl_rows])),
    }


def main() -> None:
    args = parse_args()
    out = output_folder(args.out)
    recipe = load_recipe()
    moh = recipe_arguments(recipe, args)
    path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    started = time.perf_counter()
    calibration_rows = recipe.training_rows(moh, tokenizer, "text")[: moh.calibration_rows]
    eval_split = "validation" if moh.dataset_name is None else moh.dataset_eval_split
    eval_rows = recipe.packed_rows(moh, tokenizer, eval_split, moh.num_eval_rows, "text")
    batches = [
        torch.tensor(calibration_rows[i : i + args.batch_size])
        for i in range(0, len(calibration_rows), args.batch_size)
    ]
    seconds = {"data": time.perf_counter() - started}
    dense_loss = recipe.lm_loss(model, eval_rows, args.batch_size)
    seconds["dense_eval"] = time.perf_counter() - started - seconds["data"]

    rows = [{"shared_heads": int(shape.split(",")[0]), "top_k": int(shape.split(",")[1])} for shape in args.shapes]
    mean_rows = off_head_rows(model, head_output_means(model, batches))
    for option in args.options:
        importance = None
        if "importance" in (moh.shared_heads, moh.router_init):
            mark = time.perf_counter()
            importance = list(head_ablation_kl(model, batches, off_rows=mean_rows if option == "mean" else None))
            seconds[f"head_importance_{option}"] = time.perf_counter() - mark
        for row in rows:
            mark = time.perf_counter()
            torch.manual_seed(args.seed)
            # importance depends on the option, not on the shape: measured once above (the costly part on a CPU)
            # and handed to every shape's conversion in place of measuring it again
            with mock.patch.object(
                moh_adapter, "head_ablation_kl", lambda *_, measured=importance, **__: iter(measured)
            ):
                adapter = MoHAdapter.for_model(
                    model,
                    num_shared_heads=row["shared_heads"],
                    top_k=row["top_k"],
                    variant=moh.variant,
                    router_init_std=moh.router_init_std,
                    shared_heads=moh.shared_heads,
                    router_init=moh.router_init,
                    calibration=batches,
                    router_lr_ratio=moh.router_lr_ratio,
                    off_head_bias=option,
                )
            adapter.attach(model)
            row["active_fraction"] = adapter.active_fraction()
            row[option] = measure(model, adapter, recipe, eval_rows, args.kl_rows, args.batch_size)
            adapter.detach()
            if option == "none":  # the same router, its off heads mean-ablated
                hyperparameters = adapter.hyperparameters() | {"off_head_bias": "mean"}
                biased = MoHAdapter(adapter.layout, adapter.heads, **hyperparameters)
                biased.load_state_dict(adapter.state_dict(), strict=False)
                biased._set_off_bias(mean_rows).attach(model)
                row["mean_on_zero_router"] = measure(model, biased, recipe, eval_rows, args.kl_rows, args.batch_size)
                biased.detach()
            row[f"seconds_{option}"] = time.perf_counter() - mark
            print(json.dumps(row), flush=True)

    settings = {key: getattr(moh, key) for key in (*OVERRIDES, "router_init_std", "router_lr_ratio")}
    settings |= {
        "dataset_name": moh.dataset_name,
        "eval_split": eval_split,
        "num_world_rows": moh.num_world_rows,
        "kl_rows": args.kl_rows,
        "seed": args.seed,
        "threads": torch.get_num_threads(),
    }
    summary = {
        "command": command_line(),
        "git": git_commit(),
        "model": args.model,
        "settings": settings,
        "dense_eval_loss": dense_loss,
        "rows": rows,
        "seconds": seconds,
    }
    name = f"moh_off_head_bias_step0_{args.model.replace('-', '_')}{'_' + args.suffix if args.suffix else ''}"
    columns = [option for option in ("none", "mean", "mean_on_zero_router") if option in rows[0]]
    header = "| shape | active | " + " | ".join(f"held-out loss: {c}" for c in columns)
    header += " | " + " | ".join(f"KL to dense: {c}" for c in columns) + " |"
    lines = [
        f"`{summary['command']}` (git {summary['git'][:10]}; {args.model}, dense held-out loss {dense_loss:.4f}, "
        f"{len(eval_rows)} rows of {moh.seq_len} tokens; {moh.calibration_rows} calibration rows; shared heads "
        f"{moh.shared_heads}, router {moh.variant}/{moh.router_init})",
        "",
        header,
        "|---" * (2 + 2 * len(columns)) + "|",
    ]
    for row in rows:
        cells = [f"{row['shared_heads']} shared + top {row['top_k']}", f"{row['active_fraction']:.0%}"]
        cells += [f"{row[c]['step0_eval_loss']:.4f}" for c in columns]
        cells += [f"{row[c]['step0_logit_change']['mean_kl']:.4f}" for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    write_results(out, {f"{name}.json": json.dumps(summary, indent=1), f"{name}.md": "\n".join(lines)})
    print("\n".join(lines))


if __name__ == "__main__":
    main()
