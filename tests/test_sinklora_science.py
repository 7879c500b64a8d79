"""benchmarks/sinklora_science.py: its perplexity and throughput ratios, its table and its target pass/fail logic on
fixed numbers."""

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from ctxaware.texts import SPLITS, read_text
from ctxaware.world.longctx import PASSKEY_INTRO, text_sentences
from tests import long_documents
from tests.launch import load_benchmark


@pytest.fixture(scope="module")
def science():
    return load_benchmark("sinklora_science")


def _result(ppl512, ppl2048, passkey=None, niah=None):
    result = {"long_ppl": {"ppl_len512": ppl512, "ppl_len1024": ppl512 + 1, "ppl_len2048": ppl2048}}
    if passkey is not None:
        result["passkey"] = {"acc": passkey, "acc_len2048": passkey}
    if niah is not None:
        result["niah"] = {"acc_plain": niah, "acc_plain_len2048": niah}
    return result


RESULTS = {
    "original": _result(43.6, 134.3, passkey=0.0),
    "yarn_untrained": _result(41.0, 45.6, passkey=1.0, niah=0.4),
    "yarn_full": _result(4.0, 4.0, passkey=1.0, niah=0.95),
    "yarn_s2": _result(4.0, 4.2, passkey=0.8, niah=0.9),
    "yarn_sf": _result(4.0, 4.1, passkey=0.9, niah=0.9),  # exactly at the 0.9 bar and 2.5% above full: met
    "linear_untrained": _result(211.7, 216.3, passkey=0.0),
    "linear_full": _result(4.0, 4.0, passkey=0.5, niah=0.2),
    "linear_s2": _result(4.0, 4.1, passkey=0.0, niah=0.0),  # better than sf: the paper's direction missed
    "linear_sf": _result(4.0, 4.2, passkey=0.85, niah=None),  # 5% above full, below 0.9, niah not evaluated
}
SPEEDS = {  # the recipe's training_speed of each trained variant (peak memory None: a CPU run)
    "yarn_full": {"tokens_per_s": 1000.0, "peak_memory_gib": 30.4},
    "yarn_s2": {"tokens_per_s": 2500.0, "peak_memory_gib": 12.0},
    "yarn_sf": {"tokens_per_s": 2000.0, "peak_memory_gib": 12.5},
    "linear_sf": {"tokens_per_s": 1800.0, "peak_memory_gib": None},  # no full variant: no ratio
}
KV = {
    "full": {"ppl": 30.0, "within_budget": True},
    "h2o:0.2": {"ppl": 31.0, "within_budget": True},
    "window:0.2": {"ppl": 33.0, "within_budget": True},
}


def test_targets_on_fixed_numbers(science):
    met = science.targets(RESULTS, ["yarn", "linear"], 2048, KV)
    assert met == {
        "yarn: sf passkey@2048 >= 0.9": True,
        "yarn: sf niah@2048 >= 0.9": True,
        "yarn: sf ppl@2048 within 3% of full": True,
        "yarn: s2 ppl@2048 no better than sf": True,
        "yarn: sf ppl@2048 below the untrained scaled model's": True,
        "linear: sf passkey@2048 >= 0.9": False,
        "linear: sf niah@2048 >= 0.9": False,
        "linear: sf ppl@2048 within 3% of full": False,
        "linear: s2 ppl@2048 no better than sf": False,
        "linear: sf ppl@2048 below the untrained scaled model's": True,
        "kv: every cache holds at most its budget": True,
        "kv: h2o:0.2 raises ppl less than window:0.2": True,
    }
    worse = {**KV, "h2o:0.2": {"ppl": 34.0, "within_budget": False}}
    met = science.targets(RESULTS, ["yarn"], 2048, worse)
    assert not met["kv: h2o:0.2 raises ppl less than window:0.2"]
    assert not met["kv: every cache holds at most its budget"]
    # Training must beat the untrained scaled model: equal perplexity misses.
    untrained_as_good = {**RESULTS, "yarn_untrained": _result(41.0, 4.1, passkey=1.0, niah=0.4)}
    assert not science.targets(untrained_as_good, ["yarn"], 2048)[
        "yarn: sf ppl@2048 below the untrained scaled model's"
    ]
    # A variant that did not run misses every target that needs it.
    assert not any(science.targets({"yarn_full": RESULTS["yarn_full"]}, ["yarn"], 2048).values())
    # A run of SF alone judges no comparison with full attention or S^2; SF's own targets stay.
    alone = science.targets({k: RESULTS[k] for k in ("yarn_sf", "yarn_untrained")}, ["yarn"], 2048, variants=["sf"])
    assert alone == {
        "yarn: sf passkey@2048 >= 0.9": True,
        "yarn: sf niah@2048 >= 0.9": True,
        "yarn: sf ppl@2048 below the untrained scaled model's": True,
    }


