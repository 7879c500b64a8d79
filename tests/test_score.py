"""`ctxaware score`: the kernel label-mass metric against materialised attention, the log-likelihood gain against a
direct computation, selection, agreement statistics, and the command's outputs and errors."""

import json

import pytest
import torch

from ctxaware.cli import main
from ctxaware.methods.context import encode_conversation
from ctxaware.methods.context_scoring import auroc, heads_report, score_records, select_turns, spearman
from tests.tiny_models import build_tiny_tokenizer, tiny_model


RECORDS = [
    {
        "messages": [
            {
                "role": "user",
                "content": "Answer using the text.\n\nBero lies on the Alna.\n\nQuestion: Where is Bero?",
            },
            {"role": "assistant", "content": "On the Alna."},
            {"role": "user", "content": "And the passkey?"},
            {"role": "assistant", "content": "83512"},
        ],
        "kind": "context",
        "context": "Bero lies on the Alna.",
    },
    {
        "messages": [{"role": "user", "content": "What is 17 + 25?"}, {"role": "assistant", "content": "42"}],
        "kind": "knowledge",
        "context": None,
    },
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "The sky is blue. The grass is green. What colour is the grass?"},
            {"role": "assistant", "content": "Green, the text says."},
        ],
        "kind": "context",
        "context": "The sky is blue. The grass is green.",
    },
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def _materialised_scores(model, tokenizer, record, layer):
    """The paper's metric from output_attentions: per response-predicting row, the mass on the turn's user tokens,
    max over heads, mean over rows; averaged over layers when layer is None."""
    encoded = encode_conversation(tokenizer, record["messages"])
    with torch.no_grad():
        attentions = model(torch.tensor([encoded.input_ids]), output_attentions=True).attentions
    layers = range(len(attentions)) if layer is None else [layer]
    labels = torch.tensor(encoded.key_labels)
    scores = []
    for t, turn in enumerate(encoded.turns):
        rows = slice(turn.response[0] - 1, turn.response[1] - 1)
        per_layer = [attentions[k][0, :, rows][..., labels == t + 1].sum(-1).max(0).values.mean() for k in layers]
        scores.append(float(torch.stack(per_layer).mean()))
    return scores


@pytest.mark.parametrize("layer", [None, 1])
def test_label_mass_score_equals_materialised_attention(tokenizer, layer):
    model = tiny_model("llama", gqa=True, attn_implementation="eager")
    turns, heads = score_records(model, tokenizer, RECORDS, layer=layer, batch_size=2, progress=False)
    assert model.config._attn_implementation == "eager"  # restored
    for record, record_turns in zip(RECORDS, turns):
        expected = _materialised_scores(model, tokenizer, record, layer)
        assert [t["attention"] for t in record_turns] == pytest.approx(expected, abs=1e-5)
    assert heads[(0, 0)].shape == ((2 if layer is None else 1), 4)
    select_turns(turns, "attention", percentile=50)
    report = heads_report(turns, heads, layer)
    assert {tuple(x) for x in report["ranked"]} == {
        (k, h) for k in ([0, 1] if layer is None else [1]) for h in range(4)
    }


def _mean_logprob(model, ids, start, end):
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    return logprobs[torch.arange(start - 1, end - 1), torch.tensor(ids[start:end])]


def test_loglik_gain_is_the_response_pmi_with_the_user_context(tokenizer):
    model = tiny_model("qwen2", gqa=False)
    record = RECORDS[2]
    turns, _ = score_records(model, tokenizer, [record], batch_size=1, progress=False)
    full = encode_conversation(tokenizer, record["messages"])
    ablated_messages = [record["messages"][0], {"role": "user", "content": ""}, record["messages"][2]]
    ablated = encode_conversation(tokenizer, ablated_messages)
    with_context = _mean_logprob(model, full.input_ids, *full.turns[0].response)
    without = _mean_logprob(model, ablated.input_ids, *ablated.turns[0].response)
    assert turns[0][0]["loglik_gain"] == pytest.approx(float((with_context - without).mean()), abs=1e-5)

    # span="context" removes only the context string; a record without a context scores exactly 0 on both metrics.
    turns, _ = score_records(model, tokenizer, RECORDS[1:3], span="context", progress=False)
    assert turns[0][0]["loglik_gain"] == 0.0 and turns[0][0]["attention"] == 0.0 and turns[0][0]["span_tokens"] == 0
    ablated = encode_conversation(
        tokenizer,
        [record["messages"][0], {"role": "user", "content": " What colour is the grass?"}, record["messages"][2]],
    )
    without = _mean_logprob(model, ablated.input_ids, *ablated.turns[0].response)
    assert turns[1][0]["loglik_gain"] == pytest.approx(float((with_context - without).mean()), abs=1e-5)


