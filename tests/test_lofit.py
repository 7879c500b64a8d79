"""LoFiT: head selection, training only the selected offsets, exact merge into o_proj (AutoModel reload), the recipe."""

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from ctxaware.adapters import HeadAdapter
from ctxaware.heads import HeadLayout, all_heads, random_heads, save_head_selection, top_heads
from ctxaware.methods.lofit import LoFiTAdapter
from ctxaware.world import CONTEXT_QA_PROMPT, build_world, closed_book_qa, context_qa
from tests.launch import accelerate_launch
from tests.tiny_models import build_tiny_tokenizer, tiny_model


def random_adapter(model, heads, *, scales=True, offsets=True) -> LoFiTAdapter:
    adapter = LoFiTAdapter(HeadLayout.from_model(model), heads, scales=scales, offsets=offsets, base_model="tiny")
    with torch.no_grad():
        for layer in adapter.layers.values():
            if offsets:
                layer.offset.normal_()
            if scales:
                layer.scale.normal_(0, 0.3)
    return adapter


@pytest.mark.parametrize(
    "family,gqa,merged_type",
    [
        ("llama", True, "llama"),
        ("qwen2", False, "llama"),
        ("qwen3", True, "qwen3"),
        ("mistral", True, "llama"),
        ("gemma", False, "gemma"),
    ],
)
def test_merge_is_exact_and_reloads_with_automodel(tmp_path, family, gqa, merged_type):
    overrides = {"sliding_window": None} if family == "mistral" else {}
    model = tiny_model(family, gqa=gqa, **overrides).eval()
    ids = torch.randint(3, 300, (2, 11))
    adapter = random_adapter(model, [(0, 0), (0, 3), (1, 2)])
    adapter.attach(model)
    adapted = model(ids).logits
    merged = adapter.merge(model)
    assert not any(name.endswith("ctxaware_adapter") for name, _ in merged.named_modules())
    torch.testing.assert_close(merged(ids).logits, adapted, atol=1e-5, rtol=1e-5)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert reloaded.config.model_type == merged_type
    assert all(layer.self_attn.o_proj.bias is not None for layer in reloaded.model.layers)
    torch.testing.assert_close(reloaded(ids).logits, adapted, atol=1e-5, rtol=1e-5)


def test_merge_keeps_an_existing_bias_and_refuses_sliding_windows():
    model = tiny_model("llama", attention_bias=True).eval()
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.bias.normal_()
    ids = torch.randint(3, 300, (1, 8))
    adapter = random_adapter(model, [(0, 1)], scales=False)
    adapter.attach(model)
    adapted = model(ids).logits
    torch.testing.assert_close(adapter.merge(model)(ids).logits, adapted, atol=1e-5, rtol=1e-5)
    windowed = tiny_model("mistral", sliding_window=64)
    with pytest.raises(ValueError, match="sliding-window attention.*sliding_window = None"):
        random_adapter(windowed, [(0, 1)]).merge(windowed)


def test_stage1_scales_start_small_and_selection_takes_the_largest_norms():
    torch.manual_seed(0)
    model = tiny_model("llama")
    layout = HeadLayout.from_model(model)
    stage1 = LoFiTAdapter(layout, all_heads(layout), scales=True, offsets=False, init_std=1e-3)
    scales = torch.cat([layer.scale for layer in stage1.layers.values()])
    assert scales.shape == (8, 8) and 5e-4 < scales.std().item() < 2e-3
    with torch.no_grad():
        stage1.layers["1"].scale[2] = 1.0  # norm 2.83
        stage1.layers["0"].scale[3] = -0.5  # norm 1.41: sign does not matter
    norms = stage1.scale_norms()
    assert norms.shape == (2, 4)
    torch.testing.assert_close(norms[1, 2], torch.tensor(8**0.5))
    assert top_heads(norms, 2) == [(0, 3), (1, 2)]
    assert top_heads(norms, 0.25) == [(0, 3), (1, 2)]
    assert stage1.l1_penalty().item() == pytest.approx(
        sum(layer.scale.abs().sum().item() for layer in stage1.layers.values())
    )
    with pytest.raises(ValueError, match="only 8"):
        top_heads(norms, 9)


