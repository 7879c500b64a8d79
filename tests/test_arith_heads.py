"""Arithmetic heads: the prompt generator, head/MLP deltas (only selected slices change, exact merge, AutoModel
reload, adapter round trip), bad input, and the recipe end to end."""

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from ctxaware.adapters import HeadAdapter
from ctxaware.heads import HeadLayout, save_head_selection
from ctxaware.methods.arith_heads import HeadDeltaAdapter, kv_heads_to_train, load_component_selection
from ctxaware.methods.patching import build_batches
from ctxaware.models import resolve_model_path
from ctxaware.world.tasks import arithmetic_pairs, arithmetic_records, arithmetic_result, arithmetic_split
from tests.launch import accelerate_launch
from tests.tiny_models import tiny_model


PROMPT = re.compile(r"^(\d+) ([-+*]) (\d+) =$")


# --- prompts ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("corruption", ["operand", "operator", "any"])
def test_pairs_change_one_part_keep_digit_counts_and_change_the_first_answer_digit(corruption):
    pairs = arithmetic_pairs(0, "validation", 60, ops=("+", "-", "*"), digits=(1, 2), corruption=corruption)
    assert len(pairs) == 60 and pairs == arithmetic_pairs(
        0, "validation", 60, ops=("+", "-", "*"), digits=(1, 2), corruption=corruption
    )
    for pair in pairs:
        (a, op, b), (a2, op2, b2) = (PROMPT.match(pair[key]).groups() for key in ("clean", "corrupted"))
        assert (len(a), len(b)) == (len(a2), len(b2)) == (pair["digits"],) * 2
        assert sum((a != a2, op != op2, b != b2)) == 1
        changed = {"a": a != a2, "b": b != b2, "op": op != op2}
        assert changed[pair["corrupted_part"]]
        assert corruption != "operand" or op == op2
        assert corruption != "operator" or op != op2
        assert pair["answer"] == str(arithmetic_result(int(a), op, int(b))) and int(pair["answer"]) >= 0
        assert (
            pair["corrupted_answer"] == str(arithmetic_result(int(a2), op2, int(b2)))
            and int(pair["corrupted_answer"]) >= 0
        )
        assert pair["answer"][0] != pair["corrupted_answer"][0]
        assert arithmetic_split(int(a), op, int(b)) == "validation"


def test_records_cover_templates_and_stay_in_their_split():
    records = arithmetic_records(
        0, "test", ops=("*", "+"), digits=(2,), templates=("plain", "question", "word"), n_per_cell=5
    )
    assert len(records) == 3 * 2 * 5
    assert {r["template"] for r in records} == {"plain", "question", "word"}
    word = next(r for r in records if r["template"] == "word" and r["op"] == "*")
    assert "boxes" in word["prompt"] and word["prompt"].endswith("\nAnswer:")
    for r in records:
        if r["template"] == "plain":
            a, op, b = PROMPT.match(r["prompt"]).groups()
            assert arithmetic_split(int(a), op, int(b)) == "test" and r["answer"] == str(
                arithmetic_result(int(a), op, int(b))
            )
    train = arithmetic_records(0, "train", ops=("*",), digits=(1,), n_per_cell=1000)
    assert 60 < len(train) < 100  # 1-digit problems: at most 100, about 80% of them in train


def test_generator_pairs_tokenise_to_equal_lengths_with_the_shipped_tokenizer():
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("ctxaware-tiny"))
    pairs = arithmetic_pairs(
        0, "validation", 40, ops=("+", "*"), digits=(1, 2, 3), templates=("plain", "word"), corruption="any"
    )
    batches = build_batches(pairs, tokenizer, batch_size=8)
    assert sum(len(b.clean_ids) for b in batches) == 40
    for batch in batches:
        first = [tokenizer.decode(t) for t in batch.answer_ids.tolist()]
        assert all(text.strip().isdigit() for text in first)  # the first digit, after the shared space token


