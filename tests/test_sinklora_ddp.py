"""Issue 12's CPU part: the SinkLoRA recipe under the DDP accelerate config on two processes (gloo) follows the
one-process run with the same global batch: the same losses and the same saved adapter."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.launch import accelerate_launch


def _losses(output_dir):
    (state,) = output_dir.glob("checkpoint-*/trainer_state.json")
    return [entry["loss"] for entry in json.loads(state.read_text())["log_history"] if "loss" in entry]


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tiny_base, tmp_path):
    common = ["--model_name_or_path", str(tiny_base), "--max_steps", "3", "--save_steps", "3", "--seed", "0"]
    common += ["--num_train_rows", "6", "--eval_limit", "0", "--learning_rate", "0.01", "--logging_steps", "1"]
    single, double = tmp_path / "one-process", tmp_path / "two-processes"
    accelerate_launch(
        "recipes/sinklora.py", *common, "--per_device_train_batch_size", "2", "--output_dir", str(single)
    )
    accelerate_launch(
        "recipes/sinklora.py",
        *common,
        "--per_device_train_batch_size",
        "1",
        "--output_dir",
        str(double),
        num_processes=2,
        config_file="recipes/accelerate/ddp.yaml",
        finished=double / "adapter" / "eval_results.json",
    )
    assert len(_losses(single)) == 3
    assert _losses(double) == pytest.approx(_losses(single), rel=1e-4)
    one = load_file(single / "adapter" / "adapter_model.safetensors")
    two = load_file(double / "adapter" / "adapter_model.safetensors")
    assert one.keys() == two.keys() and any("embed_tokens" in key for key in one)
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5, msg=key)
