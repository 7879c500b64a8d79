"""MoH: conversion close to dense, exact top-k gates, the balance loss, gradients to the router, adapter round trip,
KV-cache generation, errors, the `--moh` switch and the recipe end to end."""

import gc
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from ctxaware.adapters import HeadAdapter, load_adapter
from ctxaware.attention import ATTN_IMPLEMENTATION, attention_modules, get_attention_options
from ctxaware.kernels import moh_router
from ctxaware.kernels.moh_router import router_gates
from ctxaware.methods.moh.adapter import MoHAdapter, find_moh_adapter, logit_change
from ctxaware.methods.moh.calibration import fit_router_weights, head_ablation_kl
from ctxaware.methods.moh.router import MoHRouter
from ctxaware.switches import apply_generation_hooks
from tests.launch import accelerate_launch, load_benchmark
from tests.tiny_models import tiny_model


HEADS = 8  # query heads per layer (4 key/value heads: GQA)


def moh_model(num_shared=2, top_k=3, variant="learned", seed=0, **kwargs):
    model = tiny_model("llama", num_heads=HEADS, head_dim=4, seed=seed).eval()
    adapter = MoHAdapter.for_model(model, num_shared_heads=num_shared, top_k=top_k, variant=variant, **kwargs)
    adapter.attach(model)
    return model, adapter


def layer_gates(model, layer=0) -> torch.Tensor:
    return get_attention_options(attention_modules(model)[layer]).head_gates


def test_conversion_starts_close_to_dense():
    torch.manual_seed(0)
    ids = torch.randint(3, 300, (2, 16))
    model, adapter = moh_model(num_shared=2, top_k=6)  # every routed head active: only the gate values differ
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    all_active = logit_change(model, adapter, ids)
    gates = layer_gates(model)
    assert ((gates - 1).abs() < 0.05).all()  # active heads start at weight ~1
    assert all_active["max_abs_logit_change"] < 5e-3 and all_active["top1_agreement"] == 1.0
    adapter.set_top_k(2)  # 50% active: the heads left out are the whole change
    half = logit_change(model, adapter, ids)
    assert half["mean_kl"] > all_active["mean_kl"]
    print(f"step-0 logit change, all active: {all_active}; 50% active: {half}")
    dense = tiny_model("llama", num_heads=HEADS, head_dim=4).eval()(ids).logits
    adapter.detach()
    assert model.config._attn_implementation == "sdpa" and layer_gates(model) is None
    torch.testing.assert_close(model(ids).logits, dense)


@pytest.mark.parametrize("variant", ["learned", "query_norm"])
def test_top_k_gates_have_exactly_k_routed_nonzeros(variant):
    model, adapter = moh_model(num_shared=3, top_k=2, variant=variant)
    ids = torch.randint(3, 300, (3, 10))
    model(ids)
    for layer in range(2):
        gates = layer_gates(model, layer)
        assert gates.shape == (3, 10, HEADS)
        assert (gates[..., :3] != 0).all()  # shared heads: always on
        assert ((gates[..., 3:] != 0).sum(-1) == 2).all()  # exactly k routed heads per token
    if variant == "query_norm":
        assert set(layer_gates(model).unique().tolist()) == {0.0, 1.0}
        attn = attention_modules(model)[0]
        hidden = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
        norms = attn.q_proj(hidden).unflatten(-1, (HEADS, 4)).norm(dim=-1)[..., 3:]
        expected = torch.zeros_like(norms).scatter_(-1, norms.topk(2, dim=-1).indices, 1.0)
        torch.testing.assert_close(layer_gates(model)[..., 3:], expected)
        assert not list(adapter.parameters())


def test_balance_loss_on_a_hand_computed_case():
    router = MoHRouter(4, num_heads=4, head_dim=2, shared=[], top_k=2, variant="learned", init_std=0.0).train()
    with torch.no_grad():
        router.routed.weight.copy_(torch.eye(4))
    x = torch.tensor([[[2.0, 1.0, 0.0, -1.0], [0.0, 2.0, 1.0, -1.0]]])  # logits = x: top 2 are {0, 1} and {1, 2}
    gates = router(x, torch.zeros(1, 2, 8))
    assert (gates != 0).sum(-1).tolist() == [[2, 2]]
    f = [0.5, 1.0, 0.5, 0.0]  # share of tokens routed to each head
    z1 = sum(math.exp(v) for v in (2, 1, 0, -1))
    p1 = [math.exp(v) / z1 for v in (2, 1, 0, -1)]
    p2 = [p1[1], p1[0], p1[2], p1[3]]  # the second token's logits are a permutation of the first's
    probs = [(a + b) / 2 for a, b in zip(p1, p2)]
    expected = 4 / 2 * sum(fi * pi for fi, pi in zip(f, probs))
    assert router.balance_loss().item() == pytest.approx(expected, rel=1e-6)
    # gate values: n_r * softmax at the chosen heads (no shared heads: no mixing router)
    torch.testing.assert_close(gates[0, 0], torch.tensor([4 * p1[0], 4 * p1[1], 0.0, 0.0]))
    # uniform routing gives 1: every head chosen by half of the tokens with probability 1/4
    router.stats = {"load": torch.full((4,), 0.5), "prob": torch.full((4,), 0.25)}
    assert router.balance_loss().item() == pytest.approx(1.0)


