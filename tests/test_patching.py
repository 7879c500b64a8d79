"""Activation and path patching: hooks on every family, zero effect for a self-patch, a planted head is found,
tokenisation of clean/corrupted pairs and its errors."""

import pytest
import torch

from ctxaware.heads import HeadLayout
from ctxaware.methods.patching import (
    PatchingBatch,
    build_batches,
    head_concentration,
    logit_difference,
    patch_all,
    patched_logit_differences,
    run_with_cache,
)
from tests.tiny_models import FAMILIES, tiny_model


def random_batch(n: int = 3, length: int = 7, position: int = 3) -> PatchingBatch:
    generator = torch.Generator().manual_seed(0)
    clean = torch.randint(3, 300, (n, length), generator=generator)
    corrupted = clean.clone()
    corrupted[:, position] = (clean[:, position] + 17) % 297 + 3
    return PatchingBatch(clean, corrupted, torch.tensor([5] * n), torch.tensor([9] * n))


def all_components(layout: HeadLayout):
    heads = [("head", layer, head) for layer in range(layout.num_layers) for head in range(layout.num_heads)]
    return heads + [("mlp", layer, None) for layer in range(layout.num_layers)]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["activation", "path"])
def test_patching_a_component_with_its_own_activation_changes_nothing(family, kind):
    model = tiny_model(family, **({"sliding_window": None} if family == "mistral" else {})).eval()
    layout = HeadLayout.from_model(model)
    batch = random_batch()
    logits, cache = run_with_cache(model, batch.clean_ids)
    assert cache[("attn", 1)].shape == (3, 7, layout.num_heads * layout.head_dim)
    assert cache[("mlp", 1)].shape == (3, 7, layout.hidden_size)
    diffs = patched_logit_differences(
        model, batch.clean_ids, cache, cache, batch, all_components(layout), layout=layout, kind=kind
    )
    expected = logit_difference(logits, batch).expand_as(diffs)
    torch.testing.assert_close(diffs, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["activation", "path"])
@pytest.mark.parametrize("positions", ["all", "last"])
def test_components_patched_together_score_as_one_forward_each(kind, positions):
    # the reference is one forward per component; groups of 2 with a remainder (7 rows // 3) and all at once must match
    model = tiny_model("llama", gqa=True, initializer_range=0.2).eval()
    layout = HeadLayout.from_model(model)
    batch = random_batch(n=3)
    _, clean = run_with_cache(model, batch.clean_ids)
    _, corrupted = run_with_cache(model, batch.corrupted_ids)
    components = all_components(layout)
    scores = {
        rows: patched_logit_differences(
            model,
            batch.clean_ids,
            clean,
            corrupted,
            batch,
            components,
            layout=layout,
            kind=kind,
            positions=positions,
            rows_per_forward=rows,
        )
        for rows in (3, 7, 64)
    }
    assert scores[3].shape == (len(components), 3)
    assert (scores[3] - scores[3][:1]).abs().max() > 1e-3  # components differ, so a swapped row would show
    torch.testing.assert_close(scores[7], scores[3], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores[64], scores[3], atol=1e-5, rtol=1e-5)


def planted_model():
    """Two layers, 4 query / 2 kv heads; only head 2 of layer 1 writes to the residual stream, so it alone moves
    information between positions."""
    model = tiny_model("llama", gqa=True, initializer_range=0.5).eval()
    with torch.no_grad():
        for layer, attention in enumerate(m.self_attn for m in model.model.layers):
            keep = torch.zeros_like(attention.o_proj.weight)
            if layer == 1:
                keep[:, 16:24] = 1
            attention.o_proj.weight.mul_(keep)
    return model


@pytest.mark.parametrize("direction", ["corrupted_into_clean", "clean_into_corrupted"])
def test_activation_patching_finds_the_one_head_that_carries_the_signal(direction):
    model = planted_model()
    batch = random_batch(n=4)
    result = patch_all(model, [batch], direction=direction)
    assert abs(result.clean_logit_diff - result.corrupted_logit_diff) > 1e-3
    effects = result.head_effects
    assert effects.shape == (2, 4)
    # Only this head moves the corrupted token's information to the final position: patching it alone moves the
    # logit difference all the way; every other head writes nothing, so its effect is exactly zero.
    assert effects[1, 2].item() == pytest.approx(1.0, abs=1e-4)
    others = torch.ones_like(effects, dtype=torch.bool)
    others[1, 2] = False
    assert torch.all(effects[others].abs() < 1e-6)
    top_head = next(e for e in result.ranked() if e["component"] == "head")
    assert (top_head["layer"], top_head["head"]) == (1, 2)
    assert result.concentration()["heads_for_80pct"]["heads"] == 1
    assert result.mlp_effects.shape == (2,)


