"""Distillation during MoH continue-tuning: the chunked KL against a full-logits one, the frozen teacher (a copy of the
model before conversion, or a saved model), the loss unchanged without distillation, the recipe's run and its
errors."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset

from ctxaware.distillation import frozen_copy, next_token_kl
from ctxaware.methods.moh.adapter import MoHAdapter
from tests.launch import accelerate_launch
from tests.test_configs import load_recipe
from tests.tiny_models import tiny_model


def padded_batch():
    """Three rows of 12 token ids, right-padded to 12, 7 and 4 real tokens; labels -100 on the padding and on the
    first row's 3-token prompt."""
    ids = torch.randint(3, 300, (3, 12))
    attention = torch.ones_like(ids)
    attention[1, 7:] = attention[2, 4:] = 0
    labels = ids.masked_fill(attention == 0, -100)
    labels[0, :3] = -100
    return ids, attention, labels


@pytest.mark.parametrize("chunk_size", [5, 64])  # 18 counted positions: four chunks and a short one, or one
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_chunked_kl_equals_the_full_logits_kl(stable_seed, chunk_size, temperature):
    student, teacher = tiny_model("llama", seed=0), tiny_model("llama", seed=1).eval()
    ids, attention, labels = padded_batch()
    hidden = student.base_model(input_ids=ids, attention_mask=attention).last_hidden_state
    with torch.no_grad():
        teacher_hidden = teacher.base_model(input_ids=ids, attention_mask=attention).last_hidden_state
    kl = next_token_kl(
        hidden,
        student.lm_head,
        teacher_hidden,
        teacher.lm_head,
        labels,
        temperature=temperature,
        chunk_size=chunk_size,
    )

    logits = student(input_ids=ids, attention_mask=attention).logits[:, :-1] / temperature
    with torch.no_grad():
        teacher_logits = teacher(input_ids=ids, attention_mask=attention).logits[:, :-1] / temperature
    per_token = F.kl_div(
        F.log_softmax(logits, -1), F.log_softmax(teacher_logits, -1), log_target=True, reduction="none"
    ).sum(-1)
    counted = labels[:, 1:] != -100
    assert counted.sum() == 18
    expected = per_token[counted].mean() * temperature**2
    torch.testing.assert_close(kl, expected)
    params = list(student.parameters())
    for got, want in zip(torch.autograd.grad(kl, params), torch.autograd.grad(expected, params)):
        torch.testing.assert_close(got, want)

    nothing = next_token_kl(hidden, student.lm_head, teacher_hidden, teacher.lm_head, torch.full_like(labels, -100))
    assert nothing.item() == 0 and nothing.requires_grad  # a batch with no counted token


def dense_model(tokenizer, seed=0):
    """The tiny dense model the MoH trainer's model is converted from (seed 0), or another of the same shape."""
    return tiny_model("llama", num_heads=8, head_dim=4, vocab_size=len(tokenizer), seed=seed)


def moh_trainer(tmp_path, tokenizer, distill_coef=0.0, with_teacher=False, teacher=None, **kwargs):
    """The recipe's MoHTrainer on a tiny MoH model (2 shared + top 3 of 6 routed heads; the same weights and router on
    every call), one step of 2 rows of 16 tokens, and the dense model it was converted from (a frozen copy: the
    trainer's teacher `with_teacher`, unless `teacher` is given)."""
    recipe = load_recipe("moh")
    model = dense_model(tokenizer)
    dense = frozen_copy(model) if teacher is None else teacher
    with_teacher = with_teacher or teacher is not None
    adapter = MoHAdapter.for_model(model, num_shared_heads=2, top_k=3)
    adapter.attach(model)
    rows = torch.randint(3, len(tokenizer), (2, 16)).tolist()
    config = recipe.MoHTrainingConfig(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, use_cpu=True, learning_rate=1e-2
    )
    trainer = recipe.MoHTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_dict({"input_ids": rows}),
        processing_class=tokenizer,
        adapter=adapter,
        balance_coef=0.01,
        load_log=None,
        teacher=dense if with_teacher else None,
        distill_coef=distill_coef,
        **kwargs,
    )
    return trainer, dense


