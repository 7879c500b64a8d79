"""Fixed-slot H2O / window decoding on the GPU (`pytest -m gpu tests/gpu`): the replayed CUDA graph steps equal the
same steps run eagerly, without allocating, and the Triton kernels' decode over fixed slots equals the dynamic cache's
generate, EOS stop included."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import ctxaware.attention
from ctxaware.methods.h2o import H2OCache, WindowCache
from ctxaware.methods.h2o_static import WARMUP_STEPS, FixedSlotDecoder, generate_fixed_slots, generate_in_slots
from tests.tiny_models import left_padded_prompts


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

PAD = 2
NEW = 24


def _model(dtype):
    """SmolLM2-135M's attention layout (9 query / 3 kv heads of 64, hidden 576), 4 layers, random weights."""
    config = LlamaConfig(
        vocab_size=4096,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=4,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        max_position_embeddings=4096,
        pad_token_id=PAD,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(
            config, attn_implementation=ctxaware.attention.ATTN_IMPLEMENTATION, dtype=dtype
        )
    return model.eval()


def _batch(lengths):
    """Left-padded random prompts on the GPU."""
    ids, mask = left_padded_prompts(lengths, seed=sum(lengths), pad=PAD, high=4096)
    return ids.cuda(), mask.cuda()


@pytest.mark.parametrize("cache_class", [H2OCache, WindowCache])
@pytest.mark.parametrize("budget", [0.2, 1040])  # evicts at the prompt; fills empty slots, then evicts
def test_graph_replay_equals_eager_steps(cache_class, budget):
    model = _model(torch.bfloat16)
    ids, mask = _batch((1024, 700))
    eager = FixedSlotDecoder(model, cache_class(model, budget=budget), ids, mask)
    graphed = FixedSlotDecoder(model, cache_class(model, budget=budget), ids, mask, cuda_graph=True)
    allocated = None
    for step in range(NEW):
        eager.step()
        graphed.step()
        if step == WARMUP_STEPS + 1:  # captured, replayed once
            torch.cuda.synchronize()
            allocated = torch.cuda.memory_allocated()
        assert torch.equal(graphed.token, eager.token), step
        torch.testing.assert_close(graphed.logits, eager.logits, rtol=1e-2, atol=1e-2)
    assert graphed.graph is not None
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == allocated  # replays allocate nothing
    for a, b in zip(graphed.cache.layers, eager.cache.layers, strict=True):
        assert torch.equal(a.positions, b.positions)  # the replays moved the cache exactly as the eager steps
        assert torch.equal(a.free, b.free)
    assert graphed.cache.get_seq_length() == 1024 + NEW


@pytest.mark.parametrize("cache_class", [H2OCache, WindowCache])
@pytest.mark.parametrize("budget", [64, 320])
def test_fixed_slots_on_triton_generate_what_the_dynamic_cache_generates(cache_class, budget):
    """float32, so both run the kernels at IEEE precision and differ only by the order keys are summed in."""
    model = _model(torch.float32)
    ids, mask = _batch((300, 181))
    expected = model.generate(
        input_ids=ids,
        attention_mask=mask,
        cache=cache_class(model, budget=budget),
        max_new_tokens=NEW,
        do_sample=False,
        pad_token_id=PAD,
        eos_token_id=None,
        output_scores=True,
        return_dict_in_generate=True,
    )
    out = generate_fixed_slots(
        model, cache_class(model, budget=budget), ids, mask, max_new_tokens=NEW, cuda_graph=True, output_scores=True
    )
    assert torch.equal(out.sequences, expected.sequences)
    for got, want in zip(out.scores, expected.scores, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cache_class", [H2OCache, WindowCache])
def test_eos_inside_the_graph_stops_as_generate_does(cache_class):
    """The EOS ids are tokens the rows emit, without EOS, after the capture (steps 6 and 11); through the eval
    harness's `generate_in_slots`, which turns the graph on for CUDA inputs."""
    model = _model(torch.float32)
    ids, mask = _batch((300, 181))
    width = ids.shape[1]
    free = generate_fixed_slots(model, cache_class(model, budget=64), ids, mask, max_new_tokens=NEW, cuda_graph=True)
    eos = [int(free.sequences[0, width + 6]), int(free.sequences[1, width + 11])]
    options = dict(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=PAD, eos_token_id=eos)
    expected = model.generate(cache=cache_class(model, budget=64), do_sample=False, **options)
    got = generate_in_slots(model, cache=cache_class(model, budget=64), **options)
    assert torch.equal(got, expected)
    assert got.shape[1] <= width + 12  # every row finished by step 11: the host stopped
