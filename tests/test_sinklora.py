"""SinkLoRA: the recipe end to end through `accelerate launch`, adapters that restore embeddings and norms, RoPE
scaling, the training patterns, and the bad-input errors."""

import json
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

import ctxaware.attention
from ctxaware.attention import attention_modules
from ctxaware.hub import push_folder_to_hub, write_model_card
from ctxaware.methods import sinklora
from ctxaware.models import load_model
from ctxaware.training import TrainingSpeed, pack_token_stream, resolve_resume_checkpoint
from tests.launch import accelerate_launch
from tests.test_configs import load_recipe
from tests.tiny_models import tiny_model


def test_recipe_end_to_end_and_adapter_restores_embeddings_and_norms(tiny_base, tmp_path):
    out = tmp_path / "run"
    args = ["--model_name_or_path", str(tiny_base), "--output_dir", str(out), "--max_steps", "2", "--save_steps", "2"]
    args += [
        "--num_train_rows",
        "2",
        "--eval_limit",
        "1",
        "--eval_passkey_limit",
        "1",
        "--activation_checkpointing",
        "true",
        "--learning_rate",
        "0.01",
    ]
    result = accelerate_launch("recipes/sinklora.py", *args)
    adapter = out / "adapter"
    assert f"adapter, model card and eval results: {adapter}" in result.stdout
    metadata = json.loads((adapter / "sinklora.json").read_text())
    assert metadata["max_position_embeddings"] == 256 and metadata["attention"] == "sf"
    # What ran, counted at the attention calls: SF at G = 256 / 4 in both layers while training, dense at evaluation.
    ran = metadata["attention_ran"]
    assert ran["expected"] == "sf(G=64, sinks=4)" and set(ran["patterns"]) == {"sf(G=64, sinks=4)"}
    assert set(ran["backends"]) == {"sdpa"} and ran["layers_called"] == ran["layers"] == 2
    assert set(ran["evaluation"]["patterns"]) == {"dense"}
    assert '"attention_ran"' in result.stdout
    assert metadata["rope_parameters"]["rope_type"] == "yarn" and metadata["rope_parameters"]["factor"] == 4.0
    results = json.loads((adapter / "eval_results.json").read_text())
    # Training throughput and peak memory, the same in both files and the printed summary: 2 steps of one 256-token
    # row; no GPU peak on a CPU (null, not 0).
    speed = metadata["training_speed"]
    assert results["training_speed"] == speed and f'"tokens_per_s": {speed["tokens_per_s"]}' in result.stdout
    assert speed["train_steps"] == 2 and speed["train_tokens"] == 2 * 256 and speed["peak_memory_gib"] is None
    assert speed["train_seconds"] > 0 and speed["tokens_per_s"] == pytest.approx(512 / speed["train_seconds"])
    summary = results["summary"]
    # Before and after on the same text: the original model, the RoPE-scaled one untrained, the trained one.
    assert set(results["before"]) == {"original", "scaled"}
    assert results["before"]["original"]["long_ppl"].keys() == summary["long_ppl"].keys()
    assert results["before"]["original"] != results["before"]["scaled"]
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert table[0] == "| model | ppl@64 | ppl@128 | ppl@256 | passkey@256 |"
    assert [row.split(" | ")[0] for row in table[1:]] == [
        f"| original {tiny_base} (context 64)",
        "| yarn RoPE x4, untrained",
        "| yarn RoPE x4 + SF LoRA, 2 steps",
    ]
    assert set(summary["long_ppl"]) == {"ppl_len64", "ppl_len128", "ppl_len256"}
    assert "acc_len256" in summary["passkey"]
    assert "| long_ppl | ppl_len256 |" in (adapter / "README.md").read_text()

    model = sinklora.load_sinklora(adapter, base_model=str(tiny_base))
    base = tiny_model("llama", max_position_embeddings=64, vocab_size=320, tie_word_embeddings=True)
    base.load_state_dict(_state(tiny_base))
    merged = {k: v for k, v in model.merge_and_unload().state_dict().items()}
    # Embeddings and every norm were trained and come back from the adapter: they differ from the base's.
    assert not torch.equal(merged["model.embed_tokens.weight"], base.model.embed_tokens.weight)
    assert not torch.equal(merged["model.norm.weight"], base.model.norm.weight)
    assert not torch.equal(
        merged["model.layers.0.input_layernorm.weight"], base.model.layers[0].input_layernorm.weight
    )
    assert torch.equal(merged["lm_head.weight"], merged["model.embed_tokens.weight"])  # still tied
    assert model.config.rope_parameters["factor"] == 4.0 and model.config.max_position_embeddings == 256

    # `ctxaware eval --adapter` rebuilds the same extended base: identical logits to load_sinklora's model.
    evaluated, _ = load_model(str(tiny_base), adapter=str(adapter), dtype="float32", device="cpu")
    assert evaluated.config.rope_parameters["factor"] == 4.0 and evaluated.config.max_position_embeddings == 256
    input_ids = torch.randint(3, 320, (1, 200))
    torch.testing.assert_close(evaluated(input_ids).logits, model.eval()(input_ids).logits)

    # Resuming with another attention pattern is refused, naming the differing key.
    recipe = load_recipe("sinklora")
    with pytest.raises(ValueError, match="attention: 'sf', now 's2'"):
        recipe.main(*_parse(recipe, [*args, "--attention", "s2", "--resume_from_checkpoint", "true"]))


