"""Output folders: a lock against a second run, no mixing with another run's results, interrupted checkpoints and
temporary folders cleaned up, unique eval result names, the Hub token kept off disk, and training lengths that would
train nothing refused."""

import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from ctxaware import outputs
from ctxaware.eval import runner
from ctxaware.training import RequireTrainingSteps, RunConfigCallback, resolve_resume_checkpoint
from tests.test_configs import load_recipe


@pytest.fixture(autouse=True)
def _release_locks():
    yield
    for folder in list(outputs._HELD):
        outputs.unlock_output_dir(folder)


def _checkpoint(folder, step, *, complete=True, config=None):
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    if complete:
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if config is not None:
        (path / outputs.RUN_CONFIG_NAME).write_text(json.dumps(config))
    return path


def test_a_second_process_is_refused_naming_the_holder(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from ctxaware.outputs import lock_output_dir; "
            f"lock_output_dir({str(tmp_path)!r}); print('locked', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=rf"in use by a running job \(pid {holder.pid} on .*another --output_dir"):
            outputs.claim_output_dir(tmp_path, {"lr": 1})
    finally:
        holder.kill()
        holder.wait()
    outputs.claim_output_dir(tmp_path, {"lr": 1})  # the lock dies with its process, even a killed one


def test_other_settings_are_refused_unless_overwrite(tmp_path):
    outputs.claim_output_dir(tmp_path, {"lr": 1, "logging_steps": 1})
    _checkpoint(tmp_path, 10, config={"lr": 1})
    outputs.unlock_output_dir(tmp_path)
    with pytest.raises(ValueError, match=r"other settings \(lr: 1, now 2\).*--overwrite_output_dir true"):
        outputs.claim_output_dir(tmp_path, {"lr": 2, "logging_steps": 1})
    outputs.claim_output_dir(tmp_path, {"lr": 2, "logging_steps": 1}, overwrite=True)
    assert not (tmp_path / "checkpoint-10").exists()  # the other run's checkpoints cannot be resumed into this one
    assert json.loads((tmp_path / outputs.RUN_CONFIG_NAME).read_text())["lr"] == 2


def test_same_settings_with_checkpoints_need_resume_or_overwrite(tmp_path):
    outputs.claim_output_dir(tmp_path, {"lr": 1, "logging_steps": 1})
    _checkpoint(tmp_path, 10, config={"lr": 1})
    with pytest.raises(ValueError, match="--resume_from_checkpoint true to continue"):
        outputs.claim_output_dir(tmp_path, {"lr": 1, "logging_steps": 5})
    outputs.claim_output_dir(tmp_path, {"lr": 1, "logging_steps": 5}, resume="true")
    outputs.unlock_output_dir(tmp_path)
    with pytest.raises(ValueError, match="pass --overwrite_output_dir true to start over"):  # a recipe without resume
        outputs.claim_output_dir(tmp_path, {"lr": 1}, resume="true", resumable=False)


def test_a_folder_of_unknown_files_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"already holds files of another run \(notes.txt\)"):
        outputs.claim_output_dir(tmp_path, {"lr": 1})
    outputs.claim_output_dir(tmp_path, {"lr": 1}, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"  # overwrite deletes checkpoints, never unknown files


def test_interrupted_checkpoint_is_skipped_and_removed(tmp_path):
    config = {"attention": "sf"}
    outputs.claim_output_dir(tmp_path, config)
    _checkpoint(tmp_path, 5, config=config)
    _checkpoint(tmp_path, 10, complete=False)  # killed while the Trainer wrote it: an empty folder
    assert resolve_resume_checkpoint(True, str(tmp_path), config) == str(tmp_path / "checkpoint-5")
    outputs.unlock_output_dir(tmp_path)
    outputs.claim_output_dir(tmp_path, config, resume=True)
    assert not (tmp_path / "checkpoint-10").exists() and (tmp_path / "checkpoint-5").is_dir()


def test_checkpoint_without_its_own_config_falls_back_to_the_folders(tmp_path):
    """Killed after the Trainer finished a checkpoint but before the callback copied the run config into it."""
    outputs.claim_output_dir(tmp_path, {"attention": "sf"})
    _checkpoint(tmp_path, 4)
    assert resolve_resume_checkpoint("true", str(tmp_path), {"attention": "sf"}).endswith("checkpoint-4")
    with pytest.raises(ValueError, match="attention: 'sf', now 's2'"):
        resolve_resume_checkpoint("true", str(tmp_path), {"attention": "s2"})


def test_leftovers_of_killed_writes_are_removed(tmp_path):
    outputs.claim_output_dir(tmp_path, {"lr": 1})
    (tmp_path / ".adapter-tmp-x1y2").mkdir()
    (tmp_path / ".sft-tmp-abc").mkdir()
    (tmp_path / ".adapter-old").mkdir()
    (tmp_path / ".results.json.k2j.tmp").write_text("{")
    (tmp_path / ".adapter.1f2e3d4c.tmp").mkdir()  # ctxaware.io's names
    (tmp_path / ".adapter.1f2e3d4c.old").mkdir()
    (tmp_path / "adapter").mkdir()
    outputs.unlock_output_dir(tmp_path)
    outputs.claim_output_dir(tmp_path, {"lr": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == [outputs.LOCK_NAME, "adapter", outputs.RUN_CONFIG_NAME]


def test_run_config_in_checkpoints_is_written_atomically(tmp_path):
    (tmp_path / "checkpoint-3").mkdir()
    args, state = SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(global_step=3, is_world_process_zero=True)
    RunConfigCallback({"lr": 1}).on_save(args, state, None)
    assert json.loads((tmp_path / "checkpoint-3" / outputs.RUN_CONFIG_NAME).read_text()) == {"lr": 1}
    assert sorted(p.name for p in (tmp_path / "checkpoint-3").iterdir()) == [outputs.RUN_CONFIG_NAME]


def test_eval_results_of_runs_in_the_same_second_keep_distinct_names(tmp_path):
    results = {"config": {"model": "m"}, "date": time.time(), "results": {}}
    first = runner.write_outputs(results, {}, tmp_path)["results"]
    second = runner.write_outputs(results, {}, tmp_path)["results"]
    assert first != second and first.is_file() and second.is_file()
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == sorted([first.name, second.name])


# --- training length and the Hub token ------------------------------------------------------------------------------
def _parse(recipe_name, *flags, tmp_path):
    from trl import TrlParser

    recipe = load_recipe(recipe_name)
    return TrlParser(recipe.CONFIG_CLASSES).parse_args_and_config(args=["--output_dir", str(tmp_path), *flags])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max_steps", "-3"], "--max_steps -3 trains nothing, or not that many steps"),
        (["--max_steps", "0"], "--max_steps 0"),
        (["--max_steps", "-1", "--num_train_epochs", "0"], "--num_train_epochs 0.0 trains nothing"),
    ],
)
def test_training_lengths_that_train_nothing_are_refused(tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        _parse("sinklora", *flags, tmp_path=tmp_path)


def test_num_train_rows_zero_is_refused(tmp_path):
    recipe = load_recipe("sinklora")
    args, training_args, model_args = _parse("sinklora", "--num_train_rows", "0", tmp_path=tmp_path)
    with pytest.raises(ValueError, match="--num_train_rows 0 trains on nothing"):
        recipe.validate(args, training_args, model_args, original_length=64)


def test_a_data_loader_without_a_batch_stops_training():
    args = SimpleNamespace(per_device_train_batch_size=4, dataloader_drop_last=True)
    with pytest.raises(ValueError, match="no batch of 4 rows.*--dataloader_drop_last false"):
        RequireTrainingSteps().on_train_begin(args, None, None, train_dataloader=[])
    with pytest.raises(ValueError, match="0 steps"):
        RequireTrainingSteps().on_train_end(args, SimpleNamespace(global_step=0), None)


def test_hub_token_never_reaches_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "")  # recorded, so the token the recipe sets is undone after the test
    _, args, _ = _parse("sinklora", "--hub_token", "hf_secret123", tmp_path=tmp_path)
    assert os.environ["HF_TOKEN"] == "hf_secret123"  # where huggingface_hub finds it for the push
    assert "hf_secret123" not in repr(vars(args))  # the Trainer pickles the config into training_args.bin
    assert "hf_secret123" not in json.dumps(args.to_dict(), default=str)


def test_moh_num_train_rows_zero_is_refused(tmp_path):
    with pytest.raises(ValueError, match="num_train_rows=0 trains on nothing"):
        _parse("moh", "--num_train_rows", "0", tmp_path=tmp_path)
