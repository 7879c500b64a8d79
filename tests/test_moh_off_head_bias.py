"""MoH's off-head bias (`off_head_bias="mean"`): a routed head the router leaves out adds its mean output on the dense
model. Checked against a reference computed by hand on the dense model, with every head on, with padding, across
save and load, in cached generation, and when disabled or detached."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from ctxaware.adapters import HeadAdapter, load_adapter
from ctxaware.attention import attention_modules, get_attention_options
from ctxaware.methods.moh.adapter import MoHAdapter, find_moh_adapter
from ctxaware.methods.moh.calibration import head_ablation_kl, head_output_means, off_head_rows
from tests.launch import accelerate_launch
from tests.tiny_models import tiny_model


HEADS, HEAD_DIM = 8, 4  # 8 query heads, 4 key/value heads: GQA


def dense_model(seed=0):
    return tiny_model("llama", num_heads=HEADS, head_dim=HEAD_DIM, seed=seed).eval()


def ragged_batch(seed=0, pad_side="left"):
    """Seeded input ids (3 rows of 12) with 0, 3 and 5 pad tokens (distinct ids, so padding would move a mean)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 300, (3, 12), generator=generator)
    mask = torch.ones_like(ids)
    for row, pads in ((1, 3), (2, 5)):
        if pad_side == "left":
            mask[row, :pads] = 0
        else:
            mask[row, -pads:] = 0
    return ids, mask


def converted(off_head_bias="mean", *, top_k=2, variant="learned", routing_chunk=0, seed=0):
    """A dense tiny model converted with a decisive random router, calibrated on a ragged batch."""
    model = dense_model(seed)
    ids, mask = ragged_batch(seed + 1, pad_side="right")
    adapter = MoHAdapter.for_model(
        model,
        num_shared_heads=2,
        top_k=top_k,
        variant=variant,
        routing_chunk=routing_chunk,
        off_head_bias=off_head_bias,
        calibration=[{"input_ids": ids, "attention_mask": mask}],
    )
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in adapter.named_parameters():
            if "off_bias" not in name:
                param.normal_(0, 0.5)  # a router that routes decisively
    adapter.attach(model)
    return model, adapter


def hand_means(model, ids, mask) -> list[torch.Tensor]:
    """Per layer (Hq, D): each query head's o_proj input averaged over the real tokens, by plain hooks."""
    seen = {}
    handles = [
        attn.o_proj.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0].detach()))
        for i, attn in enumerate(attention_modules(model))
    ]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for handle in handles:
        handle.remove()
    return [seen[i][mask.bool()].unflatten(-1, (HEADS, HEAD_DIM)).mean(0) for i in range(len(seen))]


def recorded_gates(model):
    """Hooks that keep each layer's gates as the adapter's q_proj hook (registered before) sets them."""
    gates, handles = {}, []
    for i, attn in enumerate(attention_modules(model)):
        options = get_attention_options(attn)
        handles.append(
            attn.q_proj.register_forward_hook(lambda m, a, o, i=i, opt=options: gates.__setitem__(i, opt.head_gates))
        )
    return gates, handles


@pytest.mark.parametrize("variant, routing_chunk", [("learned", 0), ("query_norm", 0), ("learned", 4)])
def test_step0_equals_the_dense_model_with_off_heads_replaced_by_their_mean(variant, routing_chunk):
    model, adapter = converted(variant=variant, routing_chunk=routing_chunk)
    ids, mask = ragged_batch(seed=7)
    gates, handles = recorded_gates(model)
    with torch.no_grad():
        routed = model(input_ids=ids, attention_mask=mask).logits
    for handle in handles:
        handle.remove()
    assert all(((g[..., 2:] == 0).sum(-1) == 4).all() for g in gates.values())  # 4 of 6 routed heads off per token

    reference = dense_model()
    means = hand_means(reference, *ragged_batch(1, pad_side="right"))  # the conversion's calibration batch

    def replace(layer):
        def hook(module, args):
            heads = args[0].unflatten(-1, (HEADS, HEAD_DIM))
            gate = gates[layer][..., None]
            out = torch.where(gate == 0, means[layer], heads * gate)
            return (out.flatten(-2),)

        return hook

    handles = [
        attn.o_proj.register_forward_pre_hook(replace(i)) for i, attn in enumerate(attention_modules(reference))
    ]
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(routed[keep], expected[keep])
    for handle in handles:
        handle.remove()
    with torch.no_grad():  # zero-ablation differs: the mean is not zero
        zero = converted("none", variant=variant, routing_chunk=routing_chunk)[0](input_ids=ids, attention_mask=mask)
    assert not torch.allclose(zero.logits[keep], routed[keep], atol=1e-3)