def test_ppl_relative_to_full_and_report(science):
    relative = science.relative_to_full(RESULTS, ["yarn", "linear"], [512, 1024, 2048])
    assert relative["yarn"]["sf"]["ppl_len2048"] == pytest.approx(4.1 / 4.0)
    assert relative["yarn"]["untrained"]["ppl_len2048"] == pytest.approx(45.6 / 4.0)
    assert relative["linear"]["full"] == {"ppl_len512": 1.0, "ppl_len1024": 1.0, "ppl_len2048": 1.0}
    kv = {b: {**row, "passkey": 1.0, "kv_bytes": 10.0, "memory_saved": 0.5} for b, row in KV.items()}
    speed_relative = science.speed_relative_to_full(SPEEDS, ["yarn", "linear"])
    assert speed_relative == {"yarn": {"full": 1.0, "s2": 2.5, "sf": 2.0}}
    summary = {
        "settings": {"variants_side_by_side": True},
        "results": RESULTS,
        "ppl_relative_to_full": relative,
        "training_speed": SPEEDS,
        "tokens_per_s_relative_to_full": speed_relative,
        "kv_cache_at_L": kv,
        "targets": science.targets(RESULTS, ["yarn"], 2048, KV),
    }
    rows = science.report(summary, ["yarn", "linear"], [512, 1024, 2048])
    assert rows[0].endswith("| niah@2048 | train tokens/s | tokens/s / full | peak GiB |")
    assert "| yarn full | 4.00 | 5.00 | 4.00 | 1.000 | 1.00 | 0.95 | 1000 | 1.00 | 30.4 |" in rows
    assert "| yarn sf | 4.00 | 5.00 | 4.10 | 1.025 | 0.90 | 0.90 | 2000 | 2.00 | 12.5 |" in rows
    assert "| linear sf | 4.00 | 5.00 | 4.20 | 1.050 | 0.85 | - | 1800 | - | - |" in rows
    assert "| linear full | 4.00 | 5.00 | 4.00 | 1.000 | 0.50 | 0.20 | - | - | - |" in rows
    assert "| original | 43.60 | 44.60 | 134.30 | - | 0.00 | - | - | - | - |" in rows
    assert any("side by side" in row for row in rows)
    assert "- yarn: sf passkey@2048 >= 0.9: met" in rows
    apart = science.report({**summary, "settings": {"variants_side_by_side": False}}, ["yarn"], [512, 1024, 2048])
    assert not any("side by side" in row for row in apart)


def test_each_variant_s_training_speed_is_collected_from_the_recipe_s_eval_results(science, tmp_path):
    for name in ("yarn_full", "yarn_s2", "yarn_sf"):
        before = {"original": RESULTS["original"], "scaled": RESULTS["yarn_untrained"]} if name == "yarn_full" else {}
        recorded = {"summary": RESULTS[name], "before": before, "harness": {}}
        if name != "yarn_s2":  # an adapter trained before the speed was recorded
            recorded["training_speed"] = SPEEDS[name]
        (tmp_path / name / "adapter").mkdir(parents=True)
        (tmp_path / name / "adapter" / "eval_results.json").write_text(json.dumps(recorded))
    results, speeds = science.collect(tmp_path, ["yarn"], ["full", "s2", "sf"])
    assert speeds == {name: SPEEDS[name] for name in ("yarn_full", "yarn_sf")}
    assert set(science.speed_relative_to_full(speeds, ["yarn"])["yarn"]) == {"full", "sf"}
    assert results == {
        name: RESULTS[name] for name in ("original", "yarn_untrained", "yarn_full", "yarn_s2", "yarn_sf")
    }