@pytest.mark.parametrize("routing_chunk", [0, 4])
def test_gradients_reach_every_router_parameter(routing_chunk):
    model, adapter = moh_model(num_shared=2, top_k=3, routing_chunk=routing_chunk)
    model.train()
    ids = torch.randint(3, 300, (2, 12))
    loss = model(ids, labels=ids).loss + 0.01 * adapter.balance_loss()
    loss.backward()
    names = [name for name, _ in adapter.named_parameters()]
    assert sorted({n.split(".", 2)[2] for n in names}) == ["mix.weight", "routed.weight", "shared.weight"]
    for name, param in adapter.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    load = adapter.pop_load()
    assert load.shape == (2, 6) and load.mean().item() == pytest.approx(1.0)  # fair share is 1 on average
    assert adapter.pop_load() is None  # cleared


def test_adapter_round_trip_and_shape_mismatch(tmp_path):
    model, adapter = moh_model(num_shared=2, top_k=3, base_model="org/tiny")
    with torch.no_grad():
        for param in adapter.parameters():
            param.normal_(0, 0.3)
    ids = torch.randint(3, 300, (2, 9))
    routed = model(ids).logits
    adapter.save_pretrained(tmp_path / "router")
    config = json.loads((tmp_path / "router" / "adapter_config.json").read_text())
    assert config["method"] == "moh" and config["hyperparameters"]["top_k"] == 3
    assert config["heads"] == [[layer, head] for layer in range(2) for head in range(2)]  # the shared heads

    fresh = tiny_model("llama", num_heads=HEADS, head_dim=4).eval()
    load_adapter(fresh, str(tmp_path / "router"))  # as `ctxaware eval --adapter` does: the adapter object is dropped
    gc.collect()
    loaded = find_moh_adapter(fresh)  # the `--moh on` switch finds it through the model
    assert (
        isinstance(loaded, MoHAdapter) and loaded.top_k == 3 and not any(p.requires_grad for p in loaded.parameters())
    )
    torch.testing.assert_close(fresh(ids).logits, routed)

    other = tiny_model("llama", num_heads=4, head_dim=8)
    with pytest.raises(ValueError, match=r"does not fit this model \(num_heads: adapter 8 vs model 4.*retrain it"):
        HeadAdapter.from_pretrained(tmp_path / "router", other)


@pytest.mark.parametrize("variant", ["learned", "query_norm"])
def test_chunk_routing_gives_every_token_its_chunk_starts_gates(tmp_path, variant):
    """Layer 0 sees the embeddings in both models, so its per-token gates are the independent reference."""
    per_token, adapter = moh_model(num_shared=2, top_k=2, variant=variant, seed=1)
    chunked, chunked_adapter = moh_model(num_shared=2, top_k=2, variant=variant, seed=1, routing_chunk=4)
    with torch.no_grad():
        for a, b in zip(adapter.parameters(), chunked_adapter.parameters()):
            b.copy_(a.normal_(0, 0.5))
    ids = torch.randint(3, 300, (2, 11))  # chunks [0, 4), [4, 8), [8, 11): the last one ragged
    per_token(ids)
    logits = chunked(ids).logits
    starts = torch.arange(11) // 4 * 4
    torch.testing.assert_close(layer_gates(chunked), layer_gates(per_token)[:, starts])
    assert not torch.equal(layer_gates(chunked), layer_gates(per_token))
    # causal: a token changes nothing before it (it starts the chunk [8, 11) and routes the tokens after it)
    changed = ids.clone()
    changed[:, 8] = (changed[:, 8] + 1) % 300
    other = chunked(changed).logits
    torch.testing.assert_close(other[:, :8], logits[:, :8])
    assert not torch.allclose(other[:, 9:], logits[:, 9:])
    # the chunk length travels with the saved router
    chunked_adapter.save_pretrained(tmp_path / "router")
    fresh = tiny_model("llama", num_heads=HEADS, head_dim=4, seed=1).eval()
    load_adapter(fresh, str(tmp_path / "router"))
    assert find_moh_adapter(fresh).routing_chunk == 4
    torch.testing.assert_close(fresh(ids).logits, logits)


