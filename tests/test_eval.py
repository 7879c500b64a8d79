"""Eval harness units: each task's metric against a hand-computed case (stub model, fake world), generation helpers
against direct computation, the results schema, and the generation-hook registry."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from ctxaware import generation, switches
from ctxaware.eval import data, metrics, output
from ctxaware.eval.registry import EvalOptions, get_task
from tests.eval_fakes import CONTEXT_QA, SUMMARIZATION, StubLM, by_question, install_fake_world
from tests.tiny_models import tiny_model


@pytest.fixture
def fake_world(monkeypatch):
    install_fake_world(monkeypatch)


def run_task(name, lm, **options):
    task, opts = get_task(name), EvalOptions(progress=False, **options)
    records = task.load(lm, opts)
    return records, task.evaluate(lm, records, opts)


# --- metrics ---------------------------------------------------------------------------------------------------


def test_rouge_l_on_known_strings():
    # LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat": P = R = 5/6.
    assert metrics.rouge_l("The cat sat on the mat.", "the cat is on the mat") == pytest.approx(5 / 6)
    # LCS(a b c d, a c e) = 2: P = 1/2, R = 2/3, F = 4/7.
    assert metrics.rouge_l("a b c d", "a c e") == pytest.approx(4 / 7)
    assert metrics.rouge_l("", "a") == 0.0
    assert metrics.rouge_l("same words", "Same, words!") == 1.0


def test_answer_matching():
    assert metrics.exact_match("The Bero.", "bero") == 1.0
    assert metrics.exact_match("in Bero", "Bero") == 0.0
    assert metrics.contains_answer("It is in Bero town", ["Tarn", "Bero"]) == 1.0
    assert metrics.contains_answer("Beronia", "Bero") == 0.0  # whole words only
    assert metrics.mean_stderr([1, 1, 0, 0]) == pytest.approx(math.sqrt((4 * 0.25 / 3) / 4))
    assert math.isnan(metrics.mean_stderr([1.0]))


# --- tasks on a stub model --------------------------------------------------------------------------------------


def test_arithmetic_k_of_n(fake_world, tiny_tokenizer):
    # Correct on both additions and on the one-digit product: 3 of 6.
    right = {"3 + 4": "7", "12 + 30": "42", "3 * 3": "9"}
    lm = StubLM(tiny_tokenizer, lambda text: next((f" {v} and more" for k, v in right.items() if k in text), " 0"))
    records, result = run_task("arithmetic", lm)
    assert len(records) == 6
    assert result.metrics["acc"] == 0.5
    assert result.stderrs["acc"] == pytest.approx(math.sqrt(0.3 / 6))
    assert (result.metrics["acc_add"], result.metrics["acc_sub"], result.metrics["acc_mul"]) == (1.0, 0.0, 0.5)
    assert result.metrics["acc_digits1"] == pytest.approx(2 / 3)
    assert result.metrics["acc_digits2"] == pytest.approx(1 / 3)
    assert result.extra["acc_by_op_digits"]["*"] == {"1": 1.0, "2": 0.0}


def test_arithmetic_limit_covers_every_cell(fake_world, tiny_tokenizer):
    from ctxaware.eval.arithmetic import interleave_cells

    records, _ = run_task("arithmetic", StubLM(tiny_tokenizer, lambda t: ""), limit=3)
    assert len({(r["op"], r["digits"]) for r in records}) == 3
    cells = [{"op": op, "digits": 1, "i": i} for op in "+-" for i in range(3)]
    assert [(r["op"], r["i"]) for r in interleave_cells(cells)[:4]] == [("+", 0), ("-", 0), ("+", 1), ("-", 1)]


def test_counterfactual_qa_rates(fake_world, tiny_tokenizer):
    # Alna: follows the context (Bero); Emet: follows memory (Gant); the others answer from the context.
    answer = by_question({"Alna": "Bero", "Corin": "Dask", "Emet": "Gant", "Hira": "Ivel"})
    # Log-likelihood prefers the context's answer only for Alna (Bero 0 > Tarn -1; Fiol -1 == Gant -1).
    lm = StubLM(tiny_tokenizer, answer, score=lambda ctx, cont: 0.0 if cont.strip() == "Bero" else -1.0)
    _, result = run_task("counterfactual_qa", lm, indicator="[CTX]")
    for variant in ("plain", "chat"):
        assert result.metrics[f"acc_{variant}"] == 0.75
        assert result.metrics[f"context_rate_{variant}"] == 0.5
        assert result.metrics[f"memory_rate_{variant}"] == 0.5
        assert result.metrics[f"prefers_context_{variant}"] == 0.5
    assert result.extra["n_counterfactual"] == 2
    assert all("[CTX]" in p for p in lm.prompts)
    assert sum("<|assistant|>" in p for p in lm.prompts) == len(CONTEXT_QA)  # the chat variant used the template


def test_extractive_qa_exact_match_and_contains(fake_world, tiny_tokenizer):
    lm = StubLM(tiny_tokenizer, by_question({"Corin": " Dask.\nQuestion: more", "Hira": " It is Ivel town"}))
    records, result = run_task("extractive_qa", lm)
    assert [r["answer"] for r in records] == ["Dask", "Ivel"]  # counterfactual records are left out
    assert result.metrics == {"exact_match": 0.5, "contains": 1.0}


def test_extractive_qa_appends_the_indicator(fake_world, tiny_tokenizer):
    lm = StubLM(tiny_tokenizer, by_question({"Corin": "Dask", "Hira": "Ivel"}))
    _, result = run_task("extractive_qa", lm, indicator="[CTX]", chat_template="on")
    assert len(lm.prompts) == 2 and all("[CTX]" in p for p in lm.prompts)
    assert result.metrics["contains"] == 1.0


def test_extractive_qa_squad_mapping(tiny_tokenizer):
    from datasets import Dataset

    squad = Dataset.from_dict(
        {
            "id": ["a", "b"],
            "title": ["T", "T"],
            "context": ["Bero is a town.", "Tarn is a river."],
            "question": ["What is Bero?", "What is Tarn?"],
            "answers": [
                {"text": ["a town", "town"], "answer_start": [8, 10]},
                {"text": ["a river"], "answer_start": [8]},
            ],
        }
    )
    records = data.real_records("extractive_qa", "squad", limit=1, dataset=squad)
    assert records == [
        {"context": "Bero is a town.", "question": "What is Bero?", "answer": "a town", "answers": ["a town", "town"]}
    ]
    tldr = Dataset.from_dict({"prompt": ["SUBREDDIT: r/x POST: long text\nTL;DR:"], "completion": [" short"]})
    (record,) = data.real_records("summarization", "tldr", None, dataset=tldr)
    assert record["reference"] == "short"
    assert record["post"] == "SUBREDDIT: r/x POST: long text"  # the harness adds its own TL;DR: prompt
    with pytest.raises(KeyError, match="lacks the column"):
        data.real_records("extractive_qa", "squad", None, dataset=tldr)
    with pytest.raises(ValueError, match="known: squad"):
        data.real_records("extractive_qa", "nq", None)


def test_niah_grid(fake_world, tiny_tokenizer, tmp_path):
    def answer(text):  # finds the needle only in the first half of the context
        body = text[: text.rfind("Question")]
        position = body.find("The secret word of Xo is ")
        return body[position:].split(" is ")[1].split(".")[0] if position < len(body) / 2 else "nothing"

    lm = StubLM(tiny_tokenizer, answer)
    records, result = run_task("niah", lm, lengths=[64, 128], depths=[0.0, 0.25, 1.0], limit=2, chat_template="off")
    assert len(records) == 2 * 3 * 2
    assert result.extra["grid"]["plain"] == [[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]]
    assert result.metrics["acc_plain"] == pytest.approx(2 / 3)
    assert result.metrics["acc_plain_len128"] == pytest.approx(2 / 3)
    result.plots["heatmap_plain"](tmp_path / "grid.png")
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"


def test_niah_found_counts_the_answers_first_token_apart_from_the_whole_answer(fake_world, tiny_tokenizer):
    """A reply whose answer starts with the answer's first token and then goes astray found the needle without copying
    it: `found` counts it, `acc` does not (the tiny model finds needles it cannot copy). A restated needle before the
    answer is skipped."""

    def answer(text):  # the needle's word cut to its first token, in the first half of the context only
        body = text[: text.rfind("Question")]
        position = body.find("The secret word of Xo is ")
        if position >= len(body) / 2:
            return "nothing"
        word = body[position:].split(" is ")[1].split(".")[0]
        pieces = [
            tiny_tokenizer.decode([i]) for i in tiny_tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        ]
        start = next(piece for piece in pieces if piece.strip()).strip()
        # near the start the reply restates the needle first, as chat models do
        return f" The secret word of Xo is {start} zzq" if position < len(body) / 8 else f" {start} zzq"

    records, result = run_task(
        "niah",
        StubLM(tiny_tokenizer, answer),
        lengths=[64, 128],
        depths=[0.0, 0.25, 1.0],
        limit=2,
        chat_template="off",
    )
    assert result.metrics["found_plain"] == pytest.approx(2 / 3)
    assert result.metrics["found_plain_len64"] == pytest.approx(2 / 3)
    multi_token = [len(tiny_tokenizer(" " + r["answer"], add_special_tokens=False)["input_ids"]) > 1 for r in records]
    assert any(multi_token)  # so some found needles are not copied
    for sample, multi in zip(result.samples, multi_token):
        assert sample["found"] == (1.0 if sample["depth"] < 1.0 else 0.0)
        if multi:
            assert sample["acc"] == 0.0


def test_niah_answer_span_reads_past_a_restated_needle():
    """Chat models restate the needle before the answer; its first token is read after the last " is "."""
    from ctxaware.eval import niah

    assert niah.answer_span("\n\nThe secret word of Dodi is shadok.\n\nWhat is") == "shadok."
    assert niah.answer_span(" sezas\n5 - 0 = 5") == "sezas"
    assert niah.answer_span("\n\nA:") == "A:"


def test_niah_haystack_too_short(fake_world, tiny_tokenizer, tmp_path):
    haystack = tmp_path / "hay.txt"
    haystack.write_text("Too short. ")
    with pytest.raises(ValueError, match="fewer than the longest requested context"):
        run_task("niah", StubLM(tiny_tokenizer, str), lengths=[64], haystack_file=str(haystack))


def test_passkey_by_length(fake_world, tiny_tokenizer):
    def answer(text):
        return " " + text.split("The pass key is ")[1][:5] if "[len=128]" in text else " 12345"

    _, result = run_task("passkey", StubLM(tiny_tokenizer, answer), lengths=[128, 256], limit=3)
    assert (result.metrics["acc"], result.metrics["acc_len128"], result.metrics["acc_len256"]) == (0.5, 1.0, 0.0)


@pytest.mark.parametrize(
    "reply, correct",
    [
        ("{key}", True),
        (" {key}. Remember it.", True),
        ("{key}\nThe pass key is 11111", True),
        ("{head}", False),  # a 2-digit prefix
        ("{key_but_last}", False),
        ("{key}7", False),  # a longer number that starts with the key
        (" 1{key}", False),
        ("The year 1999. The pass key is {key}", False),  # the first number answers
        ("", False),
    ],
)
def test_passkey_counts_only_the_exact_key(fake_world, tiny_tokenizer, reply, correct):
    def answer(text):
        key = text.split("The pass key is ")[1][:5]
        return reply.format(key=key, head=key[:2], key_but_last=key[:-1])

    records, result = run_task("passkey", StubLM(tiny_tokenizer, answer), lengths=[128], limit=4)
    assert result.metrics["acc"] == float(correct)
    assert all(len(r["answer"]) == 5 for r in records)


WORLD_TASKS = {  # task: the world generator its records come from
    "counterfactual_qa": "context_qa",
    "extractive_qa": "context_qa",
    "attention_allocation": "context_qa",
    "arithmetic": "arithmetic",
    "summarization": "summarization",
}


def test_world_tasks_evaluate_test_split_entities_by_default(tiny_tokenizer):
    """`ctxaware eval` without --split scores the world's test split: records about held-out entities (and held-out
    arithmetic), never the training split that pretraining saw."""
    from ctxaware.cli import build_parser
    from ctxaware.eval import cli, data
    from tests.world_splits import entity_splits, wrong_split_subjects

    args = build_parser().parse_args(["eval", "--tasks", ",".join(WORLD_TASKS), "--limit", "40"])
    options, tasks, _ = cli._validate(args)
    assert options.split == EvalOptions().split == "test"
    splits = entity_splits(data.world(options.seed))
    lm = StubLM(tiny_tokenizer, str)
    for task in tasks:
        records = get_task(task).load(lm, options)
        assert len(records) == 40, task
        wrong = [why for record in records if (why := wrong_split_subjects(WORLD_TASKS[task], record, "test", splits))]
        assert not wrong, f"{task}: {wrong[:3]}"


def test_summarization_rouge_preference_win_rate(fake_world, tiny_tokenizer, tmp_path):
    baseline = tmp_path / "baseline.jsonl"
    baseline.write_text("".join(json.dumps({"doc_id": i, "summary": "nothing"}) + "\n" for i in range(2)))
    lm = StubLM(tiny_tokenizer, lambda text: " Alna moved to Bero.\nmore" if "Alna" in text else " nothing")
    _, result = run_task("summarization", lm, baseline_samples=str(baseline))
    assert result.metrics["rouge_l"] == 0.5  # 1 for the reference, 0 for "nothing"
    assert result.metrics["preference"] == 0.5
    assert result.metrics["win_rate"] == 0.75  # a win and a tie
    assert result.samples[0]["summary"] == "Alna moved to Bero."
    assert len(SUMMARIZATION) == len(result.samples)


def test_summarization_makes_more_world_posts_than_a_split_holds_when_asked():
    task = get_task("summarization")
    default = task.load(None, EvalOptions(split="test"))
    more = task.load(None, EvalOptions(split="test", limit=2 * len(default)))
    assert len(more) == 2 * len(default) and more[: len(default)] == default  # the first posts stay the same
    assert len({r["post"] for r in more}) == len(more)
    validation = task.load(None, EvalOptions(split="validation", limit=len(more)))
    assert not {r["post"] for r in validation} & {r["post"] for r in more}


# --- generation and scoring helpers against direct computation ------------------------------------------------


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama").eval()


def test_batched_left_padded_generation_matches_one_by_one(llama, tiny_tokenizer):
    prompts = [generation.encode_prompt(tiny_tokenizer, t) for t in ["The river", "Question: What is 17 + 25?", "a"]]
    batched = generation.generate(llama, tiny_tokenizer, prompts, max_new_tokens=6, batch_size=3, progress=False)
    single = [generation.generate(llama, tiny_tokenizer, [p], max_new_tokens=6, progress=False)[0] for p in prompts]
    assert batched == single
    assert prompts[0][0] == tiny_tokenizer.bos_token_id


def test_loglikelihood_matches_direct_computation(llama, tiny_tokenizer):
    ctx, cont = [0, 5, 9, 14], [33, 40]
    short = ([0, 7], [8])
    (total, _), (short_total, _) = generation.loglikelihood(
        llama, tiny_tokenizer, [(ctx, cont), short], progress=False
    )
    with torch.no_grad():
        logprobs = torch.log_softmax(llama(torch.tensor([ctx + cont])).logits[0], -1)
    assert total == pytest.approx((logprobs[3, 33] + logprobs[4, 40]).item(), abs=1e-4)
    with torch.no_grad():
        direct = torch.log_softmax(llama(torch.tensor([[0, 7, 8]])).logits[0], -1)[1, 8].item()
    assert short_total == pytest.approx(direct, abs=1e-4)


class UniformLM(torch.nn.Module):
    """Zero logits: every token has probability 1/V, so the perplexity is exactly V."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    @property
    def device(self):
        return torch.device("cpu")

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab))


