"""RLHF summarisation: reward normalisation, the EOS penalty, data checks, and the recipe end to end on a tiny model."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, GenerationConfig

from ctxaware.methods import rlhf
from ctxaware.tokenizer import train_tokenizer
from ctxaware.world import build_world, preference_pairs, summarization
from tests.launch import REPO_ROOT, accelerate_launch
from tests.tiny_models import tiny_config, tiny_model


RECIPE = REPO_ROOT / "recipes" / "rlhf_summarize.py"
DEFAULT_CONFIG = REPO_ROOT / "recipes" / "configs" / "rlhf_summarize" / "default.yaml"


@pytest.fixture(scope="module")
def world_records():
    return summarization(build_world(0), "train")[:64]


@pytest.fixture(scope="module")
def world_tokenizer(world_records):
    texts = [r["post"] + "\nTL;DR: " + r["reference"] for r in world_records]
    return train_tokenizer(texts * 4, vocab_size=700)


@pytest.fixture(scope="module")
def tiny_policy_dir(tmp_path_factory, world_tokenizer):
    """A tiny random Llama policy saved with the world tokenizer, as a stand-in for ctxaware-tiny."""
    folder = tmp_path_factory.mktemp("tiny-policy")
    tok = world_tokenizer
    model = tiny_model(
        "llama",
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    # Point the EOS logit along the mean final hidden state, so samples end at varied lengths (a random model would
    # run out of tokens every time, every completion would get the same EOS penalty, and RL would have no signal).
    posts = tok([r["post"] for r in summarization(build_world(0), "train")[:8]], return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = model(**posts, output_hidden_states=True).hidden_states[-1][posts["attention_mask"].bool()]
        mean = hidden.mean(0)
        model.lm_head.weight[tok.eos_token_id] = 4.0 * mean / mean.norm() ** 2
    model.save_pretrained(folder)
    GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    ).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def reward_model(tokenizer, seed=0):
    torch.manual_seed(seed)
    config = tiny_config("llama", vocab_size=len(tokenizer), num_labels=1, pad_token_id=tokenizer.pad_token_id)
    return AutoModelForSequenceClassification.from_config(config).eval()


def test_reward_normalisation_centres_references(world_records, world_tokenizer):
    model = reward_model(world_tokenizer)
    posts, references = [r["post"] for r in world_records], [r["reference"] for r in world_records]
    bias = rlhf.reward_bias(model, world_tokenizer, posts, references, batch_size=5)
    raw = rlhf.RewardModelReward(model, world_tokenizer, score_unfinished=True)
    normalized = rlhf.RewardModelReward(model, world_tokenizer, bias=bias, score_unfinished=True)
    prompts = [rlhf.policy_prompt(world_tokenizer, p) for p in posts]
    raw_scores = raw(prompts, [" " + r for r in references], post=posts)
    scores = normalized(prompts, [" " + r for r in references], post=posts)
    assert abs(sum(raw_scores) / len(raw_scores) - bias) < 1e-5 and abs(bias) > 1e-3
    assert abs(sum(scores) / len(scores)) < 1e-5  # references score 0 on average
    assert scores == pytest.approx([s - bias for s in raw_scores], abs=1e-6)
    # Without a `post` column the post is read back from the prompt, and gives the same scores.
    assert normalized(prompts, references) == pytest.approx(scores, abs=1e-5)


def test_reward_text_matches_eval_harness_format(world_tokenizer, tiny_policy_dir):
    record = {"post": "Hi all, Ana here. I ran 5 kilometres.", "reference": "Ana ran 5 kilometres."}
    text = rlhf.reward_model_text(world_tokenizer, record["post"], " Ana ran 5 kilometres. ")
    messages = [{"role": "user", "content": record["post"]}, {"role": "assistant", "content": record["reference"]}]
    assert text == world_tokenizer.apply_chat_template(messages, tokenize=False)
    no_template = type("Tok", (), {"chat_template": None})()
    assert rlhf.reward_model_text(no_template, "post", " sum") == "post\nTL;DR: sum"
    assert rlhf.policy_prompt(world_tokenizer, "post") == world_tokenizer.bos_token + "post\nTL;DR:"
    assert rlhf.post_from_prompt(rlhf.policy_prompt(world_tokenizer, "a\nb"), world_tokenizer.bos_token) == "a\nb"


def test_eos_penalty_on_hand_made_completions(world_tokenizer):
    eos = world_tokenizer.eos_token_id
    completion_ids = [[5, 6, eos], [5, 6, 7], [], [eos]]
    penalty = rlhf.EOSPenalty([eos], penalty=-1.0)
    assert penalty(prompts=["p"] * 4, completions=["x"] * 4, completion_ids=completion_ids) == [0.0, -1.0, -1.0, 0.0]
    assert rlhf.EOSPenalty([eos, 99], penalty=-2.5)(completion_ids=[[3, 99], [3]]) == [0.0, -2.5]
    # The reward model leaves unfinished completions unscored, so TRL sums only the penalty for them.
    reward = rlhf.RewardModelReward(reward_model(world_tokenizer), world_tokenizer, eos_token_ids=[eos])
    scores = reward(["post\nTL;DR:"] * 4, [" a", " b", "", " c"], completion_ids=completion_ids)
    assert scores[1] is None and scores[2] is None
    assert isinstance(scores[0], float) and isinstance(scores[3], float)
    with pytest.raises(ValueError, match="completion_ids"):
        penalty(prompts=["p"], completions=["x"])


def test_preference_data_without_chosen_rejected_is_rejected():
    rows = preference_pairs(build_world(0), "train", noise=0.0)[:3]
    assert rlhf.preference_records(rows, "world")[0]["chosen"] == rows[0]["chosen"].strip()
    with pytest.raises(ValueError, match=r"no chosen / rejected column.*trl-lib/tldr-preference"):
        rlhf.preference_records([{"prompt": "p", "completion": "c"}], "my/sft-data")
    with pytest.raises(ValueError, match="no rejected column"):
        rlhf.preference_records([{"prompt": "p", "chosen": "c"}], "my/pairs")
    with pytest.raises(ValueError, match="neither a `prompt` nor a `post`"):
        rlhf.preference_records([{"chosen": "c", "rejected": "r"}], "my/pairs")


def test_reward_tokenizer_must_match_policy(world_tokenizer, tiny_tokenizer):
    rlhf.check_same_tokenizer(world_tokenizer, world_tokenizer, "rm")
    with pytest.raises(ValueError, match=r"different tokenizer.*--stage reward"):
        rlhf.check_same_tokenizer(world_tokenizer, tiny_tokenizer, "other-rm")


def test_generation_length_too_short_for_any_summary(world_tokenizer, world_records):
    references = [r["reference"] for r in world_records]
    shortest = min(len(world_tokenizer(" " + r, add_special_tokens=False)["input_ids"]) for r in references) + 1
    rlhf.check_generation_length(world_tokenizer, references, shortest)
    with pytest.raises(ValueError, match=r"too short for any summary.*--max_completion_length to at least"):
        rlhf.check_generation_length(world_tokenizer, references, shortest - 1)


def test_data_formats(world_tokenizer, world_records):
    sft = rlhf.sft_rows(world_records[:2], world_tokenizer)
    assert sft[0]["prompt"].endswith("\nTL;DR:") and sft[0]["completion"] == " " + world_records[0]["reference"]
    pairs = rlhf.preference_records(preference_pairs(build_world(0), "train")[:4], "world")
    rows = rlhf.reward_rows(pairs, world_tokenizer)
    expected = world_tokenizer(
        rlhf.reward_model_text(world_tokenizer, pairs[0]["post"], pairs[0]["chosen"]), add_special_tokens=False
    )["input_ids"]
    assert rows[0]["chosen_ids"] == expected
    assert rlhf.reward_rows(pairs, world_tokenizer, max_length=5) == []
    dpo = rlhf.dpo_rows(pairs, world_tokenizer)
    assert dpo[0]["chosen"] == " " + pairs[0]["chosen"] and dpo[0]["prompt"].endswith("TL;DR:")


def load_recipe():
    spec = importlib.util.spec_from_file_location("recipe_rlhf_summarize", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_completion_log_probabilities_of_left_padded_prompts_match_unpadded(world_records, tiny_policy_dir):
    """The batched KL estimate reads completions after left-padded prompts: each row must score as it would alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_policy_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_policy_dir)
    prompts = [rlhf.policy_prompt(tokenizer, r["post"]) for r in world_records[:3]]
    completion = torch.tensor([[5, 6, 7, tokenizer.eos_token_id]] * len(prompts))
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    assert len(set(batch["attention_mask"].sum(1).tolist())) > 1  # prompts of different lengths: padding is used
    with torch.no_grad():
        batched = rlhf.completion_logprobs(
            model, torch.cat([batch["input_ids"], completion], 1), batch["attention_mask"]
        )
        for row, prompt in enumerate(prompts):
            ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
            alone = rlhf.completion_logprobs(model, torch.cat([ids, completion[:1]], 1), torch.ones_like(ids))
            torch.testing.assert_close(batched[row], alone[0], atol=1e-5, rtol=1e-5)


