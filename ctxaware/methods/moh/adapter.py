"""The MoH adapter: a router per layer (`ctxaware.methods.moh.router`) saved, loaded and attached like every
ctxaware adapter, and built from a dense model by `MoHAdapter.for_model`.

The gates go to the kernel through `AttentionOptions.head_gates`, set by a forward hook on each layer's query
projection (whose input is the attention input and output the queries), so nothing passes through forward keyword arguments and it
works under Trainer, gradient checkpointing and PEFT. Attaching switches the model to `attn_implementation="ctxaware"`
(detaching restores it). Zero gates skip whole kernel tiles only where every query of a tile skips the head: per-token
routing skips work in decode (one query per tile); in prefill and training it is the same maths as masking.
With `off_head_bias="mean"` a forward hook on each layer's o_proj adds, per token, the mean output of the heads the
router left out (`MoHRouter.off_output`), measured on the dense model by `for_model`.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager

import torch
from torch import nn

from ctxaware.adapters import ATTACHED_ATTR, HeadAdapter
from ctxaware.attention import (
    attention_modules,
    get_attention_options,
    output_projection,
    restore_attention,
    use_ctxaware_attention,
)
from ctxaware.heads import Head, HeadLayout, heads_by_layer
from ctxaware.methods.moh.calibration import fit_router_weights, head_ablation_kl, head_output_means, off_head_rows
from ctxaware.methods.moh.router import VARIANTS, MoHRouter, check_moh_shape, query_projection


SHARED_HEADS = ("first", "importance")
ROUTER_INITS = ("random", "importance")
OFF_HEAD_BIASES = ("none", "mean")


class MoHAdapter(HeadAdapter):
    """Routers for every layer; `heads` are the shared (always active) heads, every other query head is routed.
    `off_head_bias`: "none", a routed head the router leaves out adds nothing (zero-ablation); "mean", it adds a
    learnable bias that `for_model` sets to its mean output on the dense model (mean-ablation; a constructed adapter
    starts at zero, a loaded one reads its saved bias)."""

    method = "moh"
    description = (
        "MoH (mixture-of-head attention) router: shared heads always active, the top-k routed heads chosen per token, "
        "heads that are not chosen skipped by the ctxaware attention kernel. Trained with ctxaware."
    )

    def __init__(
        self,
        layout: HeadLayout,
        heads: list[Head],
        *,
        top_k: int,
        variant: str = "learned",
        router_init_std: float = 1e-2,
        router_lr_ratio: float = 1.0,
        routing_chunk: int = 0,
        off_head_bias: str = "none",
        **kwargs,
    ):
        super().__init__(layout, heads, **kwargs)
        if off_head_bias not in OFF_HEAD_BIASES:
            raise ValueError(f"off_head_bias={off_head_bias!r}: choose one of {', '.join(OFF_HEAD_BIASES)}.")
        if variant not in VARIANTS:
            raise ValueError(f"MoH variant {variant!r} is unknown: choose one of {', '.join(VARIANTS)}.")
        if router_lr_ratio <= 0:
            raise ValueError(f"router_lr_ratio={router_lr_ratio}: choose a ratio > 0 (1: the model's learning rate).")
        if routing_chunk < 0:
            raise ValueError(
                f"routing_chunk={routing_chunk}: choose 0 (route every token) or a chunk length in tokens (128 lets "
                "the kernel skip whole tiles)."
            )
        self.routing_chunk = routing_chunk
        self.top_k, self.variant, self.router_init_std = top_k, variant, router_init_std
        self.router_lr_ratio, self.off_head_bias = router_lr_ratio, off_head_bias
        shared = heads_by_layer(self.heads)
        for layer in range(layout.num_layers):
            self.layers[str(layer)] = MoHRouter(
                layout.hidden_size,
                layout.num_heads,
                layout.head_dim,
                shared.get(layer, []),
                top_k=top_k,
                variant=variant,
                init_std=router_init_std,
                lr_ratio=router_lr_ratio,
                chunk=routing_chunk,
                off_bias=off_head_bias != "none",
            )
        self._restore: tuple[nn.Module, str] | None = None
        self.calibration: dict | None = None  # what `for_model` measured on the dense model, if it measured

    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        *,
        num_shared_heads: int,
        top_k: int,
        num_routed_heads: int | None = None,
        variant: str = "learned",
        router_init_std: float = 1e-2,
        shared_heads: str = "first",
        router_init: str = "random",
        calibration: Iterable | None = None,
        off_head_bias: str = "none",
        **kwargs,
    ) -> MoHAdapter:
        """A fresh router for `model` (not yet attached: call `attach(model)`).

        `shared_heads`: "first" shares the first `num_shared_heads` query heads of each layer; "importance" the heads
        whose absence costs the dense model most on `calibration` (batches of input ids; mean per-token KL, see
        `head_ablation_kl`): the heads a few rare tokens depend on (retrieval, carries) stay always on.
        `router_init` (learned variant): "random" draws the routed logits; "importance" fits each router so its top k
        picks, per token, the routed heads whose absence costs most at that token (`fit_router_weights`), so the
        converted model starts close to the dense one. `off_head_bias="mean"` sets each routed head's off-bias to
        o_proj applied to its mean output over the real tokens of `calibration` (`head_output_means`), and head
        importance then measures the cost of mean-ablating each head (what the converted model will do), not of
        zero-ablating it. Calibration batches are input ids, or mappings with `input_ids` and `attention_mask`
        (padding is left out). What was measured is kept in `adapter.calibration`. Other keyword arguments
        (`router_lr_ratio`, `base_model`, ...) go to the constructor."""
        layout = HeadLayout.from_model(model)
        check_moh_shape(layout.num_heads, num_shared_heads, num_routed_heads, top_k)
        if shared_heads not in SHARED_HEADS or router_init not in ROUTER_INITS:
            raise ValueError(
                f"shared_heads={shared_heads!r}, router_init={router_init!r}: choose shared_heads in "
                f"{', '.join(SHARED_HEADS)} and router_init in {', '.join(ROUTER_INITS)}."
            )
        if router_init == "importance" and variant != "learned":
            raise ValueError(
                f"router_init='importance' fits the learned router; the {variant} variant has no router weights: "
                "use router_init='random'."
            )
        first = list(range(num_shared_heads))
        kwargs |= {"top_k": top_k, "variant": variant, "router_init_std": router_init_std}
        kwargs |= {"off_head_bias": off_head_bias}
        measure_importance = shared_heads == "importance" or router_init == "importance"
        if calibration is None and (measure_importance or off_head_bias == "mean"):
            raise ValueError(
                f"shared_heads={shared_heads!r}, router_init={router_init!r}, off_head_bias={off_head_bias!r} "
                "measure the dense model: pass `calibration` (batches of input ids), or use shared_heads='first', "
                "router_init='random', off_head_bias='none'."
            )
        batches = list(calibration) if calibration is not None else []
        rows = off_head_rows(model, head_output_means(model, batches)) if off_head_bias == "mean" else None
        if not measure_importance:
            adapter = cls(layout, [(layer, head) for layer in range(layout.num_layers) for head in first], **kwargs)
            return adapter._set_off_bias(rows)
        shared, weights, importance, overlap = [], [], [], []
        for layer, (inputs, token_kl) in enumerate(head_ablation_kl(model, batches, off_rows=rows)):
            importance.append(token_kl.mean(0))
            heads = first
            if shared_heads == "importance":
                heads = sorted(importance[-1].topk(num_shared_heads).indices.tolist())
            shared += [(layer, head) for head in heads]
            if router_init == "importance":
                routed = [head for head in range(layout.num_heads) if head not in heads]
                weight, agreement = fit_router_weights(inputs, token_kl[:, routed], top_k, logit_std=router_init_std)
                weights.append(weight)
                overlap.append(agreement)
        adapter = cls(layout, shared, **kwargs)
        for router, weight in zip(adapter.routers, weights):
            router.set_weight("routed", weight)
        adapter.calibration = {"head_importance": torch.stack(importance).tolist(), "router_overlap": overlap}
        return adapter._set_off_bias(rows)

    @torch.no_grad()
    def _set_off_bias(self, rows: list[torch.Tensor] | None) -> MoHAdapter:
        """Sets each router's off-bias to its routed heads' rows of `off_head_rows` (None: nothing to set)."""
        if rows is not None:
            for router, layer_rows in zip(self.routers, rows):
                router.off_bias.copy_(layer_rows[router.routed_index.to(layer_rows.device)])
        return self

    def hyperparameters(self) -> dict:
        return {
            "top_k": self.top_k,
            "variant": self.variant,
            "router_init_std": self.router_init_std,
            "router_lr_ratio": self.router_lr_ratio,
            "routing_chunk": self.routing_chunk,
            "off_head_bias": self.off_head_bias,
        }

    @property
    def routers(self) -> list[MoHRouter]:
        return [self.layers[str(layer)] for layer in range(self.layout.num_layers)]

    def active_fraction(self) -> float:
        """Share of query heads active per token: (shared + top_k) / heads, averaged over layers."""
        return sum((r.num_shared + r.top_k) / r.num_heads for r in self.routers) / len(self.routers)

    def set_top_k(self, top_k: int) -> None:
        """Changes k at inference (e.g. to evaluate another sparsity with the same router)."""
        for router in self.routers:
            check_moh_shape(router.num_heads, router.num_shared, router.num_routed, top_k)
        for router in self.routers:
            router.top_k = top_k
        self.top_k = top_k

    # --- attaching: a hook on each layer's query projection writes the gates into the kernel's options ----------
    def attach(self, model: nn.Module) -> nn.Module:
        """All or nothing: everything is checked before the model is touched, and a failure midway undoes it all."""
        self.check_compatible(model)
        if self._handles:
            raise RuntimeError("this MoH adapter is already attached: call `detach()` first")
        modules = attention_modules(model)
        if taken := [str(i) for i, m in enumerate(modules) if hasattr(m, ATTACHED_ATTR)]:
            raise RuntimeError(
                f"layers {', '.join(taken)} already carry a ctxaware adapter: detach it (`adapter.detach()`) or merge "
                "it first"
            )
        projections = [query_projection(module, self.layout) for module in modules]
        try:
            self._restore = use_ctxaware_attention(model)  # a tuple: not registered as a submodule
            for module, router, (linear, width) in zip(modules, self.routers, projections):
                router.__dict__["adapter"] = self  # a plain attribute, not a submodule: `find_moh_adapter` reads it
                module.add_module(ATTACHED_ATTR, router)
                self._attached_to.append(module)
                self._handles.append(linear.register_forward_hook(_gate_hook(module, router, width)))
                if router.chunk:
                    self._handles.append(module.register_forward_pre_hook(_offset_hook(router), with_kwargs=True))
                if router.off_bias is not None:
                    self._handles.append(
                        output_projection(module).register_forward_hook(_off_bias_hook(module, router))
                    )
        except BaseException:
            self.detach()
            raise
        return model

    def detach(self) -> None:
        for module in self._attached_to:
            get_attention_options(module).head_gates = None
        for router in self.routers:
            router.__dict__.pop("adapter", None)
        super().detach()
        if self._restore is not None:
            restore_attention(self._restore)
        self._restore = None

    @contextmanager
    def disabled(self):
        """Dense attention (every gate 1) inside the block, with the adapter still attached."""
        for router in self.routers:
            router.enabled = False
        try:
            yield
        finally:
            for router in self.routers:
                router.enabled = True

    # --- training signals -------------------------------------------------------------------------------------
    def balance_loss(self) -> torch.Tensor | None:
        """Mean over layers of each router's load-balance loss from the last training forward (None without one)."""
        losses = [loss for router in self.routers if (loss := router.balance_loss()) is not None]
        return torch.stack(losses).mean() if losses else None

    def pop_load(self) -> torch.Tensor | None:
        """(layers, routed heads) fraction of tokens routed to each head in the last training forward, scaled so the
        fair share is 1 (k / n_r of the tokens); clears the stored statistics. None without a training forward."""
        if any(router.stats is None for router in self.routers):
            return None
        load = torch.stack([r.stats["load"].detach() * r.num_routed / r.top_k for r in self.routers])
        for router in self.routers:
            router.stats = None
        return load


