"""What the GPU speed benchmarks share: the commit they timed, the timers, and calling a kernel module version."""

import importlib.util
import sys
import time
from pathlib import Path

import torch
import triton


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's ctxaware, as every benchmark uses it
sys.path.insert(0, str(Path(__file__).resolve().parent))  # science_common, beside this file
from science_common import git_commit  # noqa: E402, F401  (re-exported: the benchmarks import it from here)

from ctxaware.attention import cuda_graph_warmup  # noqa: E402
from ctxaware.io import write_text  # noqa: E402


# SmolLM2-135M-Instruct's shape (its config.json), for the benchmarks that build it with random weights
SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    tie_word_embeddings=True,
)


def bench(fn) -> float:
    """Median ms of `triton.testing.do_bench` on the GPU, after one call outside the timing (compilation)."""
    fn()
    torch.cuda.synchronize()
    return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))


def bench_graph(fn) -> float:
    """GPU time: median ms of the calls replayed from a CUDA graph (`triton.testing.do_bench_cudagraph`), without the
    Python and launch time `bench` includes; an MoH-gated call at 4k tokens spends longer on the host than its kernels
    take on the H200. The warm-up runs as captured (`cuda_graph_warmup`), so no kernel is first launched inside the
    capture."""
    with cuda_graph_warmup():
        fn()
    torch.cuda.synchronize()
    return float(triton.testing.do_bench_cudagraph(fn, rep=40, return_mode="median"))


def graph_replay(fn):
    """`fn` captured as a CUDA graph (warmed up as captured: `cuda_graph_warmup`), returned as the graph's replay: a
    profile of it gives the kernels as the graph runs them, back to back, and the capture's path (under capture the
    attention keeps its per-key document check for a prefill), where an eager profile gives each kernel alone."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), cuda_graph_warmup():
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay  # the bound method keeps the graph alive


def host_us(fn, calls: int = 50) -> float:
    """Microseconds of host time per call (Python, autograd, argument checks, launches), measured without waiting for
    the GPU: 50 calls of a few launches each stay well inside the launch queue, so the host never blocks. On a CPU
    (smoke runs) it is the whole call."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    seconds = time.perf_counter() - start
    sync()
    return seconds / calls * 1e6


def kernel_profile(fn, calls: int = 5) -> tuple[dict[str, float], float]:
    """GPU milliseconds per call of each CUDA kernel `fn` launches, slowest first (what a timing is made of), and the
    kernels it launches per call (a step of many small kernels costs their launches and tails even replayed from a
    CUDA graph); torch.profiler over `calls` calls, after one call outside it."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels = [event for event in prof.key_averages() if getattr(event, "self_device_time_total", 0) > 0]
    times: dict[str, float] = {}
    for event in kernels:
        times[event.key[:120]] = times.get(event.key[:120], 0.0) + event.self_device_time_total / 1e3 / calls
    return dict(sorted(times.items(), key=lambda item: -item[1])), sum(event.count for event in kernels) / calls


def kernel_ms(fn, calls: int = 5) -> dict[str, float]:
    """`kernel_profile`'s GPU milliseconds per kernel alone."""
    return kernel_profile(fn, calls)[0]


def alternating_order(versions: dict, repeat: int) -> dict:
    """The versions of an A/B in the order of repeat `repeat`: as given, then reversed, alternately, so the version
    timed first (on a colder GPU) is not always the same."""
    items = list(versions.items())
    return dict(items if repeat % 2 == 0 else reversed(items))


def write_results(out: Path, files: dict[str, str]) -> None:
    """Writes each {file name: text} under `out` through a temporary file, so a run cut short (device time limits)
    never leaves a half-written table behind."""
    for name, text in files.items():
        write_text(out / name, text if text.endswith("\n") else text + "\n")


def wall_ms(fn) -> float:
    """Wall-clock ms of one call after a first one: the CPU smoke runs' timer, which checks scripts, not speed."""
    fn()
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def import_kernel_module(path: Path, name: str):
    """A version of `ctxaware/kernels/triton_attention.py` (another commit's, or one a benchmark rewrote) imported
    as module `name`, beside the installed one; registered in sys.modules, where Triton looks up kernel source."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def edit_source(source: str, edits: list[tuple[str, str]]) -> str:
    """`source` with each (old, new) replaced; an `old` that is not there (the kernels changed) is an error."""
    for old, new in edits:
        if old not in source:
            raise RuntimeError(f"the kernel source changed; update this edit: {old[:60]!r}")
        source = source.replace(old, new)
    return source


def load_kernel_source(name: str, source: str, folder: Path):
    """Kernel-module source (a rewritten copy of the package's) imported as module `name`; written to `folder` first,
    because Triton reads kernel source from the file."""
    path = folder / f"{name}.py"
    path.write_text(source)
    return import_kernel_module(path, name)


def kernel_forward(module, q, k, v, pattern=None, head_gates=None):
    """Causal attention output through a kernel module's `triton_attention` (default scale, no statistics)."""
    return module.triton_attention(q, k, v, scale=q.shape[-1] ** -0.5, causal=True, pattern=pattern,
                                   key_padding_mask=None, doc_ids=None, head_gates=head_gates, key_mass=False,
                                   key_labels=None, num_labels=None)[0]  # fmt: skip


def kernel_forward_backward(module, q, k, v, dout, pattern=None):
    """dq, dk, dv of causal attention through a kernel module's forward and backward (autograd)."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    return torch.autograd.grad(kernel_forward(module, *leaves, pattern), leaves, dout)
