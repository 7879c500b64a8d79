"""Benchmark MoH routing against dense attention on one GPU: kernel-level and whole-model, timed in the same run.

    python benchmarks/moh.py --out benchmarks/results [--seq 4096 16384] [--active 0.75 0.5] [--train-step 8 1024]
    python benchmarks/moh.py --out DIR --seq 4096 8192 --active 0.5 --decode-only   # the decode step alone (A/Bs)
    python benchmarks/moh.py --out /tmp/moh-smoke --smoke      # CPU: tiny shapes, checks the script end to end

Model: a Llama of about 1B parameters built from a config (Llama-3.2-1B's shapes: 16 layers, hidden 2048, 32 query /
8 key/value heads of 64, MLP 8192; random bf16 weights, nothing downloaded). Active fractions are (shared + top_k) /
32 with 16 shared heads at 75% (16 + 8 of 16 routed, the paper's split) and 8 shared at 50% (8 + 8 of 24).
Measured, B=1, causal, bf16, ms (medians):
- attention (32/8 heads, D=64; GPU time from CUDA-graph replay, and the host time per call): ours dense (no gates),
  SDPA flash and cuDNN, and ours with gates at each active fraction routed per token (what the router gives: top-k
  of random logits) and per 128-token chunk (every query of a kernel tile makes the same choice: the most the tile
  skipping can give); forward and forward + backward.
- the routed-row index alone (the compaction kernel every gated call runs first), for the per-token gates.
- the forward of each head's last query tile alone (its BM queries against all S keys): no launch of the causal
  forward can take less, so it bounds what skipping work can save at short lengths.
- decode attention: one query against an S-token KV cache, batch 8, per-token gates (each tile is one query, so
  every zero gate is skipped work).
- whole model: forward of the 1B model on S tokens with `attn_implementation="ctxaware"`, dense vs MoH (learned
  router attached, per-token top-k, and routed per 128-token chunk with `routing_chunk=128`: the router runs on the
  chunks' first tokens and the kernel skips whole tiles), and SDPA; and one decode step after an S-token prefill
  through HF's DynamicCache from Python (wall time, and its host time per step). With `--graphs` (on by default) the
  forward and the decode step again as replayed CUDA graphs, the decode through a static cache of S + 1 slots
  (`decode_steps`): GPU time, the router and the gates inside the graph; chunk routing also at a step inside a chunk
  (the prefill one token shorter), which reuses the chunk's gates and runs no router. On a GPU the static decode step
  is also profiled kernel by kernel as its graph replays, with the number of kernels it launches. While a graph is
  captured the ctxaware attention cannot check whether the model's position ids mark packed rows (a read-back), so
  the captured forward runs the kernels' per-key document check over one document (same attention), dense and MoH
  alike. From Python a 1B model's decode step is host-bound and so is its forward at 4k, so only the graph rows
  compare work.
- with `--train-step B S`: SmolLM2-135M's training step (random weights, every weight trainable, loss over its
  49,152-token vocabulary) dense and as MoH at 7/9 and 5/9 active, token-routed with the off-head mean bias: wall
  ms from Python and the GPU time of its kernels, each kernel's and how many it launches.
Writes moh.json (all timings, GPU, versions, command) and moh.md (tables with ratios to dense) to --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from bench_common import (
    SMOLLM2_135M,
    bench_graph,
    git_commit,
    graph_replay,
    host_us,
    kernel_ms,
    kernel_profile,
    write_results,
)
from bench_common import bench as bench_gpu
from transformers import DynamicCache, StaticCache


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ctxaware.kernels import attention  # noqa: E402


SPLITS = {0.75: 16, 0.5: 8}  # active fraction -> shared heads of 32 (top_k = active * 32 - shared)
LLAMA_1B = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    vocab_size=128256,
    tie_word_embeddings=True,
)
TRAINING_SPLITS = ((4, 3), (3, 2))  # SmolLM2's MoH runs: (shared, top_k) of its 9 query heads, 7/9 and 5/9 active
SMOKE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=8,
    vocab_size=256,
    tie_word_embeddings=True,
)


def bench(fn, device, graph=False) -> float:
    """Median ms. graph: GPU time of the calls replayed from a CUDA graph, without the Python and launch time, which
    at 4k tokens is longer than the kernels' (`host_us`)."""
    if device.type == "cuda":
        return bench_graph(fn) if graph else bench_gpu(fn)
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[1]


