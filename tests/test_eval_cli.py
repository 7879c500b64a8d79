"""`ctxaware eval` end to end on tiny random models saved to disk: every task with --limit, results JSON against the
schema, samples and plots written atomically, PEFT adapters, and the errors that name their fix."""

import json

import pytest
import torch

from ctxaware.cli import main
from ctxaware.eval.output import validate_results
from ctxaware.eval.registry import task_names
from tests.eval_fakes import install_fake_world
from tests.tiny_models import tiny_model


FAST = ["--no_progress", "--batch_size", "4", "--max_new_tokens", "4"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def lora_dirs(tmp_path_factory, tiny_tokenizer):
    """A LoRA adapter of the 32-wide model, and a 48-wide model it does not fit."""
    from peft import LoraConfig, get_peft_model

    adapter = tmp_path_factory.mktemp("lora")
    peft_model = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(adapter)
    wide = tmp_path_factory.mktemp("wide")
    tiny_model("llama", hidden_size=48, head_dim=12).save_pretrained(wide)
    tiny_tokenizer.save_pretrained(wide)
    return adapter, wide


def eval_cli(*args):
    return main(["eval", *args])


def read_results(out_dir):
    (results_file,) = out_dir.glob("*/results_*.json")
    return json.loads(results_file.read_text()), results_file.parent


def test_list(capsys):
    assert eval_cli("--list") == 0
    listed = capsys.readouterr().out
    for name in task_names():
        assert name in listed


def test_every_task_end_to_end(model_dir, tmp_path, capsys, monkeypatch):
    install_fake_world(monkeypatch)
    out, haystack = tmp_path / "runs", tmp_path / "haystack.txt"
    haystack.write_text("The grass is green. The river is wide and slow. " * 40)
    code = eval_cli(
        "--model",
        str(model_dir),
        "--tasks",
        "default",
        "--limit",
        "2",
        "--lengths",
        "32,64",
        "--depths",
        "0,1",
        "--haystack_file",
        str(haystack),
        "--output_path",
        str(out),
        *FAST,
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    stdout = captured.out
    results, folder = read_results(out)
    validate_results(results)
    assert set(results["results"]) == set(task_names())
    assert results["results"]["arithmetic"]["alias"] == "arithmetic"
    assert 0.0 <= results["results"]["arithmetic"]["acc,none"] <= 1.0
    assert "acc_stderr,none" in results["results"]["arithmetic"]
    assert results["n-samples"]["arithmetic"] == {"original": 2, "effective": 2}
    assert results["n-samples"]["niah"]["effective"] == 2 * 2 * 2  # lengths x depths x limit
    assert results["config"]["generation_hooks"] == {"kv_cache": "full", "steer": "none", "moh": "off"}
    assert results["configs"]["long_ppl"]["mode"].startswith("full")
    for task, name in results["samples_files"].items():
        rows = [json.loads(line) for line in (folder / name).read_text().splitlines()]
        assert rows and all("doc_id" in row for row in rows), task
    assert len((folder / results["samples_files"]["niah"]).read_text().splitlines()) == 16  # two templates
    for task, plots in results["plots"].items():
        for name in plots.values():
            assert (folder / name).read_bytes()[:4] == b"\x89PNG", task
    assert set(results["plots"]) == {"niah", "attention_allocation"}
    assert not list(folder.glob(".*tmp"))  # no temporary file left behind
    for task in task_names():
        assert f"|{task}" in stdout.replace(" ", "")

    # A second model's attention allocation plotted against this run's.
    results_file = next(folder.glob("results_*.json"))
    code = eval_cli(
        "--model",
        str(model_dir),
        "--tasks",
        "attention_allocation",
        "--limit",
        "1",
        "--attention_baseline",
        str(results_file),
        "--output_path",
        str(tmp_path / "cmp"),
        *FAST,
    )
    assert code == 0
    compared, cmp_folder = read_results(tmp_path / "cmp")
    assert (cmp_folder / compared["plots"]["attention_allocation"]["heatmap"]).stat().st_size > 0


def test_default_world_and_peft_adapter(model_dir, lora_dirs, tmp_path, capsys):
    """The real synthetic world feeds the tasks, and a PEFT adapter loads onto its base."""
    adapter, _ = lora_dirs
    out = tmp_path / "runs"
    code = eval_cli(
        "--model",
        str(model_dir),
        "--adapter",
        str(adapter),
        "--tasks",
        "arithmetic,counterfactual_qa",
        "--limit",
        "3",
        "--output_path",
        str(out),
        *FAST,
    )
    assert code == 0, capsys.readouterr().err
    results, _ = read_results(out)
    assert results["config"]["adapter"] == str(adapter)
    assert results["n-samples"]["arithmetic"]["effective"] == 3


def test_ctxaware_adapter_dispatch(model_dir, tmp_path, capsys):
    """The project's own adapter format (here LoFiT) goes through the same --adapter flag."""
    from ctxaware.heads import HeadLayout
    from ctxaware.methods.lofit import LoFiTAdapter

    model = tiny_model("llama")
    LoFiTAdapter(HeadLayout.from_model(model), [(0, 1)], base_model=str(model_dir)).save_pretrained(tmp_path / "lofit")
    code = eval_cli(
        "--model", str(model_dir), "--adapter", str(tmp_path / "lofit"), "--tasks", "arithmetic", "--limit", "2", *FAST
    )
    assert code == 0, capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text("{}")
    assert eval_cli("--model", str(model_dir), "--adapter", str(tmp_path / "bad"), "--tasks", "arithmetic") == 2
    assert "neither a PEFT adapter's" in capsys.readouterr().err


def test_summarization_win_rate_against_a_baseline_run(model_dir, tmp_path, monkeypatch):
    install_fake_world(monkeypatch)
    common = ["--model", str(model_dir), "--tasks", "summarization", "--limit", "2", *FAST]
    assert eval_cli(*common, "--output_path", str(tmp_path / "base")) == 0
    baseline_results, folder = read_results(tmp_path / "base")
    baseline = folder / baseline_results["samples_files"]["summarization"]
    assert eval_cli(*common, "--baseline_samples", str(baseline), "--output_path", str(tmp_path / "new")) == 0
    results, _ = read_results(tmp_path / "new")
    assert results["results"]["summarization"]["win_rate,none"] == 0.5  # same greedy model: all ties


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tasks", "niah,bogus"], "Unknown task 'bogus'. Known tasks: arithmetic, attention_allocation"),
        (["--limit", "0"], "--limit must be a positive integer"),
        (["--model", "./no/such/model"], "does not exist"),
        (["--kv_cache", "snapkv:0.2"], "no kind 'snapkv' is registered"),
        (["--tasks", "niah", "--dataset", "squad"], "No selected task knows data set 'squad'"),
        (["--tasks", "niah", "--haystack_file", "/no/such/file.txt"], "does not exist"),
    ],
)
def test_errors_before_loading(args, message, capsys):
    assert eval_cli(*args) == 2
    assert message in capsys.readouterr().err