def test_stage2_trains_only_the_selected_offsets():
    model = tiny_model("qwen2", gqa=True)
    model.requires_grad_(False)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    heads = [(0, 2), (1, 1)]
    adapter = LoFiTAdapter(HeadLayout.from_model(model), heads)
    adapter.attach(model)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert sorted(trainable) == [
        "model.layers.0.self_attn.ctxaware_adapter.offset",
        "model.layers.1.self_attn.ctxaware_adapter.offset",
    ]
    assert sum(p.numel() for p in trainable.values()) == len(heads) * 8
    optimizer = torch.optim.SGD(trainable.values(), lr=0.5)
    ids = torch.randint(3, 300, (4, 10))
    seen = []
    handle = model.model.layers[0].self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    for _ in range(3):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    handle.remove()
    for name, p in model.named_parameters():
        if name in before:
            assert torch.equal(p, before[name]), f"{name} changed"
    assert all(p.abs().sum() > 0 for p in trainable.values())
    # The offset reaches only head 2 of layer 0: o_proj's input differs from the base model's there alone.
    adapter.detach()
    base_input = []
    handle = model.model.layers[0].self_attn.o_proj.register_forward_pre_hook(lambda m, a: base_input.append(a[0]))
    model(ids)
    handle.remove()
    diff = (seen[-1] - base_input[0]).unflatten(-1, (4, 8)).abs().amax(dim=(0, 1, 3))
    assert diff[2] > 0 and torch.all(diff[[0, 1, 3]] == 0)


def test_adapter_needs_scales_or_offsets():
    with pytest.raises(ValueError, match="scales, offsets or both"):
        LoFiTAdapter(HeadLayout("llama", 2, 4, 2, 8, 32), [(0, 0)], scales=False, offsets=False)


def test_recipe_rejects_a_task_of_the_other_objective():
    from tests.test_configs import load_recipe

    recipe = load_recipe("lofit")
    with pytest.raises(ValueError, match="set `objective: dpo`"):
        recipe.LoFiTArguments(task="world/preference", objective="sft")
    with pytest.raises(ValueError, match="choose one of lofit"):
        recipe.LoFiTArguments(method="ito")


def test_chat_qa_records_put_the_question_in_the_chat_template_with_one_bos(tiny_tokenizer):
    from tests.test_configs import load_recipe

    recipe = load_recipe("lofit")
    args = recipe.LoFiTArguments(task="world/chat_qa")
    records = recipe.with_bos(recipe.load_records(args, "test", tiny_tokenizer), tiny_tokenizer)
    expected = closed_book_qa(build_world(0), "test")
    assert len(records) == len(expected)
    first = records[0]
    messages = [{"role": "user", "content": expected[0]["question"]}]
    assert first["prompt"] == tiny_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    bos = tiny_tokenizer.bos_token
    assert first["prompt"].startswith(bos) and first["prompt"].count(bos) == 1
    assert first["completion"] == " " + expected[0]["answer"]  # the world's answers follow one space
    plain = recipe.with_bos([{"prompt": "2 + 2 =", "completion": " 4"}], tiny_tokenizer)
    assert plain[0]["prompt"] == tiny_tokenizer.bos_token + "2 + 2 ="