def test_with_every_head_on_the_option_changes_nothing():
    ids, mask = ragged_batch(seed=3)
    mean_model, mean_adapter = converted("mean", top_k=6)
    none_model, _ = converted("none", top_k=6)  # the same seeds: the same router
    assert all(router.off_bias.abs().sum() > 0 for router in mean_adapter.routers)
    with torch.no_grad():
        torch.testing.assert_close(
            mean_model(input_ids=ids, attention_mask=mask).logits,
            none_model(input_ids=ids, attention_mask=mask).logits,
        )


def test_padding_does_not_enter_the_mean():
    model = dense_model()
    ids, mask = ragged_batch(seed=5, pad_side="right")  # right padding: the real tokens keep their positions
    padded = head_output_means(model, [{"input_ids": ids, "attention_mask": mask}])
    rows = [ids[row, : int(mask[row].sum())][None] for row in range(len(ids))]
    torch.testing.assert_close(padded, head_output_means(model, rows))
    assert padded.shape == (2, HEADS, HEAD_DIM)
    torch.testing.assert_close(padded, torch.stack(hand_means(model, ids, mask)))
    assert not torch.allclose(padded, head_output_means(model, [ids]), atol=1e-4)  # with padding it would differ


def test_round_trip_keeps_the_bias_and_old_adapters_load_as_none(tmp_path):
    model, adapter = converted("mean")
    with torch.no_grad():
        for router in adapter.routers:
            router.off_bias.normal_(0, 0.3)  # as if trained
    ids, mask = ragged_batch(seed=4)
    with torch.no_grad():
        routed = model(input_ids=ids, attention_mask=mask).logits
    adapter.save_pretrained(tmp_path / "router")
    config = json.loads((tmp_path / "router" / "adapter_config.json").read_text())
    assert config["hyperparameters"]["off_head_bias"] == "mean" and config["shapes"]["layers.0.off_bias"] == [6, 32]
    fresh = dense_model()
    load_adapter(fresh, str(tmp_path / "router"))
    loaded = find_moh_adapter(fresh)
    assert loaded.off_head_bias == "mean"
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids, attention_mask=mask).logits, routed)

    # an adapter saved before the option: no `off_head_bias` in its hyperparameters, no bias in its weights
    _, plain = converted("none")
    plain.save_pretrained(tmp_path / "old")
    path = tmp_path / "old" / "adapter_config.json"
    config = json.loads(path.read_text())
    del config["hyperparameters"]["off_head_bias"]
    path.write_text(json.dumps(config))
    old = dense_model()
    load_adapter(old, str(tmp_path / "old"))
    assert find_moh_adapter(old).off_head_bias == "none"
    assert all(router.off_bias is None for router in find_moh_adapter(old).routers)


@pytest.mark.parametrize("variant, routing_chunk", [("learned", 0), ("query_norm", 0), ("learned", 4)])
def test_generation_with_cache_equals_recomputation(tiny_tokenizer, variant, routing_chunk):
    model, adapter = converted(variant=variant, routing_chunk=routing_chunk)
    prompts, mask = ragged_batch(seed=6)
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=2, eos_token_id=None)
    cached = model.generate(prompts, use_cache=True, **kwargs)
    recomputed = model.generate(prompts, use_cache=False, **kwargs)
    torch.testing.assert_close(cached, recomputed)
    with torch.no_grad():  # the last step's logits too (the tokens agree even when a bias is slightly off)
        full = model(input_ids=cached, attention_mask=torch.cat([mask, torch.ones_like(cached[:, 12:])], 1)).logits
        out = model(
            input_ids=cached[:, :-1],
            attention_mask=torch.cat([mask, torch.ones_like(cached[:, 12:-1])], 1),
            use_cache=True,
        )
        step = model(
            input_ids=cached[:, -1:],
            attention_mask=torch.cat([mask, torch.ones_like(cached[:, 12:])], 1),
            cache=out.cache,
            use_cache=True,
        ).logits
    torch.testing.assert_close(step[:, -1], full[:, -1])
    none_model, _ = converted("none", variant=variant, routing_chunk=routing_chunk)
    assert not torch.equal(none_model.generate(prompts, use_cache=True, **kwargs), cached)


