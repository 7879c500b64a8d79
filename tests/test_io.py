"""Atomic writes: the target appears whole or not at all, a failure keeps what was there, nothing is left behind."""

import os
import stat

import pytest

from ctxaware.io import atomic_directory, atomic_file, write_text


def test_atomic_file_replaces_the_target_only_when_the_block_completes(tmp_path):
    target = tmp_path / "sub" / "results.json"
    assert write_text(target, "first") == target  # creates the missing folder
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_text("half")
        assert target.read_text() == "first"  # the target is untouched while the block writes
        raise RuntimeError("boom")
    assert target.read_text() == "first"
    assert os.listdir(target.parent) == ["results.json"]
    write_text(target, "second")
    assert target.read_text() == "second" and os.listdir(target.parent) == ["results.json"]


def test_atomic_file_follows_the_umask_like_a_plain_write(tmp_path):
    write_text(tmp_path / "atomic.txt", "x")
    (tmp_path / "plain.txt").write_text("x")
    mode = stat.S_IMODE((tmp_path / "atomic.txt").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)  # not tempfile's private 0600


def test_atomic_directory_swaps_the_whole_folder(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "stale.bin").write_text("old run")
    with atomic_directory(target) as tmp:
        assert tmp.is_dir() and not any(tmp.iterdir()) and tmp.parent == tmp_path
        (tmp / "config.json").write_text("{}")
        assert (target / "stale.bin").exists()  # the previous folder stays until the block completes
    assert os.listdir(target) == ["config.json"]  # replaced, not merged
    assert os.listdir(tmp_path) == ["model"]


def test_atomic_directory_keeps_the_previous_folder_on_failure(tmp_path):
    target = tmp_path / "adapter"
    with atomic_directory(target) as tmp:
        (tmp / "weights").write_text("good")
    with pytest.raises(KeyboardInterrupt), atomic_directory(target) as tmp:
        (tmp / "weights").write_text("half")
        raise KeyboardInterrupt
    assert (target / "weights").read_text() == "good"
    assert os.listdir(tmp_path) == ["adapter"]
    with pytest.raises(ValueError), atomic_directory(tmp_path / "never") as tmp:
        raise ValueError
    assert os.listdir(tmp_path) == ["adapter"]