def test_truthful_qa_answers_with_the_memorised_fact_against_the_passage(tiny_tokenizer):
    from tests.test_configs import load_recipe

    recipe = load_recipe("lofit")
    records = recipe.load_records(recipe.LoFiTArguments(task="world/truthful_qa"), "test", tiny_tokenizer)
    passages = context_qa(build_world(0), "test", n=300, counterfactual_rate=1.0, novel_rate=0.0)
    assert len(records) == len(passages) == 300
    for record, passage in zip(records, passages):
        assert record["prompt"] == CONTEXT_QA_PROMPT.format(**passage)
        assert record["completion"] == " " + passage["memory_answer"] != " " + passage["answer"]
        assert passage["answer"] in record["prompt"]  # the passage states the false value
    same_passages = recipe.load_records(recipe.LoFiTArguments(task="world/context_qa"), "test", tiny_tokenizer)
    assert [r["prompt"] for r in same_passages] == [r["prompt"] for r in records]


def test_arithmetic_question_records_are_right_disjoint_and_a_limit_keeps_every_cell(tiny_tokenizer):
    import re

    from tests.test_configs import load_recipe

    recipe = load_recipe("lofit")
    args = recipe.LoFiTArguments(task="world/arithmetic_question")
    splits = {split: recipe.load_records(args, split, tiny_tokenizer) for split in ("train", "validation", "test")}
    problems = {}
    for split, records in splits.items():
        problems[split] = set()
        for record in records:
            a, op, b = re.fullmatch(r"Question: What is (\d+) ([-+*]) (\d+)\?\nAnswer:", record["prompt"]).groups()
            assert record["completion"] == " " + str(eval(f"{a} {op} {b}"))
            problems[split].add((a, op, b))
        assert len(problems[split]) == len(records)
    assert not problems["train"] & problems["validation"] and not problems["train"] & problems["test"]
    assert not problems["validation"] & problems["test"]
    assert len(splits["train"]) > 1000 and 100 < len(splits["validation"]) <= 135
    cells = {(op, len(a)) for a, op, _ in problems["validation"]}
    assert len(cells) == 9  # + - * at 1-3 digits
    first = splits["validation"][:30]  # eval_limit keeps a prefix: shuffled, it still holds every operation and size
    firsts = {
        (re.search(r"([-+*])", r["prompt"]).group(1), len(re.search(r"\d+", r["prompt"]).group())) for r in first
    }
    assert len(firsts) >= 7
    assert recipe.load_records(args, "validation", tiny_tokenizer) == splits["validation"]  # the same order each time


def test_known_facts_truthful_splits_are_disjoint_and_every_passage_contradicts(tiny_tokenizer):
    from ctxaware.eval.metrics import contains_answer
    from tests.test_configs import load_recipe

    recipe = load_recipe("lofit")
    args = recipe.LoFiTArguments(task="known_facts/truthful", known_only=False)
    splits = {split: recipe.load_records(args, split, tiny_tokenizer) for split in ("train", "validation", "test")}
    subjects = {split: {r["fact"]["subject"] for r in records} for split, records in splits.items()}
    assert len(splits["train"]) == 2000 and len(splits["validation"]) == len(splits["test"]) == 48
    assert not subjects["train"] & subjects["validation"] and not subjects["train"] & subjects["test"]
    assert not subjects["validation"] & subjects["test"]
    assert recipe.distinct_facts(splits["train"]) == 109  # every training fact, several false answers each
    assert len({r["fact"]["counterfactual_answer"] for r in splits["train"] if r["fact"]["subject"] == "Oman"}) > 1
    for record in [r for records in splits.values() for r in records]:
        fact = record["fact"]
        assert fact["counterfactual_answer"] != fact["answer"] and record["completion"] == fact["answer"]
        assert fact["passage"] in record["prompt"] and fact["question"] in record["prompt"]
        assert contains_answer(fact["passage"], fact["counterfactual_answer"])
        assert not contains_answer(fact["passage"], fact["answer"])
    messages = [{"role": "user", "content": f"{fact['passage']}\n\nQuestion: {fact['question']}"}]
    assert record["prompt"] == tiny_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def test_known_facts_truthful_keeps_the_facts_the_model_completes_closed_book(tiny_tokenizer, monkeypatch):
    from ctxaware.eval.knowledge_conflict import load_facts, load_train_facts
    from tests.eval_fakes import StubLM
    from tests.test_configs import load_recipe
    from tests.tiny_gguf import byte_level_tokenizer

    recipe = load_recipe("lofit")
    facts = load_train_facts() + load_facts("test") + load_facts("validation")
    known = {facts[i]["question"] for i in (0, 3, 60, 120)}  # two capitals, a continent, a test capital
    answers = {f.get("probe") or f"The capital of {f['subject']} is": f for f in facts}

    def closed_book_reply(prompt: str) -> str:
        fact = next(f for probe, f in answers.items() if prompt.endswith(probe))
        return " " + fact["answer"] + "." if fact["question"] in known else " a city."

    stub = StubLM(byte_level_tokenizer(), closed_book_reply)
    monkeypatch.setattr(recipe, "EvalModel", lambda model, tokenizer, **options: stub)
    args = recipe.LoFiTArguments(task="known_facts/truthful")
    train = recipe.load_records(args, "train", tiny_tokenizer, model="base")
    assert {r["fact"]["question"] for r in train} == known - {facts[120]["question"]} and len(train) == 2000
    test = recipe.load_records(args, "test", tiny_tokenizer, model="base")
    assert [r["fact"]["question"] for r in test] == [facts[120]["question"]]
    with pytest.raises(ValueError, match="completes none of the validation facts closed-book"):
        recipe.load_records(args, "validation", tiny_tokenizer, model="base")
    with pytest.raises(ValueError, match="needs the base model"):
        recipe.load_records(args, "test", tiny_tokenizer)