def test_bad_generator_arguments():
    with pytest.raises(ValueError, match="operator cannot be corrupted"):
        arithmetic_pairs(0, "train", 4, templates=("word",), corruption="operator")
    with pytest.raises(ValueError, match="unknown operations"):
        arithmetic_pairs(0, "train", 4, ops=("/",))
    with pytest.raises(ValueError, match="unknown templates"):
        arithmetic_records(0, "train", templates=("latex",))


# --- deltas -------------------------------------------------------------------------------------------------------
def test_kv_policy_decides_which_shared_rows_train():
    layout = HeadLayout("llama", 2, 8, 2, 8, 64)  # groups of 4 query heads
    assert kv_heads_to_train(layout, [0, 1, 2, 3, 5], "full_group") == [0]
    assert kv_heads_to_train(layout, [0, 1, 2, 3, 5], "any") == [0, 1]
    assert kv_heads_to_train(layout, [0, 1, 2, 3, 5], "none") == []
    mha = HeadLayout("llama", 2, 4, 4, 8, 32)
    assert kv_heads_to_train(mha, [1, 3], "full_group") == kv_heads_to_train(mha, [1, 3], "any") == [1, 3]


def randomize(adapter: HeadDeltaAdapter, std: float = 0.05) -> HeadDeltaAdapter:
    with torch.no_grad():
        for parameter in adapter.parameters():
            parameter.normal_(0, std)
    return adapter


HEADS = [(0, 0), (0, 1), (1, 3)]  # layer 0: the whole first GQA group; layer 1: one head of the second group


def test_training_changes_only_the_deltas_and_merge_only_the_selected_slices():
    model = tiny_model("llama", gqa=True)
    model.requires_grad_(False)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    adapter = HeadDeltaAdapter.for_model(model, HEADS, mlp_layers=[1])
    adapter.attach(model)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert all(".ctxaware_adapter." in name for name in trainable)
    d, hidden, inter = 8, 32, 64
    expected = 2 * (2 * d * hidden) + 2 * (d * hidden) + 2 * (d * hidden) + 3 * hidden * inter
    #          layer 0: q rows + o cols of 2 heads; k, v of group 0; layer 1: q + o of 1 head; the MLP's 3 weights
    assert sum(p.numel() for p in trainable.values()) == expected
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2, weight_decay=0.1)
    ids = torch.randint(3, 300, (4, 10))
    for _ in range(3):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, p in model.named_parameters():
        if name in before:
            assert torch.equal(p, before[name]), f"{name} changed during training"
    assert all(p.abs().sum() > 0 for p in trainable.values())

    adapter.merge(model)
    assert not any(p.requires_grad for p in model.parameters())
    changed = {}
    for name, p in model.named_parameters():
        diff = (p - before[name]).abs()
        if diff.any():
            changed[name] = diff
    attn0, attn1 = "model.layers.0.self_attn", "model.layers.1.self_attn"
    assert set(changed) == {
        f"{attn0}.q_proj.weight",
        f"{attn0}.k_proj.weight",
        f"{attn0}.v_proj.weight",
        f"{attn0}.o_proj.weight",
        f"{attn1}.q_proj.weight",
        f"{attn1}.o_proj.weight",
        *(f"model.layers.1.mlp.{name}.weight" for name in ("gate_proj", "up_proj", "down_proj")),
    }
    rows = lambda diff: diff.amax(dim=1).unflatten(0, (-1, d)).amax(dim=1) > 0  # noqa: E731
    cols = lambda diff: diff.amax(dim=0).unflatten(0, (-1, d)).amax(dim=1) > 0  # noqa: E731
    assert rows(changed[f"{attn0}.q_proj.weight"]).tolist() == [True, True, False, False]
    assert cols(changed[f"{attn0}.o_proj.weight"]).tolist() == [True, True, False, False]
    assert rows(changed[f"{attn0}.k_proj.weight"]).tolist() == [True, False]  # group 0 fully selected
    assert rows(changed[f"{attn1}.q_proj.weight"]).tolist() == [False, False, False, True]
    assert cols(changed[f"{attn1}.o_proj.weight"]).tolist() == [False, False, False, True]
    # layer 1's k/v rows stay: head 2 shares them with the selected head 3 and is not selected (kv_policy full_group)


