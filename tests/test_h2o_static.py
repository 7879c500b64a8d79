"""Fixed-slot H2O and window decoding: the same greedy tokens, logits and kept entries as the dynamic caches, step by
step, on ragged left-padded prompts, with budgets that evict at the prompt, that keep padding past it, and that the
prompt does not fill (empty slots first)."""

import pytest
import torch

import ctxaware.attention
from ctxaware.attention import set_attention_options
from ctxaware.methods.h2o import H2OCache, H2OLayer, WindowCache
from ctxaware.methods.h2o_static import FixedSlotDecoder, FixedSlotLayer, generate_fixed_slots
from tests.test_h2o import PAD
from tests.tiny_models import left_padded_prompts as _batch
from tests.tiny_models import tiny_model


NEW = 16
_LAYER_STATE = ("keys", "values", "scores", "positions", "free", "real")
CASES = [
    pytest.param(H2OCache, 12, (40, 33), id="h2o-evicts-at-the-prompt"),
    pytest.param(H2OCache, 12, (20, 9), id="h2o-keeps-padding-past-the-prompt"),
    pytest.param(H2OCache, 12, (20, 3), id="h2o-padding-in-the-recent-window"),
    pytest.param(H2OCache, 0.3, (30, 17), id="h2o-fraction"),
    pytest.param(H2OCache, 50, (40, 33), id="h2o-fills-empty-slots-first"),
    pytest.param(WindowCache, 12, (20, 9), id="window-keeps-padding-past-the-prompt"),
    pytest.param(WindowCache, 0.3, (30, 17), id="window-fraction"),
    pytest.param(WindowCache, 45, (40, 33), id="window-fills-empty-slots-first"),
]


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", attn_implementation=ctxaware.attention.ATTN_IMPLEMENTATION).eval()


@pytest.mark.parametrize("cache_class, budget, lengths", CASES)
def test_fixed_slots_generate_what_the_dynamic_cache_generates(model, cache_class, budget, lengths):
    ids, mask = _batch(lengths, seed=len(lengths) + lengths[1])
    dynamic = cache_class(model, budget=budget)
    expected = model.generate(
        input_ids=ids,
        attention_mask=mask,
        cache=dynamic,
        max_new_tokens=NEW,
        do_sample=False,
        pad_token_id=PAD,
        eos_token_id=None,  # the fixed-slot decoder never stops early
        output_scores=True,
        return_dict_in_generate=True,
    )
    assert dynamic.get_seq_length() > dynamic.get_max_length()  # it did evict
    out = generate_fixed_slots(
        model, cache_class(model, budget=budget), ids, mask, max_new_tokens=NEW, output_scores=True
    )
    assert torch.equal(out.sequences, expected.sequences)
    # The same keys in another order: attention sums them in another order, equal to float32 rounding.
    for got, want in zip(out.scores, expected.scores, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cache_class, budget, lengths", CASES)
def test_kept_entries_follow_the_dynamic_policy_at_every_step(model, cache_class, budget, lengths):
    """Teacher-forced with the fixed-slot decoder's own tokens, the dynamic cache holds the same real tokens with the
    same scores after the prompt and after every step; padding and empty slots lie in the same slots in every head,
    and the last slot (the query's own column in the kernels) is always real."""
    ids, mask = _batch(lengths, seed=7)
    decoder = FixedSlotDecoder(model, cache_class(model, budget=budget), ids, mask)
    dynamic = cache_class(model, budget=budget)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), cache=dynamic)
    _assert_same_entries(dynamic, decoder.cache)
    for _ in range(NEW):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
        with torch.no_grad():
            output = model(input_ids=decoder.token, attention_mask=mask, position_ids=decoder.position, cache=dynamic)
        decoder.step()
        torch.testing.assert_close(decoder.logits, output.logits[:, -1], rtol=1e-5, atol=1e-6)
        _assert_same_entries(dynamic, decoder.cache)
        for layer in decoder.cache.layers:
            assert torch.equal(
                layer.positions >= layer.pad_start[:, None, None], layer.real[:, None].expand_as(layer.positions)
            )
            assert bool(layer.real[:, -1].all())
    assert dynamic.get_seq_length() == decoder.cache.get_seq_length() == ids.shape[1] + NEW


def _assert_same_entries(dynamic, fixed):
    """Per layer, row and head: the real tokens (positions) and their scores the dynamic cache holds are those of the
    fixed slots other than the free one."""
    for held, slots in zip(dynamic.layers, fixed.layers, strict=True):
        keep = slots.slot != slots.free
        kept_positions = slots.positions[keep].view(*slots.free.shape[:2], -1)
        kept_scores = slots.scores[keep].view(*slots.free.shape[:2], -1)
        for row, pad_start in enumerate(slots.pad_start.tolist()):
            for head in range(held.positions.shape[1]):
                want = _real_in_order(held.positions[row, head], held.scores[row, head], pad_start)
                got = _real_in_order(kept_positions[row, head], kept_scores[row, head], pad_start)
                assert torch.equal(got[0], want[0])
                torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)