def test_token_nll_full_and_sliding():
    ids = list(range(50))
    nll, count = generation.token_nll(UniformLM(100), ids, window=50)
    assert count == 49 and nll == pytest.approx(49 * math.log(100))
    nll, count = generation.token_nll(UniformLM(100), ids, window=16, stride=5)
    assert count == 49  # every token after the first scored exactly once
    with pytest.raises(ValueError, match="pass a stride"):
        generation.token_nll(UniformLM(100), ids, window=16)


def test_token_nll_sliding_matches_manual(llama):
    ids = list(range(3, 43))
    nll, count = generation.token_nll(llama, ids, window=20, stride=10)
    with torch.no_grad():
        first = torch.nn.functional.cross_entropy(
            llama(torch.tensor([ids[:20]])).logits[0, :-1], torch.tensor(ids[1:20]), reduction="sum"
        )
        second = llama(torch.tensor([ids[10:30]])).logits[0, :-1]
        second = torch.nn.functional.cross_entropy(second[9:], torch.tensor(ids[20:30]), reduction="sum")
        third = llama(torch.tensor([ids[20:40]])).logits[0, :-1]
        third = torch.nn.functional.cross_entropy(third[9:], torch.tensor(ids[30:40]), reduction="sum")
    assert count == 39
    assert nll == pytest.approx((first + second + third).item(), rel=1e-5)


