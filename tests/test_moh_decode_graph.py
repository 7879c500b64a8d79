"""benchmarks/moh.py's static decode step (`decode_steps`, the step it captures as a CUDA graph on the GPU), run
eagerly on the CPU: the same next-token logits as the DynamicCache step, dense and MoH-routed alike."""

import pytest
import torch

from ctxaware.attention import ATTN_IMPLEMENTATION, attention_modules, get_attention_options
from ctxaware.methods.moh.adapter import MoHAdapter
from tests.launch import load_benchmark
from tests.tiny_models import tiny_model


pytestmark = pytest.mark.usefixtures("stable_seed")  # every random input reproduces (tests/conftest.py)


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("moh")


def _model(routing_chunk):
    """A tiny Llama (8 query / 4 kv heads, 2 layers) on the ctxaware attention; with `routing_chunk` (0: per token)
    a MoH router (2 shared heads, top 3 of 6 routed) whose weights are large enough that routing follows the token."""
    model = tiny_model("llama", num_heads=8, head_dim=4, attn_implementation=ATTN_IMPLEMENTATION).eval()
    if routing_chunk is None:
        return model
    adapter = MoHAdapter.for_model(model, num_shared_heads=2, top_k=3, routing_chunk=routing_chunk)
    with torch.no_grad():
        for param in adapter.parameters():
            param.normal_(0, 1.0)
    adapter.attach(model)
    return model


@pytest.mark.parametrize(
    "routing_chunk, prefix, routes",
    [
        (None, 9, False),  # dense
        (0, 9, True),  # MoH, routed per token
        (4, 8, True),  # routed per 4-token chunk; the step begins a chunk: the router runs on its token
        (4, 10, False),  # the step is inside the prefill's last chunk: it takes that chunk's gates
    ],
)
def test_static_step_gives_the_dynamic_cache_steps_logits(bench, routing_chunk, prefix, routes):
    model = _model(routing_chunk)
    ids = torch.randint(3, 300, (2, prefix))
    eager, static, token = bench.decode_steps(model, ids)
    gates = []
    for new in (ids[:, -1:], torch.randint(3, 300, (2, 1)), ids[:, -1:]):  # each step leaves the cache as it was
        token.copy_(new)
        expected = eager()
        logits = static()
        gates.append(get_attention_options(attention_modules(model)[1]).head_gates)
        assert logits.shape == expected.shape == (2, 1, model.config.vocab_size)
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
        # and both are the last step of the model run on the prefix and the new token at once
        full = model(torch.cat([ids, new], dim=-1)).logits[:, -1:]
        torch.testing.assert_close(logits, full, rtol=1e-4, atol=1e-5)
    if routing_chunk is not None:
        assert torch.equal(gates[0], gates[2])
        assert torch.equal(gates[0], gates[1]) != routes  # the step routed its own token, or took its chunk's gates


def test_static_step_of_a_routed_model_differs_from_the_dense_step(bench):
    """The routing is in the static step: with MoH attached its logits leave the dense model's."""
    ids = torch.randint(3, 300, (1, 9))
    dense = bench.decode_steps(_model(None), ids)[1]()
    routed = bench.decode_steps(_model(0), ids)[1]()
    assert (routed - dense).abs().max() > 1e-3
