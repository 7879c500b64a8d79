"""Benchmark `ctxaware score`'s attention metric against materialising attention with `output_attentions=True`.

    python benchmarks/scoring.py --out benchmarks/results [--seq 1024 2048 4096 8192] [--batch 4] [--model ID]
    python benchmarks/scoring.py --out /tmp/bench --tiny    # CPU smoke run: a 2-layer model, short sequences

Both sides compute the same numbers (per response row, attention mass on the user span, max over heads, mean over
rows, every layer) from one forward of the same model in bf16 on one GPU:
- ours: `attn_implementation="ctxaware"` with `key_labels` (the kernel's label_mass: O(S) memory per layer);
- eager: `attn_implementation="eager"`, `output_attentions=True`, then the span sums over the (B, H, S, S) weights of
  every layer (the way the paper's code does it);
- floor: the same forward with `attn_implementation="sdpa"` and no statistic (the bound on any speed-up).
Without --model the model is a randomly initialised Llama-3-8B-shaped network (throughput does not depend on the
weights, and nothing is downloaded). Writes scoring.json (timings, tokens/s, peak memory, GPU, versions, command) and
scoring.md (the table with the speed-up; target >= 10x) to --out. An eager OOM is recorded as such.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import sys
import time
from pathlib import Path

import torch
from bench_common import git_commit, write_results
from transformers import AutoModelForCausalLM, LlamaConfig


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ctxaware.attention  # noqa: E402, F401  (registers attn_implementation="ctxaware")
from ctxaware.attention import set_attention_options  # noqa: E402


LLAMA3_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=8192,
    rope_theta=500000.0,
)
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    max_position_embeddings=1024,
)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int) -> tuple[float, float | None]:
    """Median seconds of `fn` and its peak extra memory in MiB (CUDA only)."""
    fn()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device.type == "cuda" else None
    return sorted(times)[len(times) // 2], peak


def inputs(batch: int, seq: int, vocab: int, device):
    """Random tokens; the user span covers 10%..70% of each row, the response rows are the last 20%."""
    ids = torch.randint(3, vocab, (batch, seq), device=device)
    labels = torch.zeros((batch, seq), dtype=torch.long, device=device)
    labels[:, seq // 10 : 7 * seq // 10] = 1
    rows = slice(4 * seq // 5, seq - 1)
    return ids, labels, rows


def ours(model, ids, labels, rows):
    collected = {}

    def on_stats(module, stats):
        collected[module.layer_idx] = stats.label_mass[:, :, rows, 1].amax(1).mean(-1)  # (B,)

    set_attention_options(model, key_labels=labels, num_labels=2, on_stats=on_stats)
    with torch.no_grad():
        model(input_ids=ids)
    return torch.stack([collected[k] for k in sorted(collected)]).mean(0)


def eager(model, ids, labels, rows):
    with torch.no_grad():
        attentions = model(input_ids=ids, output_attentions=True).attentions
    span = labels[:, None, None, :] == 1
    return torch.stack([(a[:, :, rows] * span).sum(-1).amax(1).mean(-1) for a in attentions]).mean(0)


def floor(model, ids, labels, rows):
    """The same forward with SDPA and no statistics: no way of computing the metric can be faster end to end."""
    with torch.no_grad():
        model(input_ids=ids)


def store(results: dict, name: str, fn, *call_args) -> None:
    results[name] = fn(*call_args)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for scoring.json and scoring.md")
    parser.add_argument("--seq", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", help="a model id or folder (default: random Llama-3-8B-shaped weights)")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: a 2-layer model, float32")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    seqs = [64, 128] if args.tiny else args.seq
    if args.model:
        models = {
            impl: AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation=impl)
            for impl in ("ctxaware", "eager")
        }
    else:
        config = LlamaConfig(**(TINY if args.tiny else LLAMA3_8B))
        torch.manual_seed(0)
        with device:  # initialising 8B random weights on the CPU takes minutes; on the GPU, seconds
            base = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="ctxaware")
        models = {"ctxaware": base, "eager": base}  # one set of weights; the implementation is switched per run
    rows_out, started = [], time.time()
    for seq in seqs:
        ids, labels, rows = inputs(args.batch, seq, models["ctxaware"].config.vocab_size, device)
        row = {"B": args.batch, "S": seq}
        results = {}
        for name, fn in (("ours", ours), ("eager", eager), ("floor", floor)):
            implementation = {"ours": "ctxaware", "eager": "eager", "floor": "sdpa"}[name]
            model = models["eager" if name == "eager" else "ctxaware"].to(device).eval()
            model.set_attn_implementation(implementation)
            try:
                call = functools.partial(store, results, name, fn, model, ids, labels, rows)
                seconds, peak = timed(call, device, args.repeats)
                row[f"{name}_s"], row[f"{name}_peak_mib"] = seconds, peak
                row[f"{name}_tokens_per_s"] = args.batch * seq / seconds
            except torch.OutOfMemoryError:
                row[f"{name}_error"] = "out of memory"
            finally:
                set_attention_options(models["ctxaware"], key_labels=None, num_labels=None, on_stats=None)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if "ours" in results and "eager" in results:
            row["max_abs_diff"] = float((results["ours"].float() - results["eager"].float()).abs().max())
            row["speedup"] = row["eager_s"] / row["ours_s"]
        if "eager_s" in row and "floor_s" in row:
            row["speedup_bound"] = row["eager_s"] / row["floor_s"]
        print(json.dumps(row), flush=True)
        rows_out.append(row)
        write(args, device, dtype, rows_out, time.time() - started)


def write(args, device, dtype, rows, seconds):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    git = git_commit()
    meta = {
        "command": "python benchmarks/scoring.py " + " ".join(sys.argv[1:]),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "model": args.model or ("tiny random Llama" if args.tiny else "random Llama-3-8B-shaped"),
        "dtype": str(dtype),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git": git,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "seconds": round(seconds, 1),
    }
    lines = [
        f"# Context scoring: kernel label_mass vs eager output_attentions on {meta['device']}",
        "",
        f"Command: `{meta['command']}` (model {meta['model']}, {meta['dtype']}, torch {meta['torch']}, git "
        f"{git[:10]}). One forward, all layers; median of {args.repeats}. The SDPA forward computes no statistic: "
        "eager / SDPA bounds the speed-up any method can reach end to end.",
        "",
        "| B | S | ours s | eager s | speed-up (>= 10x) | SDPA forward s | bound (eager / SDPA) | ours tokens/s | "
        "ours peak MiB | eager peak MiB | max diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(row, key, fmt):
        return "n/a" if row.get(key) is None else format(row[key], fmt)

    for r in rows:
        lines.append(
            f"| {r['B']} | {r['S']} | {cell(r, 'ours_s', '.3f')} | {cell(r, 'eager_s', '.3f')} | "
            f"{cell(r, 'speedup', '.1f')} | {cell(r, 'floor_s', '.3f')} | {cell(r, 'speedup_bound', '.1f')} | "
            f"{cell(r, 'ours_tokens_per_s', '.0f')} | {cell(r, 'ours_peak_mib', '.0f')} | "
            f"{cell(r, 'eager_peak_mib', '.0f')} | {cell(r, 'max_abs_diff', '.2e')} |"
        )
    errors = [f"- B={r['B']} S={r['S']} {k}: {v}" for r in rows for k, v in r.items() if k.endswith("_error")]
    lines += ["", "## Errors", "", *errors] if errors else []
    write_results(
        out, {"scoring.json": json.dumps({"meta": meta, "rows": rows}, indent=1), "scoring.md": "\n".join(lines)}
    )


if __name__ == "__main__":
    main()