def test_disabled_is_dense_and_detach_leaves_no_hook():
    model, adapter = converted("mean")
    ids, mask = ragged_batch(seed=8)
    with torch.no_grad():
        dense = dense_model()(input_ids=ids, attention_mask=mask).logits
        with adapter.disabled():
            torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, dense)
        adapter.detach()
        assert not any(attn.o_proj._forward_hooks for attn in attention_modules(model))
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, dense)


def test_mean_needs_calibration():
    with pytest.raises(ValueError, match="off_head_bias='mean' measure the dense model: pass `calibration`"):
        MoHAdapter.for_model(dense_model(), num_shared_heads=2, top_k=2, off_head_bias="mean")
    with pytest.raises(ValueError, match="off_head_bias='median': choose one of none, mean"):
        MoHAdapter.for_model(dense_model(), num_shared_heads=2, top_k=2, off_head_bias="median")


def test_recipe_passes_the_option_and_saves_the_bias(tmp_path):

    out = tmp_path / "moh"
    accelerate_launch(
        "recipes/moh.py",
        "--config",
        "recipes/configs/moh/default.yaml",
        *("--max_steps", "1", "--num_train_rows", "4", "--num_eval_rows", "2", "--seq_len", "32"),
        *("--per_device_train_batch_size", "2", "--calibration_rows", "2", "--shared_heads", "first"),
        *("--router_init", "random", "--off_head_bias", "mean", "--output_dir", str(out)),
    )
    assert json.loads((out / "results.json").read_text())["off_head_bias"] == "mean"
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    adapter = HeadAdapter.from_pretrained(out / "adapter", model)
    assert adapter.off_head_bias == "mean"
    assert all(router.off_bias.abs().sum() > 0 for router in adapter.routers)


def test_importance_with_the_bias_is_the_kl_of_mean_ablating_the_head():
    model = dense_model(seed=2)
    ids, mask = ragged_batch(seed=9, pad_side="right")
    batch = {"input_ids": ids, "attention_mask": mask}
    rows = off_head_rows(model, head_output_means(model, [batch]))
    means = hand_means(model, ids, mask)
    measured = list(head_ablation_kl(model, [batch], off_rows=rows))
    with torch.no_grad():
        dense = model(input_ids=ids, attention_mask=mask).logits.log_softmax(-1)[mask.bool()]
    for layer, head in ((0, 5), (1, 2)):
        attn = attention_modules(model)[layer]

        def mean_ablate(module, args, layer=layer, head=head):
            heads = args[0].unflatten(-1, (HEADS, HEAD_DIM)).clone()
            heads[..., head, :] = means[layer][head]
            return (heads.flatten(-2),)

        handle = attn.o_proj.register_forward_pre_hook(mean_ablate)
        with torch.no_grad():
            ablated = model(input_ids=ids, attention_mask=mask).logits.log_softmax(-1)[mask.bool()]
        handle.remove()
        expected = (dense.exp() * (dense - ablated)).sum(-1)
        torch.testing.assert_close(measured[layer][1][:, head], expected, atol=1e-5, rtol=1e-4)
    zeroed = list(head_ablation_kl(model, [batch]))
    assert not torch.allclose(zeroed[0][1], measured[0][1])
    # the conversion with the bias ranks heads by that cost
    adapter = MoHAdapter.for_model(
        model, num_shared_heads=2, top_k=2, shared_heads="importance", calibration=[batch], off_head_bias="mean"
    )
    importance = torch.stack([kl.mean(0) for _, kl in measured])
    torch.testing.assert_close(torch.tensor(adapter.calibration["head_importance"]), importance)
