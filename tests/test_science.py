"""The scientific checks' pass/fail logic (`benchmarks/*_science.py`) on fixed inputs: each target met, missed, and at
its edges (exact thresholds, missing values, a baseline that did not improve)."""

import hashlib
import json
import random
import sys
import time
from pathlib import Path

import pytest

from tests.launch import load_benchmark


load = load_benchmark


def passes(targets: dict, key: str = "pass") -> dict[str, bool]:
    return {name: target[key] for name, target in targets.items()}


def test_thresholds_ignore_float_rounding_but_not_missing_values():
    common = load("science_common")
    assert 0.26 - 0.25 > 0.01 and common.at_most(0.26 - 0.25, 0.01)  # exactly one point is within one point
    assert not common.at_most(0.0101, 0.01) and not common.at_least(0.6999, 0.7)
    assert common.at_least(0.7, 0.7) and not common.at_least(None, 0.7) and not common.at_most(None, 0.7)


# --- arithmetic heads ----------------------------------------------------------------------------------------------


def arith_inputs(gains=None, heads_drops=None, fraction=3 / 64, share=0.6):
    arith = load("arith_science")
    gains = {"heads": 0.30, "random_heads": 0.10, "lora": 0.20, "full": 0.40} | (gains or {})
    drops = dict.fromkeys(arith.NON_ARITH, 0.0) | (heads_drops or {})
    results = {
        method: {
            "change": {"arith_in_distribution": gain}
            | {m: -drops[m] if method == "heads" else -0.05 for m in arith.NON_ARITH}
        }
        for method, gain in gains.items()
    }
    attribution = {
        "under_5pct": {"heads": 3, "fraction": fraction, "share": share},
        "heads_for_80pct": {"fraction": 0.2},
    }
    return arith.targets(results, attribution)


def test_arith_targets():
    assert all(passes(arith_inputs()).values())
    assert passes(arith_inputs(fraction=0.05))["fewer_than_5pct_of_heads_explain_most"] is False  # fewer than 5%
    assert passes(arith_inputs(share=0.5))["fewer_than_5pct_of_heads_explain_most"] is False  # more than half
    assert passes(arith_inputs(gains={"lora": 0.30}))["heads_gain_at_least_lora"] is True  # a tie is "as much"
    assert passes(arith_inputs(gains={"lora": 0.31}))["heads_gain_at_least_lora"] is False
    assert passes(arith_inputs(gains={"random_heads": 0.30}))["heads_beat_random_heads"] is False
    drop = "heads_non_arith_drop_at_most_1pt"
    assert passes(arith_inputs(heads_drops={"closed_book_recall": 0.26 - 0.25}))[drop] is True  # one point exactly
    assert passes(arith_inputs(heads_drops={"extractive_qa/contains": 0.02}))[drop] is False
    assert passes(arith_inputs(heads_drops={"extractive_qa/contains": -0.2}))[drop] is True  # a gain is no drop
    target = arith_inputs()[drop]
    assert target["drops"] == dict.fromkeys(load("arith_science").NON_ARITH, 0.0)
    assert target["lora_drops"] == dict.fromkeys(load("arith_science").NON_ARITH, 0.05)


def test_arith_book_perplexity_target_is_a_relative_rise_of_at_most_1pct():
    arith = load("arith_science")

    def with_ppl(heads_after):
        results = {
            method: {
                "change": {"arith_in_distribution": 0.1, "long_ppl/ppl_len256": after - 20.0},
                "before": {"long_ppl/ppl_len256": 20.0},
                "after": {"long_ppl/ppl_len256": after},
            }
            for method, after in {"heads": heads_after, "random_heads": 20.0, "lora": 20.4, "full": 25.0}.items()
        }
        attribution = {
            "under_5pct": {"heads": 3, "fraction": 0.04, "share": 0.6},
            "heads_for_80pct": {"fraction": 0.2},
        }
        return arith.targets(results, attribution)["heads_book_ppl_within_1pct"]

    assert with_ppl(20.2)["pass"] is True  # exactly 1% higher
    assert with_ppl(20.3)["pass"] is False
    assert with_ppl(15.0)["pass"] is True  # lower perplexity is no drop
    assert with_ppl(20.0)["full_relative_change"] == {"long_ppl/ppl_len256": pytest.approx(0.25)}
    assert "heads_book_ppl_within_1pct" not in arith_inputs()  # no long_ppl task: no target


# --- context awareness ---------------------------------------------------------------------------------------------


def context_targets(base=0.8, vanilla=0.5, indicator=0.75, arithmetic=(0.40, 0.40), aurocs=(0.9, 0.85)):
    context = load("context_science")
    results = {
        "counterfactual": {
            "base_chat": {"context_rate": base},
            "vanilla_chat": {"context_rate": vanilla},
            "conditional_indicator_chat": {"context_rate": indicator},
        },
        "general": {"arithmetic_plain": {"conditional": arithmetic[0], "vanilla": arithmetic[1]}},
        "scores": {"auroc_attention_vs_kind": aurocs[0], "auroc_loglik_gain_vs_kind": aurocs[1]},
    }
    return context.targets(results)