def test_chunk_routing_refuses_to_start_inside_an_unrouted_chunk():
    _, adapter = moh_model(num_shared=2, top_k=2, routing_chunk=4)
    router = adapter.routers[0]
    router.offset, router.carry = 6, None  # as if a cache had seen 6 tokens this router never routed
    with pytest.raises(RuntimeError, match=r"starts at token 6, inside a 4-token chunk.*from its start"):
        router(torch.randn(1, 3, 32), torch.randn(1, 3, 32))


@pytest.mark.parametrize("variant, routing_chunk", [("learned", 0), ("query_norm", 0), ("learned", 4)])
def test_routed_generation_with_cache_equals_recomputation(tiny_tokenizer, variant, routing_chunk):
    model, adapter = moh_model(num_shared=2, top_k=2, variant=variant, routing_chunk=routing_chunk)
    with torch.no_grad():
        for param in adapter.parameters():
            param.normal_(0, 0.5)  # a router that routes decisively
    prompts = torch.randint(3, 300, (2, 7))
    mask = torch.ones_like(prompts)
    mask[1, :2] = 0  # left padding
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=2, eos_token_id=None)
    cached = model.generate(prompts, use_cache=True, **kwargs)
    assert layer_gates(model).shape == (2, 1, HEADS)  # decode: gates for the one new query
    recomputed = model.generate(prompts, use_cache=False, **kwargs)
    torch.testing.assert_close(cached, recomputed)
    with adapter.disabled():
        dense = model.generate(prompts, use_cache=True, **kwargs)
    assert not torch.equal(dense, cached)  # routing changed the continuation


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_head_importance_is_the_kl_of_dropping_the_head(family):
    model = tiny_model(family, num_heads=HEADS, head_dim=4, num_layers=3, seed=1).eval()
    batches = [torch.randint(3, 300, (2, 12)), torch.randint(3, 300, (1, 12))]
    per_layer = list(head_ablation_kl(model, batches))  # layers 1 and 2 run from their inputs, skipping the prefix
    assert len(per_layer) == 3 and model.config._attn_implementation == "sdpa"  # restored
    assert all("forward" not in vars(layer) for layer in model.model.layers)  # the prefix layers are whole again
    dense = [model(ids).logits.log_softmax(-1) for ids in batches]
    for layer, head in [(0, 2), (1, 5), (2, 7)]:
        inputs, token_kl = per_layer[layer]
        assert inputs.shape == (36, model.config.hidden_size) and token_kl.shape == (36, HEADS)
        # reference: whole forwards with the head's o_proj columns zeroed instead of its gate, on the same batches
        o_proj = attention_modules(model)[layer].o_proj
        kept = o_proj.weight.detach().clone()
        with torch.no_grad():
            o_proj.weight[:, head * 4 : (head + 1) * 4] = 0
        ablated = [model(ids).logits.log_softmax(-1) for ids in batches]
        with torch.no_grad():
            o_proj.weight.copy_(kept)
        expected = torch.cat([(d.exp() * (d - a)).sum(-1).flatten() for d, a in zip(dense, ablated)])
        assert expected.max() > 1e-4  # the head matters, so a wrong layer or head would show
        torch.testing.assert_close(token_kl[:, head], expected, atol=1e-5, rtol=1e-4)


def test_head_importance_restores_forward_wrappers_of_skipped_layers():
    from accelerate.hooks import ModelHook, add_hook_to_module

    model = tiny_model("llama", num_heads=HEADS, head_dim=4, num_layers=2, seed=1).eval()
    add_hook_to_module(model.model.layers[0], ModelHook())  # accelerate's wrapping: an instance `forward`
    wrapper = vars(model.model.layers[0])["forward"]
    list(head_ablation_kl(model, [torch.randint(3, 300, (1, 8))]))
    assert vars(model.model.layers[0])["forward"] is wrapper and "forward" not in vars(model.model.layers[1])


