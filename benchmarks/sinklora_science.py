"""SinkLoRA's scientific check on the embedded tiny model (issue 6), in one command on one GPU:

    python benchmarks/sinklora_science.py --out runs/sinklora_science

1. the base model (no training, no RoPE scaling) through `ctxaware eval`: perplexity at L, 2L, 4L, passkey at 4L;
2. `recipes/sinklora.py` with `--attention full`, `s2` and `sf`: the same steps, data and seed, evaluated with full
   attention by the recipe (the same harness tasks, same records);
Perplexity is measured on held-out long documents of the world (another seed than the training rows).
3. H2O inside the base context: passkey at L and perplexity at L (the held-out documents streamed through the cache
   token by token, so evictions happen as in generation) with the full cache and with budgets of 50% and 20% of L,
   and the K/V bytes each cache holds at the end against the full cache's.
Writes `sinklora_science.json` and `sinklora_science.md` (with the gap-closure ratio: how much of full attention's
perplexity gain at 4L each sparse pattern recovers) to --out. `--smoke` runs the same pipeline at toy sizes on CPU.
"""

import json
import math
import subprocess
import sys

from science_common import RECIPES, at_least, command_line, harness_metrics, output_folder, run, science_parser


RECIPE = RECIPES / "sinklora.py"


def main() -> None:
    parser = science_parser("sinklora", __doc__)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--learning_rate", type=float, default=2e-4)
    parser.add_argument("--limit", type=int, default=20, help="samples per length for each evaluation")
    args = parser.parse_args()
    out = output_folder(args.out)
    python = sys.executable
    original = 512
    steps, batch, limit = args.steps, args.batch_size, args.limit
    if args.smoke:
        original, steps, batch, limit = 64, 2, 1, 1
    lengths = [original, 2 * original, 4 * original]
    target = lengths[-1]
    model = "ctxaware-tiny"
    extra_recipe = []
    if args.smoke:  # a tiny random model with a 64-token context stands in for the shipped one
        model = str(out / "smoke-base")
        subprocess.run([python, "-c", SMOKE_MODEL.format(path=model)], check=True)
        extra_recipe = ["--dtype", "float32"]
    text_file = out / "heldout_long_documents.txt"
    subprocess.run([python, "-c", HELDOUT_TEXT.format(path=str(text_file), max_tokens=target)], check=True, cwd=out)
    eval_cli = [python, "-m", "ctxaware.cli", "eval", "--model", model, "--dtype", "float32", "--no_progress"]
    eval_cli += ["--limit", str(limit), "--batch_size", "8"]

    run([*eval_cli, "--tasks", "long_ppl,passkey", "--lengths", ",".join(map(str, lengths)),
         "--haystack_file", str(text_file), "--output_path", str(out / "base")], out / "base.log")  # fmt: skip
    results = {"base": harness_metrics(out / "base")}
    for attention in ("full", "s2", "sf"):
        recipe = [
            python, "-m", "accelerate.commands.launch", "--num_processes", "1", str(RECIPE),
            "--model_name_or_path", model, "--attention", attention, "--output_dir", str(out / attention),
            "--max_length", str(target), "--max_steps", str(steps), "--num_train_rows", str(steps * batch),
            "--per_device_train_batch_size", str(batch), "--learning_rate", str(args.learning_rate),
            "--warmup_steps", "20", "--save_steps", str(10**6), "--logging_steps", "25", "--seed", "0",
            "--eval_limit", str(limit), "--eval_batch_size", "8", "--eval_text_file", str(text_file),
            "--eval_ppl_lengths", *map(str, lengths), "--eval_passkey_lengths", str(target), *extra_recipe,
        ]  # fmt: skip
        run(recipe, out / f"{attention}.log")
        results[attention] = json.loads((out / attention / "adapter" / "eval_results.json").read_text())["summary"]
    for budget in KV_BUDGETS:
        name = f"kv_{budget.replace(':', '_')}"
        run([*eval_cli, "--tasks", "passkey,long_ppl", "--lengths", str(original), "--haystack_file", str(text_file),
             "--kv_cache", budget, "--output_path", str(out / name)], out / f"{name}.log")  # fmt: skip
        results[name] = harness_metrics(out / name)
    h2o = h2o_table(results, original)

    ppl = {name: results[name]["long_ppl"] for name in ("base", "full", "s2", "sf")}
    closure = gap_closure(ppl, target)
    summary = {
        "command": command_line(),
        "settings": {"steps": steps, "batch_size": batch, "learning_rate": args.learning_rate, "limit": limit},
        "results": results,
        "gap_closure_at_4L": closure,
        "h2o_at_L": h2o,
        "targets": targets(closure, h2o),
    }
    (out / "sinklora_science.json").write_text(json.dumps(summary, indent=2))
    rows = [
        f"| model | ppl@{lengths[0]} | ppl@{lengths[1]} | ppl@{lengths[2]} | passkey@{target} |",
        "|---|---|---|---|---|",
    ]
    for name in ("base", "full", "s2", "sf"):
        passkey = results[name]["passkey"].get(f"acc_len{target}", results[name]["passkey"].get("acc"))
        rows.append(
            f"| {name} | " + " | ".join(f"{ppl[name][f'ppl_len{n}']:.2f}" for n in lengths) + f" | {passkey:.2f} |"
        )
    rows += ["", f"Gap closure at {target} (share of full attention's perplexity gain): "
             + ", ".join(f"{k} {v:.1%}" if v is not None else f"{k} n/a" for k, v in closure.items()), ""]  # fmt: skip
    rows += h2o_rows(h2o, original)
    rows += ["", "Targets: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in summary["targets"].items())]
    (out / "sinklora_science.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


KV_BUDGETS = ("full", "h2o:0.5", "h2o:0.2")
CLOSURE_TARGET = 0.8


def gap_closure(ppl: dict, length: int) -> dict:
    """Per sparse pattern (s2, sf), the share of full attention's perplexity gain over the base model at `length`
    that it recovers; None where full attention gained nothing (a ratio to a loss would reward doing worse)."""
    key = f"ppl_len{length}"
    gain_full = ppl["base"][key] - ppl["full"][key]
    return {name: (ppl["base"][key] - ppl[name][key]) / gain_full if gain_full > 0 else None for name in ("s2", "sf")}


def targets(closure: dict, h2o: dict) -> dict:
    """SF closes at least 80% of full attention's gap at 4L; every H2O cache holds at most its budget."""
    return {
        "sf_closes_at_least_80pct_of_full_gap": at_least(closure["sf"], CLOSURE_TARGET),
        "h2o_caches_hold_at_most_their_budget": all(row["within_budget"] for row in h2o.values()),
    }


def h2o_table(results: dict, length: int) -> dict:
    """Per KV cache: passkey, streamed perplexity and cache bytes at `length`; the full cache's bytes are those of a
    cache holding every token the H2O runs fed (the full-cache perplexity is one pass, equal to streaming it)."""
    full_bytes = results["kv_h2o_0.5"]["long_ppl"][f"kv_full_bytes_len{length}"]
    table = {}
    for budget in KV_BUDGETS:
        metrics = results[f"kv_{budget.replace(':', '_')}"]
        held = metrics["long_ppl"].get(f"kv_bytes_len{length}", full_bytes)
        kept = math.ceil(float(budget.partition(":")[2] or 1) * length)  # entries the budget allows
        table[budget] = {
            "passkey": metrics["passkey"]["acc"],
            "ppl": metrics["long_ppl"][f"ppl_len{length}"],
            "kv_bytes": held,
            "kv_full_bytes": full_bytes,
            "memory_saved": 1 - held / full_bytes,
            # full_bytes covers the L - 1 tokens fed (the last one predicts nothing); integer-valued, so exact
            "within_budget": held <= full_bytes and held * (length - 1) <= full_bytes * kept,
        }
    return table


def h2o_rows(table: dict, length: int) -> list[str]:
    rows = [f"| KV cache (base model, L = {length}) | passkey | ppl (streamed) | K/V bytes per sample | saved |",
            "|---|---|---|---|---|"]  # fmt: skip
    for budget, row in table.items():
        rows.append(f"| {budget} | {row['passkey']:.2f} | {row['ppl']:.2f} | {row['kv_bytes']:,.0f} | "
                    f"{row['memory_saved']:.0%} |")  # fmt: skip
    return rows


# Long documents (passkeys, needles, key-value lists) drawn with another seed than the recipe's training rows (seed 0),
# so perplexity at 4L measures the use of distant context on text the adapters never saw.
HELDOUT_TEXT = """
from ctxaware.world import build_world, pretraining_corpus
mix = {{"passkey": 1.0, "needle": 1.0, "key_value": 0.5}}
docs = pretraining_corpus(build_world(0), 200, seed=9999, mix=mix, max_tokens={max_tokens})
open({path!r}, "w").write("\\n\\n".join(doc["text"] for doc in docs))
"""

SMOKE_MODEL = """
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from ctxaware.models import resolve_model_path
tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("ctxaware-tiny"))
torch.manual_seed(0)
config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64, tie_word_embeddings=True,
    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
LlamaForCausalLM(config).save_pretrained({path!r})
tokenizer.save_pretrained({path!r})
"""


if __name__ == "__main__":
    main()
