"""A real model's baseline on every harness, and our attention kernel against SDPA on it, in one run.

    python benchmarks/real_model_baseline.py --model smollm2-135m --out DIR          # GPU, a few minutes
    python benchmarks/real_model_baseline.py --smoke --out DIR                        # CPU check on ctxaware-tiny

Runs (each through `ctxaware.eval`'s task code, no training):
- world: the world's tasks with the tasks' default templates (counterfactual QA and NIAH with and without the chat
  template), then extractive QA, arithmetic and summarisation again under the chat template;
- gsm8k: the shipped test split, 5-shot plain and zero-shot chat;
- books: passkey and NIAH (both templates) with the held-out test book as haystack, and long_ppl on it, at 1k-8k;
- books, RoPE scaled: long_ppl with linear RoPE scaling x2 (8k, 16k) and x4 (8k, 32k), no training.
Then, on the GPU: logits with `attn_implementation="ctxaware"` and with SDPA in bf16 at 8k against an fp32 SDPA
reference (max and mean abs difference), and a full training step (forward + backward, bf16) at 8k with each.
Writes `<name>_baseline.json` (every metric, the commands, tree, versions), `<name>_baseline.md` and the NIAH heat
maps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import re
import sys
import time
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_common import git_commit, write_results  # noqa: E402

from ctxaware.eval.runner import evaluate_in_process  # noqa: E402
from ctxaware.methods.sinklora import rope_parameters  # noqa: E402
from ctxaware.models import load_model  # noqa: E402


def plan(smoke: bool) -> list[dict]:
    """(name, tasks, options, RoPE factor) of each evaluation run; smoke: tiny lengths and limits for a CPU."""
    lengths = [128, 256] if smoke else [1024, 2048, 4096, 8192]
    few = 2 if smoke else None
    world_tasks = ["counterfactual_qa", "extractive_qa", "arithmetic", "summarization", "attention_allocation"]
    runs = [
        {"name": "world", "tasks": world_tasks, "options": {"limit": few}},
        {
            "name": "world_chat",
            "tasks": ["extractive_qa", "arithmetic", "summarization"],
            "options": {"limit": few, "chat_template": "on"},
        },
        {"name": "gsm8k_5shot", "tasks": ["gsm8k"], "options": {"limit": few or 250, "max_new_tokens": 256}},
        {
            "name": "gsm8k_chat",
            "tasks": ["gsm8k"],
            "options": {"limit": few or 250, "chat_template": "on", "max_new_tokens": 256},
        },
        {
            "name": "books_passkey",
            "tasks": ["passkey"],
            "options": {"haystack_file": "books", "lengths": lengths, "limit": 2 if smoke else 10},
        },
        {
            "name": "books_niah",
            "tasks": ["niah"],
            "options": {"haystack_file": "books", "lengths": lengths, "limit": 2},
        },
        {
            "name": "books_ppl",
            "tasks": ["long_ppl"],
            "options": {"haystack_file": "books", "lengths": lengths, "limit": 2 if smoke else 4},
        },
    ]
    for factor in (2, 4):
        scaled = [lengths[-1], lengths[-1] * factor]
        runs.append(
            {
                "name": f"books_rope_linear_x{factor}",
                "tasks": ["long_ppl"],
                "rope_factor": factor,
                "options": {"haystack_file": "books", "lengths": scaled, "limit": 2},
            }
        )
    return runs


def scaled_overrides(model_name: str, factor: float) -> dict:
    """Config changes for linear RoPE scaling by `factor` (context `factor` x the model's)."""
    from transformers import AutoConfig

    from ctxaware.models import resolve_model_path

    config = AutoConfig.from_pretrained(resolve_model_path(model_name))
    target = int(config.max_position_embeddings * factor)
    return {"rope_parameters": rope_parameters(config, "linear", target, factor), "max_position_embeddings": target}


def run_evaluations(args, out: Path, report: dict, save) -> None:
    """Each run in turn, its results saved as soon as it ends (a device call cut short keeps the finished runs)."""
    results = report["runs"]
    loaded = {}
    runs = plan(args.smoke)
    unknown = set(args.runs or []) - {run["name"] for run in runs}
    if unknown:
        raise SystemExit(f"Unknown --runs {sorted(unknown)}; choose from {[run['name'] for run in runs]}.")
    for run in runs:
        if args.runs and run["name"] not in args.runs:
            continue
        factor = run.get("rope_factor")
        if factor not in loaded:
            loaded.clear()
            overrides = scaled_overrides(args.model, factor) if factor else None
            loaded[factor] = load_model(args.model, device=args.device, config_overrides=overrides)
        model, tokenizer = loaded[factor]
        long = any(t in run["tasks"] for t in ("passkey", "niah", "long_ppl"))
        batch = min(8, args.batch_size) if long else args.batch_size
        start = time.time()
        config = {"model": args.model, "run": run["name"], "device": str(model.device), "dtype": str(model.dtype)}
        evaluated, _, written, options = evaluate_in_process(
            model,
            tokenizer,
            run["tasks"],
            config=config,
            batch_size=batch,
            progress=not args.no_progress,
            output_path=out / "eval" / run["name"],
            split="test",
            **run["options"],
        )
        results[run["name"]] = {
            "tasks": run["tasks"],
            "options": {k: v for k, v in dataclasses.asdict(options).items() if v is not None},
            "rope_linear_factor": factor,
            "results": evaluated["results"],
            "seconds": round(time.time() - start, 1),
            "files": {k: str(v.relative_to(out)) for k, v in written.items()},
        }
        save()
        print(f"[{run['name']}] {time.time() - start:.0f} s", flush=True)


def kernel_checks(args, seq: int) -> dict:
    """Logits and a training step at `seq` tokens of the test book, ours against SDPA (CUDA only)."""
    from bench_common import bench
    from transformers import AutoModelForCausalLM

    import ctxaware.attention  # noqa: F401  (registers attn_implementation="ctxaware")
    from ctxaware import texts
    from ctxaware.attention import set_attention_options
    from ctxaware.models import load_tokenizer, resolve_model_path

    path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(path)
    ids = tokenizer(texts.read_text("books", split="test"), add_special_tokens=False)["input_ids"][:seq]
    input_ids = torch.tensor([ids], device="cuda")

    def model_with(impl: str, dtype):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=impl).cuda()
        if impl == "ctxaware":  # our Triton kernels, not the SDPA that plain dense calls default to
            set_attention_options(model, backend="triton")
        return model

    with torch.no_grad():
        reference = model_with("sdpa", torch.float32).eval()(input_ids).logits.float()
        logits = {
            impl: model_with(impl, torch.bfloat16).eval()(input_ids).logits.float() for impl in ("ctxaware", "sdpa")
        }
    report = {"seq": len(ids), "logits_vs_fp32_sdpa": {}}
    for impl, value in logits.items():
        diff = (value - reference).abs()
        report["logits_vs_fp32_sdpa"][impl] = {"max_abs": diff.max().item(), "mean_abs": diff.mean().item()}
    diff = (logits["ctxaware"] - logits["sdpa"]).abs()
    report["logits_ctxaware_vs_sdpa_bf16"] = {"max_abs": diff.max().item(), "mean_abs": diff.mean().item()}
    del reference, logits
    step_ms, memory = {}, {}
    for impl in ("ctxaware", "sdpa"):
        model = model_with(impl, torch.bfloat16).train()

        def step(model=model):
            model.zero_grad(set_to_none=True)
            model(input_ids, labels=input_ids).loss.backward()

        torch.cuda.reset_peak_memory_stats()
        step_ms[impl] = bench(step)
        memory[impl] = torch.cuda.max_memory_allocated() / 2**20
        del model
        torch.cuda.empty_cache()
    report["train_step_ms"] = step_ms
    report["train_step_peak_mib"] = memory
    report["train_step_speedup_ctxaware_vs_sdpa"] = step_ms["sdpa"] / step_ms["ctxaware"]
    return report