def test_four_bit_on_cpu_and_unknown_stage_fail_clearly(tmp_path):
    from trl import TrlParser

    recipe = load_recipe()
    parser = TrlParser(recipe.CONFIG_CLASSES)
    with pytest.raises(ValueError, match="--stage 'ppo' is unknown"):
        parser.parse_args_and_config(args=["--config", str(DEFAULT_CONFIG), "--stage", "ppo"])
    cfg, model_args = parser.parse_args_and_config(
        args=["--config", str(DEFAULT_CONFIG), "--output_dir", str(tmp_path), "--load_in_4bit", "true"]
    )
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="drop --load_in_4bit"):
            recipe.load_policy("unused", model_args)


def test_mediocre_references_reach_sft_only_on_the_world_train_split(tmp_path):
    from trl import TrlParser

    from ctxaware.world import mediocre_references

    recipe = load_recipe()
    parser = TrlParser(recipe.CONFIG_CLASSES)
    base = ["--config", str(DEFAULT_CONFIG), "--output_dir", str(tmp_path)]
    cfg, _ = parser.parse_args_and_config(args=[*base, "--mediocre_reference_rate", "0.5", "--train_limit", "40"])
    world = build_world(0)
    train = recipe.summary_records(cfg, "train")
    assert [r["reference"] for r in train] == mediocre_references(world, "train", 0.5, seed=0)[:40]
    assert [r["post"] for r in train] == [r["post"] for r in summarization(world, "train")[:40]]
    assert recipe.summary_records(cfg, "test") == summarization(world, "test")  # evaluation keeps the references
    with pytest.raises(ValueError, match="world's posts only"):
        tldr = ["--dataset_name", "trl-lib/tldr", "--comparison_samples", "0"]
        parser.parse_args_and_config(args=[*base, *tldr, "--mediocre_reference_rate", "1"])
    real = ["--preference_dataset_name", "trl-lib/tldr-preference", "--comparison_samples", "2"]
    with pytest.raises(ValueError, match="comparison_samples needs the world's"):
        parser.parse_args_and_config(args=[*base, *real])


