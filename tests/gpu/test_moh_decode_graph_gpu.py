"""benchmarks/moh.py's static decode step captured as one CUDA graph (`pytest -m gpu tests/gpu`), as the benchmark
times it: each replay equals the same step run eagerly, for a token the step was not captured with, and a MoH model's
gates are computed inside the graph (its routing follows the token fed to the replay)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from ctxaware.attention import ATTN_IMPLEMENTATION, attention_modules, cuda_graph_warmup, get_attention_options
from ctxaware.methods.moh.adapter import MoHAdapter
from tests.launch import load_benchmark


pytestmark = [
    pytest.mark.usefixtures("stable_seed"),  # every random input reproduces (tests/conftest.py)
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

VOCAB = 1024
PREFIX = 256  # two 128-token chunks: with chunk routing the step begins the third, so its router runs


def _model(routing_chunk):
    """bf16 Llama, 2 layers, 8 query / 2 kv heads of 64, random weights, on the ctxaware attention; with
    `routing_chunk` (0: per token) a MoH router (2 shared heads, top 3 of 6 routed) with weights large enough that
    routing follows the token."""
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=1024,
    )
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=ATTN_IMPLEMENTATION, dtype=torch.bfloat16)
    if routing_chunk is not None:
        adapter = MoHAdapter.for_model(model, num_shared_heads=2, top_k=3, routing_chunk=routing_chunk)
        with torch.no_grad():
            for param in adapter.parameters():
                param.normal_(0, 1.0)
        adapter.cuda().attach(model)
    return model.eval()


@pytest.mark.parametrize("routing_chunk", [None, 0, 128], ids=["dense", "token", "chunk128"])
def test_graph_replay_equals_the_eager_static_step(routing_chunk):
    bench = load_benchmark("moh")
    model = _model(routing_chunk)
    options = get_attention_options(attention_modules(model)[1])
    _, static, token = bench.decode_steps(model, torch.randint(0, VOCAB, (1, PREFIX), device="cuda"))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), cuda_graph_warmup():  # Triton compiles its kernels, cuBLAS sets up its workspace
        static()
        static()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # records only: the replays below run it
        replayed = static()
    replayed_gates = options.head_gates  # the gates the captured step writes (None for dense)
    outputs, routings = [], set()
    for new in torch.randint(0, VOCAB, (4, 1, 1), device="cuda"):
        token.copy_(new)
        graph.replay()
        got, got_gates = replayed.clone(), None if replayed_gates is None else replayed_gates.clone()
        expected = static()
        torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-3)
        outputs.append(expected)
        if routing_chunk is not None:
            assert torch.equal(got_gates, options.head_gates)  # the replay routed the new token as the eager step did
            routings.add(tuple((got_gates != 0).flatten().tolist()))
    assert not torch.equal(outputs[0], outputs[1])  # the token reaches the step
    if routing_chunk is not None:
        assert len(routings) > 1  # routing follows the token


@pytest.mark.parametrize("routing_chunk", [None, 0], ids=["dense", "token"])
def test_a_prefill_forward_captures_and_replays_as_run_eagerly(routing_chunk):
    """benchmarks/moh.py's forward graph rows: the model forward on S tokens (position ids made by the model, so
    the packed-rows check must not read a value back during capture) replays to the eager forward's logits."""
    model = _model(routing_chunk)
    # the same kernel eagerly and captured: a dense call with no document check otherwise goes to cuDNN SDPA (the
    # backend policy), whose bf16 logits differ from ours by about 0.01, which is not what this test is about
    for module in attention_modules(model):
        get_attention_options(module).backend = "triton"
    ids = torch.randint(0, VOCAB, (1, PREFIX), device="cuda")

    @torch.no_grad()
    def forward():
        return model(input_ids=ids, logits_to_keep=1).logits

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), cuda_graph_warmup():  # the kernel variants the capture launches
        forward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = forward()
    for _ in range(2):
        ids.copy_(torch.randint(0, VOCAB, ids.shape, device="cuda"))
        graph.replay()
        torch.testing.assert_close(replayed, forward(), rtol=1e-2, atol=1e-3)