def test_context_targets():
    targets = context_targets()
    assert all(passes(targets).values())
    assert targets["vanilla_drop_in_context_rate_chat"]["value"] == pytest.approx(0.3)
    assert targets["recovery_with_indicator"]["value"] == pytest.approx(0.25 / 0.3)
    assert passes(context_targets(indicator=0.7))["recovery_with_indicator"] is False  # 0.2 / 0.3 < 0.7
    # no drop to recover: both targets missed, however well the indicator does
    no_drop = passes(context_targets(base=0.5, vanilla=0.5, indicator=0.9))
    assert not no_drop["vanilla_drop_in_context_rate_chat"] and not no_drop["recovery_with_indicator"]
    worse = context_targets(base=0.4, vanilla=0.5, indicator=0.3)  # a negative drop must not make a ratio
    assert worse["recovery_with_indicator"]["value"] is None and not worse["recovery_with_indicator"]["pass"]
    missing = passes(context_targets(indicator=None))
    assert missing["vanilla_drop_in_context_rate_chat"] and not missing["recovery_with_indicator"]
    gap = "arithmetic_conditional_minus_vanilla"
    assert passes(context_targets(arithmetic=(0.26, 0.25)))[gap] is True  # one point, either way
    assert passes(context_targets(arithmetic=(0.25, 0.26)))[gap] is True
    assert passes(context_targets(arithmetic=(0.27, 0.25)))[gap] is False
    below = context_targets(arithmetic=(0.25, 0.27))  # conditional two points worse: missed, reported with its sign
    assert below[gap]["value"] == pytest.approx(-0.02) and below[gap]["pass"] is False
    aurocs = passes(context_targets(aurocs=(0.8, 0.79)))
    assert aurocs["auroc_attention_vs_kind"] and not aurocs["auroc_loglik_gain_vs_kind"]
    assert passes(context_targets(aurocs=(None, 0.9)))["auroc_attention_vs_kind"] is False


def test_context_targets_per_measure_run_and_skill():
    """SmolLM2's targets: each context measure's drop and each conditional run's recovery, each general skill's gap
    within two points; a skill the run did not measure is missed, not passed."""
    context = load("context_science")
    runs = ("conditional_attention", "conditional_loglik_gain")

    def rows(base, vanilla, attention, loglik):
        return {
            "base_chat": {"context_rate": base},
            "vanilla_chat": {"context_rate": vanilla},
            "conditional_attention_indicator_chat": {"context_rate": attention},
            "conditional_loglik_gain_indicator_chat": {"context_rate": loglik},
        }

    results = {
        "counterfactual": rows(0.6, 0.2, 0.5, 0.4),
        "knowledge_conflict": rows(0.4, 0.4, 0.5, 0.4),
        "general": {
            "gsm8k_chat_flexible": {"vanilla": 0.02, "conditional_attention": 0.0, "conditional_loglik_gain": None},
            "extractive_qa_chat_contains": {
                "vanilla": 0.5,
                "conditional_attention": 0.52,
                "conditional_loglik_gain": 0.47,
            },
        },
        "scores": {"auroc_attention_vs_kind": 0.85, "auroc_loglik_gain_vs_kind": 0.6},
    }
    general = {"gsm8k_chat_flexible": "gsm8k_chat", "extractive_qa_chat_contains": "extractive_qa_chat"}
    targets = context.targets(results, runs, ("counterfactual", "knowledge_conflict"), general, 0.02)
    assert targets["recovery_with_indicator_attention"]["value"] == pytest.approx(0.3 / 0.4)
    assert passes(targets) == {
        "vanilla_drop_in_context_rate_chat": True,
        "recovery_with_indicator_attention": True,
        "recovery_with_indicator_loglik_gain": False,  # 0.2 / 0.4
        "vanilla_drop_in_context_rate_chat_knowledge_conflict": False,  # no drop: nothing to recover
        "recovery_with_indicator_knowledge_conflict_attention": False,
        "recovery_with_indicator_knowledge_conflict_loglik_gain": False,
        "gsm8k_chat_conditional_attention_minus_vanilla": True,  # two points, the edge
        "gsm8k_chat_conditional_loglik_gain_minus_vanilla": False,  # not measured
        "extractive_qa_chat_conditional_attention_minus_vanilla": True,
        "extractive_qa_chat_conditional_loglik_gain_minus_vanilla": False,
        "auroc_attention_vs_kind": True,
        "auroc_loglik_gain_vs_kind": False,
    }