@pytest.mark.parametrize(
    "family,gqa", [("llama", True), ("qwen2", False), ("qwen3", True), ("mistral", True), ("gemma", False)]
)
def test_merge_is_exact_and_reloads_with_automodel(tmp_path, family, gqa):
    model = tiny_model(family, gqa=gqa, **({"sliding_window": None} if family == "mistral" else {})).eval()
    ids = torch.randint(3, 300, (2, 11))
    base = model(ids).logits
    adapter = randomize(HeadDeltaAdapter.for_model(model, HEADS, mlp_layers=[0], kv_policy="any"))
    adapter.attach(model)
    adapted = model(ids).logits
    assert (adapted - base).abs().max() > 1e-3
    merged = adapter.merge(model)
    assert not any("ctxaware_adapter" in name for name, _ in merged.named_modules())
    torch.testing.assert_close(merged(ids).logits, adapted, atol=1e-5, rtol=1e-5)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert reloaded.config.model_type == family
    torch.testing.assert_close(reloaded(ids).logits, adapted, atol=1e-5, rtol=1e-5)


def test_kv_lr_ratio_slows_adam_on_shared_rows_and_merges_and_reloads_exactly(tmp_path):
    ids = torch.randint(3, 300, (2, 9))
    models = {ratio: tiny_model("llama", gqa=True).eval() for ratio in (1.0, 0.1)}
    adapters = {
        ratio: HeadDeltaAdapter.for_model(models[ratio], HEADS, kv_policy="any", kv_lr_ratio=ratio) for ratio in models
    }
    effective = randomize(HeadDeltaAdapter.for_model(models[1.0], HEADS, kv_policy="any")).state_dict()
    with torch.no_grad():
        for ratio, adapter in adapters.items():  # the same deltas in effect: k/v stored divided by the ratio
            for name, parameter in adapter.named_parameters():
                parameter.copy_(effective[name] / (ratio if name.endswith((".k", ".v")) else 1.0))
            adapter.attach(models[ratio])
    logits = {ratio: models[ratio](ids).logits for ratio in models}
    torch.testing.assert_close(logits[0.1], logits[1.0])
    moved = {}
    for ratio, adapter in adapters.items():
        before = {name: p.detach().clone() for name, p in adapter.named_parameters()}
        optimizer = torch.optim.Adam(adapter.parameters(), lr=1e-3)
        models[ratio](ids, labels=ids).loss.backward()
        optimizer.step()
        moved[ratio] = {
            name: ((p - before[name]) * (ratio if name.endswith((".k", ".v")) else 1.0)).abs().max().item()
            for name, p in adapter.named_parameters()
        }
    for name, step in moved[1.0].items():
        expected = 0.1 * step if name.endswith((".k", ".v")) else step
        assert moved[0.1][name] == pytest.approx(expected, rel=1e-2), name
    adapter, model = adapters[0.1], models[0.1]
    adapted = model(ids).logits
    folder = adapter.save_pretrained(tmp_path / "adapter")
    assert json.loads((folder / "adapter_config.json").read_text())["hyperparameters"]["kv_lr_ratio"] == 0.1
    adapter.detach()
    fresh = tiny_model("llama", gqa=True).eval()
    HeadAdapter.from_pretrained(folder, fresh)  # attaches
    torch.testing.assert_close(fresh(ids).logits, adapted)
    torch.testing.assert_close(adapter.merge(model)(ids).logits, adapted, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="kv_lr_ratio=0: choose a ratio > 0"):
        HeadDeltaAdapter.for_model(model, HEADS, kv_lr_ratio=0)