def test_policy_comparisons_join_the_world_pairs_once_labelled(tmp_path):
    from trl import TrlParser

    recipe = load_recipe()
    args = ["--config", str(DEFAULT_CONFIG), "--output_dir", str(tmp_path), "--train_limit", "10"]
    cfg, _ = TrlParser(recipe.CONFIG_CLASSES).parse_args_and_config(args=[*args, "--comparison_samples", "2"])
    with pytest.raises(FileNotFoundError, match="run `--stage compare`"):
        recipe.preference_pairs(cfg, "train")
    own = [{"prompt": "A post\nTL;DR:", "chosen": " good", "rejected": " bad", "post_id": "train-00000"}]
    (tmp_path / "compare").mkdir()
    (tmp_path / "compare" / recipe.COMPARISONS_FILE).write_text(json.dumps(own))
    pairs = recipe.preference_pairs(cfg, "train")
    assert len(pairs) == 11 and pairs[-1] == {"post": "A post", "chosen": "good", "rejected": "bad"}
    assert len(recipe.preference_pairs(cfg, "test")) == 2 * len(summarization(build_world(0), "test"))


def test_a_stage_beside_the_run_reads_its_comparisons_from_the_run_s_folder(tmp_path):
    from trl import TrlParser

    recipe = load_recipe()
    own = [{"prompt": "A post\nTL;DR:", "chosen": " good", "rejected": " bad", "post_id": "train-00000"}]
    (tmp_path / "run" / "compare").mkdir(parents=True)
    (tmp_path / "run" / "compare" / recipe.COMPARISONS_FILE).write_text(json.dumps(own))
    args = ["--config", str(DEFAULT_CONFIG), "--output_dir", str(tmp_path / "beside"), "--train_limit", "10"]
    args += ["--comparison_samples", "2", "--comparisons_dir", str(tmp_path / "run" / "compare")]
    cfg, _ = TrlParser(recipe.CONFIG_CLASSES).parse_args_and_config(args=args)
    assert recipe.preference_pairs(cfg, "train")[-1] == {"post": "A post", "chosen": "good", "rejected": "bad"}