def _real_in_order(positions, scores, pad_start):
    real = positions >= pad_start
    order = positions[real].argsort()
    return positions[real][order], scores[real][order]


def test_ties_and_padding_evict_as_the_dynamic_layer_does():
    """On one layer fed the same keys and a mass with many exact ties (as bf16 mass underflowing to 0 gives), the
    fixed slots keep what `H2OLayer` keeps: ties go to the oldest token, padding (row 1: 5 pads) goes first, from the
    same slots in every head whatever positions the heads' pads had."""
    budget, sinks, heads = 8, 2, 2
    pad_start = torch.tensor([0, 5])
    dynamic = H2OLayer(budget, sinks, recent_ratio=0.25)
    keys = torch.arange(10.0).expand(2, heads, 10)[..., None].clone()  # a key's value is its position
    dynamic.update(keys, keys.clone())

    def mass(positions, step):  # three levels of mass, none on padding and empty slots
        level = (positions * 5 + step + torch.arange(heads)[:, None]) % 3
        return level.float().masked_fill(positions < pad_start[:, None, None], 0.0)

    dynamic.observe(mass(dynamic.positions, 0), dynamic.positions[:, 0] >= pad_start[:, None])
    for name in ("positions", "keys", "values"):  # which pads a head keeps is arbitrary: head 1 holds them reversed
        getattr(dynamic, name)[1, 1, :3] = getattr(dynamic, name)[1, 1, :3].flip(0)
    column = torch.tensor(10)
    fixed = FixedSlotLayer(dynamic, pad_start, column)
    for step in range(1, 20):
        key = torch.full((2, heads, 1, 1), float(column))
        dynamic.update(key, key.clone())
        fixed.update(key.clone(), key.clone())
        dynamic.observe(mass(dynamic.positions, step), dynamic.positions[:, 0] >= pad_start[:, None])
        fixed.observe(mass(fixed.positions, step))
        column += 1
        keep = fixed.slot != fixed.free
        kept = fixed.positions[keep].view(2, heads, -1)
        for row in range(2):
            for head in range(heads):
                want = dynamic.positions[row, head]
                got = kept[row, head]
                assert got[got >= pad_start[row]].sort().values.tolist() == want[want >= pad_start[row]].tolist()
        assert torch.equal(fixed.keys[..., 0], fixed.positions.float().where(fixed.positions >= 0, 0.0))
        real = fixed.positions >= pad_start[:, None, None]  # the same slots real in every head: one padding mask
        assert torch.equal(real, fixed.real[:, None].expand_as(real))


def test_a_decode_step_reads_nothing_back(model, monkeypatch):
    """What a CUDA-graph capture forbids, on the CPU: no tensor value reaches Python during a step (the GPU path
    differs only inside the attention call, which runs the Triton kernels there), and the step's state stays in the
    tensors it started in (a replay writes to the addresses it captured)."""
    ids, mask = _batch((20, 9))
    decoder = FixedSlotDecoder(model, H2OCache(model, budget=12), ids, mask)
    state = [decoder.token, decoder.position, decoder.logits, decoder.cache.column]
    state += [getattr(layer, name) for layer in decoder.cache.layers for name in _LAYER_STATE]
    addresses = [t.data_ptr() for t in state]

    def host_read(*args, **kwargs):
        raise AssertionError("a decode step read a tensor value back to the host")

    with monkeypatch.context() as patch:
        for name in ("__bool__", "item", "tolist", "__int__", "__float__", "__index__"):
            patch.setattr(torch.Tensor, name, host_read)
        decoder.step()
        with pytest.raises(AssertionError, match="read a tensor value back"):  # a mask makes transformers read one
            model(input_ids=decoder.token, attention_mask=torch.ones(2, 21, dtype=torch.long))
    state = [decoder.token, decoder.position, decoder.logits, decoder.cache.column]
    state += [getattr(layer, name) for layer in decoder.cache.layers for name in _LAYER_STATE]
    assert [t.data_ptr() for t in state] == addresses


def test_refuses_what_it_cannot_decode(model):
    ids, mask = _batch((12, 9))
    with pytest.raises(ValueError, match="needs the model and inputs on a CUDA device"):
        FixedSlotDecoder(model, H2OCache(model, budget=8), ids, mask, cuda_graph=True)
    with pytest.raises(ValueError, match="padded on the left only"):
        FixedSlotDecoder(model, H2OCache(model, budget=8), ids, mask.flip(-1))
    used = H2OCache(model, budget=8)
    decoder = FixedSlotDecoder(model, used, ids, mask)
    with pytest.raises(ValueError, match="fresh H2OCache"):
        FixedSlotDecoder(model, used, ids, mask)
    with pytest.raises(ValueError, match="without attention_mask"), torch.no_grad():
        model(input_ids=decoder.token, attention_mask=torch.ones(2, 9), cache=decoder.cache)
    set_attention_options(model, key_padding_mask=mask.bool())  # the option and a model mask: one too many
    try:
        with pytest.raises(ValueError, match="own key padding mask"), torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    finally:
        set_attention_options(model, key_padding_mask=None)
