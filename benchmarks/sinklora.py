"""SinkLoRA benchmarks on one GPU: a LoRA training step at long context, and H2O generation, peers in the same run.

    python benchmarks/sinklora.py --out benchmarks/results [--seq 16384] [--steps 5] [--quick]
    python benchmarks/sinklora.py --shape smollm2 --seq 32768 --liger --skip_generation --out DIR

Training: a Llama built from a config with random bf16 weights (`--shape 1b`: TinyLlama-1.1B's, 22 layers, hidden
2048, 32 query / 4 kv heads; `smollm2`: SmolLM2-135M's, 30 layers, hidden 576, 9 query / 3 kv heads of 64, a 49,152
vocabulary), LoRA r=8 on q/k/v/o plus trainable embeddings and norms, gradient checkpointing, AdamW, one row of
`--seq` tokens. Peers: SF on the ctxaware kernels (attn_implementation="ctxaware"), LongLoRA's S^2 as published
(half the heads rolled by G/2, groups folded into the batch, causal SDPA flash), dense SDPA, and the step without
attention (the floor). `--liger` adds each peer again with liger-kernel's fused linear cross-entropy (the logits are
never materialised), RMSNorm, SwiGLU and RoPE. Reports the median step's tokens/s and the peak memory, with the
ratios to LongLoRA's and full attention's steps.

Generation: the same model, an `--gen_prompt`-token prompt, `--gen_new` greedy tokens: full cache (SDPA, the
ctxaware attention under its dense backend policy, and forced onto the ctxaware kernels) against H2O and the sinks +
window cache at budgets 0.5 and 0.2; decode tokens/s (a `--gen_new`-token generate's time less a 1-token one's),
steady decode ms a step (16 timed steps after 4 warm-up steps) and KV-cache bytes. `--cuda_graph` adds each H2O / window peer in
fixed slots (`ctxaware.methods.h2o_static`), eager (`+slots`) and replayed as one CUDA graph a step (`+graph`; its
end-to-end time includes the capture). `--profile_decode` adds each peer's host / GPU time per decode step and its op
table (decode_profile_<peer>.txt).
Writes sinklora.json (timings, GPU, versions, command) and sinklora.md (tables) to --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from bench_common import SMOLLM2_135M, git_commit, kernel_ms
from torch.nn.attention import SDPBackend, sdpa_kernel


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ctxaware.methods import sinklora  # noqa: E402
from ctxaware.methods.h2o import H2OCache, WindowCache  # noqa: E402
from ctxaware.methods.h2o_static import FixedSlotDecoder, generate_fixed_slots  # noqa: E402


LONGLORA = "longlora_s2"
FLOOR = "no_attention_floor"
LIGER = "+liger"  # peer-name suffix: the same step with liger-kernel's fused loss and layers
TRAIN_PEERS = ("sf_ctxaware", "s2_longlora_sdpa", "full_sdpa", FLOOR)
# full_auto: the ctxaware attention under its dense backend policy (plain decode goes to SDPA)
GENERATION_PEERS = ("full_sdpa", "full_auto", "full_ctxaware", "h2o_0.5", "h2o_0.2", "window_0.5", "window_0.2")
# peer-name suffixes (`--cuda_graph`): an evicting cache's decode in fixed slots, eager, and as one CUDA graph a step
FIXED_SLOTS = ("+slots", "+graph")
STEADY_WARMUP, STEADY_STEPS = 4, 16  # decode steps before the steady-state timing (graph capture included), and timed
GROUP_SIZE_RATIO = 0.25


def longlora_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """LongLoRA's S^2 (their flash path): GQA repeated to Hq, half the heads rolled by -G/2, groups folded into the
    batch, causal SDPA flash per group, unfolded and rolled back. Registered as an AttentionInterface entry."""
    b, h, s, d = query.shape
    group = int(s * GROUP_SIZE_RATIO)
    if s % group:
        raise ValueError(f"LongLoRA's reshape needs the length {s} to be a multiple of the group size {group}")
    repeat = h // key.shape[1]
    key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)

    def fold(t):
        t = torch.cat([t[:, : h // 2], t[:, h // 2 :].roll(-group // 2, dims=2)], dim=1)
        return t.view(b, h, s // group, group, d).transpose(1, 2).reshape(b * s // group, h, group, d)

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = torch.nn.functional.scaled_dot_product_attention(
            fold(query), fold(key), fold(value), is_causal=True, scale=scaling
        )
    out = out.view(b, s // group, h, group, d).transpose(1, 2).reshape(b, h, s, d)
    out = torch.cat([out[:, : h // 2], out[:, h // 2 :].roll(group // 2, dims=2)], dim=1)
    return out.transpose(1, 2).contiguous(), None


def attention_floor(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """No attention at all (each token's own value), keeping q and k in the graph: the step time of everything else,
    so LongLoRA's step / this step bounds what any attention kernel could gain end to end."""
    repeat = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
    return (value + 0.0 * (query + key)).transpose(1, 2).contiguous(), None


SHAPES = {
    "1b": dict(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 8.0},
    ),
    "smollm2": dict(**SMOLLM2_135M, rope_parameters={"rope_type": "linear", "rope_theta": 100000.0, "factor": 4.0}),
}