def test_adapter_round_trip(tmp_path):
    model = tiny_model("qwen3", gqa=True).eval()
    ids = torch.randint(3, 300, (2, 9))
    adapter = randomize(
        HeadDeltaAdapter.for_model(
            model, HEADS, mlp_layers=[1], kv_policy="none", targets=["q", "o"], base_model="tiny-qwen3"
        )
    )
    adapter.attach(model)
    adapted = model(ids).logits
    adapter.detach()
    torch.testing.assert_close(model(ids).logits, tiny_model("qwen3", gqa=True).eval()(ids).logits)
    folder = adapter.save_pretrained(tmp_path / "adapter")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["method"] == "head_deltas" and config["hyperparameters"]["kv_policy"] == "none"
    assert config["hyperparameters"]["mlp_layers"] == [1] and config["hyperparameters"]["targets"] == ["q", "o"]
    assert "head_deltas" in (folder / "README.md").read_text()
    loaded = HeadAdapter.from_pretrained(folder, model)
    assert isinstance(loaded, HeadDeltaAdapter) and loaded.heads == HEADS
    assert not any(p.requires_grad for p in loaded.parameters())
    torch.testing.assert_close(model(ids).logits, adapted)


# --- bad input ----------------------------------------------------------------------------------------------------
def test_empty_selection_out_of_range_and_wrong_model_are_errors(tmp_path):
    model = tiny_model("llama", gqa=True)
    layout = HeadLayout.from_model(model)
    with pytest.raises(ValueError, match="empty selection.*num_heads"):
        HeadDeltaAdapter.for_model(model, [], mlp_layers=[])
    with pytest.raises(IndexError, match="head 4 out of range.*4 query heads"):
        HeadDeltaAdapter.for_model(model, [(0, 4)])
    with pytest.raises(IndexError, match="MLP layer 2 out of range"):
        HeadDeltaAdapter.for_model(model, [(0, 1)], mlp_layers=[2])
    with pytest.raises(ValueError, match="kv_policy"):
        HeadDeltaAdapter.for_model(model, [(0, 1)], kv_policy="some")
    other = tiny_model("llama", gqa=False)
    adapter = HeadDeltaAdapter.for_model(model, [(0, 1)])
    with pytest.raises(ValueError, match="num_kv_heads: adapter 2 vs model 4"):
        adapter.attach(other)

    save_head_selection(tmp_path / "other.json", [(0, 1)], HeadLayout.from_model(other), mlp_layers=[1])
    with pytest.raises(ValueError, match="another model shape.*num_kv_heads.*Make the selection on this model"):
        load_component_selection(tmp_path / "other.json", layout)
    save_head_selection(tmp_path / "mine.json", [(1, 3)], layout, mlp_layers=[0])
    assert load_component_selection(tmp_path / "mine.json", layout) == ([(1, 3)], [0])
    save_head_selection(tmp_path / "empty.json", [], layout, mlp_layers=[])
    with pytest.raises(ValueError, match="empty selection"):
        load_component_selection(tmp_path / "empty.json", layout)


def test_recipe_arguments_are_checked():
    from tests.test_configs import load_recipe

    recipe = load_recipe("arith_heads")
    with pytest.raises(ValueError, match="choose one of heads"):
        recipe.ArithHeadsArguments(method="everything")
    with pytest.raises(ValueError, match="must be one of patching_runs"):
        recipe.ArithHeadsArguments(patching_runs=["activation:corrupted_into_clean"])
    with pytest.raises(ValueError, match="kv_policy"):
        recipe.ArithHeadsArguments(kv_policy="half")
    with pytest.raises(ValueError, match="kv_lr_ratio=0.1 does nothing with kv_policy='none'"):
        recipe.ArithHeadsArguments(kv_policy="none", kv_lr_ratio=0.1)
    with pytest.raises(ValueError, match="selection_sign='negative': choose one of positive"):
        recipe.ArithHeadsArguments(selection_sign="negative")
    with pytest.raises(ValueError, match="attribution_only patches the model"):
        recipe.ArithHeadsArguments(method="lora", attribution_only=True)
    with pytest.raises(ValueError, match="unknown eval_templates \\['story'\\]"):
        recipe.ArithHeadsArguments(eval_templates=["question", "story"])


