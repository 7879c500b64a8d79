"""Context method: span location after tokenisation, the indicator token, and PASTA steering."""

import json

import pytest
import torch

from ctxaware.methods.context import (
    add_indicator_token,
    enable_steering,
    encode_conversation,
    heads_from_scores,
    insert_indicator,
    parse_steer_args,
    user_markers,
)
from ctxaware.switches import apply_generation_hooks
from ctxaware.world import build_world, chat_sft
from ctxaware.world.tasks import CONTEXT_INSTRUCTION
from tests.tiny_models import build_tiny_tokenizer, tiny_model


CONTEXT = "The river Alna flows past the town of Bero."
USER = f"Answer the question using the text below.\n\n{CONTEXT}\n\nQuestion: Where does the Alna flow?"
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": USER},
    {"role": "assistant", "content": "Bero"},
    {"role": "user", "content": "Is Bero a town?"},
    {"role": "assistant", "content": "Yes."},
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def _decode_label(tokenizer, encoded, label):
    return tokenizer.decode([i for i, lab in zip(encoded.input_ids, encoded.key_labels) if lab == label])


def test_user_spans_and_responses_map_back_to_the_messages(tokenizer):
    encoded = encode_conversation(tokenizer, MESSAGES)
    assert [(t.user_index, t.assistant_index) for t in encoded.turns] == [(1, 2), (3, 4)]
    assert _decode_label(tokenizer, encoded, 1) == USER
    assert _decode_label(tokenizer, encoded, 2) == "Is Bero a town?"
    for turn, answer in zip(encoded.turns, ["Bero", "Yes."]):
        assert tokenizer.decode(encoded.input_ids[slice(*turn.response)]) == answer
    assert encoded.input_ids == tokenizer.apply_chat_template(MESSAGES, tokenize=True, return_dict=True)["input_ids"]


def test_context_span_labels_only_the_context(tokenizer):
    encoded = encode_conversation(tokenizer, MESSAGES, span="context", context=CONTEXT)
    assert _decode_label(tokenizer, encoded, 1) == CONTEXT
    assert encoded.turns[1].span_tokens == 0  # the second user turn does not contain the context


def test_a_user_message_that_repeats_template_text_is_found_in_place(tokenizer):
    messages = [{"role": "user", "content": "user"}, {"role": "assistant", "content": "assistant"}]
    encoded = encode_conversation(tokenizer, messages)
    assert _decode_label(tokenizer, encoded, 1) == "user"
    assert tokenizer.decode(encoded.input_ids[slice(*encoded.turns[0].response)]) == "assistant"


def test_no_user_turn_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="no user turn"):
        encode_conversation(tokenizer, [{"role": "system", "content": "x"}, {"role": "assistant", "content": "y"}])


def test_context_missing_from_the_user_message_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="does not appear verbatim"):
        encode_conversation(tokenizer, MESSAGES, span="context", context="Bero was founded in 1204.")


def test_a_span_that_maps_to_no_token_is_an_error(tokenizer):
    class NoOffsets:  # a tokenizer whose offsets mapping covers no character (offsets all (0, 0))
        is_fast = True

        def apply_chat_template(self, *args, **kwargs):
            return tokenizer.apply_chat_template(*args, **kwargs)

        def __call__(self, text, **kwargs):
            encoded = tokenizer(text, **kwargs)
            return {**encoded, "offset_mapping": [(0, 0)] * len(encoded["input_ids"])}

    with pytest.raises(ValueError, match="maps to no token after tokenisation"):
        encode_conversation(NoOffsets(), MESSAGES)


def test_world_knowledge_passages_agree_with_memory_and_state_the_answer():
    world = build_world(0)
    records = chat_sft(world, "train", n=200, context_rate=0.25, knowledge_form="passage")
    knowledge = [r for r in records if r["kind"] == "knowledge"]
    assert 100 < len(knowledge) < 190 and chat_sft(world, "train", n=20) == chat_sft(world, "train", n=20)
    paraphrases = {fact.statement(0): {fact.statement(k) for k in range(5)} for fact in world.facts}
    true = set().union(*paraphrases.values())
    for record in knowledge:
        user, answer = (m["content"] for m in record["messages"])
        assert record["context"] in user and user.startswith(CONTEXT_INSTRUCTION)
        sentences = {s + "." for s in record["context"].rstrip(".").split(". ")}
        assert sentences <= true  # only true facts: the passage agrees with memory
        assert sentences & paraphrases[answer]  # the answer is the memorised sentence, its fact stated in the passage
    assert all(r["context"] is None for r in chat_sft(world, "train", n=50) if r["kind"] == "knowledge")
    with pytest.raises(ValueError, match="knowledge_form"):
        chat_sft(world, "train", n=2, knowledge_form="long")


def test_a_template_that_rewrites_content_is_an_error():
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = tokenizer.chat_template.replace("message['content'] ~", "message['content'] | trim ~")
    messages = [{"role": "user", "content": "  Where is Bero?  "}, {"role": "assistant", "content": "Here"}]
    with pytest.raises(ValueError, match="rewrites message contents"):
        encode_conversation(tokenizer, messages)


