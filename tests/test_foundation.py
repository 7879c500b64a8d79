import json

import pytest
import torch

from tests.launch import accelerate_launch
from tests.tiny_models import FAMILIES, tiny_config, tiny_model


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("gqa", [True, False], ids=["gqa", "mha"])
def test_tiny_family_forward_backward(family, gqa):
    model = tiny_model(family, gqa=gqa)
    config = model.config
    assert config.num_attention_heads // config.num_key_value_heads == (2 if gqa else 1)
    input_ids = torch.randint(3, config.vocab_size, (2, 12))
    out = model(input_ids=input_ids, labels=input_ids)
    assert out.logits.shape == (2, 12, config.vocab_size)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    q_proj = model.model.layers[0].self_attn.q_proj.weight
    assert q_proj.grad is not None and q_proj.grad.abs().sum() > 0


def test_tiny_config_rejects_unknown_family():
    with pytest.raises(ValueError, match="choose one of"):
        tiny_config("gpt-17")


def test_tiny_tokenizer_chat_template_marks_assistant_tokens(tiny_tokenizer):
    messages = [
        {"role": "user", "content": "What is 17 + 25?"},
        {"role": "assistant", "content": "42"},
    ]
    encoded = tiny_tokenizer.apply_chat_template(messages, return_assistant_tokens_mask=True, return_dict=True)
    ids, mask = encoded["input_ids"], encoded["assistant_masks"]
    assistant_ids = [token for token, keep in zip(ids, mask, strict=True) if keep]
    assert tiny_tokenizer.decode(assistant_ids) == "42" + tiny_tokenizer.eos_token
    assert ids[0] == tiny_tokenizer.bos_token_id
    prompt = tiny_tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|assistant|>\n")


def test_chat_template_rejects_unknown_role(tiny_tokenizer):
    with pytest.raises(Exception, match="Unknown role tool"):
        tiny_tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


@pytest.mark.slow
def test_two_process_cpu_launch_keeps_replicas_in_sync(tmp_path):
    out = tmp_path / "summary.json"
    accelerate_launch("tests/scripts/ddp_smoke.py", str(out), num_processes=2, timeout=300)
    summary = json.loads(out.read_text())
    assert summary["num_processes"] == 2
    assert summary["backend"] == "gloo"
    rank0, rank1 = summary["checksums"]
    assert rank0 == pytest.approx(rank1, rel=1e-6)  # gradients were averaged across ranks
    assert summary["weight_change"] > 0
