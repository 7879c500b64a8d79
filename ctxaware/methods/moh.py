"""MoH (mixture-of-head attention): a dense model's query heads become shared heads, always on, and routed heads, of
which a router picks the top k per token; the attention kernel skips every (token, head) whose gate is exactly 0.

Gates, per token x (the attention input) and layer, with n_s shared and n_r routed query heads:
    learned (the paper's form):
        alpha = softmax(W_mix x)                              2-way: shared vs routed group
        shared head i:  g_i = 2 alpha_0 * n_s * softmax(W_s x)_i
        routed head i:  g_i = 2 alpha_1 * n_r * softmax(W_r x)_i  if i is among the top k of W_r x, else 0
    query_norm (the released LLaMA3 conversion): shared g_i = 1; routed g_i = 1 for the k routed heads whose query
        (q_proj output, before any q_norm or RoPE, which keeps norms) has the largest L2 norm, else 0. No parameters.
The factors 2 and n make the learned gates start at 1: W_mix and W_s start at 0 and W_r at N(0, (std / sqrt(d))^2),
so at step 0 the active heads carry weight 1 +- O(std) and the converted model differs from the dense one only by
the heads it leaves out (`logit_change` measures it). Without shared heads (or without routed ones) the mixing
router is dropped. Under GQA the gates are on query heads: key/value heads are always computed, so a KV cache is
filled exactly as in the dense model and routed generation with a cache equals routed recomputation.

Load balance (Switch-style, per layer, averaged over layers): L_b = (n_r / k) * sum_i f_i P_i, f_i the fraction of
tokens that route to head i (not differentiated), P_i the mean of softmax(W_r x)_i over those tokens. It is 1 when
routing is uniform, so its coefficient (0.01 by default) means the same for any head count.

The gates go to the kernel through `AttentionOptions.head_gates`, set by a forward hook on each layer's q_proj (whose
input is the attention input and output the queries), so nothing passes through forward keyword arguments and it
works under Trainer, gradient checkpointing and PEFT. Attaching switches the model to `attn_implementation="ctxaware"`
(detaching restores it). Zero gates skip whole kernel tiles only where every query of a tile skips the head: per-token
routing skips work in decode (one query per tile); in prefill and training it is the same maths as masking.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F

from ctxaware.adapters import ATTACHED_ATTR, HeadAdapter
from ctxaware.attention import ATTN_IMPLEMENTATION, attention_modules, get_attention_options
from ctxaware.eval.hooks import GenerationSetup, register_generation_hook
from ctxaware.heads import Head, HeadLayout, heads_by_layer


VARIANTS = ("learned", "query_norm")


def check_moh_shape(num_heads: int, num_shared: int, num_routed: int | None, top_k: int) -> int:
    """Validates a shared/routed split of `num_heads` query heads; returns the routed count."""
    if not 0 <= num_shared < num_heads:
        raise ValueError(
            f"num_shared_heads={num_shared}, but the model has {num_heads} query heads per layer: choose "
            f"0 <= num_shared_heads <= {num_heads - 1} so that at least one head is routed."
        )
    if num_routed is None:
        num_routed = num_heads - num_shared
    if num_shared + num_routed != num_heads:
        raise ValueError(
            f"every query head must be shared or routed: {num_shared} shared + {num_routed} routed = "
            f"{num_shared + num_routed}, but the model has {num_heads} query heads per layer. Set "
            f"num_routed_heads={num_heads - num_shared} (or leave it unset: the heads that are not shared are routed)."
        )
    if not 1 <= top_k <= num_routed:
        raise ValueError(
            f"top_k={top_k} routed heads per token, but {num_routed} heads are routed ({num_shared} of {num_heads} "
            f"shared): choose 1 <= top_k <= {num_routed}, or fewer shared heads."
        )
    return num_routed


class MoHRouter(nn.Module):
    """One layer's router: (attention input x, queries q) -> gates (B, S, Hq) over the layer's query heads."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int,
        shared: list[int],
        *,
        top_k: int,
        variant: str,
        init_std: float,
    ):
        super().__init__()
        routed = [h for h in range(num_heads) if h not in set(shared)]
        check_moh_shape(num_heads, len(shared), len(routed), top_k)
        self.num_heads, self.head_dim, self.top_k, self.variant = num_heads, head_dim, top_k, variant
        self.num_shared, self.num_routed = len(shared), len(routed)
        self.register_buffer("shared_index", torch.tensor(shared, dtype=torch.long), persistent=False)
        self.register_buffer("routed_index", torch.tensor(routed, dtype=torch.long), persistent=False)
        # gates are built as cat([shared, routed]); this puts each head back in its own column
        self.register_buffer("order", torch.argsort(torch.tensor(shared + routed)), persistent=False)
        self.routed = self.shared = self.mix = None
        if variant == "learned":
            self.routed = nn.Linear(hidden_size, self.num_routed, bias=False)
            nn.init.normal_(self.routed.weight, std=init_std / math.sqrt(hidden_size))
            if self.num_shared > 1:
                self.shared = nn.Linear(hidden_size, self.num_shared, bias=False)
                nn.init.zeros_(self.shared.weight)
            if self.num_shared:
                self.mix = nn.Linear(hidden_size, 2, bias=False)
                nn.init.zeros_(self.mix.weight)
        self.enabled = True
        self.stats: dict[str, torch.Tensor] | None = None  # of the last training forward: "load", "prob"

    def forward(self, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        if self.variant == "learned":
            x = x.float()
            scores = F.linear(x, self.routed.weight.float())
            probs = scores.softmax(-1)
        else:
            scores = q.detach().float().unflatten(-1, (self.num_heads, self.head_dim))[..., self.routed_index, :]
            scores, probs = scores.norm(dim=-1), None
        chosen = scores.topk(self.top_k, dim=-1).indices
        mask = torch.zeros_like(scores).scatter_(-1, chosen, 1.0)
        if probs is None:
            routed_gates, shared_gates = mask, mask.new_ones(*mask.shape[:-1], self.num_shared)
        else:
            routed_gates = self.num_routed * probs * mask
            shared_gates = x.new_ones(*x.shape[:-1], self.num_shared)
            if self.shared is not None:
                shared_gates = self.num_shared * F.linear(x, self.shared.weight.float()).softmax(-1)
            if self.mix is not None:
                alpha = 2 * F.linear(x, self.mix.weight.float()).softmax(-1)
                shared_gates, routed_gates = shared_gates * alpha[..., :1], routed_gates * alpha[..., 1:]
        if self.training and torch.is_grad_enabled():
            tokens = mask.flatten(0, -2)
            self.stats = {"load": tokens.mean(0)}
            if probs is not None:
                self.stats["prob"] = probs.flatten(0, -2).mean(0)
        gates = torch.cat([shared_gates, routed_gates], dim=-1)[..., self.order]
        return gates.to(q.dtype)

    def balance_loss(self) -> torch.Tensor | None:
        """(n_r / k) * sum_i f_i P_i of the last training forward (1 when routing is uniform); None if there is none."""
        if self.stats is None or "prob" not in self.stats:
            return None
        return self.num_routed / self.top_k * (self.stats["load"].detach() * self.stats["prob"]).sum()


class MoHAdapter(HeadAdapter):
    """Routers for every layer; `heads` are the shared (always active) heads, every other query head is routed."""

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
        **kwargs,
    ):
        super().__init__(layout, heads, **kwargs)
        if variant not in VARIANTS:
            raise ValueError(f"MoH variant {variant!r} is unknown: choose one of {', '.join(VARIANTS)}.")
        self.top_k, self.variant, self.router_init_std = top_k, variant, router_init_std
        shared = heads_by_layer(self.heads)
        for layer in range(layout.num_layers):
            self.layers[str(layer)] = MoHRouter(
                layout.hidden_size, layout.num_heads, layout.head_dim, shared.get(layer, []),
                top_k=top_k, variant=variant, init_std=router_init_std,
            )  # fmt: skip
        self._restore: tuple[nn.Module, str] | None = None

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
        **kwargs,
    ) -> MoHAdapter:
        """A fresh router for `model` with the first `num_shared_heads` query heads of each layer shared (not yet
        attached: call `attach(model)`)."""
        layout = HeadLayout.from_model(model)
        check_moh_shape(layout.num_heads, num_shared_heads, num_routed_heads, top_k)
        shared = [(layer, head) for layer in range(layout.num_layers) for head in range(num_shared_heads)]
        return cls(layout, shared, top_k=top_k, variant=variant, router_init_std=router_init_std, **kwargs)

    def hyperparameters(self) -> dict:
        return {"top_k": self.top_k, "variant": self.variant, "router_init_std": self.router_init_std}

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

    # --- attaching: a q_proj hook per layer writes the gates into the kernel's options --------------------------
    def attach(self, model: nn.Module) -> nn.Module:
        self.check_compatible(model)
        if self._handles:
            raise RuntimeError("this MoH adapter is already attached: call `detach()` first")
        modules = attention_modules(model)
        if taken := [str(i) for i, m in enumerate(modules) if hasattr(m, ATTACHED_ATTR)]:
            raise RuntimeError(
                f"layers {', '.join(taken)} already carry a ctxaware adapter: detach it (`adapter.detach()`) or merge "
                "it first"
            )
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._restore = (base, base.config._attn_implementation)  # a tuple: not registered as a submodule
        if base.config._attn_implementation != ATTN_IMPLEMENTATION:
            base.set_attn_implementation(ATTN_IMPLEMENTATION)
        for module, router in zip(modules, self.routers):
            router.__dict__["adapter"] = self  # a plain attribute, not a submodule: `find_moh_adapter` reads it
            module.add_module(ATTACHED_ATTR, router)
            self._attached_to.append(module)
            self._handles.append(module.q_proj.register_forward_hook(_gate_hook(module, router)))
        return model

    def detach(self) -> None:
        for module in self._attached_to:
            get_attention_options(module).head_gates = None
        for router in self.routers:
            router.__dict__.pop("adapter", None)
        super().detach()
        if self._restore is not None and self._restore[1] != ATTN_IMPLEMENTATION:
            self._restore[0].set_attn_implementation(self._restore[1])
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