def test_repeat_negatives_join_the_world_training_pairs_of_the_limited_posts(tmp_path):
    from trl import TrlParser

    from ctxaware.world import repeats_a_fact

    recipe = load_recipe()
    parser = TrlParser(recipe.CONFIG_CLASSES)
    base = ["--config", str(DEFAULT_CONFIG), "--output_dir", str(tmp_path), "--train_limit", "10"]
    off, _ = parser.parse_args_and_config(args=[*base, "--comparison_samples", "0"])
    on, _ = parser.parse_args_and_config(args=[*base, "--comparison_samples", "0", "--repeat_negatives", "1"])
    assert off.repeat_negatives == 0
    plain, pairs = recipe.preference_pairs(off, "train"), recipe.preference_pairs(on, "train")
    assert pairs[: len(plain)] == plain and len(pairs) == len(plain) + 10  # one more pair per limited post
    for record, pair in zip(summarization(build_world(0), "train")[:10], pairs[len(plain) :]):
        assert (pair["post"], pair["chosen"]) == (record["post"], record["reference"])
        assert repeats_a_fact(pair["rejected"]) and not repeats_a_fact(pair["chosen"])
    assert recipe.preference_pairs(on, "test", noise=0.0) == recipe.preference_pairs(off, "test", noise=0.0)
    # beside the labelled SFT samples: hand-made pairs, then the samples, then the repeats
    own = [{"prompt": "A post\nTL;DR:", "chosen": " good", "rejected": " bad", "post_id": "train-00000"}]
    (tmp_path / "compare").mkdir()
    (tmp_path / "compare" / recipe.COMPARISONS_FILE).write_text(json.dumps(own))
    both, _ = parser.parse_args_and_config(args=[*base, "--comparison_samples", "2", "--repeat_negatives", "1"])
    assert recipe.preference_pairs(both, "train") == [
        *plain,
        {"post": "A post", "chosen": "good", "rejected": "bad"},
        *pairs[len(plain) :],
    ]
    with pytest.raises(ValueError, match="repeat_negatives=2.5 must lie in"):
        parser.parse_args_and_config(args=[*base, "--repeat_negatives", "2.5"])
    tldr = ["--dataset_name", "trl-lib/tldr", "--comparison_samples", "0", "--mediocre_reference_rate", "0"]
    with pytest.raises(ValueError, match="repeat_negatives needs the world's"):
        parser.parse_args_and_config(args=[*base, *tldr, "--repeat_negatives", "1"])


def test_reward_accuracy_reports_held_out_repeated_facts(tmp_path, world_tokenizer, monkeypatch):
    from trl import TrlParser

    recipe = load_recipe()
    folder = tmp_path / "reward"
    reward_model(world_tokenizer).save_pretrained(folder)
    world_tokenizer.save_pretrained(folder)
    args = ["--config", str(DEFAULT_CONFIG), "--output_dir", str(tmp_path), "--eval_split", "validation"]
    cfg, _ = TrlParser(recipe.CONFIG_CLASSES).parse_args_and_config(args=[*args, "--eval_limit", "40"])
    # a reward model that prefers the shorter summary gets every repeat right (the repeat only adds words)
    monkeypatch.setattr(rlhf, "score_texts", lambda model, tokenizer, texts, batch_size: [-len(t) for t in texts])
    result = recipe.reward_accuracy(cfg, str(folder), bias=0.0)
    n_posts = len(summarization(build_world(0), "validation"))  # one pair per held-out post (fewer than 4 x 40)
    assert result["repeated_fact_accuracy"] == {"accuracy": 1.0, "n_pairs": n_posts}
    monkeypatch.setattr(rlhf, "score_texts", lambda model, tokenizer, texts, batch_size: [len(t) for t in texts])
    assert recipe.reward_accuracy(cfg, str(folder), bias=0.0)["repeated_fact_accuracy"]["accuracy"] == 0.0