def test_path_patching_measures_the_direct_effect_only():
    model = planted_model()
    batch = random_batch(n=4)
    path = patch_all(model, [batch], kind="path")
    activation = patch_all(model, [batch], kind="activation")
    others = torch.ones(2, 4, dtype=torch.bool)
    others[1, 2] = False
    assert path.head_effects[1, 2].abs() > 1e-3 and torch.all(path.head_effects[others].abs() < 1e-6)
    # The last layer's MLP has no later component to act through: its direct and total effects agree.
    assert path.mlp_effects[1].item() == pytest.approx(activation.mlp_effects[1].item(), abs=1e-4)
    # Layer 0's MLP only acts through head (1, 2): it has a total effect but no direct one.
    assert abs(path.mlp_effects[0].item()) < 1e-4 < abs(activation.mlp_effects[0].item())
    last = patch_all(model, [batch], positions="last")
    # The corrupted token is not the last one: the last position's MLP 0 output is the same in both runs.
    assert last.mlp_effects[0].item() == pytest.approx(0.0, abs=1e-6)
    assert last.name == "activation_corrupted_into_clean_last"


def test_concentration_counts_the_fewest_heads_per_share_and_what_under_5pct_of_heads_carry():
    effects = torch.zeros(8, 8)
    effects[1, 2], effects[1, 4], effects[5, 0], effects[6, 1] = 0.4, -0.3, 0.2, 0.1  # signs do not matter
    result = head_concentration(effects)
    assert result["total_heads"] == 64
    assert result["heads_for_50pct"] == {"heads": 2, "fraction": 2 / 64}
    assert result["heads_for_80pct"]["heads"] == 3
    # 3 of 64 heads (4.7%) is the largest set under 5%: it carries 0.9 of the effect.
    assert result["under_5pct"]["heads"] == 3 and result["under_5pct"]["share"] == pytest.approx(0.9)
    # 4 heads of 80 are exactly 5%, not fewer: 3 are counted.
    assert head_concentration(torch.ones(80))["under_5pct"]["heads"] == 3


def test_results_are_saved_ranked_with_a_heat_map(tmp_path):
    import json

    result = patch_all(planted_model(), [random_batch(n=2)])
    paths = result.save(tmp_path / "attribution", selected=[(1, 2)])
    payload = json.loads(paths["json"].read_text())
    assert payload["num_pairs"] == 2 and len(payload["ranked"]) == 2 * 4 + 2
    assert [abs(e["effect"]) for e in payload["ranked"]] == sorted(
        (abs(e["effect"]) for e in payload["ranked"]), reverse=True
    )
    assert "logit" in payload["metric"] and payload["concentration"]["heads_for_80pct"]["heads"] == 1
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"


def test_the_progress_bar_counts_one_step_per_component_and_batch(capsys):
    # 2 batches x (8 heads + 2 MLPs) forwards; a bar that stops early, or counts batches only, reads otherwise
    patch_all(planted_model(), [random_batch(n=2), random_batch(n=3, length=5)])
    assert "20/20" in capsys.readouterr().err
    patch_all(planted_model(), [random_batch(n=2)], progress=False)
    assert capsys.readouterr().err == ""


def test_identical_runs_cannot_be_normalised():
    batch = random_batch()
    same = PatchingBatch(batch.clean_ids, batch.clean_ids, batch.answer_ids, batch.corrupted_answer_ids)
    with pytest.raises(ValueError, match="same mean logit difference"):
        patch_all(tiny_model("llama"), [same], heads=False)


def test_build_batches_groups_by_length_and_scores_the_first_differing_answer_token(tiny_tokenizer):
    pairs = [
        {"clean": "3 + 4 =", "corrupted": "5 + 4 =", "answer": "7", "corrupted_answer": "9"},
        {"clean": "17 + 25 =", "corrupted": "37 + 25 =", "answer": "42", "corrupted_answer": "62"},
        {"clean": "2 + 4 =", "corrupted": "8 + 4 =", "answer": "6", "corrupted_answer": "12"},
    ]
    batches = build_batches(pairs, tiny_tokenizer)
    assert sum(b.clean_ids.shape[0] for b in batches) == 3
    for batch in batches:
        assert batch.clean_ids.shape == batch.corrupted_ids.shape
        assert torch.all(batch.answer_ids != batch.corrupted_answer_ids)
        assert batch.clean_ids[0, 0].item() == tiny_tokenizer.bos_token_id
    decoded = {tiny_tokenizer.decode(b.answer_ids[i]).strip() for b in batches for i in range(len(b.answer_ids))}
    assert decoded <= {"7", "4", "42", "6"}  # the answer's first digit (or its whole number as one token)