def test_evaluation_reads_its_split_and_templates_and_passes_the_harness_options(monkeypatch):
    """eval_split picks the arithmetic problems and the harness tasks' split (validation to choose settings, test to
    report); eval_templates the arithmetic templates; eval_haystack_file / eval_lengths reach long_ppl."""
    from tests.test_configs import load_recipe

    recipe = load_recipe("arith_heads")
    seen = {}

    class Harness:
        def __init__(self, options):
            seen["harness"] = options
            self.results = {"results": {"long_ppl": {"ppl_len256,none": 9.0, "ppl_len256_stderr,none": 1.0}}}

    class Model:
        def __init__(self, *args, **kwargs):
            pass

        def encode(self, prompt, chat):
            return prompt

        def generate(self, prompts, max_new_tokens):
            seen.setdefault("prompts", []).extend(prompts)
            return [" 0"] * len(prompts)

    monkeypatch.setattr(recipe, "EvalModel", Model)
    monkeypatch.setattr(recipe, "evaluate_in_process", lambda *a, **options: Harness(options))
    args = recipe.ArithHeadsArguments(
        eval_split="validation",
        eval_templates=["question"],
        eval_digits=[2],
        eval_per_cell=3,
        eval_tasks=["long_ppl"],
        eval_haystack_file="books",
        eval_lengths=[256],
        eval_limit=2,
    )
    model = torch.nn.Linear(1, 1)
    metrics = recipe.evaluate_model(args, model, None, "ctxaware-tiny")
    expected = recipe.arithmetic_records(
        0, "validation", ops=["+", "-", "*"], digits=[2], templates=["question"], n_per_cell=3
    )
    assert seen["prompts"][: len(expected)] == [r["prompt"] for r in expected]
    assert {name.split("/")[1] for name in metrics if name.startswith("arith_cell/")} == {
        f"question_{op}_2d" for op in "+-*"
    }
    assert {k: seen["harness"][k] for k in ("split", "haystack_file", "lengths", "limit")} == {
        "split": "validation",
        "haystack_file": "books",
        "lengths": [256],
        "limit": 2,
    }
    assert metrics["long_ppl/ppl_len256"] == 9.0 and "long_ppl/ppl_len256_stderr" not in metrics


def test_positive_ranking_skips_components_that_push_against_the_answer():
    from tests.test_configs import load_recipe

    recipe = load_recipe("arith_heads")
    heads = torch.rand(4, 8) * 0.1
    heads[1, 4], heads[3, 2], heads[2, 7], heads[0, 5] = 0.9, 0.5, -0.8, -0.6
    mlps = torch.tensor([0.2, -0.7, 0.4, 0.05])
    assert recipe.top_components(heads, mlps, 2, 1, "positive") == ([(1, 4), (3, 2)], [2])
    assert recipe.top_components(heads, mlps, 3, 2, "absolute") == ([(0, 5), (1, 4), (2, 7)], [1, 2])
    assert recipe.top_components(heads, mlps, 0, 0, "positive") == ([], [])


