"""Every recipe's data set option takes a local file or folder (and `books` where it wants text), through
`ctxaware.datafiles.load_rows`, with clear errors for files that cannot serve."""

import json
from types import SimpleNamespace

import pytest

from ctxaware.datafiles import load_rows
from tests.test_configs import load_recipe


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_load_rows_reads_each_local_format(tmp_path):
    assert load_rows(str(_jsonl(tmp_path / "a.jsonl", [{"text": "x"}, {"text": "y"}])))["text"] == ["x", "y"]
    (tmp_path / "a.txt").write_text("one\ntwo\n")
    assert load_rows(str(tmp_path / "a.txt"))["text"] == ["one", "two"]
    load_rows(str(tmp_path / "a.jsonl")).to_parquet(str(tmp_path / "a.parquet"))
    assert load_rows(str(tmp_path / "a.parquet"))["text"] == ["x", "y"]
    assert load_rows(str(tmp_path / "a.jsonl"), split="train[1:]")["text"] == ["y"]
    books = load_rows("books", split="validation")
    assert len(books) == 1 and books[0]["text"].startswith("EPOCH THE THIRD")


def test_load_rows_folder_splits_and_errors(tmp_path):
    _jsonl(tmp_path / "d" / "train.jsonl", [{"text": "train row"}])
    _jsonl(tmp_path / "d" / "test.jsonl", [{"text": "test row"}])
    assert load_rows(str(tmp_path / "d"), split="test")["text"] == ["test row"]
    with pytest.raises(ValueError, match="single file, which holds one split"):
        load_rows(str(tmp_path / "d" / "train.jsonl"), split="test")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_rows(str(tmp_path / "missing.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        load_rows(str(tmp_path / "empty.jsonl"))


def test_sinklora_and_moh_read_local_text(tmp_path):
    path = _jsonl(tmp_path / "docs.jsonl", [{"body": "first document"}, {"body": "second document"}])
    sinklora = load_recipe("sinklora")
    args = SimpleNamespace(dataset_name=str(path), dataset_config=None, dataset_split="train", dataset_streaming=False)
    assert [row["body"] for row in sinklora.load_text_dataset(args, "body")] == ["first document", "second document"]
    with pytest.raises(ValueError, match="no value in column 'text'"):
        sinklora.load_text_dataset(args, "text")
    moh = load_recipe("moh")
    moh_args = SimpleNamespace(dataset_name=str(path), dataset_config=None, dataset_streaming=False)
    assert list(moh.documents(moh_args, "train", 2, text_field="body")) == ["first document", "second document"]
    books = SimpleNamespace(dataset_name="books", dataset_config=None, dataset_streaming=False)
    assert next(moh.documents(books, "test", 1)).lstrip().startswith("Produced by")


def test_lofit_reads_a_local_file(tmp_path):
    rows = [{"story": "[Ann] is [Bo]'s mother.", "query": "('Bo', 'Ann')", "target_text": "mother"}]
    path = _jsonl(tmp_path / "clutrr.jsonl", rows)
    lofit = load_recipe("lofit")
    args = SimpleNamespace(task="clutrr", dataset_name=str(path), dataset_config=None)
    (record,) = lofit.load_records(args, "train", tokenizer=None)
    assert record == {
        "prompt": "[Ann] is [Bo]'s mother.\nQuestion: How is Ann related to Bo?\nAnswer:",
        "completion": " mother",
    }


def test_context_sft_reads_local_chats(tmp_path):
    from ctxaware.methods.context_scoring import load_chat_records

    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    path = _jsonl(tmp_path / "chats.jsonl", [{"messages": chat, "kind": "plain"}] * 3)
    records = load_chat_records(str(path), limit=2)
    assert len(records) == 2 and records[0]["messages"] == chat and records[0]["kind"] == "plain"


def test_rlhf_reads_local_folders_of_both_preference_shapes(tmp_path):
    rlhf = load_recipe("rlhf_summarize")
    posts = tmp_path / "tldr"
    for split in ("train", "test"):
        _jsonl(posts / f"{split}.jsonl", [{"prompt": f"A {split} post.\nTL;DR:", "completion": " short"}])
    tldr_pairs = tmp_path / "tldr_pref"
    for split in ("train", "test"):
        _jsonl(tldr_pairs / f"{split}.jsonl", [{"prompt": "Post.\nTL;DR:", "chosen": " good", "rejected": " bad"}])
    feedback = tmp_path / "feedback"
    row = {
        "info": {"post": "My post.", "title": "T", "subreddit": "r"},
        "summaries": [{"text": " one"}, {"text": "two"}],
        "choice": 1,
    }
    cnn_row = {
        "info": {"post": None, "article": "x", "title": None},
        "summaries": [{"text": "a"}, {"text": "b"}],
        "choice": 0,
    }
    for split in ("train", "test"):
        _jsonl(feedback / f"{split}.jsonl", [row, cnn_row])  # CNN/DM rows (no post) are not Reddit comparisons
    cfg = rlhf.RLHFConfig(
        output_dir=str(tmp_path / "out"),
        dataset_name=str(posts),
        preference_dataset_name=str(tldr_pairs),
        use_cpu=True,
        report_to="none",
    )
    assert rlhf.summary_records(cfg, "test") == [{"post": "A test post.", "reference": " short"}]
    assert rlhf.preference_pairs(cfg, "train") == [{"post": "Post.", "chosen": "good", "rejected": "bad"}]
    cfg.preference_dataset_name = str(feedback)
    (pair,) = rlhf.preference_pairs(cfg, "test")
    assert (pair["chosen"], pair["rejected"]) == ("two", "one")
    assert pair["post"] == "SUBREDDIT: r/r\n\nTITLE: T\n\nPOST: My post."  # trl-lib/tldr's layout
    with pytest.raises(ValueError, match="single file"):
        rlhf.RLHFConfig(output_dir=str(tmp_path / "o2"), dataset_name=str(posts / "train.jsonl"), use_cpu=True)


def test_rlhf_holds_out_tldr_preference_validation_split(monkeypatch, tmp_path):
    """trl-lib/tldr-preference has train and validation splits only: the held-out pairs come from validation."""
    rlhf = load_recipe("rlhf_summarize")
    asked = []

    def fake_rows(name, *, config=None, split="train", streaming=False):
        from datasets import Dataset

        asked.append(split)
        return Dataset.from_list([{"prompt": "Post.\nTL;DR:", "chosen": "good", "rejected": "bad"}])

    monkeypatch.setattr(rlhf, "load_rows", fake_rows)
    cfg = rlhf.RLHFConfig(
        output_dir=str(tmp_path / "out"),
        preference_dataset_name="trl-lib/tldr-preference",
        use_cpu=True,
        report_to="none",
    )
    rlhf.preference_pairs(cfg, "test")
    rlhf.preference_pairs(cfg, "train")
    assert asked == ["validation", "train"]