def test_long_ppl_uniform_model_is_vocab_size(tiny_tokenizer, tmp_path):
    text = tmp_path / "long.txt"
    text.write_text("The grass is green and the sky is blue. " * 200)
    lm = StubLM(tiny_tokenizer, str)
    lm.model = UniformLM(320)
    for stride in (None, 16):
        _, result = run_task("long_ppl", lm, lengths=[32, 64], limit=2, haystack_file=str(text), ppl_stride=stride)
        assert result.metrics == {"ppl_len32": pytest.approx(320), "ppl_len64": pytest.approx(320)}
    with pytest.raises(ValueError, match="fewer than"):
        run_task("long_ppl", lm, lengths=[4096], haystack_file=str(text))


# --- attention allocation against eager attention probabilities ---------------------------------------------------


def test_attention_allocation_matches_eager_attention(fake_world, tiny_tokenizer, tmp_path):
    from ctxaware.eval.attention_allocation import LABELS, labelled_prompt
    from ctxaware.eval.model import EvalModel

    model = tiny_model("llama").eval()
    lm = EvalModel(model, tiny_tokenizer, progress=False)
    records, result = run_task("attention_allocation", lm, chat_template="on")
    assert model.config._attn_implementation == "sdpa"  # restored
    mass = torch.tensor([result.extra["mass"][label] for label in LABELS]).permute(1, 2, 0)  # (layers, heads, labels)
    assert torch.allclose(mass.sum(-1), torch.ones(2, 4), atol=1e-5)

    eager = tiny_model("llama", attn_implementation="eager").eval()
    expected = torch.zeros(2, 4, len(LABELS))
    for record in records:
        ids, labels, first = labelled_prompt(lm, record["context"], record["question"], chat=True)
        assert {LABELS[label] for label in labels} == set(LABELS)
        with torch.no_grad():
            attentions = eager(torch.tensor([ids]), output_attentions=True).attentions
        onehot = torch.nn.functional.one_hot(torch.tensor(labels), len(LABELS)).float()
        for layer, probs in enumerate(attentions):
            expected[layer] += (probs[0, :, first:] @ onehot).mean(1) / len(records)
    assert torch.allclose(mass, expected, atol=1e-4)
    assert result.metrics["context_mass"] == pytest.approx(
        expected[..., LABELS.index("context")].mean().item(), abs=1e-4
    )
    result.plots["heatmap"](tmp_path / "alloc.png")
    assert (tmp_path / "alloc.png").stat().st_size > 0