def test_eval_split_is_the_world_s_validation_or_test(tmp_path):
    from trl import TrlParser

    recipe = load_recipe()
    parser = TrlParser(recipe.CONFIG_CLASSES)
    base = ["--config", str(DEFAULT_CONFIG), "--output_dir", str(tmp_path)]
    cfg, _ = parser.parse_args_and_config(args=[*base, "--eval_split", "validation"])
    assert recipe.preference_pairs(cfg, cfg.eval_split, noise=0.0) != recipe.preference_pairs(cfg, "test", noise=0.0)
    with pytest.raises(ValueError, match="choose validation"):
        parser.parse_args_and_config(args=[*base, "--eval_split", "train"])
    tldr = ["--dataset_name", "trl-lib/tldr", "--comparison_samples", "0", "--mediocre_reference_rate", "0"]
    with pytest.raises(ValueError, match="validation needs the world's"):
        parser.parse_args_and_config(args=[*base, *tldr, "--eval_split", "validation"])


def test_training_pairs_per_post_leaves_the_held_out_pairs_alone(tmp_path):
    from trl import RewardConfig, TrlParser

    recipe = load_recipe()
    args = ["--config", str(DEFAULT_CONFIG), "--output_dir", str(tmp_path), "--comparison_samples", "0"]
    parser = TrlParser(recipe.CONFIG_CLASSES)
    cfg, _ = parser.parse_args_and_config(args=[*args, "--train_pairs_per_post", "2"])
    more, _ = parser.parse_args_and_config(args=[*args, "--train_pairs_per_post", "6", "--reward_batch_size", "5"])
    assert cfg.pairs_per_post == more.pairs_per_post == 2
    n_train = len(summarization(build_world(0), "train"))
    assert len(recipe.preference_pairs(cfg, "train")) == 2 * n_train
    assert len(recipe.preference_pairs(more, "train")) == 6 * n_train  # every post has more than 6 distinct pairs
    assert recipe.preference_pairs(more, "test", noise=0.0) == recipe.preference_pairs(cfg, "test", noise=0.0)
    reward_args = recipe.stage_args(more, RewardConfig, "reward", per_device_train_batch_size=more.reward_batch_size)
    assert reward_args.per_device_train_batch_size == 5


def test_held_out_pairs_are_told_apart_by_what_makes_the_rejected_worse():
    recipe = load_recipe()
    record = summarization(build_world(0), "test")[0]
    name = record["key_facts"][0].split()[0]
    dropped = f"{name} {record['key_facts'][1][len(name) + 1 :]}."
    made_up = record["reference"].replace(name, "Zzyzx", 1)
    padded = record["reference"] + " The weather has been grey all week."

    def kind(chosen, rejected):
        return recipe.pair_difference(record, {"post": record["post"], "chosen": chosen, "rejected": rejected})

    assert kind(record["reference"], made_up) == "made_up"
    assert kind(record["reference"], dropped) == "coverage"
    assert kind(record["reference"], padded) == "length"


def test_stage_configs_inherit_the_recipe_settings(tmp_path):
    from trl import DPOConfig, RLOOConfig, SFTConfig, TrlParser

    recipe = load_recipe()
    cfg, _ = TrlParser(recipe.CONFIG_CLASSES).parse_args_and_config(
        args=["--config", str(DEFAULT_CONFIG), "--output_dir", str(tmp_path), "--beta", "0.2", "--seed", "7"]
    )
    rl = recipe.stage_args(cfg, RLOOConfig, "rl")
    assert (rl.beta, rl.num_generations, rl.max_completion_length, rl.temperature) == (0.2, 4, 48, 0.7)
    assert rl.output_dir == str(tmp_path / "checkpoints" / "rl") and not rl.push_to_hub
    sft = recipe.stage_args(cfg, SFTConfig, "sft", learning_rate=cfg.sft_learning_rate, beta=9.0)
    assert (sft.learning_rate, sft.seed, sft.max_length) == (cfg.sft_learning_rate, 7, cfg.max_length)
    assert recipe.stage_args(cfg, DPOConfig, "dpo", beta=cfg.dpo_beta).beta == cfg.dpo_beta


