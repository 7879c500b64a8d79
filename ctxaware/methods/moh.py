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
the heads it leaves out (`logit_change` measures it). Without shared heads (or without routed ones) the mixing router
is dropped. Under GQA the gates are on query heads: key/value heads are always computed, so a KV cache is filled
exactly as in the dense model and routed generation with a cache equals routed recomputation.

Which heads those are matters more than how many: a few heads carry pass-key retrieval or arithmetic, and sharing the
first heads by index while a random router drops the others on random tokens loses them (ctxaware-tiny at 75% active:
held-out loss 0.77 -> 1.2 at step 0, on CPU). `MoHAdapter.for_model(shared_heads="importance", router_init="importance",
calibration=batches)` measures, per token and head, the KL between the dense model and the model with that head gated
off (`head_ablation_kl`), shares the heads with the largest mean KL and fits each learned router to pick, per token,
the routed heads with the largest KL there (`fit_router_weights`), at logits of std `router_init_std` so the gates
still start at 1 (0.81 at step 0). `router_lr_ratio` < 1 keeps that fit from being reshuffled by the first updates:
router weights are stored divided by it and multiplied back, so Adam moves them at that fraction of the learning rate.

Load balance (Switch-style, per layer, averaged over layers): L_b = (n_r / k) * sum_i f_i P_i, f_i the fraction of
tokens that route to head i (not differentiated), P_i the mean of softmax(W_r x)_i over those tokens. It is 1 when
routing is uniform, so its coefficient (0.01 by default) means the same for any head count.

The gates go to the kernel through `AttentionOptions.head_gates`, set by a forward hook on each layer's q_proj (whose
input is the attention input and output the queries), so nothing passes through forward keyword arguments and it
works under Trainer, gradient checkpointing and PEFT. Attaching switches the model to `attn_implementation="ctxaware"`
(detaching restores it). Zero gates skip whole kernel tiles only where every query of a tile skips the head: per-token
routing skips work in decode (one query per tile); in prefill and training it is the same maths as masking.

Chunk routing (`routing_chunk=C`) makes prefill and training skip tiles too: the sequence (in index space, padding
included, so chunks line up with the kernel's query tiles) is cut into chunks of C tokens, and every token of a chunk
takes the gates the router gives the chunk's first token. That stays causal (a token's gates depend on itself or an
earlier token), and generation with a KV cache keeps it: a pre-hook on each attention module reads how many tokens the
cache has seen, and the router carries the gates of a chunk begun in an earlier call. Skipping needs C to be a multiple
of the kernel's query tile (64 or 128; 128 fits both).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from ctxaware.adapters import ATTACHED_ATTR, HeadAdapter
from ctxaware.attention import ATTN_IMPLEMENTATION, attention_modules, get_attention_options
from ctxaware.eval.hooks import GenerationSetup, register_generation_hook
from ctxaware.heads import Head, HeadLayout, heads_by_layer