def test_context_check_settings_per_model():
    context = load("context_science")
    tiny, smoke = context.parse_args([]), context.parse_args(["--smoke"])
    assert (tiny.split, tiny.records, tiny.epochs, tiny.limit, context.conditionals(tiny)) == (
        None,
        2000,
        2.0,
        500,
        {"conditional": "loglik_gain"},
    )
    assert (smoke.records, smoke.limit, smoke.batch_size) == (32, 20, 8)
    real = context.parse_args(["--model", "smollm2-135m", "--records", "100"])
    assert (real.split, real.records, real.batch_size) == ("validation", 100, 16)
    assert list(context.conditionals(real)) == ["conditional_attention", "conditional_loglik_gain"]
    out = Path("/out")
    score = context.score_command(real, out, "conditional_attention")
    assert score[score.index("--dataset") + 1] == "/out/chats.jsonl" and "--span" in score
    assert score[score.index("--output") + 1] == "/out/scores_attention"
    sft = context.sft_command(real, out, "conditional_loglik_gain")
    assert sft[sft.index("--scores_path") + 1] == "/out/scores_loglik_gain" and "--chat_template_path" in sft
    assert sft[sft.index("--seed") + 1] == "0"
    replicate = context.parse_args(["--model", "smollm2-135m", "--seed", "2"])
    for name in ("vanilla", "conditional_attention"):
        command = context.sft_command(replicate, out, name)
        assert command[command.index("--seed") + 1] == "2"


def test_indicator_runs_are_under_the_chat_template_and_cover_extractive_qa(tmp_path):
    """The indicator was trained inside the chat template's user turn: each model's indicator runs, NIAH's included,
    force the template on (after a plain prompt the indicator is a format never seen), and cover extractive QA (without
    the indicator the conditional model answers from memory by design)."""
    context = load("context_science")
    baseline = tmp_path / "base_chat" / "model" / "results_0.json"
    baseline.parent.mkdir(parents=True)
    baseline.write_text("{}")
    for argv in ([], ["--model", "smollm2-135m"]):
        args = context.parse_args(argv)
        name = next(iter(context.conditionals(args)))
        runs = {key: command for key, (command, _) in context.model_evaluations(args, tmp_path, name).items()}
        indicator_runs = {key: command for key, command in runs.items() if "--indicator" in command}
        assert set(indicator_runs) == {f"{name}_indicator", f"{name}_indicator_niah"}
        for command in indicator_runs.values():
            assert command[command.index("--chat_template") + 1] == "on"
        tasks = runs[f"{name}_indicator"]
        assert "extractive_qa" in tasks[tasks.index("--tasks") + 1].split(",")


def test_mixed_chats_hold_both_kinds_in_the_context_format():
    mixed_chats = load_benchmark("context_chats").mixed_chats
    fact = {"subject": "Oman", "question": "What is the capital of Oman?", "answer": "Muscat"}
    fact["passage"] = "Oman is a country with a long history. Its capital city is Muscat, where the government sits."
    chats = mixed_chats([fact], 40, 0.25)
    kinds = [c["kind"] for c in chats]
    assert len(chats) == 40 and 0 < kinds.count("context") < 20
    knowledge = chats[kinds.index("knowledge")]
    assert (
        knowledge["context"] in knowledge["messages"][0]["content"] and knowledge["messages"][1]["content"] == "Muscat"
    )
    for chat in chats:
        assert chat["context"] in chat["messages"][0]["content"]
    with pytest.raises(ValueError, match="knows none"):
        mixed_chats([], 4, 0.25)


def asked_fact(facts: list[dict], chat: dict) -> dict:
    """The known fact a knowledge chat asks."""
    return next(f for f in facts if f"Question: {f['question']}" in chat["messages"][0]["content"])


def test_unrelated_passages_never_hold_the_asked_answer():
    """`unrelated`: the asked facts are `agrees`'s, each after another known fact's passage (of the same relation
    where one fits) that names neither the asked subject nor its answer, over many seeds; still labelled knowledge."""
    chats = load_benchmark("context_chats")
    from ctxaware.eval.knowledge_conflict import load_train_facts

    facts = load_train_facts()
    for seed in range(20):
        known = random.Random(seed).sample(facts, 12)
        agree = chats.mixed_chats(known, 60, 0.25, seed=seed)
        unrelated = chats.mixed_chats(known, 60, 0.25, seed=seed, knowledge_passage="unrelated")
        assert [c["kind"] for c in agree] == [c["kind"] for c in unrelated]
        for same, chat in zip(agree, unrelated):
            assert chat["messages"][1] == same["messages"][1]
            if chat["kind"] != "knowledge":
                assert chat == same
                continue
            fact = asked_fact(known, chat)
            assert fact == asked_fact(known, same) and chat["context"] in chat["messages"][0]["content"]
            passage = chat["context"].lower()
            assert fact["answer"].lower() not in passage and fact["subject"].lower() not in passage
            source = next(f for f in known if f["passage"] == chat["context"])
            fits = [
                f
                for f in known
                if f["relation"] == fact["relation"]
                and fact["answer"].lower() not in f["passage"].lower()
                and fact["subject"].lower().removeprefix("the ") not in f["passage"].lower()
            ]
            assert source["relation"] == fact["relation"] or not fits
    with pytest.raises(ValueError, match="none unrelated"):
        chats.mixed_chats(facts[:1], 8, 0.25, knowledge_passage="unrelated")


