"""recipes/context_sft.py end to end through `accelerate launch` on a tiny model, and its use of score files."""

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.launch import accelerate_launch
from tests.test_configs import load_recipe
from tests.tiny_models import build_tiny_tokenizer, tiny_model


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    tiny_model("llama").save_pretrained(path)
    build_tiny_tokenizer().save_pretrained(path)
    return path


def test_conditional_sft_trains_and_saves_the_indicator_with_the_adapter(base, tmp_path):
    out = tmp_path / "run"
    accelerate_launch(
        "recipes/context_sft.py",
        "--config",
        "recipes/configs/context_sft/default.yaml",
        "--model_name_or_path",
        str(base),
        "--dataset_limit",
        "24",
        "--max_steps",
        "2",
        "--output_dir",
        str(out),
    )
    summary = json.loads((out / "context_sft.json").read_text())
    assert summary["mode"] == "conditional" and summary["records"] == 24
    assert 0 < summary["turns_marked"] < 24  # percentile 25 of the scored turns
    card = (out / "README.md").read_text()
    assert f"base_model: {base}" in card and "<|context|>" in card
    tokenizer = AutoTokenizer.from_pretrained(out)
    token_id = tokenizer.convert_tokens_to_ids("<|context|>")
    assert token_id == summary["indicator_id"] == 320

    # The adapter loads on the resized base, and carries a trained indicator row that started at the phrase mean.
    model = AutoModelForCausalLM.from_pretrained(base)
    phrase = tokenizer(summary["indicator_init"], add_special_tokens=False)["input_ids"]
    init = model.get_input_embeddings().weight[phrase].mean(0).detach()
    model.resize_token_embeddings(len(tokenizer))
    tuned = PeftModel.from_pretrained(model, out)
    prompt = torch.tensor([[0, token_id]])
    row = tuned.get_input_embeddings()(prompt)[0, 1]
    assert not torch.allclose(row, init)  # trained
    assert torch.allclose(row, init, atol=0.1)  # two small steps from the mean-of-phrase start
    lora_b = [p for n, p in tuned.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # LoRA moved from its zero init

    # merged/ is a plain model with the tokenizer: same logits as base + adapter, loadable by `ctxaware eval --model`.
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert AutoTokenizer.from_pretrained(out / "merged").convert_tokens_to_ids("<|context|>") == token_id
    prompt = torch.tensor([[0, 5, 9, token_id, 4]])
    with torch.no_grad():
        torch.testing.assert_close(merged(prompt).logits, tuned(prompt).logits, atol=1e-4, rtol=1e-4)


def test_scores_file_must_match_the_data(tmp_path):
    recipe = load_recipe("context_sft")
    config = recipe.ContextSFTArguments(scores_path=str(tmp_path))
    records = [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        {"messages": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]},
    ]
    scored = [
        {**records[0], "context_scores": [{"user_index": 0, "chosen": True}]},
        {**records[1], "context_scores": [{"user_index": 0, "chosen": False}]},
    ]
    (tmp_path / "scores.jsonl").write_text("".join(json.dumps(s) + "\n" for s in scored))
    assert recipe.chosen_user_turns(config, None, None, records) == [[0], []]
    records[1]["messages"][0]["content"] = "changed"
    with pytest.raises(ValueError, match="was not scored on this data set"):
        recipe.chosen_user_turns(config, None, None, records)
    with pytest.raises(ValueError, match="mode must be"):
        recipe.ContextSFTArguments(mode="both")


def test_indicator_row_trains_through_trls_fused_head_when_embeddings_are_tied():
    # PEFT wraps a tied LM head for the indicator row in a TrainableTokensWrapper without `bias`, which TRL's fused
    # head reads (ctxaware-tiny and Llama-3.2 tie their embeddings): the recipe gives the wrapper the head's bias.
    from peft import LoraConfig, get_peft_model
    from trl.trainer.utils import add_fused_lm_head

    from ctxaware.methods.context import add_indicator_token

    recipe = load_recipe("context_sft")
    tokenizer = build_tiny_tokenizer()
    model = tiny_model("llama", tie_word_embeddings=True)
    token_id = add_indicator_token(model, tokenizer)
    add_fused_lm_head(model)
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=[token_id]))
    ids = torch.tensor([[0, 5, token_id, 9, 4, 7]])
    with pytest.raises(AttributeError, match="bias"):
        peft(input_ids=ids, labels=ids, fused_lm_head=True)
    keys = set(peft.state_dict())
    recipe.expose_lm_head_bias(peft)
    assert set(peft.state_dict()) == keys  # a plain attribute: the saved adapter is unchanged
    peft(input_ids=ids, labels=ids, fused_lm_head=True).loss.backward()
    (delta,) = [p for n, p in peft.named_parameters() if "trainable_tokens_delta" in n and p.requires_grad]
    assert delta.grad is not None and delta.grad.abs().sum() > 0