def test_known_facts_truthful_score_counts_the_true_fact_not_the_passages():
    from ctxaware.eval.knowledge_conflict import REPLY_TOKENS
    from tests.test_configs import load_recipe
    from tests.tiny_gguf import CHAT_TEMPLATE, byte_level_tokenizer

    recipe = load_recipe("lofit")
    tokenizer = byte_level_tokenizer()  # pad is the end-of-turn token, as in SmolLM2, and chat prompts hold it
    tokenizer.chat_template = CHAT_TEMPLATE
    args = recipe.LoFiTArguments(task="known_facts/truthful", known_only=False)
    records = recipe.load_records(args, "validation", tokenizer)[:5]
    true, false = [r["fact"]["answer"] for r in records], [r["fact"]["counterfactual_answer"] for r in records]
    replies = [
        f"The capital is {true[0]}.\nIt is not {false[0]}.",  # right: only the first line counts
        false[1],  # the passage's answer
        f"{true[2]} or {false[2]}",  # both: not the truth
        f"{true[3]}ian",  # not the answer as a word
        "I do not know.",
    ]
    calls = []

    def generate(input_ids, attention_mask, max_new_tokens, **options):
        calls.append((attention_mask.sum(1).tolist(), max_new_tokens))
        reply_ids = [tokenizer(reply, add_special_tokens=False)["input_ids"] for reply in replies]
        width = max(map(len, reply_ids))
        padded = [ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids in reply_ids]
        return torch.cat([input_ids, torch.tensor(padded)], dim=1)

    model = SimpleNamespace(eval=lambda: None, device=torch.device("cpu"), generate=generate)
    assert recipe.score(model, tokenizer, records, "sft") == pytest.approx(1 / 5)
    lengths = [len(tokenizer(r["prompt"])["input_ids"]) for r in records]
    assert calls == [(lengths, REPLY_TOKENS)]  # the prompts' end-of-turn tokens are attended, not taken for padding


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", gqa=True).save_pretrained(path)
    build_tiny_tokenizer().save_pretrained(path)
    return path