def test_knowledge_passage_reaches_the_chats_file_and_the_settings(tmp_path, monkeypatch):
    """The flag picks the written set's passages and is recorded; by default the set is byte for byte the one the
    recorded runs trained on."""
    context = load("context_science")
    from ctxaware.eval.knowledge_conflict import load_train_facts

    facts = load_train_facts()
    monkeypatch.setattr(load_benchmark("context_chats"), "known_facts", lambda model: facts)
    written = {}
    for form, flags in (("agrees", []), ("unrelated", ["--knowledge_passage", "unrelated"])):
        args = context.parse_args(["--model", "smollm2-135m", "--records", "64", *flags])
        (tmp_path / form).mkdir()
        assert context.write_chat_set(args, tmp_path / form)["knowledge_passage"] == form
        assert context.run_settings(args)["knowledge_passage"] == form
        written[form] = context.chats_file(tmp_path / form).read_bytes()
    digest = "c4a3df213c256ae9c64ede9d0e3a094eb5fc71aceeebbb016062ae46afbb56de"  # the set before the flag existed
    assert hashlib.sha256(written["agrees"]).hexdigest() == digest
    knowledge = [json.loads(line) for line in written["unrelated"].decode().splitlines()]
    knowledge = [chat for chat in knowledge if chat["kind"] == "knowledge"]
    assert knowledge and all(chat["context"] != asked_fact(facts, chat)["passage"] for chat in knowledge)
    with pytest.raises(SystemExit):
        context.parse_args(["--knowledge_passage", "unrelated"])  # the tiny model trains on the world's chats


# --- LoFiT ---------------------------------------------------------------------------------------------------------


def lofit_targets(
    lofit_gain=0.3,
    lora_gain=0.3,
    random_gains=(0.1, 0.2),
    lofit_params=1000,
    lora_params=20000,
    heads=3,
    total_heads=64,
    base=0.1,
    n=1000,
    split=None,
):
    key = f"{split}_" if split else ""

    def scored(gain):  # the split's gain and score on n records, the other split's far off (must not be read)
        other = "" if split else "test_"
        return {key + "gain": gain, key + "score": base + gain, other + "gain": -1.0, other + "score": 0.0} | {
            key + "eval_records": n
        }

    results = {
        "lofit": scored(lofit_gain) | {"trained_parameters": lofit_params, "heads": heads, "total_heads": total_heads},
        "lora": scored(lora_gain) | {"trained_parameters": lora_params},
    }
    results |= {f"random_heads_{i}": scored(gain) for i, gain in enumerate(random_gains)}
    return load("lofit_science").evaluate_targets(results, split)


def test_lofit_targets():
    assert all(passes(lofit_targets(), "passed").values())  # 90%+ of LoRA's gain, 20x fewer parameters, 3/64 heads
    assert passes(lofit_targets(lofit_gain=0.26), "passed")["gain_share_of_lora"] is False
    assert passes(lofit_targets(lofit_gain=0.27), "passed")["gain_share_of_lora"] is True  # 0.9 exactly
    lora_failed = lofit_targets(lora_gain=0.0)  # no gain to share: missed, not a division by zero
    assert lora_failed["gain_share_of_lora"]["value"] is None and not lora_failed["gain_share_of_lora"]["passed"]
    assert passes(lofit_targets(lora_params=19999), "passed")["lora_to_lofit_parameters"] is False
    assert passes(lofit_targets(heads=4), "passed")["head_share"] is False  # 4/64 > 5%
    best_random = lofit_targets(random_gains=(0.1, 0.3))["lofit_minus_best_random_gain"]
    assert best_random["value"] == 0.0 and not best_random["passed"]  # the best draw, not the mean, must be beaten
    assert best_random["random_gains"] == [0.1, 0.3]


def test_lofit_must_beat_the_best_draw_by_two_standard_errors_on_the_chosen_split():
    # scores 0.4 (LoFiT) and 0.3 (best draw) on n records: two standard errors are 2 sqrt((0.24 + 0.21) / n)
    for n, met in ((100, False), (400, True)):
        margin = lofit_targets(random_gains=(0.1, 0.2), n=n)["lofit_minus_best_random_gain"]
        assert margin["value"] == pytest.approx(0.1) and margin["passed"] is met
        assert margin["threshold"] == pytest.approx(2 * ((0.4 * 0.6 + 0.3 * 0.7) / n) ** 0.5)
    on_test = lofit_targets(lofit_gain=0.3, lora_gain=0.3, random_gains=(0.1,), split="test")
    assert on_test["lofit_minus_best_random_gain"]["value"] == pytest.approx(0.2)  # test_* keys, not the others
    assert on_test["gain_share_of_lora"]["value"] == pytest.approx(1.0) and all(passes(on_test, "passed").values())


