"""H2O cache: identical to the full cache when the budget holds everything, bounded by the budget otherwise, and
evicting exactly the keys a materialised-attention reference ranks lowest."""

import pytest
import torch
from transformers import DynamicCache

import ctxaware.attention
from ctxaware.eval.hooks import apply_generation_hooks
from ctxaware.methods.h2o import H2OCache, parse_budget
from tests.tiny_models import tiny_model


PAD = 2


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", attn_implementation=ctxaware.attention.ATTN_IMPLEMENTATION).eval()


def _batch(lengths=(40, 33), seed=0):
    """Left-padded prompts of different lengths, as batched generation builds them."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(3, 300, (n,), generator=generator)
        mask[row, width - n :] = 1
    return ids, mask


def _generate(model, cache, ids, mask, new=6):
    return model.generate(
        input_ids=ids, attention_mask=mask, cache=cache, max_new_tokens=new, do_sample=False, pad_token_id=PAD,
        output_scores=True, return_dict_in_generate=True,
    )  # fmt: skip


def test_budget_above_length_equals_the_full_cache(model):
    ids, mask = _batch()
    full = _generate(model, DynamicCache(config=model.config), ids, mask)
    h2o = _generate(model, H2OCache(model, budget=1000), ids, mask)
    assert torch.equal(full.sequences, h2o.sequences)
    # Same keys, same math; the full cache runs the fused CPU path, H2O the reference (it needs key_mass): equal to
    # float32 rounding, not bit for bit.
    for a, b in zip(full.scores, h2o.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_small_budget_bounds_the_cache_and_keeps_sinks_and_recent(model):
    ids, mask = _batch()
    cache = H2OCache(model, budget=0.4, sinks=2)  # ceil(0.4 * 40) = 16 entries
    _generate(model, cache, ids, mask, new=5)
    assert cache.get_seq_length() == 40 + 5 - 1  # every token seen counts for the positions
    for layer in cache.layers:
        assert layer.keys.shape[-2] == layer.values.shape[-2] == 16
        for row, first in ((0, 0), (1, 7)):  # row 1 starts after 7 pads: its sinks are its first real tokens
            positions = layer.positions[row]
            assert bool((positions[:, :2] == torch.tensor([first, first + 1])).all())
            assert bool((positions[:, -8:] == torch.arange(36, 44)).all())  # recent window: half the budget
    assert cache.cache_bytes() == 2 * 2 * 2 * 16 * 8 * 4 * len(cache.layers)


def test_evicts_the_lowest_mass_keys_of_a_materialised_reference(model):
    ids, mask = _batch(lengths=(30, 30), seed=1)
    budget, sinks, recent = 12, 2, 4
    cache = H2OCache(model, budget=budget, sinks=sinks, recent_ratio=recent / budget)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, cache=cache)
        model.set_attn_implementation("eager")
        try:
            attentions = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
        finally:
            model.set_attn_implementation(ctxaware.attention.ATTN_IMPLEMENTATION)
    kv_heads = model.config.num_key_value_heads
    for layer, probs in zip(cache.layers, attentions):
        mass = probs.sum(-2)  # (B, Hq, S): per-key mass over the queries
        mass = mass.view(mass.shape[0], kv_heads, -1, mass.shape[-1]).sum(2)
        middle = mass[..., sinks : 30 - recent]
        heavy = middle.topk(budget - sinks - recent, dim=-1).indices + sinks
        expected = torch.cat([torch.arange(sinks).expand(2, kv_heads, -1), heavy.sort(-1).values], dim=-1)
        expected = torch.cat([expected, torch.arange(30 - recent, 30).expand(2, kv_heads, -1)], dim=-1)
        assert torch.equal(layer.positions, expected)
        torch.testing.assert_close(layer.scores, mass.gather(-1, expected), rtol=1e-4, atol=1e-5)


def test_needs_the_ctxaware_kernels():
    sdpa = tiny_model("llama", attn_implementation="sdpa")
    with pytest.raises(ValueError, match="set_attn_implementation\\('ctxaware'\\)"):
        H2OCache(sdpa, budget=0.5)


def test_budget_parsing_and_eval_switch(model):
    assert parse_budget("0.2") == 0.2 and parse_budget("512") == 512
    with pytest.raises(ValueError, match="fraction like 0.2"):
        parse_budget("half")
    setup = apply_generation_hooks(model, {"kv_cache": "h2o:0.5"})
    try:
        assert isinstance(setup.cache_factory(), H2OCache)
    finally:
        setup.close()
