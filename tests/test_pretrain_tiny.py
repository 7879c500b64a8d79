"""The shipped tiny model and its recipe: offline loading, behaviour on its world, packing, the schedule, and a CPU
smoke run through `accelerate launch`."""

import importlib.util
import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ctxaware.models import EMBEDDED_MODEL_DIR, EMBEDDED_MODEL_NAME, resolve_model_path
from ctxaware.world import QA_PROMPT, build_world, closed_book_qa
from tests.launch import REPO_ROOT, accelerate_launch


shipped = pytest.mark.skipif(
    not (EMBEDDED_MODEL_DIR / "model.safetensors").is_file(),
    reason="the embedded model is not committed yet: build it with recipes/pretrain_tiny.py on a GPU",
)


def load_recipe():
    spec = importlib.util.spec_from_file_location("pretrain_tiny", REPO_ROOT / "recipes" / "pretrain_tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@shipped
def test_shipped_model_loads_offline_with_finite_logits():
    path = resolve_model_path(EMBEDDED_MODEL_NAME)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA
    assert tokenizer.eos_token == "<|end|>" and tokenizer.chat_template
    size = sum(f.stat().st_size for f in EMBEDDED_MODEL_DIR.iterdir())
    assert size <= 25 * 1024 * 1024
    ids = tokenizer("Question: Where does Bako live?\nAnswer:", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer)) and torch.isfinite(logits).all()
    digits = tokenizer("12345", add_special_tokens=False).input_ids
    assert len(digits) == 5  # digits are split one by one


@shipped
def test_shipped_model_recalls_held_out_facts_of_its_world():
    path = resolve_model_path(EMBEDDED_MODEL_NAME)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    records = closed_book_qa(build_world(0), "test")[:16]
    hits = 0
    for record in records:
        ids = [tokenizer.bos_token_id, *tokenizer(QA_PROMPT.format(**record), add_special_tokens=False).input_ids]
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        hits += tokenizer.decode(out[0, len(ids) :]).strip().startswith(record["answer"])
    assert hits / len(records) >= 0.8


def test_pack_keeps_documents_whole():
    recipe = load_recipe()
    docs = [np.arange(1, n + 1, dtype=np.int16) for n in (5, 3, 9, 2, 12, 4)]
    rows, dropped = recipe.pack(docs, seq_len=10, pad_id=0)
    assert dropped == 1  # the 12-token document does not fit a row
    assert rows.shape[1] == 10
    found = []
    for row in rows.tolist():
        starts = [i for i, token in enumerate(row) if token == 1]
        for start, end in zip(starts, [*starts[1:], len(row)]):
            found.append(len([t for t in row[start:end] if t != 0]))
    assert sorted(found) == [2, 3, 4, 5, 9]


def test_learning_rate_warms_up_then_decays_to_the_floor():
    recipe = load_recipe()
    cfg = recipe.PretrainConfig(learning_rate=1e-3, warmup_fraction=0.1, min_lr_ratio=0.1)
    assert recipe.learning_rate(cfg, 0.0) == 0.0
    assert recipe.learning_rate(cfg, 0.1) == pytest.approx(1e-3)
    assert recipe.learning_rate(cfg, 0.5) < 1e-3
    assert recipe.learning_rate(cfg, 1.0) == pytest.approx(1e-4)


@pytest.mark.slow
def test_recipe_smoke_run_writes_a_loadable_model(tmp_path):
    output = tmp_path / "model"
    accelerate_launch(
        REPO_ROOT / "recipes" / "pretrain_tiny.py",
        "--config",
        "recipes/configs/pretrain_tiny/smoke.yaml",
        "--output_dir",
        str(output),
        "--max_steps",
        "2",
        "--probe_limit",
        "4",
        "--probe_passkey_lengths",
        "128",
    )
    model = AutoModelForCausalLM.from_pretrained(output)
    assert model.config.max_position_embeddings == 256
    assert next(model.parameters()).dtype == torch.bfloat16
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 2 and "closed_book_test_acc" in metrics
    assert not list(tmp_path.glob(".model-*"))  # no temporary folder left behind