def _gate_hook(module: nn.Module, router: MoHRouter, width: int):
    options = get_attention_options(module)

    def hook(projection, args, output):
        options.head_gates = router(args[0], output[..., :width]) if router.enabled else None

    return hook


def _off_bias_hook(module: nn.Module, router: MoHRouter):
    """Adds the off-bias of the heads the layer's gates leave out to o_proj's output (nothing while disabled: the
    gates are then None)."""
    options = get_attention_options(module)

    def hook(projection, args, output):
        if options.head_gates is not None:
            return output + router.off_output(options.head_gates).to(output.dtype)

    return hook


def _offset_hook(router: MoHRouter):
    def hook(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # renamed `cache` in transformers 5.x
        router.offset = cache.get_seq_length(module.layer_idx) if cache is not None else 0

    return hook


@torch.no_grad()
def logit_change(model: nn.Module, adapter: MoHAdapter, input_ids: torch.Tensor, attention_mask=None) -> dict:
    """How far routing moves the model from its dense self on `input_ids`: max |delta logit|, mean KL(dense || MoH)
    per token and top-1 agreement."""
    was_training = model.training
    model.eval()
    with adapter.disabled():
        dense = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    routed = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    model.train(was_training)
    keep = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    dense_logp, routed_logp = dense.log_softmax(-1)[keep], routed.log_softmax(-1)[keep]
    kl = (dense_logp.exp() * (dense_logp - routed_logp)).sum(-1)
    return {
        "max_abs_logit_change": (dense - routed).abs()[keep].max().item(),
        "mean_kl": kl.mean().item(),
        "top1_agreement": (dense_logp.argmax(-1) == routed_logp.argmax(-1)).float().mean().item(),
    }


def find_moh_adapter(model: nn.Module) -> MoHAdapter | None:
    """The MoH adapter attached to `model`, if any."""
    for module in attention_modules(model):
        router = getattr(module, ATTACHED_ATTR, None)
        if isinstance(router, MoHRouter) and "adapter" in router.__dict__:
            return router.__dict__["adapter"]
    return None
