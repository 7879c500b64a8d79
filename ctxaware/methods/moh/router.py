"""One layer's MoH router: the gates over its query heads, the load-balance loss and chunk routing.

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

Load balance (Switch-style, per layer, averaged over layers): L_b = (n_r / k) * sum_i f_i P_i, f_i the fraction of
tokens that route to head i (not differentiated), P_i the mean of softmax(W_r x)_i over those tokens. It is 1 when
routing is uniform, so its coefficient (0.01 by default) means the same for any head count.

Chunk routing (`routing_chunk=C`) makes prefill and training skip tiles too: the sequence (in index space, padding
included, so chunks line up with the kernel's query tiles) is cut into chunks of C tokens, and every token of a chunk
takes the gates the router gives the chunk's first token. That stays causal (a token's gates depend on itself or an
earlier token), and generation with a KV cache keeps it: a pre-hook on each attention module reads how many tokens the
cache has seen, and the router carries the gates of a chunk begun in an earlier call. Skipping needs C to be a multiple
of the kernel's query tile (64 or 128; 128 fits both).

Off-head bias (`off_head_bias="mean"`): a head the router leaves out (gate exactly 0) contributes nothing to the
attention output, as if zero-ablated. With the bias it contributes a learnable constant instead: B (n_r, hidden), whose
row i starts as o_proj's slice for routed head i applied to that head's mean output on the dense model
(mean-ablation, usually far cheaper than zero-ablation), and the layer's o_proj output gains (gates == 0) @ B per
token. The kernel still skips the head; the bias is one (tokens, n_r) x (n_r, hidden) matmul. Shared heads are never
off, so B has rows for the routed heads only. The choice of heads is discrete, so B sends no gradient to the router.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


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
        lr_ratio: float = 1.0,
        chunk: int = 0,
        off_bias: bool = False,
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
        # the o_proj output a routed head adds when it is off (zeros until set, e.g. by `MoHAdapter.for_model`)
        self.off_bias = nn.Parameter(torch.zeros(self.num_routed, hidden_size)) if off_bias else None
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
                x,
                self.routed.weight,
                *(m.weight if m is not None else None for m in (self.shared, self.mix)),
                self.columns,
                lr_ratio=self.lr_ratio,
                top_k=self.top_k,
                dtype=q.dtype,
            )
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

    def off_output(self, gates: torch.Tensor) -> torch.Tensor:
        """(B, S, hidden): what the heads that `gates` (B, S, Hq) leave out (gate exactly 0) add to o_proj's output."""
        off = (gates[..., self.routed_index] == 0).to(self.off_bias.dtype)
        return off @ self.off_bias

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


def query_projection(module: nn.Module, layout) -> tuple[nn.Linear, int]:
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
