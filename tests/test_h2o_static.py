"""Fixed-slot H2O and window decoding: the same greedy tokens, logits and kept entries as the dynamic caches, step by
step, on ragged left-padded prompts, with budgets that evict at the prompt, that keep padding past it, and that the
prompt does not fill (empty slots first)."""

import copy
import functools

import pytest
import torch

import ctxaware.attention
from ctxaware import generation
from ctxaware.attention import set_attention_options
from ctxaware.eval.model import EvalModel
from ctxaware.eval.registry import EvalOptions, get_task
from ctxaware.methods import h2o_static
from ctxaware.methods.h2o import H2OCache, H2OLayer, WindowCache
from ctxaware.methods.h2o_static import (
    FINISH_CHECK_STEPS,
    FixedSlotDecoder,
    FixedSlotLayer,
    generate_fixed_slots,
    generate_in_slots,
)
from ctxaware.switches import apply_generation_hooks
from tests.eval_fakes import install_fake_world
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
    """What a CUDA-graph capture forbids, on the CPU: no tensor value reaches Python during a step, the EOS rule's
    included (the GPU path differs only inside the attention call, which runs the Triton kernels there), and the
    step's state stays in the tensors it started in (a replay writes to the addresses it captured)."""
    ids, mask = _batch((20, 9))
    decoder = FixedSlotDecoder(model, H2OCache(model, budget=12), ids, mask, eos_token_id=[5, 7], pad_token_id=PAD)
    state = [decoder.token, decoder.position, decoder.logits, decoder.finished, decoder.cache.column]
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
    state = [decoder.token, decoder.position, decoder.logits, decoder.finished, decoder.cache.column]
    state += [getattr(layer, name) for layer in decoder.cache.layers for name in _LAYER_STATE]
    assert [t.data_ptr() for t in state] == addresses


