"""H2O cache: identical to the full cache when the budget holds everything, bounded by the budget otherwise, and
evicting exactly the keys a materialised-attention reference ranks lowest; streaming perplexity through it (long_ppl
under `--kv_cache`) equal to one-pass scoring without eviction and to sink + window attention for a recent-only
budget."""

from collections import Counter

import pytest
import torch
from transformers import DynamicCache

import ctxaware.attention
from ctxaware import generation
from ctxaware.attention import attention_modules, get_attention_options, set_attention_options
from ctxaware.eval.model import EvalModel
from ctxaware.eval.registry import EvalOptions, get_task
from ctxaware.kernels import AttentionPattern
from ctxaware.methods.h2o import H2OCache, H2OLayer, WindowCache, parse_budget
from ctxaware.switches import apply_generation_hooks
from tests.tiny_models import left_padded_prompts as _batch
from tests.tiny_models import tiny_model


PAD = 2


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", attn_implementation=ctxaware.attention.ATTN_IMPLEMENTATION).eval()


def _generate(model, cache, ids, mask, new=6):
    return model.generate(
        input_ids=ids,
        attention_mask=mask,
        cache=cache,
        max_new_tokens=new,
        do_sample=False,
        pad_token_id=PAD,
        output_scores=True,
        return_dict_in_generate=True,
    )


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


def test_scores_accumulate_over_prefill_and_every_decode_step(model):
    """With nothing evicted, a key's score is its attention mass summed over every query that saw it: the prefill's
    and each decode step's, as one materialised causal forward over the whole text gives them."""
    texts = _texts(rows=2, length=31, seed=5)
    cache = H2OCache(model, budget=1000)
    generation.streaming_token_nll(model, texts, cache, prefill=10)  # 10 tokens, then 20 decode steps
    with torch.no_grad():
        model.set_attn_implementation("eager")
        try:
            attentions = model(input_ids=torch.tensor(texts)[:, :30], output_attentions=True).attentions
        finally:
            model.set_attn_implementation(ctxaware.attention.ATTN_IMPLEMENTATION)
    kv_heads = model.config.num_key_value_heads
    for layer, probs in zip(cache.layers, attentions, strict=True):
        mass = probs.sum(-2)
        mass = mass.view(mass.shape[0], kv_heads, -1, mass.shape[-1]).sum(2)
        assert torch.equal(layer.positions[0, 0], torch.arange(30))
        torch.testing.assert_close(layer.scores, mass, rtol=1e-4, atol=1e-5)


def _layer(budget, sinks, recent, padding=(0,), stored=12, kv_heads=1):
    """An H2O layer holding `stored` keys whose values are their positions; rows start after `padding` pads."""
    layer = H2OLayer(budget, sinks, recent / budget)
    keys = torch.arange(stored, dtype=torch.float32).expand(len(padding), kv_heads, stored)[..., None].clone()
    layer.update(keys, keys.clone())
    real = torch.arange(stored)[None] >= torch.tensor(padding)[:, None]
    return layer, real


def test_sinks_are_kept_even_when_they_carry_no_mass():
    """The first `sinks` real tokens survive eviction whatever their score (H2O's attention-sink protection); row 1
    is left-padded, so its sinks are positions 3 and 4, and its pads go first."""
    layer, real = _layer(budget=6, sinks=2, recent=2, padding=(0, 3))
    mass = torch.arange(12.0).expand(2, 2, 12)  # two query heads share the key/value head; early keys weigh least
    layer.observe(mass, real)
    assert layer.positions[:, 0].tolist() == [[0, 1, 8, 9, 10, 11], [3, 4, 8, 9, 10, 11]]
    assert layer.keys[:, 0, :, 0].tolist() == layer.positions[:, 0].float().tolist()  # keys follow their scores
    assert layer.scores[:, 0].tolist() == [[0, 2, 16, 18, 20, 22], [6, 8, 16, 18, 20, 22]]
    no_sinks, real = _layer(budget=6, sinks=0, recent=2, padding=(0, 3))
    no_sinks.observe(mass, real)
    assert no_sinks.positions[:, 0].tolist() == [[6, 7, 8, 9, 10, 11]] * 2


@pytest.mark.parametrize("stored", [13, 20])  # one entry over the budget (a decode step: argmin) and many (topk)
@pytest.mark.parametrize("padding", [None, (0, 3, 12)])
def test_eviction_keeps_the_highest_priority_entries_in_storage_order(stored, padding):
    """Against a direct reference on seeded random mass: sinks and the recent window stay, padding goes first (which
    pads stay is arbitrary: all are masked), then the lowest summed mass; kept entries keep storage order, pads first."""
    budget, sinks, recent = 12, 2, 4
    layer, real = _layer(budget, sinks, recent, padding=padding or (0, 0, 0), stored=stored, kv_heads=2)
    real = None if padding is None else real
    mass = torch.rand(3, 4, stored, generator=torch.Generator().manual_seed(stored))
    layer.observe(mass, real)
    for row in range(3):
        real_positions = list(range(stored)) if real is None else real[row].nonzero().flatten().tolist()
        protected = set(real_positions[:sinks]) | set(range(stored - recent, stored))
        for head in range(2):
            score = mass[row, 2 * head : 2 * head + 2].sum(0)
            ranked = sorted(real_positions, key=lambda p: (p in protected, score[p].item()))
            expected = sorted(ranked[-budget:])
            pads = budget - len(expected)
            kept = layer.positions[row, head].tolist()
            assert kept[pads:] == expected and all(p not in real_positions for p in kept[:pads])
            assert layer.keys[row, head, :, 0].tolist() == [float(p) for p in kept]