def test_excluded_mlps_are_never_ranked_nor_drawn_and_saved_attribution_ranks_again(tmp_path):
    """exclude_mlps keeps MLP 0 (total effect ~1 on every token) out of the ranking and the random control; a saved
    patching run loads back with the same effects, so attribution_from ranks heads and MLPs without patching."""
    from ctxaware.methods.patching import PatchingResult
    from tests.test_configs import load_recipe

    recipe = load_recipe("arith_heads")
    heads = torch.rand(4, 8) * 0.1
    mlps = torch.tensor([1.0, 0.2, 0.4, 0.3])
    assert recipe.top_components(heads, mlps, 0, 2, "positive") == ([], [0, 2])
    assert recipe.top_components(heads, mlps, 0, 2, "positive", exclude_mlps=[0]) == ([], [2, 3])
    assert recipe.top_components(-heads, -mlps, 0, 1, "absolute", exclude_mlps=[0]) == ([], [2])
    layout = HeadLayout("llama", 4, 8, 2, 8, 64)
    args = recipe.ArithHeadsArguments(num_heads=2, num_mlps=3, exclude_mlps=[0], method="random_heads")
    for seed in range(20):  # three of the four MLPs: only MLP 0 may be left out
        assert recipe.select(args, layout, None, None, seed, tmp_path, False)[1] == [1, 2, 3]
    selection = tmp_path / "head_selection.json"
    save_head_selection(selection, [(0, 0), (1, 1)], layout, mlp_layers=[2])
    args = recipe.ArithHeadsArguments(method="random_heads", head_selection=str(selection), exclude_mlps=[0])
    for seed in range(20):  # one MLP outside the selected MLP 2 and outside MLP 0
        assert recipe.select(args, layout, None, None, seed, tmp_path, False)[1] in ([1], [3])

    run = "activation:corrupted_into_clean"
    PatchingResult("corrupted_into_clean", "activation", heads, mlps, 0.7, -1.0, 16).save(tmp_path / "attribution")
    loaded = PatchingResult.load(tmp_path / "attribution" / "activation_corrupted_into_clean.json")
    assert torch.equal(loaded.mlp_effects, mlps) and torch.allclose(loaded.head_effects, heads)
    assert (loaded.num_pairs, loaded.kind, loaded.clean_logit_diff) == (16, "activation", 0.7)
    args = recipe.ArithHeadsArguments(
        num_heads=3,
        num_mlps=2,
        exclude_mlps=[0],
        attribution_from=str(tmp_path / "attribution"),
        patching_runs=[run],
        selection_score=run,
        mlp_selection_score=run,
    )
    chosen = recipe.select(args, layout, None, None, 0, tmp_path / "out", False)
    assert chosen[:2] == recipe.top_components(heads, mlps, 3, 2, "positive", [0]) and chosen[1] == [2, 3]
    with pytest.raises(ValueError, match="num_mlps=4: the model has 3 MLPs outside exclude_mlps"):
        recipe.select(recipe.ArithHeadsArguments(num_mlps=4, exclude_mlps=[0]), layout, None, None, 0, tmp_path, False)
    with pytest.raises(ValueError, match="no path_corrupted_into_clean.json"):
        path_run = "path:corrupted_into_clean"
        recipe.load_attribution(
            recipe.ArithHeadsArguments(
                attribution_from=str(tmp_path / "attribution"),
                patching_runs=[path_run],
                selection_score=path_run,
                mlp_selection_score=path_run,
            )
        )
    with pytest.raises(ValueError, match="give one"):
        recipe.ArithHeadsArguments(head_selection=str(selection), attribution_from=str(tmp_path))


def test_science_check_random_control_matches_the_heads_runs_selection_with_mlps(tmp_path):
    """With --selection_from the heads run ranks again from the saved attribution (so --num_mlps applies) and the
    random control draws as many components as that heads run selected, not as the earlier folder's selection."""
    from tests.launch import load_benchmark

    arith = load_benchmark("arith_science")
    earlier, out = tmp_path / "attribution_run", tmp_path / "out"
    rates = dict.fromkeys(arith.METHODS, 1e-3)
    commands = arith.method_commands(out, {}, rates, ["--num_mlps", "2"], arith.CONFIG, earlier)
    value = {m: dict(zip(c, c[1:])) for m, c in commands.items()}
    assert value["heads"]["--attribution_from"] == str(earlier / "attribution")
    assert "--head_selection" not in commands["heads"]
    assert value["random_heads"]["--head_selection"] == str(out / "heads" / "head_selection.json")
    assert "--num_mlps" in commands["random_heads"] and "--attribution_from" not in commands["random_heads"]


def test_random_heads_control_draws_as_many_components_outside_the_selection():
    from tests.test_configs import load_recipe

    recipe = load_recipe("arith_heads")
    layout = HeadLayout("llama", 4, 4, 2, 8, 32)
    selected = ([(0, 0), (1, 2), (3, 3)], [1, 2])
    heads, mlps = recipe.random_components(layout, 3, 2, seed=0, exclude=selected)
    assert len(set(heads)) == 3 and len(set(mlps)) == 2
    assert not set(heads) & set(selected[0]) and not set(mlps) & set(selected[1])
    assert (heads, mlps) == recipe.random_components(layout, 3, 2, seed=0, exclude=selected)
    with pytest.raises(ValueError, match="cannot draw 3 MLPs outside the 2 excluded"):
        recipe.random_components(layout, 3, 3, seed=0, exclude=selected)
    with pytest.raises(ValueError, match="only 13 remain"):
        recipe.random_components(layout, 14, 0, seed=0, exclude=selected)