def build_model(attn_implementation: str, layers: int | None, shape: str = "1b", liger: bool = False):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**{**SHAPES[shape], "max_position_embeddings": 32768})
    if layers:
        config.num_hidden_layers = layers
    torch.manual_seed(0)
    with torch.device("cuda"):  # random init of 1B weights on the CPU takes tens of seconds per peer; here, a second
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=torch.bfloat16)
    if liger:  # RoPE's patch is module-wide: the liger peers run after every unfused one
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(model=model)
    return model


def train_step_peer(
    name: str, seq: int, steps: int, layers: int | None, shape: str = "1b", breakdown: bool = False
) -> dict:
    base, liger = name.removesuffix(LIGER), name.endswith(LIGER)
    implementation = {"sf_ctxaware": "ctxaware", "s2_longlora_sdpa": LONGLORA, "full_sdpa": "sdpa", FLOOR: FLOOR}[base]
    model = build_model(implementation, layers, shape, liger)
    pattern = sinklora.training_pattern("sf", GROUP_SIZE_RATIO) if base == "sf_ctxaware" else None
    if implementation == "ctxaware":
        sinklora.set_training_pattern(model, pattern)
    from peft import get_peft_model

    model = get_peft_model(model, sinklora.lora_config(model))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    ids = torch.randint(0, model.config.vocab_size, (1, seq), device="cuda")
    times = []
    torch.cuda.reset_peak_memory_stats()
    for step in range(steps + 2):
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step >= 2:  # warm-up: autotuning, allocator
            times.append(time.perf_counter() - start)
    median = sorted(times)[len(times) // 2]
    result = {"step_s": median, "tokens_per_s": seq / median, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    if breakdown:
        result["gpu_ms_by_part"] = step_breakdown(model, ids, optimizer)
    del model, optimizer
    torch.cuda.empty_cache()
    return result


# Parts of a training step, told apart by CUDA kernel name (lower case; the first part whose substring matches wins).
KERNEL_PARTS = (
    ("attention", ("_fwd_kernel", "_bwd_dkdv", "_bwd_dq", "_bwd_delta", "_key_mass", "flash", "fmha", "sdpa", "attn")),
    ("loss", ("cross_entropy", "log_softmax", "logsoftmax", "nll_loss", "logsumexp", "liger")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("matmuls (projections, MLP, LM head)", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "sm90_", "sm80_")),
)
OTHER_PART = "other (norms, RoPE, SwiGLU, residuals, copies)"
TOP_KERNELS = 20  # the slowest kernels of a profiled step, by name, to see what each part is made of


def kernel_part(name: str) -> str:
    lowered = name.lower()
    return next((part for part, keys in KERNEL_PARTS if any(key in lowered for key in keys)), OTHER_PART)


def step_breakdown(model, ids: torch.Tensor, optimizer) -> dict:
    """GPU milliseconds of one profiled training step by part (`KERNEL_PARTS`), and the step's GPU total."""

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    kernels = kernel_ms(step, calls=1)
    parts: dict[str, float] = {}
    for name, ms in kernels.items():
        parts[kernel_part(name)] = parts.get(kernel_part(name), 0.0) + ms
    top = dict(list(kernels.items())[:TOP_KERNELS])
    return {**dict(sorted(parts.items(), key=lambda item: -item[1])), "total": sum(parts.values()), "top_kernels": top}


def generation_peer(
    name: str, prompt: int, new: int, layers: int | None, shape: str = "1b", profile: Path | None = None
) -> dict:
    """Decode tokens/s, steady ms a decode step and K/V bytes of one cache peer; with `profile`, a torch.profiler
    table of a short decode (host and GPU time per op) is written there, to see what bounds the decode step."""
    from transformers import DynamicCache

    base, _, slots = name.partition("+")  # slots: "slots" (fixed slots, eager) or "graph" (replayed CUDA graph)
    model = build_model("sdpa" if base == "full_sdpa" else "ctxaware", layers, shape).eval()
    if base == "full_ctxaware":  # our kernels, not the SDPA that plain dense calls default to
        from ctxaware.attention import set_attention_options

        set_attention_options(model, backend="triton")
    ids = torch.randint(0, 32000, (1, prompt), device="cuda")
    kind, _, budget = base.partition("_")
    cache_class = {"h2o": H2OCache, "window": WindowCache}.get(kind)

    def cache():
        return cache_class(model, budget=float(budget)) if cache_class else DynamicCache(config=model.config)

    def generate(tokens: int):
        """`tokens` greedy tokens after the prompt; returns the cache as it ends."""
        if slots:
            graph = slots == "graph"
            return generate_fixed_slots(model, cache(), ids, max_new_tokens=tokens, cuda_graph=graph).cache
        run_cache = cache()
        model.generate(input_ids=ids, cache=run_cache, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        return run_cache

    def stepper():
        """Prefills the prompt; returns one greedy decode step that feeds back its own token."""
        if slots:
            return FixedSlotDecoder(model, cache(), ids, cuda_graph=slots == "graph").step
        run_cache = cache()
        token = [model(input_ids=ids, cache=run_cache, use_cache=True).logits[:, -1:].argmax(-1)]

        def step():
            token[0] = model(input_ids=token[0], cache=run_cache, use_cache=True).logits[:, -1:].argmax(-1)

        return step

    with torch.no_grad():
        generate(4)
        torch.cuda.synchronize()
        start = time.perf_counter()
        generate(1)
        torch.cuda.synchronize()
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        run_cache = generate(new)
        torch.cuda.synchronize()
        total = time.perf_counter() - start
        record = {"steady_ms_per_step": steady_decode_ms(stepper())}
        if profile is not None:
            record["profile"] = profile_decode(stepper(), profile)
    layers_kv = [(layer.keys, layer.values) for layer in run_cache.layers]
    cache_bytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers_kv)
    return {
        "decode_tokens_per_s": (new - 1) / max(total - prefill, 1e-9),
        "total_s": total,
        "cache_bytes": cache_bytes,
        **record,
    }


def steady_decode_ms(step) -> float:
    """Wall milliseconds a decode step over `STEADY_STEPS` steps, after `STEADY_WARMUP` (a graph's capture among them)."""
    for _ in range(STEADY_WARMUP):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(STEADY_STEPS):
        step()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - start) / STEADY_STEPS


def profile_decode(step, path: Path, steps: int = 16) -> dict:
    """Profiles `steps` calls of the decode `step` (after the prompt's prefill; a CUDA-graphed step warms up and is
    captured first): host (CPU) and GPU time in all, and the table of ops by self CPU time, written to `path`. A
    decode step whose host time exceeds its GPU time is host-bound."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(STEADY_WARMUP):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    events = prof.key_averages()
    gpu_us = sum(getattr(e, "self_device_time_total", 0) for e in events)
    table = events.table(sort_by="self_cpu_time_total", row_limit=30)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(table)
    return {"steps": steps, "wall_ms_per_step": 1e3 * wall / steps, "gpu_ms_per_step": gpu_us / 1e3 / steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--seq", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--layers", type=int, help="decoder layers (default: the shape's)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--liger", action="store_true", help="also time each peer with liger-kernel's fused layers")
    parser.add_argument("--skip_generation", action="store_true")
    parser.add_argument("--skip_training", action="store_true")
    parser.add_argument(
        "--breakdown", action="store_true", help="also profile one training step per peer: GPU time by part"
    )
    parser.add_argument(
        "--profile_decode", action="store_true", help="also profile 16 decode steps of each generation peer"
    )
    parser.add_argument(
        "--gen_peers", default=",".join(GENERATION_PEERS), help="comma-separated, among " + ", ".join(GENERATION_PEERS)
    )
    parser.add_argument(
        "--cuda_graph",
        action="store_true",
        help="also decode each H2O / window peer in fixed slots, eager (+slots) and as a CUDA graph a step (+graph)",
    )
    parser.add_argument("--gen_prompt", type=int, default=8192)
    parser.add_argument("--gen_new", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="4k tokens, 4 layers, 2 steps: a smoke run")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/sinklora.py needs a CUDA GPU")
    if args.quick:
        args.seq, args.layers, args.steps, args.gen_prompt, args.gen_new = 4096, 4, 2, 2048, 16
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    for name, function in ((LONGLORA, longlora_attention), (FLOOR, attention_floor)):
        AttentionInterface.register(name, function)
        AttentionMaskInterface.register(name, sdpa_mask)

    train, generation = {}, {}
    for name in () if args.skip_training else TRAIN_PEERS + tuple(name + LIGER for name in TRAIN_PEERS if args.liger):
        train[name] = train_step_peer(name, args.seq, args.steps, args.layers, args.shape, args.breakdown)
        print(name, train[name], flush=True)
        write(Path(args.out), args, train, generation)
    unknown = set(args.gen_peers.split(",")) - set(GENERATION_PEERS)
    if unknown:
        parser.error(f"unknown --gen_peers {sorted(unknown)}: use {', '.join(GENERATION_PEERS)}")
    for name in () if args.skip_generation else generation_peers(args.gen_peers.split(","), args.cuda_graph):
        profile = Path(args.out) / f"decode_profile_{name.replace('+', '_')}.txt" if args.profile_decode else None
        generation[name] = generation_peer(name, args.gen_prompt, args.gen_new, args.layers, args.shape, profile)
        torch.cuda.empty_cache()
        print(name, generation[name], flush=True)
        write(Path(args.out), args, train, generation)


def generation_peers(selected: list[str], cuda_graph: bool) -> list[str]:
    """The selected peers in `GENERATION_PEERS` order, each evicting one followed by its fixed-slot forms when
    `cuda_graph` is set."""
    peers = []
    for peer in GENERATION_PEERS:
        if peer in selected:
            fixed = cuda_graph and not peer.startswith("full")
            peers += [peer, *(peer + suffix for suffix in FIXED_SLOTS if fixed)]
    return peers


def write(out: Path, args, train: dict, generation: dict) -> None:
    """Writes what has been measured so far (a run stopped by a time limit keeps its finished peers)."""
    import peft
    import transformers

    git = git_commit()
    record = {
        "command": " ".join(["python", *sys.argv]),
        "gpu": torch.cuda.get_device_name(),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "python": platform.python_version(),
        },
        "git_hash": git or None,
        "settings": vars(args),
        "train_step": train,
        "generation": generation,
    }
    lines = [
        f"# SinkLoRA benchmarks ({record['gpu']})",
        "",
        f"`{record['command']}`",
        "",
        f"Training step, the {args.shape} shape ({args.layers or 'all'} layers), {args.seq} tokens, LoRA + "
        "embeddings/norms, checkpointing:",
        "",
        "| peer | tokens/s | step s | peak GiB | vs LongLoRA | vs full SDPA |",
        "|---|---|---|---|---|---|",
    ]
    base = train.get("s2_longlora_sdpa", {}).get("tokens_per_s")
    full = train.get("full_sdpa", {}).get("tokens_per_s")
    for name, r in train.items():
        ratios = [f"{r['tokens_per_s'] / peer:.2f}x" if peer else "n/a" for peer in (base, full)]
        lines.append(
            f"| {name} | {r['tokens_per_s']:.0f} | {r['step_s']:.3f} | {r['peak_gib']:.1f} | "
            + " | ".join(ratios)
            + " |"
        )
    if base and "sf_ctxaware" in train:
        record["train_ratio_sf_over_longlora"] = train["sf_ctxaware"]["tokens_per_s"] / base
    if base and full and f"sf_ctxaware{LIGER}" in train:
        sf_liger = train[f"sf_ctxaware{LIGER}"]
        record["train_ratio_sf_liger_over_longlora"] = sf_liger["tokens_per_s"] / base
        record["train_ratio_sf_liger_over_full"] = sf_liger["tokens_per_s"] / full
        record["peak_ratio_sf_liger_over_sf"] = sf_liger["peak_gib"] / train["sf_ctxaware"]["peak_gib"]
    if base and FLOOR in train:
        record["train_ratio_bound_over_longlora"] = train[FLOOR]["tokens_per_s"] / base
        lines += [
            "",
            f"The step without attention ({FLOOR}) bounds any attention kernel's end-to-end gain over "
            f"LongLoRA at {record['train_ratio_bound_over_longlora']:.2f}x.",
        ]
    profiled = {name: r["gpu_ms_by_part"] for name, r in train.items() if "gpu_ms_by_part" in r}
    if profiled:
        parts = [part for part, _ in KERNEL_PARTS] + [OTHER_PART]
        lines += ["", "GPU ms of one profiled step, by part (CUDA kernel names):", ""]
        lines += ["| peer | " + " | ".join(parts) + " | GPU total |", "|---" * (len(parts) + 2) + "|"]
        for name, r in profiled.items():
            lines.append(
                f"| {name} | " + " | ".join(f"{r.get(part, 0.0):.1f}" for part in parts) + f" | {r['total']:.1f} |"
            )
    if generation:
        lines += ["", f"Generation, {args.gen_prompt}-token prompt, {args.gen_new} new tokens:", ""]
        lines += [
            "| cache | decode tokens/s | steady ms/step | KV MiB | profiled ms/step: wall / GPU |",
            "|---|---|---|---|---|",
        ]
        for name, r in generation.items():
            profiled = r.get("profile")
            profiled = f"{profiled['wall_ms_per_step']:.1f} / {profiled['gpu_ms_per_step']:.1f}" if profiled else "-"
            lines.append(
                f"| {name} | {r['decode_tokens_per_s']:.1f} | {r['steady_ms_per_step']:.1f} | "
                f"{r['cache_bytes'] / 2**20:.1f} | {profiled} |"
            )
    out.mkdir(parents=True, exist_ok=True)
    (out / "sinklora.json").write_text(json.dumps(record, indent=2))
    (out / "sinklora.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
