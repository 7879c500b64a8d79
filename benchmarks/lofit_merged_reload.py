"""Does a LoFiT run's merged model (`recipes/lofit.py --merge`) reload with plain `AutoModelForCausalLM` and give the
logits of the base model with the run's adapter attached? Compares them on the run's held-out prompts.

    python benchmarks/lofit_merged_reload.py --run runs/lofit_smollm2/lofit --model smollm2-135m --out FILE.json
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from science_common import RECIPES, command_line
from transformers import AutoModelForCausalLM

from ctxaware.adapters import HeadAdapter
from ctxaware.models import load_tokenizer, resolve_model_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="a lofit run's output_dir (with adapter/ and merged/)")
    parser.add_argument("--model", required=True, help="the run's base model")
    parser.add_argument("--task", default="world/context_qa")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    sys.path.insert(0, str(RECIPES))
    import lofit as recipe

    run = Path(args.run)
    path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(path)
    records = recipe.load_records(recipe.LoFiTArguments(task=args.task), args.split, tokenizer)
    prompts = [r["prompt"] + r["completion"] for r in recipe.with_bos(records, tokenizer)[: args.prompts]]
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    HeadAdapter.from_pretrained(run / "adapter", base)
    merged = AutoModelForCausalLM.from_pretrained(run / "merged", dtype=torch.float32).eval()
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    worst, worst_vs_base, same_argmax = 0.0, 0.0, True
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            adapted, reloaded, untouched = (m(ids).logits for m in (base, merged, plain))
            worst = max(worst, (adapted - reloaded).abs().max().item())
            worst_vs_base = max(worst_vs_base, (adapted - untouched).abs().max().item())
            same_argmax &= bool((adapted.argmax(-1) == reloaded.argmax(-1)).all())
    summary = {
        "command": command_line(),
        "merged_model_type": merged.config.model_type,
        "merged_class": type(merged).__name__,
        "prompts": len(prompts),
        "max_abs_logit_difference_merged_vs_adapter": worst,
        "max_abs_logit_difference_adapter_vs_base": worst_vs_base,
        "same_argmax_everywhere": same_argmax,
        "same_logits_atol_1e-4": worst <= 1e-4,
    }
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