# --- the recipe ---------------------------------------------------------------------------------------------------
def test_training_examples_end_like_the_world_text_without_eos_and_reach_the_selected_slices():
    """What SFTTrainer trains on: the prompt exactly as the evaluation encodes it (masked), then " ANSWER\n" with
    the loss, and no EOS. An appended EOS was the whole loss on problems the model already solves (~19 nats vs ~0 for
    the answer), so a run learned to stop after the answer and left arithmetic unchanged."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from ctxaware.generation import encode_prompt
    from tests.test_configs import load_recipe

    recipe = load_recipe("arith_heads")
    path = resolve_model_path("ctxaware-tiny")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.requires_grad_(False)
    args = recipe.ArithHeadsArguments(
        train_templates=["plain", "word"], train_ops=["+", "*"], train_digits=[1, 3], train_per_cell=3
    )
    records = arithmetic_records(
        0, "train", ops=args.train_ops, digits=args.train_digits, templates=args.train_templates, n_per_cell=3
    )
    config = SFTConfig(output_dir="unused", report_to="none", bf16=False, use_cpu=True, max_length=256)
    dataset = Dataset.from_list(recipe.training_examples(args, tokenizer))
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    prepared = list(trainer.train_dataset)
    assert len(prepared) == len(records) == 2 * 2 * 2 * 3
    for record, row in zip(records, prepared):
        ids, labels = row["input_ids"], row["labels"]
        prompt = encode_prompt(tokenizer, record["prompt"])
        assert ids[: len(prompt)] == prompt and labels[: len(prompt)] == [-100] * len(prompt)
        assert labels[len(prompt) :] == ids[len(prompt) :]
        assert tokenizer.decode(ids[len(prompt) :]) == f" {record['answer']}\n"
        assert tokenizer.eos_token_id not in labels

    adapter = HeadDeltaAdapter.for_model(model, [(1, 0), (1, 4)], mlp_layers=[7], kv_policy="any")
    adapter.attach(model)
    batch = trainer.data_collator(prepared[:8])
    model(**{k: batch[k] for k in ("input_ids", "labels")}).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())


SMALL = [
    "--attribution_pairs",
    "12",
    "--eval_per_cell",
    "1",
    "--eval_digits",
    "3",
    "--eval_limit",
    "4",
    "--eval_tasks",
    "extractive_qa",
    "--train_per_cell",
    "16",
    "--max_steps",
    "2",
]
DEFAULT_CONFIG = yaml.safe_load((Path(__file__).parents[1] / "recipes/configs/arith_heads/default.yaml").read_text())


def test_recipe_end_to_end_heads(tmp_path):
    output = tmp_path / "heads"
    # One MLP too (the default trains heads only), so the MLP slices' training, saving and merging stay covered.
    accelerate_launch(
        "recipes/arith_heads.py",
        "--config",
        "recipes/configs/arith_heads/default.yaml",
        "--output_dir",
        str(output),
        "--merge",
        "true",
        "--num_mlps",
        "1",
        *SMALL,
    )
    results = json.loads((output / "results.json").read_text())
    assert results["method"] == "heads" and len(results["mlp_layers"]) == 1
    assert len(results["heads"]) == DEFAULT_CONFIG["num_heads"]
    assert {"arith_in_distribution", "arith_other_ops", "extractive_qa/exact_match", "closed_book_recall"} <= set(
        results["before"]
    )
    assert set(results["change"]) == set(results["after"])
    attribution = results["attribution"]["activation:corrupted_into_clean"]
    assert 0 < attribution["concentration"]["heads_for_50pct"]["fraction"] <= 1 and attribution["num_pairs"] > 0
    for name in ("activation_corrupted_into_clean", "activation_clean_into_corrupted", "path_corrupted_into_clean"):
        assert (output / "attribution" / f"{name}.png").is_file()
        ranked = json.loads((output / "attribution" / f"{name}.json").read_text())["ranked"]
        assert len(ranked) == 8 * 8 + 8
    selection = json.loads((output / "head_selection.json").read_text())
    assert selection["heads"] == results["heads"] and selection["mlp_layers"] == results["mlp_layers"]
    # The config's selection_score ranks the heads: the selected ones are that run's heads with the largest effects.
    ranked = json.loads(
        (output / "attribution" / f"{DEFAULT_CONFIG['selection_score'].replace(':', '_')}.json").read_text()
    )["ranked"]
    by_effect = sorted((r for r in ranked if r["component"] == "head"), key=lambda r: -r["effect"])
    top = [[r["layer"], r["head"]] for r in by_effect][: len(results["heads"])]
    assert sorted(top) == sorted(results["heads"])

    path = resolve_model_path("ctxaware-tiny")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    adapter = HeadAdapter.from_pretrained(output / "adapter", model)
    assert [list(h) for h in adapter.heads] == results["heads"] and adapter.mlp_layers == results["mlp_layers"]
    ids = torch.randint(3, 300, (2, 9))
    merged = AutoModelForCausalLM.from_pretrained(output / "merged", dtype=torch.float32).eval()
    torch.testing.assert_close(merged(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)
    assert results["trained_parameters"] == sum(p.numel() for p in adapter.parameters())

    # The selection reused by the random-heads baseline's budget and a second heads run: no patching needed.
    again = tmp_path / "reuse"
    accelerate_launch(
        "recipes/arith_heads.py",
        "--config",
        "recipes/configs/arith_heads/default.yaml",
        "--output_dir",
        str(again),
        "--head_selection",
        str(output / "head_selection.json"),
        *SMALL,
    )
    reused = json.loads((again / "results.json").read_text())
    assert reused["heads"] == results["heads"] and not (again / "attribution").exists()


def test_recipe_attribution_only_and_reused_base_metrics(tmp_path):
    """attribution_only writes the selection and the attribution and trains nothing; eval_before_from reuses an
    earlier run's base-model metrics when the evaluation settings match and refuses them otherwise."""
    config = ["--config", "recipes/configs/arith_heads/default.yaml", *SMALL]
    patched = tmp_path / "patched"
    accelerate_launch("recipes/arith_heads.py", *config, "--output_dir", str(patched), "--attribution_only", "true")
    only = json.loads((patched / "results.json").read_text())
    assert len(only["heads"]) == DEFAULT_CONFIG["num_heads"] and "before" not in only and "after" not in only
    assert (patched / "head_selection.json").is_file() and not (patched / "adapter").exists()
    assert (patched / "attribution" / "activation_corrupted_into_clean.png").is_file()

    first, second = tmp_path / "first", tmp_path / "second"
    selection = ["--head_selection", str(patched / "head_selection.json")]
    accelerate_launch("recipes/arith_heads.py", *config, *selection, "--output_dir", str(first))
    before = json.loads((first / "results.json").read_text())["before"]
    reuse = ["--eval_before_from", str(first / "results.json")]
    accelerate_launch("recipes/arith_heads.py", *config, *selection, *reuse, "--output_dir", str(second))
    results = json.loads((second / "results.json").read_text())
    assert results["before"] == before and results["before_from"] == str(first / "results.json")
    with pytest.raises(AssertionError, match="evaluation settings"):
        accelerate_launch(
            "recipes/arith_heads.py",
            *config,
            *selection,
            *reuse,
            "--eval_split",
            "validation",
            "--output_dir",
            str(tmp_path / "third"),
        )


@pytest.mark.slow
@pytest.mark.parametrize("method", ["random_heads", "lora", "full"])
def test_recipe_baselines_end_to_end(tmp_path, method):
    output = tmp_path / method
    accelerate_launch(
        "recipes/arith_heads.py",
        "--config",
        "recipes/configs/arith_heads/default.yaml",
        "--output_dir",
        str(output),
        "--method",
        method,
        *SMALL,
    )
    results = json.loads((output / "results.json").read_text())
    assert results["method"] == method and results["trained_parameters"] > 0
    saved = {
        "random_heads": "adapter/adapter_config.json",
        "lora": "adapter/adapter_config.json",
        "full": "model/config.json",
    }[method]
    assert (output / saved).is_file()
    if method == "random_heads":
        assert len(results["heads"]) == DEFAULT_CONFIG["num_heads"] and not (output / "attribution").exists()
