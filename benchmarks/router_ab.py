"""A/B of the MoH router's inference kernel (`ctxaware/kernels/moh_router.py`) against an earlier version of it, timed
side by side in one run:

    git show REV:ctxaware/kernels/moh_router.py > /tmp/old_router.py
    python benchmarks/router_ab.py --baseline /tmp/old_router.py --out DIR [--repeats 3]
    python benchmarks/router_ab.py --baseline ctxaware/kernels/moh_router.py --out DIR --smoke   # CPU check

Both versions' `router_gates` route the same bf16 activations with a 1B model's router (hidden 2048, 32 heads: 8
shared + top 8 of 24 routed, MoH's 50% split; weights in fp32 as the adapter keeps them) at 1 and 8 tokens (decode
steps) and 4096 and 8192 tokens (a prefill). Times are GPU time (CUDA-graph replay medians, `bench_graph`); with
`--repeats N` each size is timed N times with the versions' order alternating, and the change per run is reported.
Gates are compared with the baseline's (max abs difference). Writes router_ab.json and router_ab.md to --out.
`--decode-step S [S ...]` also times the 1B model's token-routed decode step after an S-token prefill (`moh.py`'s
static step as a CUDA graph) with each version's router: the dense step and both MoH steps are timed in this one
process in turn, each captured afresh, the order alternating between repeats, so the GPU's drift over a run (13%
within one row of `moh.py` on an H100) falls on all three alike. The step's logits are compared with the baseline's.
--smoke: tiny sizes on CPU under TRITON_INTERPRET=1, wall-clock times; checks the script, times nothing real (on CPU
the router runs its PyTorch form, so both versions run the same code there).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path


if "--smoke" in sys.argv:  # before triton is imported: the interpreter runs the kernels on CPU tensors
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
from bench_common import (  # noqa: E402
    alternating_order,
    bench_graph,
    git_commit,
    import_kernel_module,
    wall_ms,
    write_results,
)


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ctxaware.kernels.moh_router as package  # noqa: E402


HIDDEN, HEADS, SHARED, TOP_K = 2048, 32, 8, 8  # a 1B model's router at 50% active
TOKENS = [1, 8, 4096, 8192]
SMOKE = dict(hidden=200, heads=8, shared=2, top_k=2, tokens=[1, 40])


def measure(versions: dict, tokens: int, sizes: dict, device, timer) -> dict:
    """{version: {"ms": time, "max_abs_diff": against the baseline's gates}} for one call size."""
    torch.manual_seed(0)
    hidden, heads, shared = sizes["hidden"], sizes["heads"], sizes["shared"]
    routed = heads - shared
    x = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16)
    weights = [torch.randn(n, hidden, device=device) * 0.05 for n in (routed, shared, 2)]
    columns = torch.randperm(heads, device=device).to(torch.int32)  # shared heads, then routed, as the router lists

    def call(module):
        return module.router_gates(x, *weights, columns, lr_ratio=1.0, top_k=sizes["top_k"], dtype=torch.bfloat16)

    reference = call(versions["baseline"]).float()
    rows = {}
    for name, module in versions.items():
        gates = call(module).float()
        rows[name] = {"max_abs_diff": (gates - reference).abs().max().item(), "ms": timer(lambda m=module: call(m))}
        print(tokens, name, json.dumps(rows[name]), flush=True)
    return rows


def decode_step_runs(versions: dict, seq: int, repeats: int, device, smoke: bool) -> list[dict]:
    """Per repeat, {"dense" and each version: {"ms", "max_abs_diff"}} for the 1B model's decode step after a
    `seq`-token prefill, token-routed at 50% active with each version's `router_gates`. Each step is captured and
    timed at once, with nothing run between (`bench_graph`), and captured again for every repeat: a step run eagerly
    after its capture, or another version's prefill, left a kept graph replaying freed memory on an H100 (a
    device-side index assert)."""
    import moh
    from transformers import AutoModelForCausalLM, LlamaConfig

    from ctxaware.methods.moh.adapter import MoHAdapter

    config = LlamaConfig(**(moh.SMOKE if smoke else moh.LLAMA_1B), max_position_embeddings=max(seq + 16, 2048))
    torch.manual_seed(0)
    dtype = torch.float32 if smoke else torch.bfloat16
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="ctxaware").to(device).eval()
    ids = torch.randint(0, config.vocab_size, (1, seq), device=device)
    shared, top_k = moh.split(0.5, config.num_attention_heads)
    adapter = MoHAdapter.for_model(model, num_shared_heads=shared, top_k=top_k, routing_chunk=0).to(device)
    adapter.attach(model)
    own = package.router_gates

    @contextmanager
    def running(name):
        """The model as `name` runs it: dense (the adapter attached but off) or with that version's router."""
        package.router_gates = versions.get(name, package).router_gates  # what the router's token_gates looks up
        try:
            with adapter.disabled() if name == "dense" else nullcontext():
                yield
        finally:
            package.router_gates = own

    names = ["dense", *versions]
    outputs = {}
    for name in names:
        with running(name):
            outputs[name] = moh.decode_steps(model, ids)[1]().float()
    timer = wall_ms if smoke else bench_graph
    runs = []
    for repeat in range(repeats):
        runs.append({})
        for name in alternating_order(dict.fromkeys(names), repeat):
            with running(name):
                runs[-1][name] = {"ms": timer(moh.decode_steps(model, ids)[1])}
            print(f"decode_step_{seq}", name, json.dumps(runs[-1][name]), flush=True)
    for run in runs:
        for name in run:
            run[name]["max_abs_diff"] = (outputs[name] - outputs["baseline"]).abs().max().item()
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", required=True, help="an earlier ctxaware/kernels/moh_router.py")
    parser.add_argument("--out", required=True, help="folder for router_ab.json and router_ab.md")
    parser.add_argument("--repeats", type=int, default=1, help="runs of every size, the versions' order alternating")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: checks the script end to end")
    parser.add_argument("--decode-step", type=int, nargs="+", default=[], metavar="S",
                        help="also the 1B decode step after S prefill tokens, each version's router, in one process")  # fmt: skip
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: pass 1 or more")
    if any(seq < 1 for seq in args.decode_step):
        parser.error(f"--decode-step {args.decode_step}: prefill lengths of 1 token or more")
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("benchmarks/router_ab.py times Triton kernels: run it on a GPU (or pass --smoke on CPU)")
    device = torch.device("cpu" if args.smoke else "cuda")
    sizes = SMOKE if args.smoke else dict(hidden=HIDDEN, heads=HEADS, shared=SHARED, top_k=TOP_K, tokens=TOKENS)
    versions = {"baseline": import_kernel_module(Path(args.baseline), "router_ab_baseline"), "package": package}
    timer = wall_ms if args.smoke else bench_graph
    meta = {"command": "python benchmarks/router_ab.py " + " ".join(sys.argv[1:]), "git": git_commit(),
            "gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke)", "torch": torch.__version__,
            "baseline": Path(args.baseline).name, "sizes": sizes, "date": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
    results = {}
    for tokens in sizes["tokens"]:
        runs = []
        for repeat in range(args.repeats):
            runs.append(measure(alternating_order(versions, repeat), tokens, sizes, device, timer))
        results[str(tokens)] = summarise(runs, list(versions))
        write(Path(args.out), results, meta)  # after every size: a cut-short run keeps what it measured
    for seq in args.decode_step:
        runs = decode_step_runs(versions, seq, args.repeats, device, args.smoke)
        results[f"decode_step_{seq}"] = summarise(runs, [*versions, "dense"])
        write(Path(args.out), results, meta)


def summarise(runs: list[dict], names: list[str]) -> dict:
    """Medians and per-run values of each version's time, and the package's change against the baseline per run."""
    changes = [run["package"]["ms"] / run["baseline"]["ms"] - 1 for run in runs]
    return {
        name: {
            "ms": statistics.median(run[name]["ms"] for run in runs),
            "ms_runs": [run[name]["ms"] for run in runs],
            "max_abs_diff": max(run[name]["max_abs_diff"] for run in runs),
        }
        for name in names
    } | {"change_per_run": changes, "median_change": statistics.median(changes)}


def write(out: Path, results: dict, meta: dict) -> None:
    lines = [f"# MoH router A/B on {meta['gpu']}", "", f"Command: `{meta['command']}` (torch {meta['torch']}, git "
             f"{meta['git'][:10]}, baseline {meta['baseline']}). ms, GPU time (CUDA-graph replay).", "",
             "| tokens | baseline | package | change per run | median change | max abs diff |", "|---|---|---|---|---|---|"]  # fmt: skip
    for tokens, row in results.items():
        per_run = " / ".join(f"{c:+.1%}" for c in row["change_per_run"])
        label = tokens
        if "dense" in row:  # a decode step: the prefill length, and each version's step against the dense one
            x_dense = " / ".join(f"{row[n]['ms'] / row['dense']['ms']:.3f}x" for n in ("baseline", "package"))
            label = f"1B decode step after {tokens.removeprefix('decode_step_')} (dense {row['dense']['ms']:.3f}; {x_dense})"
        lines.append(
            f"| {label} | {row['baseline']['ms']:.4f} | {row['package']['ms']:.4f} | {per_run} "
            f"| {row['median_change']:+.1%} | {row['package']['max_abs_diff']:.3g} |"
        )
    out.mkdir(parents=True, exist_ok=True)
    write_results(out, {"router_ab.json": json.dumps({"meta": meta, "results": results}, indent=1),
                        "router_ab.md": "\n".join(lines) + "\n"})  # fmt: skip


if __name__ == "__main__":
    main()