def _state(folder):
    from safetensors.torch import load_file

    state = load_file(folder / "model.safetensors")
    state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    return state


def _parse(recipe, args):
    from trl import TrlParser

    return TrlParser(recipe.CONFIG_CLASSES).parse_args_and_config(args=args)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max_length", "100"], "not compatible with group_size_ratio=0.25.*multiple of 8"),
        (["--rope_factor", "0.5"], "below 1"),
        (["--attention", "dense"], "not one of sf, s2, full"),
        (["--load_in_4bit", "true"], "need bitsandbytes on a CUDA GPU.*drop --load_in_4bit"),
        (["--attn_implementation", "sdpa"], "--attn_implementation ctxaware"),
        (["--train_mix", "passkey:2", "novels:1"], "entry 'novels:1'.*kind among facts"),
        (["--train_mix", "passkey:-1"], "weight >= 0"),
        (["--train_mix", "passkey:0"], "no document a positive weight"),
        (["--eval_split", "train"], "use validation .choosing settings. or test"),
    ],
)
def test_bad_input_is_refused_before_loading(tiny_base, tmp_path, flags, message):
    recipe = load_recipe("sinklora")
    args, training_args, model_args = _parse(
        recipe, ["--model_name_or_path", str(tiny_base), "--output_dir", str(tmp_path), *flags]
    )
    with pytest.raises(ValueError, match=message):
        recipe.validate(args, training_args, model_args, original_length=64)


def test_default_yaml_is_the_plain_command():
    """`accelerate launch recipes/sinklora.py` (the README's main job) and `--config .../default.yaml` are one run."""
    recipe = load_recipe("sinklora")
    plain = _parse(recipe, [])
    configured = _parse(recipe, ["--config", "recipes/configs/sinklora/default.yaml"])
    assert vars(plain[0]) == vars(configured[0])
    assert plain[1].to_dict() == configured[1].to_dict()
    assert vars(plain[2]) == vars(configured[2])


def test_dataset_without_text_column(tmp_path):
    recipe = load_recipe("sinklora")
    data = tmp_path / "docs.jsonl"
    data.write_text('{"content": "a long text"}\n')
    args, training_args, _ = _parse(recipe, ["--dataset_name", str(data), "--output_dir", str(tmp_path)])
    with pytest.raises(
        ValueError, match="row 1: no value in column 'text' \\(columns: content\\).*--dataset_text_field"
    ):
        recipe.load_text_dataset(args, training_args.dataset_text_field)


def test_resume_from_a_folder_without_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no complete one"):
        resolve_resume_checkpoint(True, str(tmp_path), {"attention": "sf"})