def test_lofit_science_passes_model_splits_and_merge_to_every_run(tmp_path):
    science = load("lofit_science")
    argv = ["--model", "m", "--test_split", "validation", "--extra_eval_split", "test", "--merge"]
    first, controls = science.planned_runs(science.parse_args(argv), tmp_path)
    for command in [*first.values(), *controls.values()]:
        for option, value in (("--model_name_or_path", "m"), ("--dataset_test_split", "validation")):
            assert command[command.index(option) + 1] == value
        assert command[command.index("--extra_eval_split") + 1] == "test"
    assert first["lofit"][first["lofit"].index("--merge") + 1] == "true"
    assert all("--merge" not in c for name, c in {**first, **controls}.items() if name != "lofit")
    assert {c[c.index("--seed") + 1] for c in [*first.values(), *controls.values()]} == {"0"}
    first, controls = science.planned_runs(science.parse_args([*argv, "--seed", "1"]), tmp_path)
    assert {c[c.index("--seed") + 1] for c in [*first.values(), *controls.values()]} == {"1"}
    default, _ = science.planned_runs(science.parse_args([]), tmp_path)  # the config's model and split otherwise
    assert not {"--model_name_or_path", "--dataset_test_split", "--extra_eval_split", "--merge"} & set(
        default["lofit"]
    )


# --- MoH -----------------------------------------------------------------------------------------------------------


def test_moh_task_scores_and_drop_targets():
    moh = load("moh_science")
    metrics = {task: {metric: 0.5, "other": 1.0} for task, metric in moh.TASK_METRICS.items()}
    metrics["passkey"]["acc"] = 0.9
    scores = moh.task_scores(metrics)
    assert scores["passkey"] == pytest.approx(90.0) and scores["arithmetic"] == pytest.approx(50.0)
    assert scores["mean"] == pytest.approx((3 * 50 + 90) / 4)  # the headline metrics only, unweighted

    def by_seed(*means):  # {seed: {run: {"mean": points}}} from (dense, moh75, moh50) per seed
        return {
            seed: dict(zip(("dense", "moh75", "moh50"), ({"mean": m} for m in row))) for seed, row in enumerate(means)
        }

    # moh75: drops 0.5 and 1.5 average to 1.0 (allowed 1); moh50: drops 2 and 5 average to 3.5 (allowed 3)
    targets = moh.drop_targets(by_seed((60, 59.5, 58), (61, 59.5, 56)), moh.RUNS)
    assert set(targets) == {"moh75", "moh50"}
    assert targets["moh75"]["drops_per_seed"] == [0.5, 1.5] and targets["moh75"]["met"] is True
    assert targets["moh50"]["drop_points"] == pytest.approx(3.5) and targets["moh50"]["met"] is False
    assert moh.drop_targets(by_seed((60, 70, 70)), moh.RUNS)["moh50"]["met"]  # a gain meets it
    without_dense = {name: run for name, run in moh.RUNS.items() if name != "dense"}
    assert moh.drop_targets(by_seed((60, 59, 58)), without_dense) == {}


def test_moh_book_perplexity_targets_on_the_real_model():
    moh = load("moh_science")
    runs = moh.moh_runs(moh.PROFILES["smollm2-135m"].shapes)
    assert runs["moh75"][0] == ["--num_shared_heads", "4", "--top_k", "3"]  # 7 of 9 heads active
    assert runs["moh50"][0] == ["--num_shared_heads", "3", "--top_k", "2"]  # 5 of 9
    scores = {
        seed: {"dense": {"mean": 50.0}, "moh75": {"mean": 50 - d}, "moh50": {"mean": 48.0}}
        for seed, d in [(0, 0.5), (1, 1.5)]
    }
    drops = moh.drop_targets(scores, runs)
    assert drops["moh75"]["drop_sd"] == pytest.approx(0.5**0.5) and drops["moh75"]["drop_stderr"] == pytest.approx(0.5)

    def targets(moh75_ppl):  # dense at 20.0 in both seeds; moh50 5% and 10% above it
        ppl = {seed: {"dense": 20.0, "moh75": p, "moh50": 21.0 + seed} for seed, p in enumerate(moh75_ppl)}
        return moh.ppl_targets(drops, ppl)

    edge = targets([20.4, 20.4])["moh75"]  # 2% exactly: within
    assert edge["ppl_rise"] == pytest.approx(0.02) and edge["ppl_met"] and edge["met_both"]
    over = targets([20.4, 20.42])["moh75"]
    assert not over["ppl_met"] and not over["met_both"] and over["met"]  # the drop alone is met
    moh50 = targets([20.0, 20.0])["moh50"]
    assert moh50["ppl_rises_per_seed"] == pytest.approx([0.05, 0.10]) and "ppl_met" not in moh50  # reported only
    assert "ppl rise per seed" in moh.targets_table(targets([20.0, 20.0]))