def test_head_importance_refuses_layers_that_share_state_beyond_hidden_states():
    model = tiny_model("llama", num_heads=HEADS, head_dim=4, num_layers=3, seed=1).eval()
    state = {}  # a cross-layer side channel (as in KV-sharing architectures): layer 2 reads what layer 0 wrote
    model.model.layers[0].register_forward_hook(lambda module, args, output: state.update(first=output))
    model.model.layers[2].register_forward_pre_hook(lambda module, args: (args[0] + state["first"], *args[1:]))
    with pytest.raises(ValueError, match="do not pass hidden states straight"):
        list(head_ablation_kl(model, [torch.randint(3, 300, (1, 8))]))


def test_router_fit_picks_the_costliest_heads_at_small_logits():
    torch.manual_seed(0)
    inputs = torch.randn(512, 16)
    token_kl = (inputs @ torch.randn(16, 6)).exp()  # a linear ranking: the fit can reproduce it
    weight, overlap = fit_router_weights(inputs, token_kl, 2, logit_std=0.01)
    assert weight.shape == (6, 16) and overlap > 0.9
    logits = inputs @ weight.T
    assert logits.std().item() == pytest.approx(0.01, rel=1e-4)
    picked = logits.topk(2, dim=-1).indices
    assert (picked[:, :, None] == token_kl.topk(2, dim=-1).indices[:, None, :]).any(-1).float().mean() == overlap


def test_importance_conversion_starts_closer_to_dense():
    model = tiny_model("llama", num_heads=HEADS, head_dim=4, seed=2).eval()
    with torch.no_grad():
        for module in attention_modules(model):
            module.o_proj.weight[:, 5 * 4 : 6 * 4] *= 8  # a head the model leans on, routed when sharing by index
    torch.manual_seed(0)
    calibration = [torch.randint(3, 300, (4, 32)) for _ in range(2)]
    change = {}
    for shared_heads, router_init in [("first", "random"), ("importance", "random"), ("importance", "importance")]:
        adapter = MoHAdapter.for_model(
            model,
            num_shared_heads=2,
            top_k=2,
            shared_heads=shared_heads,
            router_init=router_init,
            calibration=calibration,
        )
        adapter.attach(model)
        change[shared_heads, router_init] = logit_change(model, adapter, torch.cat(calibration))["mean_kl"]
        if shared_heads == "importance":
            importance = torch.tensor(adapter.calibration["head_importance"])
            assert all(5 in importance[layer].topk(2)[1] for layer in range(2))
            assert adapter.heads == [(layer, h) for layer in range(2) for h in sorted(importance[layer].topk(2)[1])]
            gates = layer_gates(model, 1)
            assert (gates[..., importance[1].topk(2)[1]] != 0).all() and ((gates != 0).sum(-1) == 4).all()
            assert ((gates[gates != 0] - 1).abs() < 0.05).all()  # active heads still start at weight ~1
        adapter.detach()
    assert adapter.calibration["router_overlap"][0] > 1 / 3  # chance for 2 of 6
    print(f"step-0 mean KL on the calibration tokens (shared heads, router init): {change}")
    assert change["first", "random"] > change["importance", "random"] > change["importance", "importance"]


def test_router_lr_ratio_slows_adam_on_the_same_gates():
    torch.manual_seed(0)
    x, q = torch.randn(2, 6, 16), torch.randn(2, 6, 8 * 2)
    routers = {
        ratio: MoHRouter(16, 8, 2, [0, 1], top_k=3, variant="learned", init_std=1.0, lr_ratio=ratio).train()
        for ratio in (1.0, 0.1)
    }
    for name in ("routed", "shared", "mix"):
        effective = torch.randn_like(routers[1.0].weight(name))
        for router in routers.values():
            router.set_weight(name, effective)
    torch.testing.assert_close(routers[0.1](x, q), routers[1.0](x, q))  # the same gates
    moved = {}
    for ratio, router in routers.items():
        before = router.weight("routed").clone()
        optimizer = torch.optim.Adam(router.parameters(), lr=1e-3)
        (router(x, q) * torch.arange(8.0)).sum().backward()
        optimizer.step()
        moved[ratio] = (router.weight("routed") - before).abs().max().item()
    assert moved[0.1] == pytest.approx(0.1 * moved[1.0], rel=1e-2)