def render(report: dict) -> str:
    """The markdown table: every metric of every run, then the kernel checks."""
    lines = [
        f"# Baseline: {report['model']}",
        "",
        f"Command: `{report['command']}`  ",
        f"Tree: {report['tree']}, device: {report['device']}, {report['date']}",
        "",
        "| run | task | metric | value | stderr |",
        "|---|---|---|---|---|",
    ]
    for name, run in report["runs"].items():
        for task, metrics in run["results"].items():
            for key, value in metrics.items():
                if key == "alias" or "_stderr," in key:
                    continue
                metric = key.split(",")[0]
                stderr = metrics.get(f"{metric}_stderr,none", "")
                stderr = f"{stderr:.4f}" if isinstance(stderr, float) else ""
                shown = f"{value:.4f}" if isinstance(value, float) else str(value)
                lines.append(f"| {name} | {task} | {metric} | {shown} | {stderr} |")
    checks = report.get("kernel_checks")
    if checks:
        lines += [
            "",
            f"## Our kernel against SDPA at {checks['seq']} tokens (bf16)",
            "",
            "| | ctxaware | sdpa |",
            "|---|---|---|",
        ]
        fp32 = checks["logits_vs_fp32_sdpa"]
        for stat in ("max_abs", "mean_abs"):
            lines.append(f"| logits vs fp32 SDPA, {stat} | {fp32['ctxaware'][stat]:.4f} | {fp32['sdpa'][stat]:.4f} |")
        lines.append(
            f"| training step (ms) | {checks['train_step_ms']['ctxaware']:.1f} | {checks['train_step_ms']['sdpa']:.1f} |"
        )
        lines.append(
            f"| peak memory (MiB) | {checks['train_step_peak_mib']['ctxaware']:.0f} | {checks['train_step_peak_mib']['sdpa']:.0f} |"
        )
        lines += ["", f"Training step speed-up, ours vs SDPA: {checks['train_step_speedup_ctxaware_vs_sdpa']:.2f}x"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--smoke", action="store_true", help="ctxaware-tiny on CPU, tiny lengths: checks the script")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--device", default=None)
    parser.add_argument("--kernel_seq", type=int, default=8192)
    parser.add_argument("--runs", type=lambda text: text.split(","), help="comma-separated subset of the runs")
    parser.add_argument("--skip_kernel_checks", action="store_true")
    parser.add_argument("--no_progress", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.device = "ctxaware-tiny", "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    name = "smollm2" if args.model == "smollm2-135m" else re.sub(r"[^A-Za-z0-9]+", "_", Path(args.model).name)
    report = {
        "model": args.model,
        "command": "python " + " ".join(sys.argv),
        "tree": git_commit(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "date": time.strftime("%Y-%m-%d"),
        "versions": {"torch": torch.__version__, **_versions()},
        "runs": {},
    }

    def save():
        files = {f"{name}_baseline.json": json.dumps(report, indent=2), f"{name}_baseline.md": render(report)}
        write_results(args.out, files)

    run_evaluations(args, args.out, report, save)
    if torch.cuda.is_available() and not args.smoke and not args.skip_kernel_checks:
        report["kernel_checks"] = kernel_checks(args, args.kernel_seq)
        save()
    print(render(report))
    return 0


def _versions() -> dict:
    import transformers

    return {"transformers": transformers.__version__}


if __name__ == "__main__":
    sys.exit(main())