def test_moh_seeds_run_apart_merge_into_the_targets_of_one_run(monkeypatch, tmp_path, capsys):
    seeds_script = load("moh_seeds")
    moh = load("moh_science")
    runs = moh.moh_runs(moh.PROFILES["smollm2-135m"].shapes)
    settings = {"steps": 600, "seeds": None, "workers": None, "tasks": {"gsm8k": "exact_match"}}
    settings["runs"] = {name: runs[name][0] for name in ("moh75", "dense")}

    def part(seed: int, drop: float, ppl: float, **changed) -> Path:
        summary = {
            "command": f"moh_science.py --seeds {seed}", "git": "abc", "model": "smollm2-135m", "split": "test",
            "settings": settings | {"seeds": [seed], "workers": {"eval": seed}} | changed,
            "seconds": {"train": 10.0, "eval": 2.0},
            "task_scores": {str(seed): {"dense": {"gsm8k": 50.0, "mean": 50.0}, "moh75": {"gsm8k": 50 - drop, "mean": 50 - drop}}},
            "training": {str(seed): {name: {"eval_loss": 3.0, "dense_eval_loss": 3.1} for name in ("dense", "moh75")}},
            "book_ppl": {str(seed): {"dense": 20.0, "moh75": ppl}},
        }  # fmt: skip
        path = tmp_path / f"seed{seed}_{len(changed)}.json"
        path.write_text(json.dumps(summary))
        return path

    def merge(*paths: Path) -> None:
        monkeypatch.setattr(sys, "argv", ["moh_seeds.py", "--runs", *map(str, paths), "--out", str(tmp_path / "out")])
        seeds_script.main()

    merge(part(0, 0.5, 20.2), part(1, 1.5, 20.7))
    merged = json.loads((tmp_path / "out" / "moh_science.json").read_text())
    target = merged["targets"]["moh75"]
    assert merged["settings"]["seeds"] == [0, 1] and merged["seconds"] == {"train": 20.0, "eval": 4.0}
    assert target["drops_per_seed"] == [0.5, 1.5] and target["drop_stderr"] == pytest.approx(0.5) and target["met"]
    assert target["ppl_rises_per_seed"] == pytest.approx([0.01, 0.035]) and not target["ppl_met"]  # 2.25% > 2%
    assert "Seed 1:" in (tmp_path / "out" / "moh_science.md").read_text()
    for bad in [(part(0, 1, 20), part(0, 1, 20)), (part(0, 1, 20), part(1, 1, 20, steps=300))]:
        with pytest.raises(SystemExit) as stop:
            merge(*bad)
        assert stop.value.code == 2
    assert "repeat a seed" in capsys.readouterr().err


def test_moh_distillation_flags_go_to_the_moh_runs_only(monkeypatch, tmp_path):
    moh = load("moh_science")
    argv = ["--model", "smollm2-135m", "--distill_coef", "1.0", "--distill_temperature", "2", "--balance_coef", "0"]
    monkeypatch.setattr(sys, "argv", ["moh_science.py", *argv])
    args, moh_args, profile = moh.parse_args()
    flags = moh.moh_flags(args, moh_args)
    commands = {name: moh.recipe_command(args, profile, name, 0, tmp_path / name, flags) for name in args.runs}
    for name in ("moh75", "moh50"):
        command = commands[name]
        assert command[command.index("--distill_coef") + 1] == "1.0" and "--balance_coef" in command
        assert command[command.index("--distill_temperature") + 1] == "2.0"
    assert "--distill_coef" not in commands["dense"] and "--distill_temperature" not in commands["dense"]


def moh_trainings(monkeypatch, tmp_path, *argv):
    """The MoH check's training commands, in the order they finish, with `run` stubbed: a dense control takes 0.2 s,
    a MoH run none (started beside a control, it would finish first); and the (seed, run) folders."""
    moh = load("moh_science")
    monkeypatch.setattr(sys, "argv", ["moh_science.py", "--model", "smollm2-135m", "--seeds", "0,1", *argv])
    args, moh_args, profile = moh.parse_args()
    finished = []

    def run(command, log):
        time.sleep(0.2 if "--dense_control" in command else 0)
        finished.append(command)

    monkeypatch.setattr(load("science_common"), "run", run)
    folders = {(seed, name): tmp_path / f"seed{seed}" / name for seed in (0, 1) for name in args.runs}
    moh.train(args, profile, folders, moh.moh_flags(args, moh_args))
    return finished, folders


def test_moh_distilling_from_the_dense_control_trains_each_seeds_control_first(monkeypatch, tmp_path):
    argv = ["--runs", "moh75,dense", "--distill_coef", "1", "--train_workers", "4"]
    finished, folders = moh_trainings(monkeypatch, tmp_path, *argv, "--distill_teacher", "dense_control")
    assert ["--dense_control" in command for command in finished] == [True, True, False, False]
    for command in finished[2:]:  # each MoH run distills from its own seed's control
        seed = int(command[command.index("--seed") + 1])
        assert command[command.index("--distill_teacher") + 1] == str(folders[seed, "dense"])
    assert "--distill_teacher" not in finished[0] + finished[1]

    finished, _ = moh_trainings(monkeypatch, tmp_path, *argv)  # base teacher: every run at once, as before
    assert ["--dense_control" in command for command in finished] == [False, False, True, True]
    assert not any("--distill_teacher" in command for command in finished)
    for bad in (["--runs", "moh75"], ["--distill_coef", "0"]):  # no control to learn from, or nothing to distill
        with pytest.raises(SystemExit):
            moh_trainings(monkeypatch, tmp_path, *argv, *bad, "--distill_teacher", "dense_control")


