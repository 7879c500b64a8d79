"""Bad input fails fast with exit code 2 and one line naming the fix: broken YAML, empty or non-UTF-8 data files, rows
without the needed column, switch values out of range for the model, context lengths that cannot be scored."""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from ctxaware.cli import main
from ctxaware.datafiles import check_safetensors, read_records, read_text, require_column
from ctxaware.eval.cli import warn_beyond_context
from ctxaware.methods.context_scoring import load_chat_records
from tests.tiny_models import tiny_model


REPO_ROOT = Path(__file__).resolve().parents[1]


def test_broken_yaml_config_is_one_line_and_exit_code_2(tmp_path):
    config = tmp_path / "broken.yaml"
    config.write_text("learning_rate: [1e-3\nmax_steps: 2\n")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "recipes/lofit.py", "--config", str(config)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(errors) == 1 and errors[0].startswith("lofit: error: the --config file is not valid YAML")
    assert "broken.yaml" in errors[0] and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "content, message",
    [(b"", "is empty"), (b"  \n", "is empty"), (b"caf\xe9 au lait\nsecond\n", r"not UTF-8 text \(byte 3, line 1\)")],
)
def test_unreadable_text_files_name_the_file(tmp_path, content, message):
    path = tmp_path / "hay.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"{path}.*{message}"):
        read_text(path)


def test_jsonl_rows_are_named(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text('{"messages": []}\n\n{"messages": [\n')
    with pytest.raises(ValueError, match=r"chats.jsonl, line 3: not valid JSON"):
        read_records(path)
    path.write_text('{"text": "a"}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"row 2: expected a JSON object, got list"):
        read_records(path)
    with pytest.raises(ValueError, match=r"src, row 2: no value in column 'text' \(columns: body\); fix it"):
        require_column([{"text": "a"}, {"body": "b"}], "text", "src", "fix it")


def test_chat_rows_without_a_conversation_are_named(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"prompt": "no conversation"}\n')
    with pytest.raises(ValueError, match=r"chats.jsonl, row 2: no value in column 'messages'"):
        load_chat_records(str(path))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--tasks", "counterfactual_qa", "--steer", "pasta:heads=99.99"], "layer 99 is out of range"),
        (["--tasks", "passkey", "--kv_cache", "h2o:-3"], "H2O budget must be positive"),
        (["--tasks", "long_ppl", "--lengths", "1"], "every context length must be at least 2 tokens"),
    ],
)
def test_eval_switches_and_lengths_are_checked_before_work(model_dir, flags, message, capsys):
    assert main(["eval", "--model", str(model_dir), "--no_progress", "--limit", "1", *flags]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("ctxaware eval: error: ") and message in errors[0]


def test_lengths_beyond_the_context_are_announced(capsys):
    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=512))
    warn_beyond_context(model, [256, 100000])
    assert "--lengths up to 100000 exceed the model's context of 512 tokens" in capsys.readouterr().err
    warn_beyond_context(model, [512])
    assert capsys.readouterr().err == ""


def test_a_truncated_safetensors_file_is_named(tmp_path, tiny_tokenizer, capsys):
    tiny_model("llama").save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert main(["eval", "--model", str(tmp_path), "--tasks", "arithmetic", "--limit", "1", "--no_progress"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and f"{weights} is truncated or corrupt" in errors[0]
    weights.write_bytes(b"\x00" * 4)
    with pytest.raises(ValueError, match="header is unreadable"):
        check_safetensors(tmp_path)


def test_lofit_names_a_broken_local_data_file(tmp_path):
    from trl import TrlParser

    from tests.test_configs import load_recipe

    recipe = load_recipe("lofit")
    data = tmp_path / "clutrr.jsonl"
    data.write_bytes(b'{"story": "a"}\n{"story": "caf\xe9"}\n')
    args, *_ = TrlParser(recipe.CONFIG_CLASSES).parse_args_and_config(
        args=["--task", "clutrr", "--dataset_name", str(data), "--output_dir", str(tmp_path / "out")]
    )
    with pytest.raises(ValueError, match=r"clutrr.jsonl is not UTF-8 text \(byte 29, line 2\)"):
        recipe.load_records(args, "train", tokenizer=None)