def test_turns_beyond_max_length_are_left_unscored(tokenizer):
    model = tiny_model("llama")
    first_end = encode_conversation(tokenizer, RECORDS[0]["messages"]).turns[0].response[1]
    turns, _ = score_records(model, tokenizer, RECORDS[:1], max_length=first_end, progress=False)
    assert turns[0][0]["attention"] is not None and turns[0][1]["attention"] is None


def _turns(values):
    return [[{"attention": v, "loglik_gain": -v}] for v in values]


def test_selection_by_threshold_and_percentile():
    turns = _turns([0.1, 0.5, 0.9, 0.7])
    assert select_turns(turns, "attention", threshold=0.6) == 0.6
    assert [t[0]["chosen"] for t in turns] == [False, False, True, True]
    select_turns(turns, "attention", percentile=25)
    assert [t[0]["chosen"] for t in turns] == [False, False, True, False]
    with pytest.raises(ValueError, match=r"outside the attention scores' range \[0.1, 0.9\]"):
        select_turns(turns, "attention", threshold=0.95)


def test_spearman_and_auroc_by_hand():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)  # 1 - 6 * 2 / (4 * 15)
    assert spearman([1, 1, 1], [1, 2, 3]) is None
    assert auroc([0.9, 0.8, 0.3, 0.1], [True, True, False, False]) == 1.0
    assert auroc([0.9, 0.2, 0.3, 0.1], [True, True, False, False]) == 0.75  # 3 of 4 pairs ordered
    assert auroc([0.5, 0.5], [True, False]) == 0.5


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny")
    tiny_model("llama").save_pretrained(path)
    tokenizer.save_pretrained(path)
    data = path / "chats.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path, data


def test_score_command_writes_scores_summary_heads_and_histogram(saved_model, tmp_path, capsys):
    model, data = saved_model
    out = tmp_path / "scores"
    code = main(
        [
            "score",
            "--model",
            str(model),
            "--dataset",
            str(data),
            "--output",
            str(out),
            "--percentile",
            "50",
            "--select_by",
            "loglik_gain",
            "--no_progress",
            "--batch_size",
            "2",
        ]
    )
    assert code == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert [len(r["context_scores"]) for r in rows] == [2, 1, 1]
    assert rows[0]["messages"] == RECORDS[0]["messages"] and rows[0]["kind"] == "context"
    assert all(r["context_dependent"] == any(t["chosen"] for t in r["context_scores"]) for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["turns_scored"] == 4 and "auroc_attention_vs_kind" in summary
    heads = json.loads((out / "heads.json").read_text())
    assert len(heads["ranked"]) == 2 * 4
    assert (out / "histogram.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["scores"]  # no staging folder left behind


def test_score_command_errors(saved_model, tmp_path, capsys):
    model, data = saved_model
    base = ["score", "--model", str(model), "--dataset", str(data), "--output", str(tmp_path / "o"), "--no_progress"]
    assert main([*base, "--threshold", "7"]) == 2
    assert "outside the attention scores' range" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert main([*base, "--layer", "5"]) == 2
    assert "the model has 2 layers" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}) + "\n")
    assert main([*base[:3], "--dataset", str(bad), *base[5:]]) == 2
    assert "record 0: a conversation has no user turn" in capsys.readouterr().err