def test_the_retrieval_sweep_chooses_by_validation_retrieval_among_settings_that_lower_perplexity():
    sweep = load_benchmark("sinklora_retrieval_sweep")

    def summary(ppl, passkey, niah):
        untrained = _result(200.0, 150.0)
        return {
            "settings": {"original_length": 512},
            "results": {"yarn_sf": _result(40.0, ppl, passkey, niah), "yarn_untrained": untrained},
        }

    validation = {
        "best_retrieval_but_worse_ppl": summary(160.0, 1.0, 1.0),  # above the untrained 150: not eligible
        "good": summary(100.0, 0.9, 0.8),
        "tie_higher_ppl": summary(120.0, 0.8, 0.9),
        "poor": summary(90.0, 0.2, 0.1),
    }
    assert sweep.choose(validation, "yarn") == "good"
    assert sweep.choose({"worse": validation["best_retrieval_but_worse_ppl"]}, "yarn") is None
    assert sweep.parse_setting('a="--steps 16 --learning_rate 1e-3"'.replace('"', "")) == (
        "a",
        ["--steps", "16", "--learning_rate", "1e-3"],
    )


def _harness_run(folder, windows: list[tuple[int, int, float]], length: int, pooled: float) -> None:
    """A `ctxaware eval --output_path` folder: long_ppl samples (doc_id, tokens, ppl) and the pooled metrics."""
    (folder / "model").mkdir(parents=True)
    samples = [{"doc_id": i, "length": length, "tokens_scored": n, "ppl": ppl} for i, n, ppl in windows]
    (folder / "model" / "samples_long_ppl_1.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples[::-1]))
    metrics = {f"ppl_len{length},none": pooled, f"kv_bytes_len{length},none": 20.0}
    metrics[f"kv_full_bytes_len{length},none"] = 100.0
    results = {"long_ppl": metrics, "passkey": {"acc,none": 1.0}}
    (folder / "model" / "results_1.json").write_text(
        json.dumps({"results": results, "samples_files": {"long_ppl": "samples_long_ppl_1.jsonl"}})
    )


def test_kv_table_keeps_each_window_s_perplexity_and_they_pool_to_the_run_s(science, tmp_path):
    # windows of unequal token counts: only the token-weighted mean of log-perplexities gives the pooled value
    windows = [(0, 100, 20.0), (1, 300, 30.0), (2, 50, 10.0)]
    pooled = math.exp((100 * math.log(20.0) + 300 * math.log(30.0) + 50 * math.log(10.0)) / 450)
    _harness_run(tmp_path / "h2o", windows, 64, pooled)
    per_window = science.ppl_windows(tmp_path / "h2o", 64)
    assert per_window == [{"window": i, "tokens": n, "ppl": ppl} for i, n, ppl in windows]
    table = science.kv_table({"h2o:0.2": science.harness_metrics(tmp_path / "h2o")}, 64, {"h2o:0.2": per_window})
    assert table["h2o:0.2"]["windows"] == per_window
    assert science.pooled_ppl(table["h2o:0.2"]["windows"]) == pytest.approx(table["h2o:0.2"]["ppl"], rel=1e-12)
    # windows that do not pool to the run's perplexity (one lost, or another run's) stop the check
    with pytest.raises(ValueError, match="do not pool"):
        science.kv_table({"h2o:0.2": science.harness_metrics(tmp_path / "h2o")}, 64, {"h2o:0.2": per_window[:2]})


def test_kv_paired_compares_the_caches_window_by_window(science):
    def cache(ppls):
        return {"windows": [{"window": i, "tokens": 10, "ppl": p} for i, p in enumerate(ppls)]}

    kv = {"full": cache([20.0, 10.0, 30.0]), "h2o:0.2": cache([20.5, 10.2, 30.1])}
    kv["window:0.2"] = cache([21.0, 10.6, 30.4])  # window - h2o increases: 0.5, 0.4, 0.3
    paired = science.kv_paired(kv)
    assert paired["windows"] == [0, 1, 2]
    assert paired["increase_over_full"]["h2o:0.2"]["per_window"] == pytest.approx([0.5, 0.2, 0.1])
    assert paired["increase_over_full"]["window:0.2"]["mean"] == pytest.approx(2.0 / 3)
    difference = paired["window:0.2 - h2o:0.2"]
    assert difference["per_window"] == pytest.approx([0.5, 0.4, 0.3])
    assert difference["mean"] == pytest.approx(0.4)
    assert difference["sd"] == pytest.approx(0.1)
    assert difference["stderr"] == pytest.approx(0.1 / math.sqrt(3))
    assert difference["separated"]
    # the same mean spread wider across windows is within two standard errors: not separated
    kv["window:0.2"] = cache([21.5, 10.2, 30.6])  # differences 1.0, 0.0, 0.5: mean 0.5, se 0.29
    assert not science.kv_paired(kv)["window:0.2 - h2o:0.2"]["separated"]


def test_kv_comparison_runs_each_cache_at_the_asked_length_evicting_caches_first(science, tmp_path, monkeypatch):
    """--kv_length, --skip_kv_passkey and --kv_workers reach the eval commands; the full cache runs last."""
    calls = []

    def fake_run_parallel(jobs, workers=None):
        calls.append(workers)
        for command, _ in jobs:
            out = Path(command[command.index("--output_path") + 1])
            _harness_run(out, [(0, 10, 20.0)], 256, 20.0)
            calls.append(command)

    monkeypatch.setattr(science, "run_parallel", fake_run_parallel)
    args = SimpleNamespace(dtype="float32", eval_batch_size=2, split="test", skip_kv_passkey=True, kv_workers=2)
    table = science.kv_comparison(tmp_path, "m", args, 256, "books", 3, ["full", "h2o:0.2", "window:0.2"])
    workers, *commands = calls
    assert workers == 2
    caches = [command[command.index("--kv_cache") + 1] for command in commands]
    assert caches == ["h2o:0.2", "window:0.2", "full"]
    for command in commands:
        assert command[command.index("--lengths") + 1] == "256"
        assert command[command.index("--tasks") + 1] == "long_ppl"
    assert set(table) == {"full", "h2o:0.2", "window:0.2"}
    args.skip_kv_passkey = False
    calls.clear()
    (tmp_path / "with_passkey").mkdir()
    science.kv_comparison(tmp_path / "with_passkey", "m", args, 256, "books", 3, ["full", "h2o:0.2"])
    assert all(c[c.index("--tasks") + 1] == "passkey,long_ppl" for c in calls[1:])


TRAIN_MIX = ["passkey:2", "needle:1", "key_value:0.5", "reading:1"]
# sha256 of the rows file TRAIN_TEXT wrote for `books`, share 0.5, TRAIN_MIX, 256 tokens, 5 rows, before
# --train_retrieval_text existed: without the option the training rows must stay these bytes.
TRAIN_DOCUMENTS_DIGEST = "3159824cb4f4cc14ab28a518921c4bc86b9c0ab4a665bf32b79289b38f410643"


def _train_documents(science, path: Path, max_tokens: int, retrieval: str | None) -> bytes:
    code = science.TRAIN_TEXT.format(
        path=str(path), source="books", share=0.5, mix=TRAIN_MIX, max_tokens=max_tokens, rows=5, retrieval=retrieval
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    return path.read_bytes()


def test_training_rows_without_train_retrieval_text_are_unchanged(science, tmp_path):
    written = _train_documents(science, tmp_path / "rows.jsonl", 256, None)
    assert hashlib.sha256(written).hexdigest() == TRAIN_DOCUMENTS_DIGEST


def test_train_retrieval_text_hides_the_world_s_keys_in_the_books_train_portion(science, tmp_path):
    written = _train_documents(science, tmp_path / "rows.jsonl", 1024, "books")
    docs = [json.loads(line)["text"] for line in written.decode().splitlines()]
    retrieval = [(doc, found) for doc in docs if (found := long_documents.parts(doc))]
    assert {doc.startswith(PASSKEY_INTRO) for doc, _ in retrieval} == {True, False}  # pass keys and needles
    prose = {split: " ".join(text_sentences(read_text("books", split=split))) for split in SPLITS}
    for doc, (filler, needle, answer) in retrieval:
        assert answer in needle and doc.endswith(f" {answer}")
        assert filler in f"{prose['train']} {prose['train']}"  # consecutive train sentences, wrapping at the end
        assert filler not in prose["validation"] and filler not in prose["test"]
    assert len({filler[:100] for _, (filler, _, _) in retrieval}) == len(retrieval)  # each its own stretch


def test_train_retrieval_text_is_recorded_and_needs_world_documents_in_the_rows(science, monkeypatch, capsys):
    args = SimpleNamespace(train_text="books", train_text_share=0.5, train_mix=TRAIN_MIX, train_retrieval_text="books")
    assert science.train_settings(args) == {
        "text": "books",
        "text_share": 0.5,
        "world_mix": TRAIN_MIX,
        "retrieval_text": "books",
    }
    monkeypatch.setattr(science, "output_folder", lambda _: pytest.fail("the run started"))
    for flags in (["--train_retrieval_text", "books"], ["--train_text", "books", "--train_retrieval_text", "books"]):
        monkeypatch.setattr(sys, "argv", ["sinklora_science.py", *flags])
        with pytest.raises(SystemExit) as stopped:
            science.main()
        assert stopped.value.code == 2 and "--train_text_share below 1" in capsys.readouterr().err