@pytest.mark.parametrize("cache_class", [H2OCache, WindowCache])
@pytest.mark.parametrize(
    "finish_steps, pad",
    [
        pytest.param((2, 3, None), PAD, id="one-row-runs-to-the-end"),
        pytest.param((4, 1, 5), PAD, id="every-row-finishes-early"),
        pytest.param((4, 1, 5), None, id="pad-defaults-to-the-first-eos"),
    ],
)
def test_rows_that_emit_eos_pad_after_it_and_the_host_stops_as_generate_does(model, cache_class, finish_steps, pad):
    """EOS ids are tokens the rows emit at `finish_steps` (None: never) without an EOS; each row then feeds and emits
    the pad token, and once every row has finished the host stops within `FINISH_CHECK_STEPS` steps, returning what
    `generate` returns."""
    ids, mask = _batch((20, 9, 14), seed=3)
    free = generate_fixed_slots(model, cache_class(model, budget=12), ids, mask, max_new_tokens=NEW).sequences
    eos = [int(free[row, ids.shape[1] + step]) for row, step in enumerate(finish_steps) if step is not None]
    expected = model.generate(
        input_ids=ids,
        attention_mask=mask,
        cache=cache_class(model, budget=12),
        max_new_tokens=NEW,
        do_sample=False,
        pad_token_id=pad,
        eos_token_id=eos,
        output_scores=True,
        return_dict_in_generate=True,
    )
    out = generate_fixed_slots(
        model,
        cache_class(model, budget=12),
        ids,
        mask,
        max_new_tokens=NEW,
        eos_token_id=eos,
        pad_token_id=pad,
        output_scores=True,
    )
    assert torch.equal(out.sequences, expected.sequences)
    for got, want in zip(out.scores, expected.scores, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    new = expected.sequences[:, ids.shape[1] :]
    ended = [next((step for step, token in enumerate(row) if token in eos), None) for row in new.tolist()]
    assert ended == list(finish_steps)  # rows finish at different steps; padding follows (pad or the first EOS)
    assert (new[0, ended[0] + 1 :] == (eos[0] if pad is None else pad)).all()
    if None not in finish_steps:  # every row finished: the host stopped at its first check after that
        assert new.shape[1] == max(finish_steps) + 1 < NEW
        assert out.cache.get_seq_length() == ids.shape[1] + FINISH_CHECK_STEPS - 1


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


# --- `--kv_cache h2o:B,slots` through the eval harness --------------------------------------------------------------


def _passkey(model, tokenizer, kv_cache, **generate_kwargs):
    task, options = get_task("passkey"), EvalOptions(progress=False, lengths=[40, 96], limit=2)
    setup = apply_generation_hooks(model, {"kv_cache": kv_cache})
    setup.generate_kwargs.update(generate_kwargs)
    try:
        lm = EvalModel(model, tokenizer, batch_size=2, setup=setup, progress=False)  # 2 batches of 2
        return [sample["response"] for sample in task.evaluate(lm, task.load(lm, options), options).samples]
    finally:
        setup.close()


@pytest.mark.parametrize("kind", ["h2o:12", "window:0.3"])
def test_eval_switch_decodes_in_fixed_slots_what_the_dynamic_cache_decodes(model, tiny_tokenizer, monkeypatch, kind):
    """passkey under `--kv_cache KIND,slots` answers what it answers under `KIND`, with the tokenizer's EOS (a token
    the model emits on its 4th step) cutting both, and every batch decoded in fixed slots."""
    install_fake_world(monkeypatch)
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(38)
    slot_batches = []

    def spy(*args, **kwargs):
        slot_batches.append(kwargs["eos_token_id"])
        return generate_fixed_slots(*args, **kwargs)

    monkeypatch.setattr(h2o_static, "generate_fixed_slots", spy)
    dynamic = _passkey(model, tokenizer, kind)
    assert slot_batches == []
    slots = _passkey(model, tokenizer, f"{kind},slots")
    assert slots == dynamic
    assert slot_batches == [38, 38]
    cut = len(tokenizer.decode([126, 70, 172], skip_special_tokens=True))  # what the model emits before the EOS
    assert [len(response) for response in dynamic] == [cut] * 4
    assert _passkey(model, tiny_tokenizer, f"{kind},slots") == _passkey(model, tiny_tokenizer, kind) != dynamic


def test_stop_strings_end_generation_at_a_check_with_the_texts_generate_gives_up_to_them(
    model, tiny_tokenizer, monkeypatch
):
    """Each row writes one of the stop strings at step 3, 3 or 5 (the texts of tokens it emits): `generate` stops
    after step 5, the fixed slots at their first check after it, and the texts agree up to the first stop string."""
    ids, mask = _batch((20, 9, 14), seed=3)
    prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]
    stops = ["W", "(", "2"]
    widths = []

    def spy(*args, **kwargs):
        out = generate_fixed_slots(*args, **kwargs)
        widths.append(out.sequences.shape[1] - args[2].shape[1])
        return out

    monkeypatch.setattr(h2o_static, "generate_fixed_slots", spy)
    options = dict(max_new_tokens=NEW, batch_size=3, progress=False, cache_factory=lambda: H2OCache(model, budget=12))
    dynamic = generation.generate(model, tiny_tokenizer, prompts, stop_strings=stops, **options)
    slots = generation.generate(
        model,
        tiny_tokenizer,
        prompts,
        stop_strings=stops,
        generate_fn=functools.partial(generate_in_slots, model),
        **options,
    )
    assert widths == [FINISH_CHECK_STEPS]
    first = [min((text.index(stop) for stop in stops if stop in text), default=None) for text in dynamic]
    assert first == [len(text) - 1 for text in dynamic]  # generate stopped each row at its stop string
    assert [text[: end + 1] for text, end in zip(slots, first, strict=True)] == dynamic
    without_stops = generation.generate(
        model, tiny_tokenizer, prompts, generate_fn=functools.partial(generate_in_slots, model), **options
    )
    assert widths[1:] == [NEW] and [text[: len(slot)] for text, slot in zip(without_stops, slots)] == slots
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(
        13
    )  # row 1's "(": it ends by EOS, the others by stop strings
    slot_generate = functools.partial(generate_in_slots, model)
    generation.generate(model, tokenizer, prompts, stop_strings=["W", "2"], generate_fn=slot_generate, **options)
    assert widths[2:] == [FINISH_CHECK_STEPS]


def test_eval_switch_refuses_what_fixed_slots_cannot_decode(model, tiny_tokenizer, monkeypatch):
    install_fake_world(monkeypatch)
    with pytest.raises(ValueError, match=r"greedy only, got beam_search.*drop `,slots`"):
        _passkey(model, tiny_tokenizer, "h2o:12,slots", num_beams=2)
    with pytest.raises(ValueError, match=r"greedy only, got greedy_search with \['repetition_penalty'\]"):
        _passkey(model, tiny_tokenizer, "window:12,slots", repetition_penalty=1.2)
    ids, mask = _batch((12, 9))
    with pytest.raises(ValueError, match=r"greedy only, got sample"):
        generate_in_slots(
            model, input_ids=ids, attention_mask=mask, cache=H2OCache(model, 8), max_new_tokens=4, do_sample=True
        )
    with pytest.raises(ValueError, match="stop_strings need the tokenizer"):
        generate_in_slots(
            model, input_ids=ids, attention_mask=mask, cache=H2OCache(model, 8), max_new_tokens=4, stop_strings=["x"]
        )
    with pytest.raises(ValueError, match="unknown option 'fast'; the one option is `h2o:0.2,slots`"):
        apply_generation_hooks(model, {"kv_cache": "h2o:0.2,fast"})