VARIANTS = ("learned", "query_norm")
SHARED_HEADS = ("first", "importance")
ROUTER_INITS = ("random", "importance")


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
        lr_ratio: float = 1.0,
        chunk: int = 0,
    ):
        super().__init__()
        routed = [h for h in range(num_heads) if h not in set(shared)]
        check_moh_shape(num_heads, len(shared), len(routed), top_k)
        self.num_heads, self.head_dim, self.top_k, self.variant = num_heads, head_dim, top_k, variant
        # weights are stored divided by lr_ratio and multiplied back in `forward`: Adam-type optimizers move the
        # router at lr_ratio x the learning rate, whatever the optimizer set-up or sharding
        self.lr_ratio = lr_ratio
        self.num_shared, self.num_routed = len(shared), len(routed)
        self.register_buffer("shared_index", torch.tensor(shared, dtype=torch.long), persistent=False)
        self.register_buffer("routed_index", torch.tensor(routed, dtype=torch.long), persistent=False)
        # gates are built as cat([shared, routed]); this puts each head back in its own column
        self.register_buffer("order", torch.argsort(torch.tensor(shared + routed)), persistent=False)
        # the same, for the fused inference kernel: the head each column of cat([shared, routed]) belongs to
        self.register_buffer("columns", torch.tensor(shared + routed, dtype=torch.int32), persistent=False)
        self.routed = self.shared = self.mix = None
        if variant == "learned":
            self.routed = nn.Linear(hidden_size, self.num_routed, bias=False)
            nn.init.normal_(self.routed.weight, std=init_std / math.sqrt(hidden_size) / lr_ratio)
            if self.num_shared > 1:
                self.shared = nn.Linear(hidden_size, self.num_shared, bias=False)
                nn.init.zeros_(self.shared.weight)
            if self.num_shared:
                self.mix = nn.Linear(hidden_size, 2, bias=False)
                nn.init.zeros_(self.mix.weight)
        self.enabled = True
        self.stats: dict[str, torch.Tensor] | None = None  # of the last training forward: "load", "prob"
        # chunk routing (0: per token): `offset` is the index of x's first token (tokens the KV cache has seen), set
        # before each forward; `carry` the gates of the chunk the previous call ended in
        self.chunk, self.offset, self.carry = chunk, 0, None

    def forward(self, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        if not self.chunk:
            return self.token_gates(x, q)
        seq, inside = x.shape[-2], self.offset % self.chunk
        chunks = []
        if inside:  # the first tokens belong to a chunk that an earlier call (prefill or decode step) began
            if self.carry is None or self.carry.shape[0] != x.shape[0]:
                raise RuntimeError(
                    f"chunk routing: this forward starts at token {self.offset}, inside a {self.chunk}-token chunk, "
                    "but no earlier call of the same batch routed that chunk. Feed the sequence from its start (or "
                    "with the KV cache that saw it)."
                )
            chunks.append(self.carry)
        first = (self.chunk - inside) % self.chunk  # the first chunk this call begins (most decode steps begin none)
        if first < seq:
            chunks.append(self.token_gates(x[..., first :: self.chunk, :], q[..., first :: self.chunk, :]))
        if len(chunks) == 1 and chunks[0].shape[-2] == 1:  # every token in one chunk: no copies
            gates = chunks[0].expand(*x.shape[:-1], -1)
        else:
            gates = torch.cat(chunks, dim=-2).repeat_interleave(self.chunk, dim=-2)[..., inside : inside + seq, :]
        self.carry = gates[..., -1:, :].detach()
        return gates

    def token_gates(self, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Per-token gates (B, S, Hq) for attention inputs x and queries q. In decode the router's cost is the number
        of small ops it launches, so its three linear maps are one matmul and the constant factors are folded."""
        if self.variant == "query_norm":
            scores = q.detach().float().unflatten(-1, (self.num_heads, self.head_dim))[..., self.routed_index, :]
            mask = self._top_k_mask(scores.norm(dim=-1))
            gates = torch.cat([mask.new_ones(*mask.shape[:-1], self.num_shared), mask], dim=-1)[..., self.order]
            return gates.to(q.dtype)
        if x.is_cuda and not torch.is_grad_enabled():  # inference: one launch, not dozens (decode is launch-bound)
            from ctxaware.kernels.moh_router import router_gates

            return router_gates(
                x, self.routed.weight, *(m.weight if m is not None else None for m in (self.shared, self.mix)),
                self.columns, lr_ratio=self.lr_ratio, top_k=self.top_k, dtype=q.dtype,
            )  # fmt: skip
        maps = [m for m in (self.routed, self.shared, self.mix) if m is not None]
        weight = torch.cat([m.weight for m in maps]) if len(maps) > 1 else maps[0].weight
        logits = F.linear(x.float(), weight.float()) * self.lr_ratio
        scores = logits[..., : self.num_routed]
        probs = scores.softmax(-1)
        routed_gates = probs * self._top_k_mask(scores)
        routed_scale, shared_gates = self.num_routed, None
        if self.shared is not None:
            shared_gates = logits[..., self.num_routed : self.num_routed + self.num_shared].softmax(-1)
        if self.mix is not None:
            alpha = logits[..., -2:].softmax(-1)
            shared_weight = alpha[..., :1] * (2 * self.num_shared)
            shared_gates = shared_weight if shared_gates is None else shared_gates * shared_weight
            routed_scale = alpha[..., 1:] * (2 * self.num_routed)
        if self.training and torch.is_grad_enabled():  # `_top_k_mask` has recorded the load
            self.stats["prob"] = probs.flatten(0, -2).mean(0)
        gates = routed_gates * routed_scale
        if shared_gates is not None:  # None only without shared heads (any shared head brings the mixing router)
            gates = torch.cat([shared_gates, gates], dim=-1)
        return gates[..., self.order].to(q.dtype)

    def _top_k_mask(self, scores: torch.Tensor) -> torch.Tensor:
        """1 at the top k scores, else 0; in a training forward it records each head's load."""
        mask = torch.zeros_like(scores).scatter_(-1, scores.topk(self.top_k, dim=-1).indices, 1.0)
        if self.training and torch.is_grad_enabled():
            self.stats = {"load": mask.flatten(0, -2).mean(0)}
        return mask

    def weight(self, name: str) -> torch.Tensor:
        """The effective float32 weight of the `routed`, `shared` or `mix` linear map."""
        return getattr(self, name).weight.float() * self.lr_ratio

    def set_weight(self, name: str, weight: torch.Tensor) -> None:
        with torch.no_grad():
            getattr(self, name).weight.copy_(weight / self.lr_ratio)

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
        router_lr_ratio: float = 1.0,
        routing_chunk: int = 0,
        **kwargs,
    ):
        super().__init__(layout, heads, **kwargs)
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
        self.router_lr_ratio = router_lr_ratio
        shared = heads_by_layer(self.heads)
        for layer in range(layout.num_layers):
            self.layers[str(layer)] = MoHRouter(
                layout.hidden_size, layout.num_heads, layout.head_dim, shared.get(layer, []),
                top_k=top_k, variant=variant, init_std=router_init_std, lr_ratio=router_lr_ratio, chunk=routing_chunk,
            )  # fmt: skip
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
        calibration: Iterable[torch.Tensor] | None = None,
        **kwargs,
    ) -> MoHAdapter:
        """A fresh router for `model` (not yet attached: call `attach(model)`).

        `shared_heads`: "first" shares the first `num_shared_heads` query heads of each layer; "importance" the heads
        whose absence costs the dense model most on `calibration` (batches of input ids; mean per-token KL, see
        `head_ablation_kl`): the heads a few rare tokens depend on (retrieval, carries) stay always on.
        `router_init` (learned variant): "random" draws the routed logits; "importance" fits each router so its top k
        picks, per token, the routed heads whose absence costs most at that token (`fit_router_weights`), so the
        converted model starts close to the dense one. What was measured is kept in `adapter.calibration`. Other
        keyword arguments (`router_lr_ratio`, `base_model`, ...) go to the constructor."""
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
        if shared_heads == "first" and router_init == "random":
            return cls(layout, [(layer, head) for layer in range(layout.num_layers) for head in first], **kwargs)
        if calibration is None:
            raise ValueError(
                f"shared_heads={shared_heads!r}, router_init={router_init!r} measure head importance on the dense "
                "model: pass `calibration` (batches of input ids), or use shared_heads='first', router_init='random'."
            )
        shared, weights, importance, overlap = [], [], [], []
        batches = list(calibration)
        for layer, (inputs, token_kl) in enumerate(head_ablation_kl(model, batches)):
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
        return adapter

    def hyperparameters(self) -> dict:
        return {
            "top_k": self.top_k,
            "variant": self.variant,
            "router_init_std": self.router_init_std,
            "router_lr_ratio": self.router_lr_ratio,
            "routing_chunk": self.routing_chunk,
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
            self._restore = _use_ctxaware_attention(model)  # a tuple: not registered as a submodule
            for module, router, (linear, width) in zip(modules, self.routers, projections):
                router.__dict__["adapter"] = self  # a plain attribute, not a submodule: `find_moh_adapter` reads it
                module.add_module(ATTACHED_ATTR, router)
                self._attached_to.append(module)
                self._handles.append(linear.register_forward_hook(_gate_hook(module, router, width)))
                if router.chunk:
                    self._handles.append(module.register_forward_pre_hook(_offset_hook(router), with_kwargs=True))
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
            _restore_attention(self._restore)
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


def _use_ctxaware_attention(model: nn.Module) -> tuple[nn.Module, str]:
    """Switches `model` to the ctxaware kernels (the only ones that take head gates); returns what restores it."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    restore = (base, base.config._attn_implementation)
    if restore[1] != ATTN_IMPLEMENTATION:
        base.set_attn_implementation(ATTN_IMPLEMENTATION)
    return restore


def _restore_attention(restore: tuple[nn.Module, str]) -> None:
    if restore[1] != ATTN_IMPLEMENTATION:
        restore[0].set_attn_implementation(restore[1])


def query_projection(module: nn.Module, layout: HeadLayout) -> tuple[nn.Linear, int]:
    """The linear layer whose output holds the attention module's queries, and their width (its first outputs): the
    router reads its input and output. A separate `q_proj`, or Phi-3's fused `qkv_proj` ([q | k | v]); other fused
    layouts (GPT-NeoX interleaves q, k, v per head) are refused before anything is attached."""
    width = layout.num_heads * layout.head_dim
    linear = getattr(module, "q_proj", None) or getattr(module, "qkv_proj", None)
    if not isinstance(linear, nn.Linear) or linear.out_features < width:
        raise ValueError(
            f"MoH routes on the query projection, and {type(module).__name__} has none it can read (a `q_proj`, or a "
            "fused `qkv_proj` with the queries first): use a family with separate projections (Llama, Qwen, "
            "Mistral, Gemma, ...) or Phi-3"
        )
    return linear, width


def _gate_hook(module: nn.Module, router: MoHRouter, width: int):
    options = get_attention_options(module)

    def hook(projection, args, output):
        options.head_gates = router(args[0], output[..., :width]) if router.enabled else None

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


class _AblationHook:
    """A layer's q_proj hook: gates `head` to 0 (None: no head), and records the attention inputs while `record`."""

    def __init__(self, module: nn.Module, num_heads: int):
        self.options, self.num_heads = get_attention_options(module), num_heads
        self.head: int | None = None
        self.record = False
        self.inputs: list[torch.Tensor] = []

    def __call__(self, q_proj, args, output):
        if self.record:
            self.inputs.append(args[0].detach().flatten(0, -2).float())
        if self.head is None:
            self.options.head_gates = None
            return
        gates = output.new_ones(*output.shape[:-1], self.num_heads)
        gates[..., self.head] = 0
        self.options.head_gates = gates


def _decoder_layers(model: nn.Module, modules: list[nn.Module]) -> list[nn.Module]:
    """The decoder layer (parent module) of each attention module."""
    named = dict(model.named_modules())
    names = {id(module): name for name, module in named.items()}
    return [named[names[id(module)].rpartition(".")[0]] for module in modules]


@contextmanager
def _capture_input(layer: nn.Module, into: list[torch.Tensor]):
    """Records the hidden states a decoder layer receives."""

    def hook(module, args, kwargs):
        into.append(args[0] if args else kwargs["hidden_states"])

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def _from_layer(layers: list[nn.Module], start: int, hidden: torch.Tensor):
    """Forwards compute only layers[start:]: the layers before pass their input through untouched and layers[start]
    receives `hidden`, the input the dense forward gave it. Gating a head of layer `start` cannot change what the
    layers before it compute, so their work is skipped."""

    def passthrough(*args, **kwargs):
        return args[0] if args else kwargs["hidden_states"]

    def feed(module, args, kwargs):
        return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})

    saved = [layer.__dict__.get("forward") for layer in layers[:start]]  # e.g. accelerate's offloading wrappers
    for layer in layers[:start]:
        layer.forward = passthrough
    handle = layers[start].register_forward_pre_hook(feed, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        for layer, forward in zip(layers[:start], saved):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward


@torch.no_grad()
def head_ablation_kl(model: nn.Module, batches: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, in order: the attention inputs of every token of `batches` (input ids), (N, hidden), and per token
    and query head the KL(dense || the model with that head gated to 0 in that layer) of the next-token distribution,
    (N, Hq). A layer at a time, so one layer's inputs are held: per batch one dense forward and Hq ablated ones that
    start at that layer from the dense forward's hidden states (about half the work of whole forwards; keep batches
    small: each holds dense and ablated log-probabilities over the vocabulary)."""
    if find_moh_adapter(model) is not None:
        raise ValueError("head importance is measured on the dense model: detach its MoH adapter first.")
    restore, was_training = _use_ctxaware_attention(model), model.training
    model.eval()
    layout, modules = HeadLayout.from_model(model), attention_modules(model)
    num_heads = layout.num_heads
    layers, checked = _decoder_layers(model, modules), False
    progress = tqdm(total=len(modules) * len(batches), desc="MoH: head importance (layers x batches)", leave=False)
    try:
        for index, module in enumerate(modules):
            hook = _AblationHook(module, num_heads)
            handle = query_projection(module, layout)[0].register_forward_hook(hook)
            try:
                token_kl = []
                for input_ids in batches:
                    hook.head, hook.record, hidden = None, True, []
                    with _capture_input(layers[index], hidden):
                        dense = model(input_ids=input_ids).logits.float().log_softmax(-1)
                    hook.record = False
                    with _from_layer(layers, index, hidden[0]):
                        if not checked and index > 0:  # the layers must hand hidden states straight to the next
                            suffix = model(input_ids=input_ids).logits.float().log_softmax(-1)
                            if not torch.allclose(suffix, dense, rtol=1e-3, atol=1e-3):
                                raise ValueError(
                                    f"{type(model).__name__}: running from layer {index} with the hidden states it "
                                    "received does not reproduce the dense logits; its decoder layers do not pass "
                                    "hidden states straight from one to the next, which head importance assumes: "
                                    "convert with shared_heads='first', router_init='random'."
                                )
                            checked = True
                        per_head = []
                        for head in range(num_heads):
                            hook.head = head
                            ablated = model(input_ids=input_ids).logits.float().log_softmax(-1)
                            per_head.append((dense.exp() * (dense - ablated)).sum(-1).flatten())
                    token_kl.append(torch.stack(per_head, dim=-1))
                    progress.update()
            finally:
                handle.remove()
                hook.options.head_gates = None
            yield torch.cat(hook.inputs), torch.cat(token_kl)
    finally:
        progress.close()
        _restore_attention(restore)
        model.train(was_training)


def fit_router_weights(
    inputs: torch.Tensor, token_kl: torch.Tensor, top_k: int, *, logit_std: float, steps: int = 300
) -> tuple[torch.Tensor, float]:
    """Weights (heads, hidden) of a linear router whose top k picks, per token, the heads whose absence costs most
    there: a softmax classifier fitted (full batch, Adam, L2) to each token's top-k set of `token_kl` (N, heads), then
    scaled so its logits have std `logit_std` (the top k depends on the ranking only; small logits keep the gates at
    1). Also returns the share of each token's top-k set that the router picks, averaged over tokens."""
    best = token_kl.topk(top_k, dim=-1).indices
    target = torch.zeros_like(token_kl).scatter_(-1, best, 1.0 / top_k)
    weight = torch.zeros(inputs.shape[-1], token_kl.shape[-1], device=inputs.device, requires_grad=True)
    optimizer = torch.optim.Adam([weight], lr=1e-2)
    with torch.enable_grad():
        for _ in range(steps):
            loss = -(target * (inputs @ weight).log_softmax(-1)).sum(-1).mean() + 1e-3 * weight.square().sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    logits = inputs @ weight.detach()
    picked = logits.topk(top_k, dim=-1).indices
    overlap = (picked[:, :, None] == best[:, None, :]).any(-1).float().mean().item()
    return (weight.detach() * logit_std / logits.std().clamp_min(1e-12)).T, overlap


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