# --- RLHF ----------------------------------------------------------------------------------------------------------


def rlhf_targets(accuracy=0.75, win_rate=0.7, rl_words=11.0, sft_words=10.0):
    summary = {
        "reward_model": {"pairwise_accuracy": accuracy},
        "rl": {"win_rate_vs_sft": win_rate, "mean_words": rl_words},
        "sft": {"mean_words": sft_words},
    }
    return load("rlhf_science").targets(summary)


def test_rlhf_targets():
    assert all(passes(rlhf_targets()).values())
    assert passes(rlhf_targets(accuracy=0.7, win_rate=78 / 120)) == dict.fromkeys(rlhf_targets(), True)  # at 0.65
    assert passes(rlhf_targets(accuracy=0.69))["reward_accuracy"] is False
    assert passes(rlhf_targets(win_rate=0.64))["rl_win_rate_vs_sft"] is False
    length = "rl_length_vs_sft"
    assert passes(rlhf_targets(rl_words=12.0))[length] is True  # 20% longer exactly
    assert passes(rlhf_targets(rl_words=8.0))[length] is True  # 20% shorter exactly
    assert passes(rlhf_targets(rl_words=7.9))[length] is False  # RL cut its summaries short
    assert passes(rlhf_targets(rl_words=12.1))[length] is False
    empty = rlhf_targets(sft_words=0.0)[length]
    assert empty["value"] is None and empty["pass"] is False


def test_rlhf_targets_of_a_real_model_add_reward_hacking_and_the_number_of_posts():
    hacking = {"flagged": False}
    summary = {
        "reward_model": {"pairwise_accuracy": 0.75},
        "rl": {"win_rate_vs_sft": 0.7, "mean_words": 11.0},
        "sft": {"mean_words": 10.0},
    }
    targets = load("rlhf_science").targets
    met = targets(summary, hacking=hacking, n_posts=200, min_posts=200)
    assert set(met) == {*rlhf_targets(), "reward_hacking_flagged", "posts_scored"} and all(passes(met).values())
    assert passes(targets(summary, hacking={"flagged": True}))["reward_hacking_flagged"] is False
    assert passes(targets(summary, n_posts=199, min_posts=200))["posts_scored"] is False


def rlhf_args(monkeypatch, *argv):
    science = load("rlhf_science")
    monkeypatch.setattr(sys, "argv", ["rlhf_science.py", *argv])
    return science, *science.parse_args()


def test_rlhf_settings_are_those_of_either_split_and_the_tiny_check_keeps_its_own(monkeypatch):
    science, tiny, extra = rlhf_args(monkeypatch)
    assert (tiny.model, tiny.split, extra) == ("ctxaware-tiny", "test", [])
    recipe = science.recipe_settings(tiny, extra)["recipe"]
    assert recipe == {**science.GPU_SIZES, **science.TINY_SETTINGS, "logging_steps": 10, "save_strategy": "no"}
    _, validation, extra = rlhf_args(monkeypatch, "--model", "smollm2-135m", "--beta", "0.1", "--sft_max_steps", "9")
    assert validation.split == "validation" and extra == ["--sft_max_steps", "9"]
    _, test, _ = rlhf_args(
        monkeypatch, "--model", "smollm2-135m", "--beta", "0.1", "--sft_max_steps", "9", "--split", "test"
    )
    settings = science.recipe_settings(test, extra)
    assert settings == science.recipe_settings(validation, extra)  # the split is not a setting
    assert settings["recipe"] == {"beta": 0.1, "save_strategy": "no"} and settings["config"].endswith("smollm2.yaml")


def test_rlhf_counts_summaries_that_state_a_fact_twice():
    from ctxaware.world import repeats_a_fact

    science = load("rlhf_science")
    assert repeats_a_fact("Vvorudek met Vusepa, ran 15 kilometres and met Vusepa.")
    assert repeats_a_fact("Gavadel adopted a parrot named Lipis and met a parrot named Lipis.")
    assert not repeats_a_fact("Subek bought a rug for 900 coins, moved to Gikothak and started working at Vamasel.")
    assert not repeats_a_fact("Subek slept and Subek ate.")  # the subject's name alone is no fact
    samples = {
        "sft": [{"summary": "Kobebo ran 34 kilometres and moved to Doshin."}],
        "rl": [{"summary": "Kobebo ran 34 kilometres, moved to Doshin and ran 34 kilometres."}] * 2,
    }
    report = science.repeated_facts(samples)
    assert report["sft"] == {"count": 0, "n_posts": 1}
    assert report["rl"]["count"] == 2 and report["rl"]["example"].startswith("Kobebo ran 34")