def small_run_args(model_dir, output_dir, *extra):
    return [
        "--config",
        str(DEFAULT_CONFIG),
        "--model_name_or_path",
        str(model_dir),
        "--output_dir",
        str(output_dir),
        "--train_limit",
        "16",
        "--per_device_train_batch_size",
        "4",
        "--logging_steps",
        "1",
        "--save_steps",
        "2",
        "--sft_max_steps",
        "2",
        "--reward_max_steps",
        "2",
        "--max_steps",
        "2",
        "--dpo_max_steps",
        "2",
        "--num_generations",
        "2",
        "--max_completion_length",
        "40",
        "--normalization_limit",
        "8",
        "--eval_limit",
        "4",
        "--eval_batch_size",
        "4",
        "--kl_samples_per_prompt",
        "1",
        "--comparison_samples",
        "2",
        *extra,
    ]


def test_push_to_hub_uploads_each_stage(tiny_policy_dir, tmp_path, monkeypatch):
    """`--push_to_hub` creates `<hub_model_id>-<stage>` and uploads the stage's folder (HfApi mocked)."""
    import huggingface_hub
    from trl import TrlParser

    calls = []

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create", repo_id))

        def upload_folder(self, folder_path, repo_id, **kwargs):
            calls.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    recipe = load_recipe()
    args = small_run_args(tiny_policy_dir, tmp_path, "--stage", "sft", "--push_to_hub", "true")
    cfg, model_args = TrlParser(recipe.CONFIG_CLASSES).parse_args_and_config(args=[*args, "--hub_model_id", "me/rl"])
    recipe.main(cfg, model_args)
    assert calls[0] == ("create", "me/rl-sft")
    assert calls[1][:2] == ("upload", "me/rl-sft") and {"config.json", "README.md", "model.safetensors"} <= set(
        calls[1][2]
    )


def test_recipe_end_to_end_then_resumes(tiny_policy_dir, tmp_path):
    out = tmp_path / "run"
    result = accelerate_launch(RECIPE, *small_run_args(tiny_policy_dir, out, "--stage", "all"), timeout=900)
    for stage in ("sft", "reward", "rl", "dpo"):
        assert (out / stage / "config.json").is_file(), result.stdout[-3000:]
    assert "bias" in json.loads((out / "reward" / rlhf.NORMALIZATION_FILE).read_text())
    # the compare stage labelled pairs of the SFT policy's own samples of the 16 training posts
    compared = json.loads((out / "compare" / load_recipe().COMPARISONS_FILE).read_text())
    assert compared and {int(p["post_id"].split("-")[1]) for p in compared} <= set(range(16))
    rl_log = json.loads((out / "rl" / load_recipe().TRAINING_LOG).read_text())
    logged = {key for entry in rl_log for key in entry}
    assert {"kl", "rewards/eos_penalty/mean", "completions/clipped_ratio"} <= logged
    sft, rl, dpo = (load_file(out / s / "model.safetensors") for s in ("sft", "rl", "dpo"))
    base = load_file(tiny_policy_dir / "model.safetensors")
    assert any(not torch.equal(base[k], sft[k]) for k in base)  # each stage trained something
    assert any(not torch.equal(sft[k], rl[k]) for k in sft)
    assert any(not torch.equal(sft[k], dpo[k]) for k in sft)
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert set(summary) == {"sft", "rl", "dpo", "reward_model"}
    assert 0.0 <= summary.pop("reward_model")["pairwise_accuracy"] <= 1.0
    for name, metrics in summary.items():
        assert {"rouge_l", "preference", "reward", "reward_normalized", "mean_words", "win_rate_vs_reference"} <= set(
            metrics
        )
        if name != "sft":
            assert {"win_rate_vs_sft", "kl_to_sft"} <= set(metrics)
    # A second run keeps the finished stages (resumable pipeline) and only re-evaluates.
    again = accelerate_launch(RECIPE, *small_run_args(tiny_policy_dir, out, "--stage", "rl"), timeout=600)
    assert "stage rl: already done" in again.stdout