def test_the_teacher_stays_frozen_through_a_training_step(tmp_path, tiny_tokenizer):
    with pytest.raises(ValueError, match="distill_coef=1.0 needs a teacher"):
        moh_trainer(tmp_path, tiny_tokenizer, distill_coef=1.0)
    trainer, teacher = moh_trainer(tmp_path, tiny_tokenizer, distill_coef=1.0, with_teacher=True)
    before = {name: param.detach().clone() for name, param in teacher.named_parameters()}
    student_before = [param.detach().clone() for param in trainer.model.parameters()]
    trainer.train()

    assert "moh/distill_loss" in trainer.state.log_history[0]
    assert not teacher.training
    for name, param in teacher.named_parameters():
        assert not param.requires_grad and param.grad is None, name
        assert torch.equal(param, before[name]), name
    assert any(not torch.equal(p, q) for p, q in zip(trainer.model.parameters(), student_before))  # the student moved
    ids = torch.randint(3, 300, (2, 9))
    dense = dense_model(tiny_tokenizer)
    with torch.no_grad():  # the teacher is the dense model before conversion, without the student's router
        torch.testing.assert_close(teacher(ids).logits, dense(ids).logits, rtol=0, atol=0)


def test_without_distillation_the_loss_is_the_lm_and_balance_loss(tmp_path, tiny_tokenizer):
    from trl import SFTTrainer

    trainer, _ = moh_trainer(tmp_path, tiny_tokenizer)
    model = trainer.model.train()
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    loss = trainer.compute_loss(model, dict(inputs))
    reference = SFTTrainer.compute_loss(trainer, model, dict(inputs)) + 0.01 * trainer.adapter.balance_loss()
    assert torch.equal(loss, reference)
    assert "moh/distill_loss" not in trainer._metrics["train"]

    distilled, dense = moh_trainer(  # the same model and rows
        tmp_path, tiny_tokenizer, distill_coef=0.5, with_teacher=True, distill_temperature=2.0
    )
    with_kl = distilled.compute_loss(distilled.model.train(), dict(inputs))
    (kl,) = distilled._metrics["train"]["moh/distill_loss"]
    assert kl > 0 and with_kl.item() == pytest.approx(loss.item() + 0.5 * kl, rel=1e-5)
    backbone = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    with torch.no_grad():  # the logged KL is that of the trainer's batch, heads and temperature
        hidden = distilled.model.base_model(**backbone).last_hidden_state
        dense_hidden = dense.base_model(**backbone).last_hidden_state
        expected = next_token_kl(
            hidden, distilled.model.lm_head, dense_hidden, dense.lm_head, inputs["labels"], temperature=2.0
        )
    assert kl == pytest.approx(expected.item(), rel=1e-5)
    (plain,) = torch.autograd.grad(loss, model.model.layers[0].mlp.down_proj.weight)
    (distilling,) = torch.autograd.grad(with_kl, distilled.model.model.layers[0].mlp.down_proj.weight)
    assert not torch.allclose(plain, distilling)  # the KL's gradient reaches the student's backbone


def test_recipe_distills_and_records_it(tmp_path):
    out = tmp_path / "moh"
    result = accelerate_launch(
        "recipes/moh.py",
        "--config",
        "recipes/configs/moh/default.yaml",
        "--max_steps",
        "2",
        "--num_train_rows",
        "8",
        "--num_eval_rows",
        "2",
        "--seq_len",
        "64",
        "--per_device_train_batch_size",
        "4",
        "--calibration_rows",
        "4",
        "--logging_steps",
        "1",
        "--distill_coef",
        "1.0",
        "--distill_temperature",
        "2.0",
        "--output_dir",
        str(out),
    )
    assert result.stdout.count("'moh/distill_loss'") == 2  # logged each step
    results = json.loads((out / "results.json").read_text())
    assert results["distill_coef"] == 1.0 and results["distill_temperature"] == 2.0
    assert results["distill_teacher"] == "base"
    assert results["eval_loss"] is not None
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert '"distill_coef": 1.0' in json.dumps(config)  # the router records how it was trained