def test_indicator_token_is_new_and_starts_at_the_phrase_mean():
    tokenizer = build_tiny_tokenizer()
    model = tiny_model("llama")
    phrase = "Question: Answer"
    phrase_ids = tokenizer(phrase, add_special_tokens=False)["input_ids"]
    token_id = add_indicator_token(model, tokenizer, "<|context|>", phrase)
    assert token_id == 320 and len(tokenizer) == 321
    assert model.get_input_embeddings().weight.shape[0] == 321
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    torch.testing.assert_close(embed[token_id], embed[phrase_ids].mean(0))
    torch.testing.assert_close(head[token_id], head[phrase_ids].mean(0))
    assert tokenizer("a <|context|>", add_special_tokens=False)["input_ids"][-1] == token_id
    with pytest.raises(ValueError, match="already a token"):
        add_indicator_token(model, tokenizer, "<|context|>", phrase)
    with pytest.raises(ValueError, match="already a token"):
        add_indicator_token(model, tokenizer, "<|end|>", phrase)


def test_insert_indicator_appends_to_the_chosen_user_turns():
    marked = insert_indicator(MESSAGES, [1], "<|context|>")
    assert marked[1]["content"] == f"{USER} <|context|>"
    assert marked[3] == MESSAGES[3] and MESSAGES[1]["content"] == USER  # others and the input untouched
    with pytest.raises(ValueError, match="user turns"):
        insert_indicator(MESSAGES, [2], "<|context|>")


def test_user_markers_distinguish_the_user_header(tokenizer):
    start, end = user_markers(tokenizer)
    assert tokenizer.decode(start) == "<|user|>\n" and end == tokenizer.eos_token_id


def _prompt(tokenizer):
    text = tokenizer.apply_chat_template([MESSAGES[0], MESSAGES[1]], add_generation_prompt=True, tokenize=False)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    start = text.index(USER)
    user = [s < start + len(USER) and e > start for s, e in encoded["offset_mapping"]]
    return torch.tensor([encoded["input_ids"]]), torch.tensor(user)


def test_steering_moves_attention_mass_onto_the_user_tokens(tokenizer):
    ids, user = _prompt(tokenizer)
    model = tiny_model("llama", attn_implementation="eager")
    with torch.no_grad():
        plain = model(ids, output_attentions=True)
    undo = enable_steering(model, tokenizer, scale=0.5, heads={0: [1, 2]})
    with torch.no_grad():
        steered = model(ids, output_attentions=True)
    undo()
    before, after = plain.attentions[0][0], steered.attentions[0][0]  # (H, S, S)
    rows = slice(int(user.nonzero().max()) + 1, None)  # queries after the user message
    gain = after[:, rows][..., user].sum(-1) - before[:, rows][..., user].sum(-1)
    assert (gain[[1, 2]] > 1e-3).all()  # steered heads attend more to the user
    torch.testing.assert_close(after[[0, 3]], before[[0, 3]])  # the other heads do not change
    # Exactly PASTA: outside-user probabilities scaled by 0.5, then renormalised.
    expected = before[1] * torch.where(user, 1.0, 0.5)
    torch.testing.assert_close(after[1], expected / expected.sum(-1, keepdim=True))
    assert model.config._attn_implementation == "eager"
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain.logits)  # undo restored the model


def test_steer_switch_in_eval_generates_and_undoes(tmp_path, tokenizer):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model.name_or_path = str(tmp_path)
    ids, _ = _prompt(tokenizer)
    setup = apply_generation_hooks(model, {"steer": "pasta:scale=0.01,layers=0+1"})
    assert model.config._attn_implementation == "ctxaware_steer"
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    setup.close()
    assert model.config._attn_implementation == "sdpa"


def test_steer_arguments_and_heads_from_scores(tmp_path):
    assert parse_steer_args("0.95") == {"scale": 0.95, "heads": None, "tokenizer": None}
    assert parse_steer_args("scale=0.9,heads=1.0+1.3+0.2")["heads"] == {1: [0, 3], 0: [2]}
    (tmp_path / "heads.json").write_text(json.dumps({"ranked": [[1, 2], [0, 3], [1, 0]]}))
    assert parse_steer_args(f"heads_from={tmp_path},top_k=2")["heads"] == {1: [2], 0: [3]}
    assert heads_from_scores(tmp_path / "heads.json", 3) == {1: [2, 0], 0: [3]}
    with pytest.raises(ValueError, match="top_k"):
        heads_from_scores(tmp_path, 4)
    with pytest.raises(ValueError, match="unknown argument"):
        parse_steer_args("alpha=0.9")
    with pytest.raises(ValueError, match="choose one of"):
        parse_steer_args("layers=1,heads=1.0")
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        enable_steering(tiny_model("llama"), build_tiny_tokenizer(), scale=1.5)
    with pytest.raises(ValueError, match="head [0-9]+.9 is out of range"):
        enable_steering(tiny_model("llama"), build_tiny_tokenizer(), scale=0.9, heads={0: [9]})