def test_rope_parameters():
    config = SimpleNamespace(max_position_embeddings=512, rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    assert sinklora.rope_parameters(config, "linear", 2048) == {
        "rope_type": "linear",
        "rope_theta": 1e4,
        "factor": 4.0,
    }
    yarn = sinklora.rope_parameters(config, "yarn", 2048)
    assert yarn["original_max_position_embeddings"] == 512 and yarn["factor"] == 4.0
    with pytest.raises(ValueError, match="factor >= 1"):
        sinklora.rope_parameters(config, "linear", 2048, factor=0.5)


def test_patterns_and_full_attention_switch():
    assert sinklora.training_pattern("full") is None
    assert sinklora.training_pattern("s2", 0.25).kind == "s2"
    sf = sinklora.training_pattern("sf", 0.25, sinks=2)
    assert (sf.kind, sf.sinks, sf.group_size_ratio) == ("sf", 2, 0.25)
    model = tiny_model("llama", attn_implementation=ctxaware.attention.ATTN_IMPLEMENTATION)
    model = sinklora.prepare_model(model, sf, sinklora.lora_config(model))
    ids = torch.randint(3, 300, (1, 32))
    with torch.no_grad():
        patterned = model(input_ids=ids).logits
        with sinklora.full_attention(model):
            dense = model(input_ids=ids).logits
        assert torch.equal(model(input_ids=ids).logits, patterned)  # the pattern is back after the block
    assert not torch.allclose(patterned, dense)
    modules_to_save = model.peft_config["default"].modules_to_save
    assert {"embed_tokens", "input_layernorm", "post_attention_layernorm", "norm"} <= set(modules_to_save)


def test_the_record_reads_the_pattern_and_backend_that_ran_and_catches_a_dense_run_labelled_sf():
    model = tiny_model("llama", attn_implementation=ctxaware.attention.ATTN_IMPLEMENTATION)
    layers = model.config.num_hidden_layers
    model = sinklora.prepare_model(model, sinklora.training_pattern("sf", 0.25, sinks=4), sinklora.lora_config(model))
    ids = torch.randint(3, 300, (1, 64))
    with sinklora.record_attention(model) as record:
        model(input_ids=ids, labels=ids).loss.backward()
    expected = sinklora.expected_pattern("sf", 0.25, 4, 64)
    assert expected == "sf(G=16, sinks=4)"
    # One call per layer, each with the SF pattern at G = 64 / 4 on the CPU's masked SDPA backend.
    assert record == {
        "patterns": {"sf(G=16, sinks=4)": layers},
        "backends": {"sdpa": layers},
        "calls": layers,
        "layers": layers,
        "layers_called": layers,
    }
    sinklora.check_attention_ran(record, expected)
    assert all(ctxaware.attention.get_attention_options(m).call_log is None for m in attention_modules(model))

    # The same model with the pattern switched off trains dense: the record says so and the check refuses it.
    with sinklora.full_attention(model), sinklora.record_attention(model) as dense:
        model(input_ids=ids, labels=ids).loss.backward()
    assert dense["patterns"] == {"dense": layers}
    with pytest.raises(RuntimeError, match=r"configured for sf\(G=16, sinks=4\).*ran \{'dense': 2\}"):
        sinklora.check_attention_ran(dense, expected)
    with pytest.raises(RuntimeError, match="in 0 of 2 layers"):
        sinklora.check_attention_ran(sinklora.attention_record([Counter(), Counter()]), "dense")


def test_training_speed_counts_the_steps_this_call_ran_on_every_process_and_its_rows():
    speed = TrainingSpeed(row_length=100)
    args = SimpleNamespace(
        device=torch.device("cpu"), per_device_train_batch_size=2, gradient_accumulation_steps=3, world_size=4
    )
    speed.on_train_begin(args, SimpleNamespace(global_step=5), None)  # resumed at step 5: those steps ran before
    speed.on_train_end(args, SimpleNamespace(global_step=7), None)
    result = speed.result
    assert result["train_steps"] == 2 and result["train_tokens"] == 2 * 2 * 3 * 4 * 100
    assert result["tokens_per_s"] == pytest.approx(result["train_tokens"] / result["train_seconds"])
    assert result["peak_memory_gib"] is None


def test_training_speed_on_cuda_counts_the_peak_from_the_start_of_training_in_gib(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: calls.append(("reset", device)))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device: calls.append(("synchronize", device)))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 3 * 2**29)
    speed = TrainingSpeed(row_length=8)
    cuda = torch.device("cuda", 0)
    args = SimpleNamespace(device=cuda, per_device_train_batch_size=1, gradient_accumulation_steps=1, world_size=1)
    speed.on_train_begin(args, SimpleNamespace(global_step=0), None)
    assert calls == [("reset", cuda)]  # model loading and the evaluation before training are not counted
    speed.on_train_end(args, SimpleNamespace(global_step=1), None)
    assert calls == [("reset", cuda), ("synchronize", cuda)] and speed.result["peak_memory_gib"] == 1.5