@pytest.mark.parametrize(
    "values, match",
    [
        ({"distill_coef": -1.0}, r"distill_coef=-1.0, distill_temperature=1.0: choose distill_coef >= 0"),
        ({"distill_coef": float("nan")}, r"distill_coef=nan.*choose distill_coef >= 0"),
        ({"distill_temperature": 0.0}, r"distill_temperature=0.0: choose.*distill_temperature > 0"),
        ({"distill_coef": 1.0, "dense_control": True}, r"the dense control is not distilled: set distill_coef 0"),
        ({"distill_teacher": "out/dense"}, r"'out/dense' teaches nothing without distillation: set distill_coef > 0"),
    ],
)
def test_bad_distillation_options_fail_with_the_fix(values, match):
    with pytest.raises(ValueError, match=match):
        load_recipe("moh").MoHArguments(**values)


def save_dense(folder, tokenizer, seed):
    """A dense model of the trainer's shape (another `seed`: other weights) saved with `tokenizer` in `folder`/model,
    as the recipe's dense control saves it; returns it."""
    model = dense_model(tokenizer, seed=seed).eval()
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    return model


def test_a_saved_teacher_is_frozen_and_gives_its_own_logits(tmp_path, tiny_tokenizer):
    recipe = load_recipe("moh")
    control = save_dense(tmp_path / "dense", tiny_tokenizer, seed=1)
    base = dense_model(tiny_tokenizer)
    ids = torch.randint(3, len(tiny_tokenizer), (2, 9))
    for source in (tmp_path / "dense", tmp_path / "dense" / "model"):  # the output directory or its model folder
        args = recipe.MoHArguments(distill_coef=1.0, distill_teacher=str(source))
        teacher = recipe.distillation_teacher(args, base, tiny_tokenizer)
        assert not teacher.training and not any(param.requires_grad for param in teacher.parameters())
        with torch.no_grad():
            logits = teacher(ids).logits
            torch.testing.assert_close(logits, control(ids).logits, rtol=0, atol=0)
            assert not torch.allclose(logits, base(ids).logits)  # the saved model's, not the base's

    trainer, _ = moh_trainer(tmp_path / "run", tiny_tokenizer, distill_coef=1.0, teacher=teacher)
    before = {name: param.detach().clone() for name, param in teacher.named_parameters()}
    trainer.train()
    assert trainer.teacher is teacher and not teacher.training
    for name, param in teacher.named_parameters():  # a training step leaves the saved teacher as it was
        assert param.grad is None and torch.equal(param, before[name]), name


def test_the_base_teacher_is_the_frozen_copy_before_conversion(tmp_path, tiny_tokenizer):
    recipe = load_recipe("moh")
    model = dense_model(tiny_tokenizer)
    assert recipe.distillation_teacher(recipe.MoHArguments(), model, tiny_tokenizer) is None  # no distillation
    teacher = recipe.distillation_teacher(recipe.MoHArguments(distill_coef=1.0), model, tiny_tokenizer)
    assert teacher is not model and not teacher.training
    assert not any(param.requires_grad for param in teacher.parameters())
    assert all(param.requires_grad for param in model.parameters())  # the student still trains
    for (name, got), want in zip(teacher.state_dict().items(), model.state_dict().values()):
        assert torch.equal(got, want), name

    base, _ = moh_trainer(tmp_path, tiny_tokenizer, distill_coef=1.0, teacher=teacher)
    copied, _ = moh_trainer(tmp_path, tiny_tokenizer, distill_coef=1.0, with_teacher=True)  # today's teacher
    inputs = base._prepare_inputs(next(iter(base.get_train_dataloader())))
    loss = base.compute_loss(base.model.train(), dict(inputs))
    assert torch.equal(loss, copied.compute_loss(copied.model.train(), dict(inputs)))


def test_a_teacher_of_another_vocabulary_is_refused(tmp_path, tiny_tokenizer):
    recipe = load_recipe("moh")
    other = copy.deepcopy(tiny_tokenizer)
    other.add_tokens(["<extra>"])
    save_dense(tmp_path / "other", other, seed=1)
    args = recipe.MoHArguments(distill_coef=1.0, distill_teacher=str(tmp_path / "other"))
    with pytest.raises(ValueError, match=r"vocabulary .* differs from the model's .*: pass a model of the same tok"):
        recipe.distillation_teacher(args, dense_model(tiny_tokenizer), tiny_tokenizer)