def test_eviction_ranks_the_mass_summed_over_calls():
    """A heavy hitter of the first call that gets little mass in the second outranks a key that is heavy only now."""
    layer, real = _layer(budget=5, sinks=1, recent=1, stored=6)
    layer.observe(torch.tensor([[[0.0, 5, 4, 1, 3, 0]]]), real)
    assert layer.positions[0, 0].tolist() == [0, 1, 2, 4, 5]  # position 3 evicted
    new_key = torch.full((1, 1, 1, 1), 6.0)
    layer.update(new_key, new_key.clone())
    layer.observe(torch.tensor([[[0.0, 0, 0, 3, 2, 0]]]), torch.ones(1, 6, dtype=torch.bool))
    # summed: 1 -> 5, 2 -> 4, 4 -> 6, 5 -> 2; the latest call alone would keep 5 and drop 1 or 2
    assert layer.positions[0, 0].tolist() == [0, 1, 2, 4, 6]
    assert layer.scores[0, 0].tolist() == [0, 5, 4, 6, 0]


def test_window_cache_keeps_the_sinks_and_the_newest_tokens(model):
    """Budget 6 with 2 sinks, prompts of 10 tokens (row 1 left-padded by 3), 3 new tokens (2 fed back): positions
    count storage columns, padding included, as in H2O."""
    ids, mask = _batch(lengths=(10, 7), seed=5)
    cache = WindowCache(model, budget=6, sinks=2)
    calls = [Counter() for _ in attention_modules(model)]
    for module, log in zip(attention_modules(model), calls):
        get_attention_options(module).call_log = log
    try:
        _generate(model, cache, ids, mask, new=3)
    finally:
        set_attention_options(model, call_log=None)
    expected = torch.tensor([[0, 1, 8, 9, 10, 11], [3, 4, 8, 9, 10, 11]])  # sinks, then the 4 newest of 0..11
    kv_heads = model.config.num_key_value_heads
    for layer in cache.layers:
        assert torch.equal(layer.positions, expected[:, None, :].expand(-1, kv_heads, -1))
    # Bytes as H2O reports them: 2 rows x kv heads x 6 entries x head_dim x 4 bytes, keys and values, every layer.
    config = model.config
    assert cache.cache_bytes() == 2 * kv_heads * 6 * config.head_dim * 4 * 2 * config.num_hidden_layers
    assert generation.kv_cache_bytes(cache) == (cache.cache_bytes(), cache.cache_bytes() * 12 // 6)
    # No attention statistics were asked for: every call ran the fused SDPA path, none the reference.
    assert all(set(log) == {("dense", "sdpa")} for log in calls)


def test_window_budget_streams_like_sink_plus_window_attention_and_holds_h2os_bytes(model, tiny_tokenizer, tmp_path):
    texts, budget, sinks = _texts(seed=6), 12, 3
    streamed, _ = generation.streaming_token_nll(model, texts, WindowCache(model, budget=budget, sinks=sinks))
    set_attention_options(model, pattern=AttentionPattern.sliding_window(budget - sinks + 1, sinks=sinks))
    try:
        windowed = _one_pass_nll(model, texts)
    finally:
        set_attention_options(model, pattern=None)
    assert streamed == pytest.approx(windowed, rel=1e-5)
    text = tmp_path / "long.txt"
    text.write_text("The river Alna flows past the town of Bero. The passkey is 83512. Remember it. " * 40)
    window, h2o = (_long_ppl(model, tiny_tokenizer, text, f"{kind}:0.25") for kind in ("window", "h2o"))
    assert window.metrics["kv_bytes_len64"] == h2o.metrics["kv_bytes_len64"] == 16 * _entry_bytes(model)
    assert window.metrics["kv_full_bytes_len64"] == 63 * _entry_bytes(model)
    assert window.metrics["ppl_len64"] != pytest.approx(h2o.metrics["ppl_len64"], rel=1e-6)
    assert window.extra["kv_cache"] == "window:0.25"


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
    setup = apply_generation_hooks(model, {"kv_cache": "window:16"})
    try:
        cache = setup.cache_factory()
        assert type(cache) is WindowCache and cache.layers[0].budget == 16 and not cache.needs_key_mass
    finally:
        setup.close()
    with pytest.raises(ValueError, match="window:0.2"):
        apply_generation_hooks(model, {"kv_cache": "window"})


# --- streaming perplexity (long_ppl under --kv_cache) ---------------------------------------------------------------


def _texts(rows=3, length=48, seed=2):
    return torch.randint(3, 300, (rows, length), generator=torch.Generator().manual_seed(seed)).tolist()


def _one_pass_nll(model, texts):
    return [generation.token_nll(model, ids, window=len(ids))[0] for ids in texts]


def _entry_bytes(model):
    """Bytes of one token's keys and values over all layers (float32)."""
    config = model.config
    return config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * 4


def test_streaming_without_eviction_equals_one_pass(model):
    texts = _texts()
    reference = _one_pass_nll(model, texts)
    caches = {
        "dynamic, token by token": (DynamicCache(config=model.config), 1),
        "dynamic, default prefill": (DynamicCache(), None),
        "h2o above the length, token by token": (H2OCache(model, budget=1000), 1),
        "h2o 100% of the length": (H2OCache(model, budget=1.0, reference_length=48), None),
    }
    for name, (cache, prefill) in caches.items():
        nll, tokens = generation.streaming_token_nll(model, texts, cache, prefill=prefill)
        assert tokens == 47, name
        assert nll == pytest.approx(reference, rel=1e-5), name
        held, full = generation.kv_cache_bytes(cache)
        assert held == full == 3 * 47 * _entry_bytes(model), name  # every token but the last is fed


def test_prefill_up_to_the_budget_equals_token_by_token_decoding(model):
    texts = _texts(seed=3)
    stepwise, prefilled = (H2OCache(model, budget=0.3, reference_length=48) for _ in range(2))
    assert prefilled.get_max_length() == 15  # ceil(0.3 x 48): a fraction of the text, not of the first call
    by_step, _ = generation.streaming_token_nll(model, texts, stepwise, prefill=1)
    by_prefill, _ = generation.streaming_token_nll(model, texts, prefilled)
    assert by_prefill == pytest.approx(by_step, rel=1e-6)
    for a, b in zip(stepwise.layers, prefilled.layers, strict=True):
        assert torch.equal(a.positions, b.positions)  # the same keys evicted at every step
        assert a.keys.shape[-2] == 15


def test_recent_only_budget_streams_like_sink_plus_window_attention(model):
    """Budget B with K sinks and the rest recent: after each step the cache holds the sinks and the newest B - K
    keys, so query t attends to the sinks and keys t - (B - K) .. t: the one-pass `window` pattern with W = B - K + 1."""
    texts, budget, sinks = _texts(seed=4), 12, 3
    cache = H2OCache(model, budget=budget, sinks=sinks, recent_ratio=1.0)
    streamed, _ = generation.streaming_token_nll(model, texts, cache)
    set_attention_options(model, pattern=AttentionPattern.sliding_window(budget - sinks + 1, sinks=sinks))
    try:
        windowed = _one_pass_nll(model, texts)
    finally:
        set_attention_options(model, pattern=None)
    assert streamed == pytest.approx(windowed, rel=1e-5)
    assert streamed != pytest.approx(_one_pass_nll(model, texts), rel=1e-4)  # the window does lose context


def _long_ppl(model, tokenizer, text_file, kv_cache, **options):
    task = get_task("long_ppl")
    options = EvalOptions(progress=False, lengths=[64], limit=3, haystack_file=str(text_file), **options)
    setup = apply_generation_hooks(model, {"kv_cache": kv_cache})
    try:
        lm = EvalModel(model, tokenizer, batch_size=2, setup=setup, progress=False)  # 2 batches: one of 2, one of 1
        return task.evaluate(lm, task.load(lm, options), options)
    finally:
        setup.close()


def test_long_ppl_streams_through_the_kv_cache_switch(model, tiny_tokenizer, tmp_path):
    text = tmp_path / "long.txt"
    text.write_text("The river Alna flows past the town of Bero. The passkey is 83512. Remember it. " * 40)
    one_pass = _long_ppl(model, tiny_tokenizer, text, "full")
    assert set(one_pass.metrics) == {"ppl_len64"}  # no cache: one forward per window, no cache bytes
    kept_all = _long_ppl(model, tiny_tokenizer, text, "h2o:1.0")
    assert kept_all.metrics["ppl_len64"] == pytest.approx(one_pass.metrics["ppl_len64"], rel=1e-5)
    assert kept_all.metrics["kv_bytes_len64"] == kept_all.metrics["kv_full_bytes_len64"] == 63 * _entry_bytes(model)
    evicting = _long_ppl(model, tiny_tokenizer, text, "h2o:0.25")
    assert evicting.metrics["ppl_len64"] != pytest.approx(one_pass.metrics["ppl_len64"], rel=1e-4)
    assert evicting.metrics["kv_bytes_len64"] == 16 * _entry_bytes(model)  # ceil(0.25 x 64) entries per sample
    assert evicting.metrics["kv_full_bytes_len64"] == 63 * _entry_bytes(model)
    assert [s["doc_id"] for s in evicting.samples] == [0, 1, 2]
    assert evicting.extra["kv_cache"] == "h2o:0.25"
    with pytest.raises(ValueError, match="--ppl_stride cannot be combined with --kv_cache"):
        _long_ppl(model, tiny_tokenizer, text, "h2o:0.25", ppl_stride=16)