def test_bad_conversion_options_fail_with_the_fix():
    model, adapter = moh_model()
    with pytest.raises(ValueError, match="detach its MoH adapter first"):
        next(head_ablation_kl(model, [torch.randint(3, 300, (1, 4))]))
    dense = tiny_model("llama", num_heads=HEADS, head_dim=4)
    with pytest.raises(ValueError, match=r"pass `calibration`.*or use shared_heads='first', router_init='random'"):
        MoHAdapter.for_model(dense, num_shared_heads=2, top_k=2, shared_heads="importance")
    with pytest.raises(ValueError, match=r"query_norm variant has no router weights: use router_init='random'"):
        MoHAdapter.for_model(dense, num_shared_heads=2, top_k=2, variant="query_norm", router_init="importance")
    with pytest.raises(ValueError, match=r"shared_heads='best'.*first, importance"):
        MoHAdapter.for_model(dense, num_shared_heads=2, top_k=2, shared_heads="best")
    with pytest.raises(ValueError, match=r"router_lr_ratio=0: choose a ratio > 0"):
        MoHAdapter.for_model(dense, num_shared_heads=2, top_k=2, router_lr_ratio=0)
    with pytest.raises(ValueError, match=r"routing_chunk=-1: choose 0 \(route every token\) or a chunk length"):
        MoHAdapter.for_model(dense, num_shared_heads=2, top_k=2, routing_chunk=-1)


def test_bad_splits_fail_with_the_fix():
    model = tiny_model("llama", num_heads=HEADS, head_dim=4)
    with pytest.raises(ValueError, match=r"2 shared \+ 5 routed = 7.*8 query heads.*num_routed_heads=6"):
        MoHAdapter.for_model(model, num_shared_heads=2, num_routed_heads=5, top_k=2)
    with pytest.raises(ValueError, match=r"top_k=7 routed heads per token, but 6 heads are routed.*top_k <= 6"):
        MoHAdapter.for_model(model, num_shared_heads=2, top_k=7)
    with pytest.raises(ValueError, match=r"top_k=0"):
        MoHAdapter.for_model(model, num_shared_heads=2, top_k=0)
    with pytest.raises(ValueError, match=r"num_shared_heads=8.*at least one head is routed"):
        MoHAdapter.for_model(model, num_shared_heads=8, top_k=1)
    with pytest.raises(ValueError, match=r"variant 'topk'.*learned, query_norm"):
        MoHAdapter.for_model(model, num_shared_heads=2, top_k=2, variant="topk")
    _, adapter = moh_model()
    with pytest.raises(ValueError, match=r"top_k=9"):
        adapter.set_top_k(9)


def test_moh_generation_switch():
    model = tiny_model("llama", num_heads=HEADS, head_dim=4).eval()
    with pytest.raises(ValueError, match="--moh on needs a MoH router.*--adapter"):
        apply_generation_hooks(model, {"moh": "on"})
    setup = apply_generation_hooks(model, {"moh": "on:query_norm,shared=4,top_k=2"})
    model(torch.randint(3, 300, (1, 5)))
    assert ((layer_gates(model)[..., 4:] != 0).sum(-1) == 2).all()
    setup.close()
    assert find_moh_adapter(model) is None and model.config._attn_implementation == "sdpa"

    model, adapter = moh_model(num_shared=2, top_k=3)
    setup = apply_generation_hooks(model, {"moh": "on:top_k=1"})
    assert adapter.top_k == 1 and setup.applied == {"moh": "on:top_k=1"}
    setup.close()
    assert adapter.top_k == 3
    with pytest.raises(ValueError, match="unknown.*'topk'"):
        apply_generation_hooks(model, {"moh": "on:topk=1"})