# --- results schema ----------------------------------------------------------------------------------------------


def valid_results():
    return {
        "results": {"arithmetic": {"alias": "arithmetic", "acc,none": 0.5, "acc_stderr,none": 0.2}},
        "configs": {"arithmetic": {}},
        "versions": {"arithmetic": 1},
        "n-samples": {"arithmetic": {"original": 6, "effective": 6}},
        "higher_is_better": {"arithmetic": {"acc": True}},
        "config": {
            "model": "m",
            "batch_size": 1,
            "limit": None,
            "seed": 0,
            "chat_template": "off",
            "generation_hooks": {},
        },
        "git_hash": None,
        "date": 0.0,
        "ctxaware_version": "0",
        "transformers_version": "5",
        "torch_version": "2",
        "total_evaluation_time_seconds": "1.0",
    }


def test_results_schema():
    output.validate_results(valid_results())
    broken = valid_results()
    del broken["versions"]
    broken["results"]["arithmetic"]["acc"] = 1.0
    broken["results"]["arithmetic"]["x_stderr,none"] = 0.1
    with pytest.raises(ValueError) as error:
        output.validate_results(broken)
    message = str(error.value)
    assert "missing top-level key 'versions'" in message
    assert "'acc' is not 'metric,filter'" in message
    assert "has 'x_stderr,none' without 'x,none'" in message
    table = output.format_table(valid_results())
    assert "|arithmetic|" in table.replace(" ", "") and "0.5000" in table


