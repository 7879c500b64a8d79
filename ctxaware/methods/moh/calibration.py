"""Head importance on the dense model, and learned routers fitted to it (`MoHAdapter.for_model` with
`shared_heads="importance"` or `router_init="importance"`).

Which heads are shared or routed matters more than how many: a few heads carry pass-key retrieval or arithmetic, and
sharing the first heads by index while a random router drops the others on random tokens loses them (ctxaware-tiny at
75% active: held-out loss 0.77 -> 1.2 at step 0, on CPU). `MoHAdapter.for_model(shared_heads="importance",
router_init="importance", calibration=batches)` measures, per token and head, the KL between the dense model and the
model with that head gated off (`head_ablation_kl`), shares the heads with the largest mean KL and fits each learned
router to pick, per token, the routed heads with the largest KL there (`fit_router_weights`), at logits of std
`router_init_std` so the gates still start at 1 (0.81 at step 0). `router_lr_ratio` < 1 keeps that fit from being
reshuffled by the first updates: router weights are stored divided by it and multiplied back, so Adam moves them at
that fraction of the learning rate.

`off_head_bias="mean"` replaces a head the router leaves out by its mean output instead of zero: `head_output_means`
measures each query head's mean attention output (the input of o_proj) on the dense model, over the calibration
rows' real tokens, and `head_ablation_kl(off_rows=...)` then measures each head's importance as the cost of
mean-ablating it: a head that writes a large constant costs much when zeroed and little when mean-ablated, and with
the bias it need not stay on.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from ctxaware.adapters import ATTACHED_ATTR
from ctxaware.attention import (
    attention_modules,
    get_attention_options,
    output_projection,
    restore_attention,
    use_ctxaware_attention,
)
from ctxaware.heads import HeadLayout, register_pre_o_proj_hooks, split_heads
from ctxaware.methods.moh.router import MoHRouter, query_projection


def calibration_batch(batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(input ids, attention mask or None) of a calibration batch: input ids, or a mapping with `input_ids` and
    optionally `attention_mask` (0 at padding)."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    return batch["input_ids"], batch.get("attention_mask")


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
def head_ablation_kl(
    model: nn.Module, batches: list, off_rows: list[torch.Tensor] | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, in order: the attention inputs of every real token of `batches` (input ids, or mappings with
    `input_ids` and `attention_mask`: padding is left out), (N, hidden), and per token and query head the
    KL(dense || the model with that head gated to 0 in that layer) of the next-token distribution, (N, Hq). With
    `off_rows` (per layer (Hq, hidden), `off_head_rows`) the gated head adds its row to o_proj's output: the cost of
    mean-ablating it, as `off_head_bias="mean"` will. A layer at a time, so one layer's inputs are held: per batch one
    dense forward and Hq ablated ones that start at that layer from the dense forward's hidden states (about half the
    work of whole forwards; keep batches small: each holds dense and ablated log-probabilities over the vocabulary)."""
    if any(isinstance(getattr(module, ATTACHED_ATTR, None), MoHRouter) for module in attention_modules(model)):
        raise ValueError("head importance is measured on the dense model: detach its MoH adapter first.")
    restore, was_training = use_ctxaware_attention(model), model.training
    model.eval()
    layout, modules = HeadLayout.from_model(model), attention_modules(model)
    num_heads = layout.num_heads
    layers, checked = _decoder_layers(model, modules), False
    batches = [calibration_batch(batch) for batch in batches]
    progress = tqdm(total=len(modules) * len(batches), desc="MoH: head importance (layers x batches)", leave=False)
    try:
        for index, module in enumerate(modules):
            hook = _AblationHook(module, num_heads)
            handle = query_projection(module, layout)[0].register_forward_hook(hook)
            bias = None
            if off_rows is not None:
                rows = off_rows[index]

                def add_row(o_proj, args, output, hook=hook, rows=rows):
                    return output if hook.head is None else output + rows[hook.head].to(output)

                bias = output_projection(module).register_forward_hook(add_row)
            try:
                token_kl, inputs = [], []
                for input_ids, attention_mask in batches:
                    keep = slice(None) if attention_mask is None else attention_mask.bool().flatten()
                    hook.head, hook.record, hidden = None, True, []
                    with _capture_input(layers[index], hidden):
                        dense = (
                            model(input_ids=input_ids, attention_mask=attention_mask).logits.float().log_softmax(-1)
                        )
                    hook.record = False
                    inputs.append(hook.inputs.pop()[keep])
                    with _from_layer(layers, index, hidden[0]):
                        if not checked and index > 0:  # the layers must hand hidden states straight to the next
                            suffix = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
                            suffix = suffix.log_softmax(-1)
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
                            ablated = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
                            ablated = ablated.log_softmax(-1)
                            per_head.append((dense.exp() * (dense - ablated)).sum(-1).flatten())
                    token_kl.append(torch.stack(per_head, dim=-1)[keep])
                    progress.update()
            finally:
                handle.remove()
                if bias is not None:
                    bias.remove()
                hook.options.head_gates = None
            yield torch.cat(inputs), torch.cat(token_kl)
    finally:
        progress.close()
        restore_attention(restore)
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


@torch.no_grad()
def head_output_means(model: nn.Module, batches: list) -> torch.Tensor:
    """(layers, Hq, head_dim) float32: each query head's attention output (its slice of o_proj's input) averaged over
    the real tokens of `batches` (as `head_ablation_kl` takes them) on the dense model. Padding does not count.
    Under GQA each query head has its own output (its own attention weights over the shared values), so the mean is per
    query head, as o_proj reads them."""
    if any(isinstance(getattr(module, ATTACHED_ATTR, None), MoHRouter) for module in attention_modules(model)):
        raise ValueError("head output means are measured on the dense model: detach its MoH adapter first.")
    layout, was_training = HeadLayout.from_model(model), model.training
    sums = torch.zeros(layout.num_layers, layout.num_heads, layout.head_dim, dtype=torch.float64)
    count, keep = 0, None

    def hook(layer: int, x: torch.Tensor) -> torch.Tensor:
        heads = split_heads(x.detach(), layout.head_dim).double()  # (B, S, Hq, D)
        sums[layer] += (heads if keep is None else heads[keep]).flatten(0, -3).sum(0).cpu()
        return x

    model.eval()
    handles = register_pre_o_proj_hooks(model, hook)
    try:
        for input_ids, attention_mask in map(calibration_batch, batches):
            keep = None if attention_mask is None else attention_mask.bool()
            count += input_ids.numel() if keep is None else int(keep.sum())
            model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if not count:
        raise ValueError("head output means need calibration tokens: the calibration batches hold no real token.")
    return (sums / count).float()


@torch.no_grad()
def off_head_rows(model: nn.Module, means: torch.Tensor) -> list[torch.Tensor]:
    """Per layer (Hq, hidden) float32: o_proj's slice for each query head applied to its mean output (`means`, from
    `head_output_means`): what the head adds to the layer's output when it is mean-ablated (o_proj's bias aside)."""
    layout, rows = HeadLayout.from_model(model), []
    for module, mean in zip(attention_modules(model), means):
        weight = output_projection(module).weight.float()
        heads = weight.unflatten(1, (layout.num_heads, layout.head_dim))  # (hidden, Hq, D)
        rows.append(torch.einsum("ohd,hd->ho", heads, mean.to(weight.device)))
    return rows