def test_pack_token_stream():
    rows = pack_token_stream([[1, 2, 3], [4, 5], [6, 7, 8, 9]], 4, separator=0)
    assert rows == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]]
    assert pack_token_stream([[1] * 10], 4, max_rows=1) == [[1, 1, 1, 1]]


def test_push_to_hub_uploads_the_folder_with_its_card(tmp_path, monkeypatch):
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, private=None, exist_ok=False, repo_type=None):
            calls.append(("create", repo_id, private, exist_ok, repo_type))

        def upload_folder(self, folder_path, repo_id, commit_message, repo_type=None):
            calls.append(
                ("upload", repo_id, sorted(p.name for p in __import__("pathlib").Path(folder_path).iterdir()))
            )

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    write_model_card(tmp_path, title="t", base_model="b", description="d", results={"passkey": {"acc": 0.5}})
    push_folder_to_hub(tmp_path, "me/sinklora", private=True, token="tok")
    assert calls == [
        ("init", "tok"),
        ("create", "me/sinklora", True, True, "model"),
        ("upload", "me/sinklora", ["README.md"]),
    ]
    card = (tmp_path / "README.md").read_text()
    assert "base_model: b" in card and "| passkey | acc | 0.5 |" in card


def test_fused_layers_on_a_cpu_are_refused_before_the_output_folder_is_claimed(tiny_base, tmp_path):
    recipe = load_recipe("sinklora")
    output = tmp_path / "run"
    parsed = _parse(
        recipe, ["--model_name_or_path", str(tiny_base), "--output_dir", str(output), "--fused_layers", "true"]
    )
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        recipe.main(*parsed)
    assert not output.exists()


def test_retrieval_haystack_and_split_reach_the_harness(monkeypatch):
    """--eval_retrieval_text is the passkey and NIAH haystack (long_ppl keeps --eval_text_file); --eval_split reaches
    every task."""
    from contextlib import nullcontext
    from types import SimpleNamespace

    from ctxaware.eval import runner

    recipe = load_recipe("sinklora")
    calls = {}

    def fake(model, tokenizer, tasks, **options):
        calls[tasks[0]] = options
        return SimpleNamespace(results={"results": {tasks[0]: {"acc,none": 1.0}}})

    monkeypatch.setattr(runner, "evaluate_in_process", fake)
    args, _, _ = _parse(recipe, ["--output_dir", "unused", "--eval_niah", "true", "--eval_text_file", "ppl.txt",
                                 "--eval_retrieval_text", "books", "--eval_split", "validation"])  # fmt: skip
    model = SimpleNamespace(device="cpu", dtype=torch.float32, eval=lambda: None)
    with monkeypatch.context() as patch:
        patch.setattr(recipe.sinklora, "full_attention", nullcontext)
        recipe.evaluate(model, None, args, 64, 256, "tiny")
    assert {task: options["haystack_file"] for task, options in calls.items()} == {
        "passkey": "books",
        "niah": "books",
        "long_ppl": "ppl.txt",
    }
    assert {options["split"] for options in calls.values()} == {"validation"}
