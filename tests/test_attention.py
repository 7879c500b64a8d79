"""The kernel family behind transformers' AttentionInterface: parity with SDPA on every tiny family, padding,
packing, KV-cache generation, per-module options and statistics."""

import pytest
import torch

from ctxaware.attention import (
    ATTN_IMPLEMENTATION,
    attention_modules,
    get_attention_options,
    set_attention_options,
)
from ctxaware.kernels import AttentionPattern
from tests.tiny_models import FAMILIES, tiny_model


pytestmark = pytest.mark.usefixtures("stable_seed")  # every random input reproduces (tests/conftest.py)


def model_pair(family, gqa=True, **overrides):
    return (
        tiny_model(family, gqa=gqa, attn_implementation="sdpa", **overrides),
        tiny_model(family, gqa=gqa, attn_implementation=ATTN_IMPLEMENTATION, **overrides),
    )


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("gqa", [True, False], ids=["gqa", "mha"])
def test_logits_match_sdpa_with_left_and_right_padding(family, gqa):
    sdpa, ours = model_pair(family, gqa)
    input_ids = torch.randint(3, 320, (3, 21))
    mask = torch.ones_like(input_ids)
    mask[0, :6] = 0  # left padding
    mask[1, -4:] = 0  # right padding
    expected = sdpa(input_ids, attention_mask=mask).logits
    got = ours(input_ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours(input_ids).logits, sdpa(input_ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_greedy_generation_with_kv_cache_matches_sdpa(family):
    sdpa, ours = model_pair(family)
    input_ids = torch.randint(3, 320, (2, 9))
    mask = torch.ones_like(input_ids)
    mask[1, :3] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=2)
    assert torch.equal(ours.generate(input_ids, **kwargs), sdpa.generate(input_ids, **kwargs))


def test_autocast_mixed_dtypes_run_like_sdpa():
    # Under autocast RoPE hands over float32 q, k and a bfloat16 v; both implementations compute in bfloat16.
    sdpa, ours = model_pair("llama")
    input_ids = torch.randint(3, 320, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = sdpa(input_ids).logits, ours(input_ids).logits
    torch.testing.assert_close(got.float(), expected.float(), rtol=0.05, atol=0.05)


def test_packed_documents_do_not_attend_to_each_other():
    _, ours = model_pair("llama")
    first, second = torch.randint(3, 320, (1, 7)), torch.randint(3, 320, (1, 10))
    packed = torch.cat([first, second], dim=1)
    position_ids = torch.cat([torch.arange(7), torch.arange(10)])[None]
    logits = ours(packed, position_ids=position_ids).logits
    torch.testing.assert_close(logits[:, :7], ours(first).logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[:, 7:], ours(second).logits, rtol=1e-5, atol=1e-5)


def test_model_sliding_window_matches_sdpa():
    sdpa, ours = model_pair("mistral", sliding_window=5)
    input_ids = torch.randint(3, 320, (2, 19))
    torch.testing.assert_close(ours(input_ids).logits, sdpa(input_ids).logits, rtol=1e-5, atol=1e-5)
    dense = tiny_model("mistral", attn_implementation="sdpa", sliding_window=None)
    assert not torch.allclose(dense(input_ids).logits[:, -1], ours(input_ids).logits[:, -1], atol=1e-4)


def test_sf_pattern_is_set_per_module_and_acts_on_absolute_positions():
    sdpa, ours = model_pair("llama")
    input_ids = torch.randint(3, 320, (2, 24))
    dense_logits = sdpa(input_ids).logits
    set_attention_options(ours, pattern=AttentionPattern.sf(group_size=48, sinks=2))  # one group covers all
    torch.testing.assert_close(ours(input_ids).logits, dense_logits, rtol=1e-5, atol=1e-5)
    set_attention_options(ours, pattern=AttentionPattern.sf(group_size=8, sinks=2))
    sparse_logits = ours(input_ids).logits
    # Positions before G/2 see the same keys in every head; later ones lose keys outside their groups.
    torch.testing.assert_close(sparse_logits[:, :4], dense_logits[:, :4], rtol=1e-5, atol=1e-5)
    assert (sparse_logits[:, 12:] - dense_logits[:, 12:]).abs().max() > 1e-3


def test_statistics_reach_the_hook_with_normalised_mass():
    _, ours = model_pair("qwen2")
    seen = {}
    labels = torch.tensor([[0] * 5 + [1] * 10 + [2] * 5] * 2)
    set_attention_options(
        ours,
        layers=[1],
        key_mass=True,
        key_labels=labels,
        num_labels=3,
        on_stats=lambda module, stats: seen.update({module.layer_idx: stats}),
    )
    ours(torch.randint(3, 320, (2, 20)))
    assert list(seen) == [1]
    stats = seen[1]
    assert stats.key_mass.shape == (2, 4, 20)
    # Every query's probabilities sum to 1, so the per-key mass of a head sums to the number of queries.
    torch.testing.assert_close(stats.key_mass.sum(-1), torch.full((2, 4), 20.0))
    assert stats.label_mass.shape == (2, 4, 20, 3)
    torch.testing.assert_close(stats.label_mass.sum(-1), torch.ones(2, 4, 20))
    assert torch.all(stats.label_mass[:, :, :5, 1:] == 0)  # causal: early queries see no later span


def test_bad_options_and_unsupported_features_raise_clear_errors():
    _, ours = model_pair("llama")
    with pytest.raises(TypeError, match="unknown attention options"):
        set_attention_options(ours, patern=None)
    with pytest.raises(IndexError, match="2 attention layers"):
        set_attention_options(ours, layers=[2], key_mass=True)
    assert [m.layer_idx for m in attention_modules(ours)] == [0, 1]
    assert get_attention_options(attention_modules(ours)[0]).pattern is None
    _, windowed = model_pair("mistral", sliding_window=5)
    set_attention_options(windowed, pattern=AttentionPattern.sf(group_size=8))
    with pytest.raises(ValueError, match="sliding_window=None"):
        windowed(torch.randint(3, 320, (1, 12)))
    _, dropped = model_pair("llama", attention_dropout=0.1)
    dropped.train()
    with pytest.raises(ValueError, match="attention_dropout to 0"):
        dropped(torch.randint(3, 320, (1, 12)))


def test_plain_rows_keep_their_document_ids_while_a_cuda_graph_is_captured(monkeypatch):
    """Deciding that a row is not packed reads a value back from the GPU, which fails a CUDA graph's capture; while
    capturing, a plain row keeps its ids (one document: the same attention) and nothing is read back."""
    from ctxaware import attention as module

    plain = torch.arange(6)[None].expand(2, -1)
    assert module._doc_ids_from_positions(plain) is None
    monkeypatch.setattr(module, "_capturing", lambda tensor: True)
    assert module._doc_ids_from_positions(plain).tolist() == [[1] * 6] * 2
    _, ours = model_pair("llama")
    ids = torch.randint(3, 320, (2, 12))
    with torch.no_grad():
        captured = ours(ids, position_ids=torch.arange(12)[None]).logits
        monkeypatch.undo()
        plain_logits = ours(ids, position_ids=torch.arange(12)[None]).logits
    torch.testing.assert_close(captured, plain_logits)


def test_a_cuda_graph_warmup_takes_the_captured_path_and_leaves_no_memo_behind():
    """Warm-up calls made inside `cuda_graph_warmup` keep a plain row's ids as a capture does (so the kernel variants
    the capture launches are compiled before it); outside, the same tensor is decided again and found plain."""
    from ctxaware import attention as module

    plain = torch.arange(6)[None]
    assert module._doc_ids(plain, 2) is None
    with module.cuda_graph_warmup():
        assert module._doc_ids(plain, 2).tolist() == [[1] * 6] * 2  # the memo made outside is not reused
        with module.cuda_graph_warmup():  # nested: the outer warm-up still holds after the inner one
            pass
        assert module._doc_ids(plain, 2).tolist() == [[1] * 6] * 2
    assert module._doc_ids(plain, 2) is None  # nor is the one made inside


def test_document_ids_are_computed_once_per_position_tensor_and_follow_its_changes(monkeypatch):
    """The packed-or-not decision syncs with the GPU: one position-id tensor (one forward) decides once, and a new
    tensor, an in-place change or another batch size decides again."""
    from ctxaware import attention as module

    calls = []
    decide = module._doc_ids_from_positions
    monkeypatch.setattr(module, "_doc_ids_from_positions", lambda p: calls.append(1) or decide(p))
    memo = module._DocIdsMemo()
    packed = torch.cat([torch.arange(3), torch.arange(4)])[None]
    first = memo(packed, 2)
    assert memo(packed, 2) is first and len(calls) == 1
    assert first.tolist() == [[1, 1, 1, 2, 2, 2, 2]] * 2
    packed[0, 3] = 3  # one document now: in place, same tensor
    assert memo(packed, 2) is None and len(calls) == 2
    assert memo(packed, 1) is None and len(calls) == 3
    assert memo(torch.cat([torch.arange(5), torch.arange(2)])[None], 1).tolist() == [[1] * 5 + [2] * 2]