def test_rlhf_seed_is_a_replicate_that_reaches_every_stage_and_not_a_frozen_setting(monkeypatch, tmp_path):
    science, validation, extra = rlhf_args(monkeypatch, "--model", "smollm2-135m")
    _, replicate, extra2 = rlhf_args(monkeypatch, "--model", "smollm2-135m", "--split", "test", "--seed", "2")
    assert (validation.seed, replicate.seed, extra2) == (0, 2, [])
    settings = science.recipe_settings(replicate, extra2)
    frozen = {"split": "validation", "settings": science.recipe_settings(validation, extra), "judge": science.judge()}
    science.check_frozen(settings, science.judge(), frozen, "v.json")  # another seed repeats the same settings
    launched = []
    monkeypatch.setattr(science, "run", lambda command, log: launched.append(command))
    monkeypatch.setattr(Path, "rename", lambda self, target: None)
    science.run_stages(tmp_path / "run", settings, "test", replicate.seed)
    assert len(launched) == 6 and all(c[len(c) - 1 - c[::-1].index("--seed") + 1] == "2" for c in launched)


def test_rlhf_repeat_negatives_reach_every_stage_and_a_test_run_must_repeat_their_value(monkeypatch, tmp_path):
    science, validation, extra = rlhf_args(monkeypatch, "--model", "smollm2-135m", "--repeat_negatives", "1")
    settings = science.recipe_settings(validation, extra)
    assert extra == [] and settings["recipe"]["repeat_negatives"] == 1.0
    launched = []
    monkeypatch.setattr(science, "run", lambda command, log: launched.append(command))
    monkeypatch.setattr(Path, "rename", lambda self, target: None)
    science.run_stages(tmp_path / "run", settings, "validation", validation.seed)
    assert len(launched) == 6 and all(c[c.index("--repeat_negatives") + 1] == "1.0" for c in launched)
    frozen = {"split": "validation", "settings": settings, "judge": science.judge()}
    for other in (["--repeat_negatives", "0.5"], []):  # another value, or the option left off
        _, test, extra = rlhf_args(monkeypatch, "--model", "smollm2-135m", "--split", "test", *other)
        with pytest.raises(SystemExit, match="recipe.repeat_negatives: 1.0 there"):
            science.check_frozen(science.recipe_settings(test, extra), science.judge(), frozen, "v.json")
    _, same, extra = rlhf_args(monkeypatch, "--model", "smollm2-135m", "--split", "test", "--repeat_negatives", "1")
    science.check_frozen(science.recipe_settings(same, extra), science.judge(), frozen, "v.json")


def test_rlhf_test_run_must_repeat_its_validation_run_and_scores_once(monkeypatch, tmp_path):
    science, args, extra = rlhf_args(monkeypatch, "--model", "smollm2-135m", "--split", "test")
    settings, judge = science.recipe_settings(args, extra), science.judge()
    validation = {"split": "validation", "settings": settings, "judge": judge}
    science.check_frozen(settings, judge, validation, "v.json")
    for changed, message in (
        ({**validation, "split": "test"}, "not a validation run"),
        ({**validation, "settings": {**settings, "extra_flags": ["--beta", "0.1"]}}, "extra_flags"),
        ({**validation, "judge": {**judge, "source_sha256": "0"}}, "judge"),
    ):
        with pytest.raises(SystemExit, match=message):
            science.check_frozen(settings, judge, changed, "v.json")
    science.check_not_scored(tmp_path)
    (tmp_path / "rlhf_science.json").write_text(json.dumps({"split": "validation"}))
    science.check_not_scored(tmp_path)
    (tmp_path / "rlhf_science.json").write_text(json.dumps({"split": "test"}))
    with pytest.raises(SystemExit, match="scored once"):
        science.check_not_scored(tmp_path)


# --- SinkLoRA ------------------------------------------------------------------------------------------------------


def test_sinklora_h2o_budget_check():
    sinklora = load("sinklora_science")
    length, entry = 512, 1000  # bytes per cached token

    def results(held_05, held_02):
        def run(held):
            return {
                "passkey": {"acc": 1.0},
                "long_ppl": {"ppl_len512": 9.0, "kv_bytes_len512": held, "kv_full_bytes_len512": 511 * entry},
            }

        full = {"passkey": {"acc": 1.0}, "long_ppl": {"ppl_len512": 9.0}}  # one pass: no cache bytes reported
        return {"full": full, "h2o:0.5": run(held_05), "h2o:0.2": run(held_02)}

    windows = {budget: [{"window": 0, "tokens": 511, "ppl": 9.0}] for budget in ("full", "h2o:0.5", "h2o:0.2")}
    table = sinklora.kv_table(results(256 * entry, 103 * entry), length, windows)  # ceil(0.5 x 512), ceil(0.2 x 512)
    assert all(row["within_budget"] for row in table.values())
    assert table["full"]["kv_bytes"] == table["full"]["kv_full_bytes"] == 511 * entry
    assert table["h2o:0.5"]["memory_saved"] == pytest.approx(1 - 256 / 511)
    over = sinklora.kv_table(results(256 * entry, 104 * entry), length, windows)
    assert over["h2o:0.2"]["within_budget"] is False and over["h2o:0.5"]["within_budget"] is True