def split(active: float, heads: int) -> tuple[int, int]:
    """(shared, top_k) for an active fraction: the paper's 50/50 split at 75%, a quarter shared at 50%."""
    shared = round(heads * SPLITS.get(active, 8) / 32)
    return shared, round(active * heads) - shared


def token_gates(b, s, heads, shared, top_k, device, dtype):
    """Shared heads on, top-k of random routed logits per token; gate value 1."""
    routed = torch.rand(b, s, heads - shared, device=device).argsort(-1) < top_k
    return torch.cat([torch.ones(b, s, shared, dtype=torch.bool, device=device), routed], -1).to(dtype)


def chunk_gates(b, s, heads, shared, top_k, device, dtype, chunk=128):
    chunks = token_gates(b, -(-s // chunk), heads, shared, top_k, device, dtype)
    return chunks.repeat_interleave(chunk, 1)[:, :s]


def fwd_bwd(fn, inputs):
    def run():
        for t in inputs:
            t.grad = None
        fn().sum().backward()

    return run


def measure_attention(row, s, active_fractions, hq, hkv, d, device, dtype, backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, hq, s, d, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(1, hkv, s, d, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(1, hkv, s, d, device=device, dtype=dtype, requires_grad=True)

    def ours(gates=None):
        return lambda: attention(q, k, v, head_gates=gates, backend=backend)[0]

    row["attn_dense_fwd"] = bench(ours(), device, graph=True)
    row["attn_dense_fwdbwd"] = bench(fwd_bwd(ours(), (q, k, v)), device, graph=True)
    row["host_dense_fwd"] = host_us(ours())
    if device.type == "cuda":
        row["kernels_dense_fwdbwd"] = kernel_ms(fwd_bwd(ours(), (q, k, v)))
        for name, kind in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            try:

                def sdpa(kind=kind):
                    with sdpa_kernel(kind):
                        return torch.nn.functional.scaled_dot_product_attention(
                            q, k, v, is_causal=True, enable_gqa=True
                        )

                row[f"attn_sdpa_{name}_fwd"] = bench(sdpa, device, graph=True)
            except RuntimeError as error:
                row[f"attn_sdpa_{name}_error"] = str(error)[:200]
    for active in active_fractions:
        shared, top_k = split(active, hq)
        for routing, make in (("token", token_gates), ("chunk", chunk_gates)):
            gates = make(1, s, hq, shared, top_k, device, dtype).requires_grad_(True)
            row[f"attn_{routing}_{active}_fwd"] = bench(ours(gates), device, graph=True)
            row[f"attn_{routing}_{active}_fwdbwd"] = bench(fwd_bwd(ours(gates), (q, k, v, gates)), device, graph=True)
            row[f"host_{routing}_{active}_fwd"] = host_us(ours(gates))
            if device.type == "cuda" and routing == "token":
                # what the gated backward spends its time on; the gathered rows' index, part of every gated call
                row[f"kernels_token_{active}_fwdbwd"] = kernel_ms(fwd_bwd(ours(gates), (q, k, v, gates)))
                from ctxaware.kernels.triton_attention import _routed_rows

                plain = gates.detach()
                row[f"attn_rows_{active}"] = bench(lambda g=plain: _routed_rows(g), device, graph=True)
    if device.type == "cuda":  # every causal launch waits for its longest tiles: a head's last query tile, alone
        from ctxaware.kernels.triton_attention import _blocks

        q_last = q.detach()[:, :, -_blocks("fwd", s, d, dtype, False)["BM"] :]
        row["attn_last_tile_fwd"] = bench(lambda: attention(q_last, k, v, backend=backend)[0], device, graph=True)
    # decode: batch 8, one query per row against the cache
    with torch.no_grad():
        qd = torch.randn(8, hq, 1, d, device=device, dtype=dtype)
        kd = torch.randn(8, hkv, s, d, device=device, dtype=dtype)
        vd = torch.randn_like(kd)
        row["decode_dense"] = bench(lambda: attention(qd, kd, vd, backend=backend)[0], device, graph=True)
        for active in active_fractions:
            gates = token_gates(8, 1, hq, *split(active, hq), device, dtype)
            row[f"decode_token_{active}"] = bench(
                lambda g=gates: attention(qd, kd, vd, head_gates=g, backend=backend)[0], device, graph=True
            )


class PrefixCache(StaticCache):
    """HF's StaticCache holding a prefill's S tokens (copied from its DynamicCache) and one free slot, which each
    decode step writes and then gives back (`crop(-1)` moves the static layers' device counter back), so every step
    has the same shapes and buffers and can be captured as a CUDA graph. Its length is S, a host int: the model
    derives the step's position from it and MoH's chunk routing its offset, on the host, which a captured step cannot
    do with the static layers' counter (a device tensor)."""

    def __init__(self, config, prefill: DynamicCache):
        self.prefix = prefill.get_seq_length()
        super().__init__(config=config, max_cache_len=self.prefix + 1)
        for index, layer in enumerate(prefill.layers):
            self.update(layer.keys, layer.values, index)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.prefix


@torch.no_grad()
def decode_steps(model, ids):
    """(eager, static, token): one new token after the S-token prefill of `ids`, each step returning its logits and
    leaving the cache as the prefill left it, so it can be called again and again. `eager` runs through the prefill's
    DynamicCache and crops the token back (what a generate loop runs from Python); `static` through a `PrefixCache`
    copy of it, capturable. Both feed `token` (B, 1), the prefill's last token, a buffer callers may overwrite."""
    cache = DynamicCache(config=model.config)
    model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
    static_cache, token = PrefixCache(model.config, cache), ids[:, -1:].clone()

    def step(through):
        @torch.no_grad()
        def run():
            logits = model(input_ids=token, cache=through, use_cache=True).logits
            through.crop(-1)
            return logits

        return run

    return step(cache), step(static_cache), token


def measure_model(row, s, active_fractions, config_kwargs, device, dtype, graphs, decode_only=False):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from ctxaware.methods.moh.adapter import MoHAdapter

    config = LlamaConfig(**config_kwargs, max_position_embeddings=max(s + 16, 2048))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="ctxaware").to(device).eval()
    ids = torch.randint(0, config.vocab_size, (1, s), device=device)
    heads = config.num_attention_heads

    @torch.no_grad()
    def forward():
        return model(input_ids=ids, logits_to_keep=1).logits

    def forward_and_decode(name):
        """The forward on S tokens and the decode step from Python (wall ms; the decode's host us per step too) and,
        with `graphs`, each replayed from a CUDA graph (GPU ms; on the CPU smoke run the same calls, eagerly).
        `decode_only`: the decode step alone."""
        if not decode_only:
            row[f"model_{name}_fwd"] = bench(forward, device)
        eager, static, _ = decode_steps(model, ids)
        row[f"model_{name}_decode"] = bench(eager, device)
        row[f"host_{name}_decode"] = host_us(eager)
        calls = [("decode", static)] if decode_only else [("fwd", forward), ("decode", static)]
        if name.startswith("chunk"):  # a step inside a chunk: the prefill one token shorter, so S - 1 is not a start
            calls.append(("decode_mid", decode_steps(model, ids[:, :-1])[1]))
        for what, call in calls if graphs else ():
            try:
                row[f"model_{name}_{what}_graph"] = bench(call, device, graph=True)
            except RuntimeError as error:  # a capture that fails loses this row only, not the run's other rows
                row[f"model_{name}_{what}_graph_error"] = str(error)[:200]
        if device.type == "cuda":  # what the graph rows time: the step as replayed (eagerly, without --graphs)
            try:
                step = graph_replay(static) if graphs else static
                row[f"kernels_{name}_decode_step"], row[f"launches_{name}_decode_step"] = kernel_profile(step)
            except RuntimeError as error:
                row[f"kernels_{name}_decode_step_error"] = str(error)[:200]

    forward_and_decode("dense")
    if not decode_only:
        model.set_attn_implementation("sdpa")
        row["model_sdpa_fwd"] = bench(forward, device)
    for active in active_fractions:
        shared, top_k = split(active, heads)
        for routing, chunk in (("token", 0), ("chunk", 128)):
            adapter = MoHAdapter.for_model(model, num_shared_heads=shared, top_k=top_k, routing_chunk=chunk)
            adapter.to(device).attach(model)  # switches to the ctxaware attention
            forward_and_decode(f"{routing}_{active}")
            adapter.detach()
    if graphs:  # dense again after the MoH rows: how far the GPU drifted (clocks, heat) while they ran
        row["model_dense_decode_graph_end"] = bench(decode_steps(model, ids)[1], device, graph=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_training_step(row, batch, s, config_kwargs, device, dtype):
    """SmolLM2-135M's continue-tuning step (forward, loss over the vocabulary, backward; every weight trainable, as
    `recipes/configs/moh/smollm2.yaml` trains) dense and as MoH at 7/9 and 5/9 active heads, token-routed with the
    off-head mean bias the SmolLM2 runs use: wall ms from Python (what a user waits for) and the GPU time of its
    kernels (torch.profiler). Random weights; the optimizer step, the same for all, is left out."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from ctxaware.methods.moh.adapter import MoHAdapter

    config = LlamaConfig(**config_kwargs, max_position_embeddings=max(s, 2048))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="ctxaware").to(device).train()
    ids = torch.randint(0, config.vocab_size, (batch, s), device=device)
    key = f"step_{batch}x{s}"

    def time_step(name, trainable):
        def step():
            for p in trainable:
                p.grad = None
            model(input_ids=ids, labels=ids).loss.backward()

        row[f"{key}_{name}"] = bench(step, device)
        if device.type == "cuda":
            kernels, row[f"launches_{name}_train_step"] = kernel_profile(step)
            row[f"{key}_{name}_gpu"] = sum(kernels.values())
            row[f"kernels_{name}_train_step"] = kernels

    time_step("dense", list(model.parameters()))
    for shared, top_k in TRAINING_SPLITS:
        adapter = MoHAdapter.for_model(
            model, num_shared_heads=shared, top_k=top_k, off_head_bias="mean", calibration=[ids[:1, :128]]
        )
        adapter.to(device).attach(model)
        time_step(f"moh_{shared}_{top_k}", list(model.parameters()) + list(adapter.parameters()))
        adapter.detach()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for moh.json and moh.md")
    parser.add_argument("--seq", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--active", type=float, nargs="+", default=[0.75, 0.5])
    parser.add_argument("--skip-model", action="store_true", help="attention only")
    parser.add_argument(
        "--decode-only",
        action="store_true",
        help="the 1B decode step alone (eager, as a CUDA graph, profiled): no attention or forward rows; for A/Bs of "
        "the decode path (about 100 s a length on an H100)",
    )
    parser.add_argument(
        "--graphs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the 1B model's forward and decode step as replayed CUDA graphs (GPU time; static cache)",
    )
    parser.add_argument(
        "--train-step",
        type=int,
        nargs=2,
        action="append",
        metavar=("B", "S"),
        help="also time SmolLM2-135M's training step, dense and MoH, at B rows of S tokens (repeatable; "
        "the SmolLM2 recipe trains 8 x 1024)",
    )
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: checks the script, times nothing real")
    args = parser.parse_args()
    args.argv = sys.argv[1:]
    if args.decode_only and args.skip_model:
        parser.error("--decode-only times the model's decode step and --skip-model leaves the model out: choose one")
    if args.smoke:
        device, dtype, backend, config = torch.device("cpu"), torch.float32, "reference", SMOKE
        seqs, (hq, hkv, d) = [64], (8, 2, 8)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("benchmarks/moh.py times the Triton kernels: run it on a GPU (or pass --smoke on CPU)")
        device, dtype, backend, config = torch.device("cuda"), torch.bfloat16, "triton", LLAMA_1B
        seqs, (hq, hkv, d) = args.seq, (32, 8, 64)
    rows, start = [], time.time()
    for s in seqs:
        row = {"S": s, "Hq": hq, "Hkv": hkv, "D": d}
        if not args.decode_only:
            measure_attention(row, s, args.active, hq, hkv, d, device, dtype, backend)
        if not args.skip_model:
            try:
                measure_model(row, s, args.active, config, device, dtype, args.graphs, args.decode_only)
            except torch.OutOfMemoryError as error:
                row["model_error"] = str(error)[:200]
        print(json.dumps(row), flush=True)
        rows.append(row)
        write(args, rows, device, time.time() - start)  # after every row: a cut-short run keeps what it measured
    for batch, s in args.train_step or ():
        row = {"train_step": [batch, s]}
        measure_training_step(row, batch, s, SMOKE if args.smoke else SMOLLM2_135M, device, dtype)
        print(json.dumps(row), flush=True)
        rows.append(row)
        write(args, rows, device, time.time() - start)


KERNEL_LINES = 8  # kernels listed per profiled call, slowest first


def kernel_lines(rows) -> list[str]:
    """The slowest kernels of each profiled call (attention forward+backward, the model's decode step, SmolLM2's
    training step) with their total and, where counted, the kernels launched per call (GPU rows only)."""
    profiled = [
        (r.get("S", "x".join(map(str, r.get("train_step", [])))), what.removeprefix("kernels_"), r[what], r)
        for r in rows
        for what in r
        if what.startswith("kernels_")
    ]
    if not profiled:
        return []
    lines = ["", "GPU ms per call of the slowest kernels of the attention forward+backward (`fwdbwd`), the 1B model's "
             "static decode step (`decode_step`, its CUDA graph replayed) and SmolLM2's training step (`train_step`; torch.profiler, 5 calls):",
             ""]  # fmt: skip
    for s, what, kernels, row in profiled:
        slowest = list(kernels.items())[:KERNEL_LINES]
        launches = row.get(f"launches_{what}")
        counted = f", {launches:.0f} launches" if launches is not None else ""
        lines.append(
            f"- S={s}, {what} (all kernels {sum(kernels.values()):.3f}{counted}): "
            + "; ".join(f"{k[:70]} {v:.3f}" for k, v in slowest)
        )
    return lines


def training_lines(rows) -> list[str]:
    """SmolLM2-135M's training step, dense and each MoH split: wall ms, then GPU ms where profiled, x of dense."""
    lines = []
    for r in (r for r in rows if "train_step" in r):
        batch, s = r["train_step"]
        key = f"step_{batch}x{s}"
        if not lines:
            lines = ["", "SmolLM2-135M training step (forward, loss, backward), ms; x of dense:", ""]
            lines += ["| B x S | model | wall | GPU |", "|---|---|---|---|"]
        for name in ["dense"] + [f"moh_{shared}_{top_k}" for shared, top_k in TRAINING_SPLITS]:
            label = "dense" if name == "dense" else "MoH {} shared + top {}".format(*name.split("_")[1:])
            cells = []
            for suffix in ("", "_gpu"):
                value, dense = r.get(key + "_" + name + suffix), r.get(key + "_dense" + suffix)
                cells.append("n/a" if value is None else f"{value:.1f} ({value / dense:.2f}x)")
            lines.append(f"| {batch} x {s} | {label} | " + " | ".join(cells) + " |")
    return lines


def write(args, rows, device, seconds):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    git = git_commit()
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke)"
    meta = {
        "command": "python benchmarks/moh.py " + " ".join(args.argv),
        "gpu": gpu,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git": git,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "seconds": round(seconds, 1),
        "units": "ms, median; fwdbwd = forward + backward; ratios are x of dense (lower is faster)",
    }
    lines = [
        f"# MoH routing on {gpu}",
        "",
        f"Command: `{meta['command']}` (torch {meta['torch']}, CUDA "
        f"{meta['cuda']}, git {git[:10]}). B=1 (decode: 8), causal, bf16, ms; ratio = x of dense. Attention rows: GPU "
        "time, the calls replayed from a CUDA graph (the host time per call is its own row); model rows: as "
        "called from Python, except the decode step's CUDA-graph rows (GPU time of the step replayed, with a static "
        "cache of S + 1 slots; the eager step's host time per step is its own row).",
        "",
        "| S | what | dense | " + " | ".join(f"{a:.0%} active" for a in args.active) + " |",
        "|---|---|---|" + "---|" * len(args.active),
    ]
    kinds = [
        ("attention fwd, token-routed", "attn_dense_fwd", "attn_token_{}_fwd"),
        ("attention fwd+bwd, token-routed", "attn_dense_fwdbwd", "attn_token_{}_fwdbwd"),
        ("attention fwd, chunk-routed (128)", "attn_dense_fwd", "attn_chunk_{}_fwd"),
        ("attention fwd+bwd, chunk-routed (128)", "attn_dense_fwdbwd", "attn_chunk_{}_fwdbwd"),
        ("routed-row index alone (in every gated call)", "attn_dense_fwd", "attn_rows_{}"),
        ("host time of an attention fwd call, token-routed (us, not ms)", "host_dense_fwd", "host_token_{}_fwd"),
        ("decode attention (B=8, 1 query)", "decode_dense", "decode_token_{}"),
        ("1B model forward, token-routed", "model_dense_fwd", "model_token_{}_fwd"),
        ("1B model decode step, token-routed", "model_dense_decode", "model_token_{}_decode"),
        ("1B model forward, chunk-routed (128)", "model_dense_fwd", "model_chunk_{}_fwd"),
        ("1B model decode step, chunk-routed (128)", "model_dense_decode", "model_chunk_{}_decode"),
        ("1B model forward, token-routed, CUDA graph", "model_dense_fwd_graph", "model_token_{}_fwd_graph"),
        ("1B model forward, chunk-routed (128), CUDA graph", "model_dense_fwd_graph", "model_chunk_{}_fwd_graph"),
        ("1B model decode step, token-routed, CUDA graph", "model_dense_decode_graph", "model_token_{}_decode_graph"),
        (
            "1B model decode step, chunk-routed (128), CUDA graph",
            "model_dense_decode_graph",
            "model_chunk_{}_decode_graph",
        ),
        (
            "1B model decode step inside a chunk (no router), chunk-routed (128), CUDA graph",
            "model_dense_decode_graph",
            "model_chunk_{}_decode_mid_graph",
        ),
        (
            "1B model decode step, dense again after the MoH rows (the GPU's drift), CUDA graph",
            "model_dense_decode_graph",
            "model_dense_decode_graph_end",
        ),
        ("host time of a 1B decode step, token-routed (us, not ms)", "host_dense_decode", "host_token_{}_decode"),
        ("host time of a 1B decode step, chunk-routed (us, not ms)", "host_dense_decode", "host_chunk_{}_decode"),
    ]
    for r in (r for r in rows if "S" in r):
        for label, dense, routed in kinds:
            if dense not in r:
                continue
            cells = []
            for a in args.active:
                value = r.get(routed.format(a))
                cells.append("n/a" if value is None else f"{value:.2f} ({value / r[dense]:.2f}x)")
            lines.append(f"| {r['S']} | {label} | {r[dense]:.2f} | " + " | ".join(cells) + " |")
        peers = [
            f"{k.removeprefix('attn_').removesuffix('_fwd')} {v:.2f}"
            for k, v in r.items()
            if k.startswith("attn_sdpa") and k.endswith("_fwd")
        ] + ([f"1B model with SDPA {r['model_sdpa_fwd']:.2f}"] if "model_sdpa_fwd" in r else [])
        if peers:
            lines.append(f"| {r['S']} | peers (fwd) | " + ", ".join(peers) + " |" + " |" * len(args.active))
        if "attn_last_tile_fwd" in r:
            lines.append(
                f"| {r['S']} | attention fwd of each head's last query tile alone (a launch's critical path) "
                f"| {r['attn_last_tile_fwd']:.3f} |" + " |" * len(args.active)
            )
    lines += [
        "",
        "Target: attention at 50% active <= 0.65x dense. With gates the kernel's query tiles hold "
        "each head's routed rows only (token routing); chunk routing zeroes whole tiles without that.",
        "Target: 1B decode step with an 8k cache <= 1.0x dense, read on the CUDA-graph rows (the eager step's time is "
        "mostly host time). Chunk routing runs its router on the step that begins a chunk (one step in 128; the step "
        "measured when S is a multiple of 128); the other steps reuse the chunk's gates.",
    ]
    lines += kernel_lines(rows) + training_lines(rows)
    write_results(out, {"moh.json": json.dumps({"meta": meta, "rows": rows}, indent=1), "moh.md": "\n".join(lines)})


if __name__ == "__main__":
    main()