def _gate_hook(module: nn.Module, router: MoHRouter):
    options = get_attention_options(module)

    def hook(q_proj, args, output):
        options.head_gates = router(args[0], output) if router.enabled else None

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


# --- `ctxaware eval --moh on[:ARGS]` ------------------------------------------------------------------------------
@register_generation_hook("moh", "on")
def _moh_on(model, args: str, setup: GenerationSetup) -> None:
    """`on`: route with the MoH router loaded by `--adapter`; `on:top_k=K` evaluates it at another k;
    `on:query_norm,shared=S,top_k=K`: the released parameter-free variant, on any model."""
    options = dict(item.partition("=")[::2] for item in args.split(",") if item and "=" in item)
    flags = {item for item in args.split(",") if item and "=" not in item}
    if unknown := (set(options) - {"shared", "top_k"}) | (flags - {"query_norm"}):
        raise ValueError(
            f"--moh on:{args}: unknown {sorted(unknown)}; use `on`, `on:top_k=K` or `on:query_norm,shared=S,top_k=K`."
        )
    adapter = find_moh_adapter(model)
    if "query_norm" in flags:
        if adapter is not None:
            raise ValueError("--moh on:query_norm converts a dense model, but this one already carries a MoH router.")
        if not {"shared", "top_k"} <= set(options):
            raise ValueError("--moh on:query_norm needs the split: `on:query_norm,shared=S,top_k=K`.")
        adapter = MoHAdapter.for_model(
            model, num_shared_heads=int(options["shared"]), top_k=int(options["top_k"]), variant="query_norm"
        )
        adapter.to(next(model.parameters()).device).attach(model)
        setup.stack.callback(adapter.detach)
        return
    if adapter is None:
        raise ValueError(
            "--moh on needs a MoH router: pass the recipe's router with `--adapter OUTPUT_DIR/adapter`, or use the "
            "parameter-free variant `--moh on:query_norm,shared=S,top_k=K`."
        )
    if "shared" in options:
        raise ValueError("--moh on: a trained router fixes its shared heads; only `top_k=K` can change.")
    if "top_k" in options:
        previous = adapter.top_k
        adapter.set_top_k(int(options["top_k"]))
        setup.stack.callback(adapter.set_top_k, previous)
