"""The model families ctxaware attention runs: random tiny configs of each, logits checked against eager attention
(with left padding; Gemma 2's logit soft-capping included), the attention modules and their output projections found by role, and MoH attached where the
query projection can be read (refused, leaving the model untouched, where it cannot)."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import ctxaware.attention  # noqa: F401  (registers attn_implementation="ctxaware")
from ctxaware.attention import attention_modules, output_projection, set_attention_options
from ctxaware.methods.moh.adapter import MoHAdapter


COMMON = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=2,
    tie_word_embeddings=False,
)
# family -> (model_type, config overrides, name of the output projection)
FAMILIES = {
    "llama_attention_bias": ("llama", {"attention_bias": True}, "o_proj"),
    "qwen2": ("qwen2", {}, "o_proj"),
    "qwen3_wide_heads": ("qwen3", {"head_dim": 16}, "o_proj"),  # head_dim != hidden / heads
    "mistral_window": ("mistral", {"sliding_window": 8}, "o_proj"),
    "gemma": ("gemma", {"head_dim": 8}, "o_proj"),
    "gemma2_no_softcap": ("gemma2", {"head_dim": 8, "attn_logit_softcapping": None, "sliding_window": 8}, "o_proj"),
    "gemma2_softcap": ("gemma2", {"head_dim": 8, "attn_logit_softcapping": 0.5}, "o_proj"),  # a cap that bites
    "gemma3": ("gemma3_text", {"head_dim": 8, "sliding_window": 8}, "o_proj"),
    "phi3": ("phi3", {}, "o_proj"),
    "olmo2": ("olmo2", {}, "o_proj"),
    "granite": ("granite", {}, "o_proj"),
    "stablelm": ("stablelm", {}, "o_proj"),
    "gpt_neox": ("gpt_neox", {"num_key_value_heads": None, "rotary_pct": 0.5}, "dense"),
}


def build(family: str, attn_implementation: str):
    model_type, overrides, _ = FAMILIES[family]
    values = {k: v for k, v in {**COMMON, **overrides}.items() if v is not None or k != "num_key_value_heads"}
    config = AutoConfig.for_model(model_type, **values)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_eager(family):
    eager, ours = build(family, "eager").eval(), build(family, "ctxaware").eval()
    input_ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :5] = 0  # left padding
    with torch.no_grad():
        expected = eager(input_ids=input_ids, attention_mask=attention_mask).logits
        got = ours(input_ids=input_ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_modules_and_output_projection_by_role(family):
    model = build(family, "ctxaware")
    modules = attention_modules(model)
    assert len(modules) == 2 and len(set_attention_options(model, key_mass=True)) == 2
    expected = FAMILIES[family][2]
    assert all(output_projection(m) is getattr(m, expected) for m in modules)


@pytest.mark.parametrize("family", ["llama_attention_bias", "phi3"])
def test_moh_attaches_on_separate_and_fused_query_projections(family):
    model = build(family, "eager").eval()
    adapter = MoHAdapter.for_model(model, num_shared_heads=2, top_k=1)
    adapter.attach(model)
    input_ids = torch.randint(3, 128, (1, 12))
    with torch.no_grad():
        model(input_ids=input_ids)
    gates = ctxaware.attention.get_attention_options(attention_modules(model)[0]).head_gates
    assert gates.shape == (1, 12, 4) and torch.equal((gates != 0).sum(-1), torch.full((1, 12), 3))
    adapter.detach()
    assert model.config._attn_implementation == "eager"


def test_moh_refuses_an_unreadable_query_projection_before_touching_the_model():
    model = build("gpt_neox", "eager")
    adapter = MoHAdapter.for_model(model, num_shared_heads=2, top_k=1)
    for _ in range(2):  # a retry meets the same clear error, not a half-attached model
        with pytest.raises(ValueError, match="MoH routes on the query projection.*GPTNeoXAttention"):
            adapter.attach(model)
        assert model.config._attn_implementation == "eager"
        assert not any(hasattr(m, "ctxaware_adapter") for m in attention_modules(model)) and not adapter._handles


def test_a_failed_attach_leaves_the_model_as_it_was(monkeypatch):
    import ctxaware.methods.moh.adapter as moh

    model = build("llama_attention_bias", "eager")
    adapter = MoHAdapter.for_model(model, num_shared_heads=2, top_k=1)
    calls = []

    def failing_hook(module, router, width):
        calls.append(module)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return lambda *args: None

    monkeypatch.setattr(moh, "_gate_hook", failing_hook)
    with pytest.raises(RuntimeError, match="boom"):
        adapter.attach(model)
    assert model.config._attn_implementation == "eager" and not adapter._handles
    assert not any(hasattr(m, "ctxaware_adapter") for m in attention_modules(model))
    monkeypatch.undo()
    adapter.attach(model)  # and a retry succeeds
    adapter.detach()