# --- generation hooks --------------------------------------------------------------------------------------------


def test_generation_hooks_registry(monkeypatch):
    with pytest.raises(ValueError, match="no kind 'snapkv' is registered. Available now: full, h2o"):
        switches.apply_generation_hooks(None, {"kv_cache": "snapkv:0.2"})
    with pytest.raises(ValueError, match="no kind 'sideways' is registered.*ctxaware.methods.moh"):
        switches.apply_generation_hooks(None, {"moh": "sideways"})
    with pytest.raises(ValueError, match="Unknown generation switch"):
        switches.parse_switch("beam", "x")
    undone = []
    monkeypatch.setitem(switches._HOOKS, "steer", dict(switches._HOOKS["steer"]))

    @switches.register_generation_hook("steer", "test")
    def steer(model, args, setup):
        setup.generate_kwargs["steer_scale"] = float(args)
        setup.stack.callback(undone.append, args)

    setup = switches.apply_generation_hooks(None, {"kv_cache": None, "steer": "test:0.5", "moh": "off"})
    assert setup.generate_kwargs == {"steer_scale": 0.5}
    assert setup.applied == {"kv_cache": "full", "steer": "test:0.5", "moh": "off"}
    setup.close()
    assert undone == ["0.5"]
    with pytest.raises(ValueError, match="takes no arguments"):
        switches.apply_generation_hooks(None, {"kv_cache": "full:3"})