def test_recipe_end_to_end(tmp_path):
    common = [
        "--max_steps",
        "3",
        "--num_train_rows",
        "12",
        "--num_eval_rows",
        "4",
        "--seq_len",
        "64",
        "--per_device_train_batch_size",
        "4",
        "--logging_steps",
        "1",
    ]
    out = tmp_path / "moh"
    accelerate_launch(
        "recipes/moh.py",
        "--config",
        "recipes/configs/moh/default.yaml",
        *common,
        "--num_shared_heads",
        "2",
        "--output_dir",
        str(out),
    )
    results = json.loads((out / "results.json").read_text())
    assert results["active_fraction"] == 0.5
    assert results["step0_eval_loss"] > results["dense_eval_loss"]  # heads left out at step 0
    assert set(results["step0_logit_change"]) == {"max_abs_logit_change", "mean_kl", "top1_agreement"}
    assert len(results["load"]) == 8 and len(results["load"][0]) == 6
    importance = torch.tensor(results["head_importance"])  # default config: shared heads and router from importance
    assert importance.shape == (8, 8) and len(results["router_overlap"]) == 8
    assert results["shared_heads"] == [sorted(row.topk(2).indices.tolist()) for row in importance]
    logged = [json.loads(line) for line in (out / "load.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in logged] == [1, 2, 3]

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert not any("ctxaware_adapter" in name for name in model.state_dict())
    adapter = HeadAdapter.from_pretrained(out / "adapter", model)
    assert isinstance(adapter, MoHAdapter) and adapter.top_k == 2 and adapter.router_lr_ratio == 0.01
    assert adapter.heads == [(layer, head) for layer, heads in enumerate(results["shared_heads"]) for head in heads]
    assert all(router.mix.weight.abs().sum() > 0 for router in adapter.routers)  # zero-initialised, then trained

    dense = tmp_path / "dense"
    accelerate_launch(
        "recipes/moh.py",
        "--config",
        "recipes/configs/moh/default.yaml",
        *common,
        "--dense_control",
        "true",
        "--output_dir",
        str(dense),
    )
    control = json.loads((dense / "results.json").read_text())
    assert control["dense_control"] and "active_fraction" not in control and control["eval_loss"] is not None
    assert (dense / "model" / "config.json").is_file() and not (dense / "adapter").exists()


def test_recipe_mixes_world_rows_into_a_named_text():
    """`num_world_rows` adds the world's corpus to `books` in one shuffled order (the calibration rows mix both)."""
    from ctxaware.models import load_tokenizer, resolve_model_path
    from ctxaware.training import pack_texts
    from tests.test_configs import load_recipe

    recipe = load_recipe("moh")
    tokenizer = load_tokenizer(resolve_model_path("ctxaware-tiny"))
    args = recipe.MoHArguments(dataset_name="books", num_train_rows=3, num_world_rows=5, seq_len=64)
    rows = recipe.training_rows(args, tokenizer, "text")
    books = recipe.packed_rows(args, tokenizer, "train", 3, "text")
    world = pack_texts(recipe.world_documents(args, "train", 40), tokenizer, 64, 5)
    assert sorted(rows) == sorted(books + world) and rows != books + world
    assert recipe.training_rows(args, tokenizer, "text") == rows  # the same order for every seed
    with pytest.raises(ValueError, match="num_world_rows=2: add world rows"):
        recipe.MoHArguments(num_world_rows=2)  # the world's corpus is already the data


def test_readme_commands_parse():
    import shlex
    from pathlib import Path

    from trl import TrlParser

    from tests.test_configs import load_recipe

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    commands = [
        line.split("#")[0] for line in readme.splitlines() if line.startswith("accelerate launch recipes/moh.py")
    ]
    assert len(commands) >= 4
    recipe = load_recipe("moh")
    for command in commands:
        args = shlex.split(command)[3:]
        parsed = TrlParser(recipe.CONFIG_CLASSES).parse_args_and_config(args=args)
        assert [type(c) for c in parsed] == list(recipe.CONFIG_CLASSES)


def test_speed_benchmark_smoke_times_token_and_chunk_routing(tmp_path):
    """`benchmarks/moh.py --smoke` (CPU, toy shapes) writes every timing the GPU run reports, chunk routing, the CUDA-graph
    peers of the forward and the decode step (eagerly on the CPU) and the decode's host time included."""
    command = [sys.executable, "benchmarks/moh.py", "--out", str(tmp_path), "--smoke", "--train-step", "2", "64"]
    subprocess.run(command, check=True)
    row, step = json.loads((tmp_path / "moh.json").read_text())["rows"]
    assert row["model_dense_decode_graph"] > 0 and row["model_dense_fwd_graph"] > 0 and row["host_dense_decode"] > 0
    for routing in ("token", "chunk"):
        for active in (0.75, 0.5):
            for what in ("fwd", "fwd_graph", "decode", "decode_graph"):
                assert row[f"model_{routing}_{active}_{what}"] > 0
            assert row[f"host_{routing}_{active}_decode"] > 0
            # chunk routing also at a step that reuses its chunk's gates (runs no router); token routing has none
            assert (row.get(f"model_{routing}_{active}_decode_mid_graph", 0) > 0) == (routing == "chunk")
    table = (tmp_path / "moh.md").read_text()
    assert "1B model decode step inside a chunk (no router), chunk-routed (128), CUDA graph" in table
    assert "1B model forward, chunk-routed (128)" in table and "1B model decode step, token-routed" in table
    for what, label in (("decode", "decode step"), ("fwd", "forward")):
        dense = row[f"model_dense_{what}_graph"]
        for routed, routing in (("token-routed", "token"), ("chunk-routed (128)", "chunk")):
            (line,) = [line for line in table.splitlines() if f"1B model {label}, {routed}, CUDA graph |" in line]
            graphed = [row[f"model_{routing}_{active}_{what}_graph"] for active in (0.75, 0.5)]
            cells = [f"{dense:.2f}"] + [f"{value:.2f} ({value / dense:.2f}x)" for value in graphed]  # ratios to dense
            assert line.endswith(" | ".join(cells) + " |")
    assert "host time of a 1B decode step, token-routed" in table
    # the training step, dense and both SmolLM2 splits, each with its ratio to dense (no GPU time on the CPU)
    assert step["train_step"] == [2, 64]
    for name, label in (("dense", "dense"), ("moh_4_3", "MoH 4 shared + top 3"), ("moh_3_2", "MoH 3 shared + top 2")):
        value = step[f"step_2x64_{name}"]
        assert value > 0
        assert f"| 2 x 64 | {label} | {value:.1f} ({value / step['step_2x64_dense']:.2f}x) | n/a |" in table


def test_speed_benchmark_decode_only_times_the_decode_step_alone(tmp_path):
    """`--decode-only` (the decode path's A/Bs) times the decode step, eager and as a graph, for dense and both
    routings, and nothing else: no attention rows, no forward; it refuses --skip-model, which leaves the model out."""
    command = [sys.executable, "benchmarks/moh.py", "--out", str(tmp_path), "--smoke", "--active", "0.5"]
    subprocess.run([*command, "--decode-only"], check=True)
    (row,) = json.loads((tmp_path / "moh.json").read_text())["rows"]
    for name in ("dense", "token_0.5", "chunk_0.5"):
        assert row[f"model_{name}_decode"] > 0 and row[f"model_{name}_decode_graph"] > 0
    assert not [key for key in row if key.startswith(("attn_", "decode_")) or key.endswith(("_fwd", "_fwd_graph"))]
    assert "1B model decode step, token-routed, CUDA graph |" in (tmp_path / "moh.md").read_text()
    assert row["model_dense_decode_graph_end"] > 0  # dense re-timed last: the drift over the run
    assert "dense again after the MoH rows" in (tmp_path / "moh.md").read_text()
    refused = subprocess.run([*command, "--decode-only", "--skip-model"], capture_output=True, text=True)
    assert refused.returncode == 2 and "choose one" in refused.stderr


def test_kernel_profile_helpers_report_per_call_times_and_launches(monkeypatch):
    """bench_common.kernel_profile over a stand-in profiler (no GPU here): each kernel's device time and the kernels
    launched, per call of the profiled function, from one profile; host-only events left out."""
    import torch.profiler

    bench = load_benchmark("bench_common")
    calls = []

    class Event:
        def __init__(self, key, device_us, count):
            self.key, self.self_device_time_total, self.count = key, device_us, count

    class Profile:
        def __init__(self, activities):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def key_averages(self):
            return [Event("gemm", 3000.0, 10), Event("softmax", 1000.0, 30), Event("aten::add (host)", 0, 99)]

    monkeypatch.setattr(torch.profiler, "profile", Profile)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    assert bench.kernel_profile(lambda: calls.append(1), calls=5) == ({"gemm": 0.6, "softmax": 0.2}, 8.0)  # 40 / 5
    assert len(calls) == 6  # one call outside the profile, then five inside
    assert bench.kernel_ms(lambda: calls.append(1), calls=5) == {"gemm": 0.6, "softmax": 0.2}


def test_router_ab_benchmark_smoke(tmp_path):
    """`benchmarks/router_ab.py --smoke` (CPU, interpreter): the package's router kernel against itself as the
    baseline at a decode call and a prefill-sized call, each size twice with the order alternating, then the model's
    decode step with each version's router and the dense step, in one process."""
    command = [sys.executable, "benchmarks/router_ab.py", "--baseline", "ctxaware/kernels/moh_router.py"]
    printed = subprocess.run([*command, "--out", str(tmp_path), "--smoke", "--repeats", "2", "--decode-step", "16"],
                             check=True, capture_output=True, text=True).stdout  # fmt: skip
    assert [line.split(" ")[1] for line in printed.splitlines()][:4] == ["baseline", "package", "package", "baseline"]
    results = json.loads((tmp_path / "router_ab.json").read_text())["results"]
    assert list(results) == ["1", "40", "decode_step_16"]
    for row in results.values():
        assert len(row["change_per_run"]) == 2 and row["package"]["max_abs_diff"] == 0 and row["baseline"]["ms"] > 0
    step_order = [line.split(" ")[1] for line in printed.splitlines() if line.startswith("decode_step_16 ")]
    assert step_order == ["dense", "baseline", "package", "package", "baseline", "dense"]
    step = results["decode_step_16"]
    assert len(step["dense"]["ms_runs"]) == 2 and step["dense"]["max_abs_diff"] > 0  # dense differs from MoH's step
    table = (tmp_path / "router_ab.md").read_text()
    assert "| 40 |" in table and "| 1B decode step after 16 (dense " in table
    refused = subprocess.run([*command, "--out", str(tmp_path), "--smoke", "--decode-step", "0"], capture_output=True)
    assert refused.returncode == 2


def test_speed_benchmark_lists_each_profiled_calls_slowest_kernels():
    """The GPU run's per-kernel profile of the attention forward+backward: one line per length and case, the slowest
    kernels first with their GPU ms, and the call's total."""
    bench = load_benchmark("moh")
    kernels = {f"k{i}": 1.0 / (i + 1) for i in range(10)}  # already slowest first, as `kernel_ms` returns them
    rows = [{"S": 4096, "kernels_dense_fwdbwd": kernels, "kernels_token_0.5_fwdbwd": {"_bwd_dkdv_kernel": 0.5}}]
    lines = bench.kernel_lines(rows)
    assert lines[-2].startswith(
        f"- S=4096, dense_fwdbwd (all kernels {sum(kernels.values()):.3f}): k0 1.000; k1 0.500"
    )
    assert lines[-2].endswith(f"k7 {1 / 8:.3f}") and "k8" not in lines[-2]
    assert lines[-1] == "- S=4096, token_0.5_fwdbwd (all kernels 0.500): _bwd_dkdv_kernel 0.500"
    assert bench.kernel_lines([{"S": 4096}]) == []  # CPU rows: nothing profiled, no section
    # the decode step's and the training step's profiles with their kernel launches per call
    rows = [
        {"S": 8192, "kernels_dense_decode_step": {"gemv": 2.0}, "launches_dense_decode_step": 350.0},
        {"train_step": [8, 1024], "kernels_moh_4_3_train_step": {"mm": 40.0}, "launches_moh_4_3_train_step": 2400.4},
    ]
    assert bench.kernel_lines(rows)[-2:] == [
        "- S=8192, dense_decode_step (all kernels 2.000, 350 launches): gemv 2.000",
        "- S=8x1024, moh_4_3_train_step (all kernels 40.000, 2400 launches): mm 40.000",
    ]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("shared, top_k, lr_ratio", [([], 2, 1.0), ([3], 1, 0.1), ([0, 5, 6], 3, 0.01)])
@pytest.mark.parametrize(
    "tokens, decode_block",
    [(20, 1024), (3, 1024), (3, 64)],
    ids=["prefill-blocks", "decode-one-block", "decode-ragged-blocks"],
)
def test_fused_router_kernel_gives_the_routers_gates(shared, top_k, lr_ratio, tokens, decode_block, monkeypatch):
    """Inference on CUDA takes the one-launch kernel; it must give the PyTorch router's gates (no shared head, one,
    several; weights stored divided by lr_ratio) on both of its paths: 40 tokens read the hidden size in blocks of
    128 (200 is not a multiple), 6 tokens (a decode call) in wider blocks, all of it at once or in ragged steps."""
    monkeypatch.setattr(moh_router, "DECODE_HIDDEN_BLOCK", decode_block)
    router = MoHRouter(200, 8, 4, shared, top_k=top_k, variant="learned", init_std=1.0, lr_ratio=lr_ratio)
    with torch.no_grad():
        for param in router.parameters():
            param.normal_(0, 0.2 / lr_ratio)  # effective weights of std 0.2: decisive, varied routing
    x = torch.randn(2, tokens, 200)
    q = torch.randn(2, tokens, 32)
    expected = router.token_gates(x, q)  # on CPU: the PyTorch router
    fused = router_gates(
        x,
        router.routed.weight,
        router.shared.weight if router.shared is not None else None,
        router.mix.weight if router.mix is not None else None,
        router.columns,
        lr_ratio=lr_ratio,
        top_k=top_k,
        dtype=q.dtype,
    )
    assert torch.equal(fused != 0, expected != 0)
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-6)
    assert (expected != 0).sum(-1).eq(len(shared) + top_k).all()