def test_corrupted_prompt_of_another_length_is_an_error_naming_the_fix(tiny_tokenizer):
    pairs = [{"clean": "3 + 4 =", "corrupted": "13 + 4 =", "answer": "7", "corrupted_answer": "17"}]
    with pytest.raises(ValueError, match="tokenises to .*same digit count|digit count.*drop_mismatched") as error:
        build_batches(pairs, tiny_tokenizer)
    assert "drop_mismatched" in str(error.value)
    with pytest.raises(ValueError, match="no usable pairs"):
        build_batches(pairs, tiny_tokenizer, drop_mismatched=True)
    same_answer = [{"clean": "3 + 4 =", "corrupted": "4 + 3 =", "answer": "7", "corrupted_answer": "7"}]
    with pytest.raises(ValueError, match="first digit"):
        build_batches(same_answer, tiny_tokenizer)


def test_attribution_compare_counts_shared_top_heads_and_sums_heads_against_mlps(tmp_path):
    """`benchmarks/arith_attribution_compare.py` on two planted runs (3 layers x 4 heads): the top 3 heads by signed
    effect share two, MLP 0 is left out of the sums, and a results file that carries the run under `ranked` loads."""
    import json
    import subprocess
    import sys

    from ctxaware.methods.patching import PatchingResult

    def run(heads, mlps):
        return PatchingResult(
            "corrupted_into_clean", "activation", torch.tensor(heads), torch.tensor(mlps), 0.7, -1.0, 5
        )

    a = run([[0.9, 0.0, 0.0, -0.5], [0.0, 0.4, 0.0, 0.0], [0.0, 0.0, 0.3, 0.1]], [1.0, 0.2, -0.1])
    b = run([[0.8, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.6], [0.0, 0.0, 0.5, -0.9]], [1.0, 0.0, 0.3])
    a_path, b_path, out = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "cmp.json"
    a_path.write_text(json.dumps(a.to_dict()))
    b_path.write_text(json.dumps({"command": "x", "ranked": b.to_dict()}))
    command = [sys.executable, "benchmarks/arith_attribution_compare.py", "--runs", f"a={a_path}", f"b={b_path}"]
    subprocess.run([*command, "--top", "3", "--out", str(out)], check=True, capture_output=True)
    result = json.loads(out.read_text())
    assert result["runs"]["a"]["top_heads"] == [[0, 0], [1, 1], [2, 2]]  # -0.5 is not among the top by signed effect
    assert result["runs"]["b"]["top_heads"] == [[0, 0], [1, 3], [2, 2]]
    pair = result["pairs"]["a vs b"]
    assert pair["top_heads_shared"] == 2 and pair["shared"] == [[0, 0], [2, 2]]
    # a's top heads carry b's 0.8 + 0.5 of 0.8 + 0.6 + 0.5; b's top heads carry a's 0.9 + 0.3 of 0.9 + 0.4 + 0.3 + 0.1
    assert pair["first_top_share_of_second"] == pytest.approx(1.3 / 1.9)
    assert pair["second_top_share_of_first"] == pytest.approx(1.2 / 1.7)
    assert result["runs"]["a"]["summed_abs_effect"] == pytest.approx({"heads": 2.2, "mlps": 0.3})
    assert result["runs"]["b"]["summed_abs_effect"]["mlps"] == pytest.approx(0.3)
    assert -1 <= pair["spearman_heads"] <= 1 and out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_patching_speed_benchmark_times_both_ways_and_compares_their_scores(tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "speed.json"
    command = [sys.executable, "benchmarks/patching_speed.py", "--model", "ctxaware-tiny", "--batch", "1", "2"]
    subprocess.run([*command, "--heads", "4", "--repeats", "1", "--out", str(out)], check=True, capture_output=True)
    result = json.loads(out.read_text())
    assert [row["pairs"] for row in result["rows"]] == [1, 2] and result["heads"] == 4
    for row in result["rows"]:
        assert row["max_abs_score_difference"] < 1e-5
        assert row["speedup_median"] == row["seconds"]["one_a_forward"][0] / row["seconds"]["grouped"][0]