def test_h2o_kv_cache_switch(tiny_tokenizer):
    from ctxaware.eval.model import EvalModel

    model = tiny_model("llama").eval()
    prompts = [generation.encode_prompt(tiny_tokenizer, t) for t in ["The river Alna flows past", "Question: What"]]
    full = EvalModel(model, tiny_tokenizer, progress=False).generate(prompts, max_new_tokens=5)
    setup = switches.apply_generation_hooks(model, {"kv_cache": "h2o:1.0"})
    assert model.config._attn_implementation == "ctxaware"
    kept_everything = EvalModel(model, tiny_tokenizer, setup=setup, progress=False).generate(prompts, max_new_tokens=5)
    setup.close()
    assert model.config._attn_implementation == "sdpa"
    assert kept_everything == full  # a budget of the whole prompt evicts nothing
    setup = switches.apply_generation_hooks(model, {"kv_cache": "h2o:4"})
    assert len(EvalModel(model, tiny_tokenizer, setup=setup, progress=False).generate(prompts, max_new_tokens=5)) == 2
    setup.close()
    with pytest.raises(ValueError, match="needs a budget"):
        switches.apply_generation_hooks(model, {"kv_cache": "h2o"})
    assert model.config._attn_implementation == "sdpa"


def test_summarization_reward_model_scores(fake_world, tiny_tokenizer, tmp_path):
    from transformers import LlamaForSequenceClassification

    from tests.tiny_models import tiny_config

    torch.manual_seed(0)
    reward_model = LlamaForSequenceClassification(tiny_config("llama", num_labels=1)).eval()
    reward_model.save_pretrained(tmp_path / "rm")
    tiny_tokenizer.save_pretrained(tmp_path / "rm")
    lm = StubLM(tiny_tokenizer, lambda text: " Alna moved." if "Alna" in text else " Corin adopted a cat named Mip.")
    _, result = run_task("summarization", lm, reward_model=str(tmp_path / "rm"), batch_size=2)
    for record, sample in zip(SUMMARIZATION, result.samples):
        messages = [{"role": "user", "content": record["post"]}, {"role": "assistant", "content": sample["summary"]}]
        text = tiny_tokenizer.apply_chat_template(messages, tokenize=False)
        with torch.no_grad():
            expected = reward_model(**tiny_tokenizer(text, add_special_tokens=False, return_tensors="pt")).logits[0, 0]
        assert sample["reward"] == pytest.approx(expected.item(), abs=1e-5)
    assert result.metrics["reward"] == pytest.approx(sum(s["reward"] for s in result.samples) / 2)


@pytest.mark.parametrize("task", ["passkey", "niah"])
def test_retrieval_keys_differ_between_validation_and_test(fake_world, tiny_tokenizer, task):
    """Settings chosen on validation keys must not have seen the test keys; the test keys stay the world seed's."""
    grid = dict(lengths=[128], limit=3, chat_template="off") | ({"depths": [0.0, 0.5]} if task == "niah" else {})
    lm = StubLM(tiny_tokenizer, str)
    test, _ = run_task(task, lm, split="test", **grid)
    validation, _ = run_task(task, lm, split="validation", **grid)
    answers = [r["answer"] for r in test]
    assert not set(answers) & {r["answer"] for r in validation}
    assert answers == [r["answer"] for r in run_task(task, lm, split="test", **grid)[0]]  # deterministic
    assert data.sample_seed(0, "test") == 0  # the test split keeps the records reported before splits existed