def test_haystack_file_too_short(model_dir, tmp_path, capsys):
    haystack = tmp_path / "hay.txt"
    haystack.write_text("A short story. It ends here.")
    code = eval_cli(
        "--model", str(model_dir), "--tasks", "niah", "--lengths", "256", "--haystack_file", str(haystack), *FAST
    )
    assert code == 2
    assert "fewer than the longest requested context (256): pass a longer file" in capsys.readouterr().err


@pytest.mark.parametrize(
    "switch, message",
    [
        (["--kv_cache", "h2o"], "--kv_cache h2o needs a budget"),
        (["--kv_cache", "full:3"], "takes no arguments"),
        (["--moh", "on:topk=1"], "unknown ['topk']"),
        (["--moh", "on"], "--moh on needs a MoH router"),
    ],
)
def test_switch_arguments_rejected_after_loading(model_dir, switch, message, capsys):
    """Switch arguments checked against the loaded model: a one-line error and exit code 2, no traceback."""
    assert eval_cli("--model", str(model_dir), "--tasks", "passkey", "--lengths", "32", *switch, *FAST) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("ctxaware eval: error: ") and message in last


def test_adapter_for_another_base_model(lora_dirs, capsys):
    adapter, wide = lora_dirs
    assert eval_cli("--model", str(wide), "--adapter", str(adapter), "--tasks", "arithmetic", *FAST) == 2
    err = capsys.readouterr().err
    assert "was trained on base model" in err and "--model" in err


def test_help_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys; from ctxaware.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_every_task_on_the_embedded_model_with_its_world(tmp_path, capsys):
    """The default suite on the shipped `ctxaware-tiny` (the default --model) and the real world data, with --limit."""
    out = tmp_path / "runs"
    code = eval_cli(
        "--tasks",
        "default",
        "--limit",
        "1",
        "--lengths",
        "128",
        "--depths",
        "0.5",
        "--output_path",
        str(out),
        "--no_progress",
        "--batch_size",
        "4",
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    results, _ = read_results(out)
    validate_results(results)
    assert results["config"]["model"] == "ctxaware-tiny"
    assert set(results["results"]) == set(task_names())
    # Within its training context the shipped model retrieves a 5-digit passkey (1.00 in RESULTS.md).
    assert results["results"]["passkey"]["acc,none"] == 1.0
    assert 1.0 < results["results"]["long_ppl"]["ppl_len128,none"] < 1000.0


def test_peft_adapter_with_an_added_token_loads_with_its_tokenizer(model_dir, tmp_path):
    """Conditional SFT saves a tokenizer with an added token and the new embedding row beside its LoRA adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    from ctxaware.models import load_model

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|context|>"]})
    base = tiny_model("llama")
    base.resize_token_embeddings(len(tokenizer))
    config = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens", "lm_head"])
    trained = get_peft_model(base, config)
    with torch.no_grad():
        trained.base_model.model.model.embed_tokens.modules_to_save["default"].weight[-1].fill_(0.5)
    trained.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    model, loaded_tokenizer = load_model(str(model_dir), adapter=str(tmp_path), dtype="float32", device="cpu")
    assert len(loaded_tokenizer) == len(tokenizer) == 321
    ids = loaded_tokenizer("hello <|context|>", return_tensors="pt")["input_ids"]
    assert ids[0, -1].item() == 320
    torch.testing.assert_close(model(ids).logits, trained.eval()(ids).logits)