def test_recipe_end_to_end(tmp_path, tiny_model_dir):
    output = tmp_path / "run"
    accelerate_launch(
        "recipes/lofit.py",
        "--config",
        "recipes/configs/lofit/default.yaml",
        "--model_name_or_path",
        str(tiny_model_dir),
        "--output_dir",
        str(output),
        "--max_train_samples",
        "16",
        "--eval_limit",
        "4",
        "--stage1_max_steps",
        "2",
        "--max_steps",
        "2",
        "--num_heads",
        "2",
        "--merge",
        "true",
        "--dataset_test_split",
        "validation",
        "--extra_eval_split",
        "test",
    )
    results = json.loads((output / "results.json").read_text())
    assert results["method"] == "lofit" and results["heads"] == 2
    assert results["trained_parameters"] == 2 * 8
    assert {"base_score", "score", "gain", "base_parameters"} <= set(results)
    assert results["eval_records"] == results["test_eval_records"] == 4  # validation scored, test scored too
    assert results["test_gain"] == results["test_score"] - results["test_base_score"]
    selection = json.loads((output / "head_selection.json").read_text())
    scores = torch.tensor(selection["scores"])
    assert selection["heads"] == [list(h) for h in top_heads(scores, 2)]
    assert (output / "head_scores.png").read_bytes()[:4] == b"\x89PNG"

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    adapter = HeadAdapter.from_pretrained(output / "adapter", model)
    assert adapter.training_config["task"] == "world/truthful_qa"
    assert [list(h) for h in adapter.heads] == selection["heads"]
    assert adapter.training_config["method"] == "lofit" and adapter.training_config["objective"] == "sft"
    ids = torch.randint(3, 300, (2, 9))
    merged = AutoModelForCausalLM.from_pretrained(output / "merged").eval()
    torch.testing.assert_close(merged(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_extra_eval_split_scores_base_and_tuned_model_on_its_own_records(tmp_path, tiny_model_dir, monkeypatch):
    from trl import TrlParser

    from tests.test_configs import load_recipe

    recipe = load_recipe("lofit")
    calls = []  # (first prompt of the records scored, whether an adapter is attached)

    def numbered_score(model, tokenizer, records, objective, batch_size=16):
        attached = any(name.endswith("ctxaware_adapter") for name, _ in model.named_modules())
        calls.append((records[0]["prompt"], len(records), attached))
        return float(len(calls))

    monkeypatch.setattr(recipe, "score", numbered_score)
    cli = ["--config", "recipes/configs/lofit/default.yaml", "--model_name_or_path", str(tiny_model_dir)]
    cli += ["--output_dir", str(tmp_path / "run"), "--max_train_samples", "8", "--eval_limit", "3"]
    cli += ["--stage1_max_steps", "1", "--max_steps", "1", "--num_heads", "2", "--report_to", "none"]
    cli += ["--dataset_test_split", "validation", "--extra_eval_split", "test"]
    results = recipe.main(*TrlParser(recipe.CONFIG_CLASSES).parse_args_and_config(cli))
    # base on validation, base on test, tuned on validation, tuned on test
    assert [results[k] for k in ("base_score", "test_base_score", "score", "test_score")] == [1.0, 2.0, 3.0, 4.0]
    assert results["test_gain"] == 2.0 and results["test_eval_records"] == 3
    (val, _, before), (test, n, _), (val_after, _, after), (test_after, _, after_test) = calls
    assert val == val_after != test == test_after and n == 3  # each split's own records, before and after
    assert not before and after and after_test  # the tuned model, adapter attached, scores both splits after training


def test_recipe_dpo_objective_trains_only_the_selected_offsets(tmp_path, tiny_model_dir):
    output = tmp_path / "dpo"
    accelerate_launch(
        "recipes/lofit.py",
        "--config",
        "recipes/configs/lofit/dpo_default.yaml",
        "--model_name_or_path",
        str(tiny_model_dir),
        "--output_dir",
        str(output),
        "--max_train_samples",
        "16",
        "--eval_limit",
        "4",
        "--stage1_max_steps",
        "2",
        "--max_steps",
        "2",
        "--num_heads",
        "3",
    )
    results = json.loads((output / "results.json").read_text())
    assert results["method"] == "lofit" and results["heads"] == 3 and results["trained_parameters"] == 3 * 8
    selection = json.loads((output / "head_selection.json").read_text())
    assert selection["heads"] == [list(h) for h in top_heads(torch.tensor(selection["scores"]), 3)]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    adapter = HeadAdapter.from_pretrained(output / "adapter", model)
    assert adapter.training_config["objective"] == "dpo" and adapter.training_config["task"] == "world/preference"
    offsets = torch.cat([layer.offset for layer in adapter.layers.values()])
    assert offsets.shape == (3, 8) and offsets.abs().sum() > 0  # two DPO steps moved them from their zero start


def test_random_heads_draw_with_head_seed_and_lora_uses_its_own_learning_rate(tmp_path, tiny_model_dir):
    common = [
        "--config",
        "recipes/configs/lofit/default.yaml",
        "--model_name_or_path",
        str(tiny_model_dir),
        "--max_train_samples",
        "8",
        "--eval_limit",
        "0",
        "--max_steps",
        "1",
        "--num_heads",
        "2",
    ]
    for name, seed in (("a", "5"), ("b", "6")):
        accelerate_launch(
            "recipes/lofit.py",
            *common,
            "--method",
            "random_heads",
            "--head_seed",
            seed,
            "--output_dir",
            str(tmp_path / name),
        )
    layout = HeadLayout.from_model(tiny_model("llama", gqa=True))
    for name, seed in (("a", 5), ("b", 6)):
        selection = json.loads((tmp_path / name / "head_selection.json").read_text())
        assert selection["heads"] == [list(h) for h in random_heads(layout, 2, seed)]
        assert json.loads((tmp_path / name / "results.json").read_text())["trained_parameters"] == 2 * 8

    accelerate_launch(
        "recipes/lofit.py",
        *common,
        "--method",
        "random_heads",
        "--head_seed",
        "5",
        "--exclude_heads",
        str(tmp_path / "a" / "head_selection.json"),
        "--output_dir",
        str(tmp_path / "c"),
    )
    avoided = json.loads((tmp_path / "c" / "head_selection.json").read_text())["heads"]
    assert len(avoided) == 2 and not set(map(tuple, avoided)) & set(random_heads(layout, 2, 5))

    from tests.test_configs import load_recipe

    recipe = load_recipe("lofit")
    args = recipe.LoFiTArguments(method="lora", lora_learning_rate=3e-4)
    training = recipe.LoFiTTrainingConfig(output_dir=str(tmp_path / "lora"), learning_rate=1.0)
    assert recipe.trl_config(training, "sft", learning_rate=args.lora_learning_rate).learning_rate == 3e-4


def test_random_heads_exclusion_rejects_bad_selections(tmp_path):
    from tests.test_configs import load_recipe

    recipe = load_recipe("lofit")
    layout = HeadLayout("llama", 2, 4, 2, 8, 32)
    save_head_selection(tmp_path / "other.json", [(0, 1)], HeadLayout("llama", 3, 4, 2, 8, 32))
    with pytest.raises(ValueError, match="another model shape"):
        recipe.draw_random_heads(
            recipe.LoFiTArguments(method="random_heads", exclude_heads=str(tmp_path / "other.json")), layout, seed=0
        )
    save_head_selection(tmp_path / "six.json", all_heads(layout)[:6], layout)
    args = recipe.LoFiTArguments(method="random_heads", num_heads=3, exclude_heads=str(tmp_path / "six.json"))
    with pytest.raises(ValueError, match="only 2 remain"):
        recipe.draw_random_heads(args, layout, seed=0)
    args.num_heads = 2
    assert recipe.draw_random_heads(args, layout, seed=0) == all_heads(layout)[6:]
    with pytest.raises(ValueError, match="only shapes a random_heads draw"):
        recipe.LoFiTArguments(method="lofit", exclude_heads=str(tmp_path / "six.json"))


def test_task_probe_keeps_replies_and_splits_wrong_ones_by_form(tmp_path):
    """`benchmarks/lofit_task_probe.py --replies`: every scored reply with its verdict, the score is their mean, and the
    wrong replies to integer answers split into bare integers and other forms, each counted from the replies."""
    import re
    import subprocess
    import sys

    from ctxaware.world.probe import matches

    out = tmp_path / "probe.json"
    command = [sys.executable, "benchmarks/lofit_task_probe.py", "--model", "ctxaware-tiny", "--limit", "24"]
    command += ["--tasks", "world/arithmetic_question", "--replies", "--out", str(out)]
    subprocess.run(command, check=True, capture_output=True)
    task = json.loads(out.read_text())["tasks"]["world/arithmetic_question"]
    replies = task["replies"]
    assert len(replies) == task["scored"] == 24
    assert task["score"] == sum(r["correct"] for r in replies) / 24
    wrong = [r["reply"].strip().split("\n")[0].strip() for r in replies if not r["correct"]]
    bare = sum(re.fullmatch(r"-?\d+", line) is not None for line in wrong)
    assert (task["wrong"], task["wrong_bare_integer"], task["wrong_other_form"]) == (
        len(wrong),
        bare,
        len(wrong) - bare,
    )
    assert all(r["correct"] == matches(r["reply"], r["answer"]) for r in replies)  # the recipe's verdict
    assert 0 < bare < len(wrong)  # both forms occur on the tiny model, so a swapped count shows


def test_lofit_seeds_summarises_lofit_against_the_draws_of_each_seed(tmp_path):
    """`benchmarks/lofit_seeds.py`: per seed, LoFiT's gain minus its best and its mean random draw; over seeds their
    mean, sd and standard error; the share of LoRA's gain only where every seed has LoRA."""
    import subprocess
    import sys

    def write(path, payload):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload))

    seeds = {0: (0.30, [0.20, 0.35, 0.10]), 1: (0.40, [0.25, 0.30]), 2: (0.20, [0.20, 0.30, 0.10])}
    for seed, (lofit, draws) in seeds.items():
        folder = tmp_path / f"seed{seed}"
        write(folder / "lofit" / "results.json", {"test_gain": lofit, "gain": 0.0})
        write(folder / "lofit" / "run_config.json", {"seed": seed})
        for i, gain in enumerate(draws):
            write(folder / f"random_heads_{i}" / "results.json", {"test_gain": gain, "gain": 0.0})
    write(tmp_path / "seed0" / "lora" / "results.json", {"test_gain": 0.6, "gain": 0.0})
    out = tmp_path / "seeds.json"
    folders = [str(tmp_path / f"seed{s}") for s in seeds]
    command = [sys.executable, "benchmarks/lofit_seeds.py", "--runs", *folders, "--split", "test", "--out", str(out)]
    subprocess.run(command, check=True, capture_output=True)
    result = json.loads(out.read_text())
    rows = result["seeds"]
    assert [r["seed"] for r in rows] == [0, 1, 2]
    best = [r["lofit_minus_best_random"] for r in rows]
    assert best == pytest.approx([0.30 - 0.35, 0.40 - 0.30, 0.20 - 0.30])
    assert [r["lofit_minus_mean_random"] for r in rows] == pytest.approx([0.30 - 0.65 / 3, 0.40 - 0.275, 0.0])
    over = result["over_seeds"]["lofit_minus_best_random"]
    sd = (sum((b - sum(best) / 3) ** 2 for b in best) / 2) ** 0.5
    assert over["mean"] == pytest.approx(sum(best) / 3) and over["sd"] == pytest.approx(sd)
    assert over["stderr"] == pytest.approx(sd / 3**0.5) and over["n"] == 3
    assert rows[0]["share_of_lora_gain"] == pytest.approx(0.5) and "share_of_lora_gain" not in result["over_seeds"]
