"""Head layout arithmetic (GQA slices), head selections and the pre-o_proj hook."""

import json

import pytest
import torch

from ctxaware.heads import (
    HeadLayout,
    all_heads,
    check_heads,
    load_head_selection,
    plot_head_scores,
    random_heads,
    register_pre_o_proj_hooks,
    resolve_head_count,
    save_head_selection,
    split_heads,
    top_heads,
)
from tests.tiny_models import tiny_model


def test_layout_from_gqa_model_and_slices():
    layout = HeadLayout.from_model(tiny_model("llama", gqa=True, num_heads=4, head_dim=8))
    assert (layout.num_layers, layout.num_heads, layout.num_kv_heads, layout.head_dim) == (2, 4, 2, 8)
    assert layout.total_heads == 8 and layout.group_size == 2
    assert [layout.kv_head(h) for h in range(4)] == [0, 0, 1, 1]
    assert layout.q_rows(3) == slice(24, 32) and layout.o_cols(3) == slice(24, 32)
    assert layout.kv_rows(3) == slice(8, 16)  # shared with head 2
    assert HeadLayout.from_model(tiny_model("qwen2", gqa=False)).group_size == 1


def test_head_count_as_count_or_fraction_and_errors():
    assert resolve_head_count(3, 64) == 3
    assert resolve_head_count(0.05, 64) == 3
    assert resolve_head_count(0.05, 270) == 13  # a budget: 13.5 rounds down, 14 would be 5.2%
    assert resolve_head_count(0.07, 100) == 7
    assert resolve_head_count(0.001, 64) == 1
    with pytest.raises(ValueError, match="only 64"):
        resolve_head_count(65, 64)
    with pytest.raises(ValueError, match="neither"):
        resolve_head_count(2.5, 64)
    with pytest.raises(ValueError, match="neither"):
        resolve_head_count(0, 64)


def test_top_heads_picks_the_largest_scores():
    scores = torch.zeros(3, 4)
    scores[2, 1], scores[0, 3], scores[1, 0] = 5.0, 4.0, 3.0
    scores[1, 2] = 0.5
    assert top_heads(scores, 3) == [(0, 3), (1, 0), (2, 1)]
    assert top_heads(-scores.abs(), 12) == all_heads(HeadLayout("llama", 3, 4, 2, 8, 32))


def test_random_heads_are_seeded_distinct_and_in_range():
    layout = HeadLayout("llama", 4, 8, 2, 16, 128)
    heads = random_heads(layout, 5, seed=1)
    assert heads == random_heads(layout, 5, seed=1) != random_heads(layout, 5, seed=2)
    assert len(set(heads)) == 5 and check_heads(heads, layout) == heads
    avoided = random_heads(layout, 0.5, seed=1, exclude=heads)
    assert len(avoided) == 16 and not set(avoided) & set(heads)
    assert random_heads(layout, 27, seed=3, exclude=heads) == sorted(set(all_heads(layout)) - set(heads))
    with pytest.raises(ValueError, match="cannot avoid the 5 excluded heads: only 27 remain"):
        random_heads(layout, 28, exclude=heads)


def test_check_heads_names_the_shape():
    layout = HeadLayout("llama", 2, 4, 2, 8, 32)
    with pytest.raises(IndexError, match="4 query heads"):
        check_heads([(0, 4)], layout)
    with pytest.raises(IndexError, match="2 layers"):
        check_heads([(2, 0)], layout)


def test_pre_o_proj_hook_sees_concatenated_heads():
    """Zeroing head h in the hook equals zeroing o_proj's columns of head h (the definition of 'pre-o_proj')."""
    model = tiny_model("mistral", gqa=True).eval()
    layout = HeadLayout.from_model(model)
    ids = torch.randint(3, 300, (2, 7))
    seen = []

    def zero_head(layer, x):
        seen.append(x.shape)
        heads = split_heads(x, layout.head_dim).clone()
        heads[..., 1, :] = 0
        return heads.flatten(-2)

    handles = register_pre_o_proj_hooks(model, zero_head, layers=[1])
    hooked = model(ids).logits
    for handle in handles:
        handle.remove()
    assert seen == [torch.Size([2, 7, layout.num_heads * layout.head_dim])]
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[:, layout.o_cols(1)] = 0
    torch.testing.assert_close(hooked, model(ids).logits)
    with pytest.raises(IndexError, match="2 attention layers"):
        register_pre_o_proj_hooks(model, zero_head, layers=[2])


def test_selection_artefacts(tmp_path):
    layout = HeadLayout("llama", 2, 4, 2, 8, 32)
    save_head_selection(tmp_path / "heads.json", [(0, 1), (1, 2), (1, 3)], layout, objective="sft")
    saved = json.loads((tmp_path / "heads.json").read_text())
    assert saved["heads"] == [[0, 1], [1, 2], [1, 3]] and saved["by_layer"] == {"0": [1], "1": [2, 3]}
    assert saved["total_heads"] == 8 and saved["objective"] == "sft" and saved["layout"]["num_kv_heads"] == 2
    assert load_head_selection(tmp_path / "heads.json", layout) == ([(0, 1), (1, 2), (1, 3)], saved)
    save_head_selection(tmp_path / "other.json", [(0, 1)], HeadLayout("llama", 2, 4, 4, 8, 32))
    with pytest.raises(ValueError, match="another model shape .*num_kv_heads: selection 4 vs model 2"):
        load_head_selection(tmp_path / "other.json", layout)
    (tmp_path / "bare.json").write_text(json.dumps({"heads": [[0, 1]]}))
    with pytest.raises(ValueError, match="records no model layout"):
        load_head_selection(tmp_path / "bare.json", layout)
    save_head_selection(tmp_path / "outside.json", [(1, 9)], layout)
    with pytest.raises(IndexError):
        load_head_selection(tmp_path / "outside.json", layout)
    plot_head_scores(tmp_path / "heads.png", torch.rand(2, 4), [(0, 1)], title="|A|")
    assert (tmp_path / "heads.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
