"""Arithmetic heads: precise SFT of selected heads and MLPs.

The clean/corrupted prompts (`arithmetic_pairs`, `arithmetic_records`) are the world's, in `ctxaware.world.tasks`.

Precise SFT (`HeadDeltaAdapter`): trained deltas on the slices of the selected components only, zero at the start:
- a selected query head h of layer l: its rows of q_proj (h*D:(h+1)*D) and its columns of o_proj;
- its key/value rows under GQA, shared by h's group of `group_size` query heads, by `kv_policy`:
  `full_group` (default) trains a group's k/v rows only when every query head of the group is selected, so that no
  unselected head changes; `any` trains them when any head of the group is selected (the other heads of the group
  then change too); `none` never trains them. Under MHA (group size 1) `full_group` and `any` agree. `kv_lr_ratio`
  < 1 moves shared k/v rows slower than the heads' own slices: they are stored divided by it and multiplied back, so
  Adam-type optimizers move them at that fraction of the learning rate.
- a selected MLP: a delta on every linear weight of the layer's MLP (gate/up/down projections).
Biases (Qwen2's q/k/v) are not trained. The deltas act through forward hooks (y += x @ delta^T on the slice), so the
base weights stay frozen and bit-identical, and the optimizer state is the size of the deltas. The base weights are
not in the optimizer, so weight decay needs no exclusion (a gradient mask would: AdamW decays masked weights too); set,
it pulls the deltas toward the base weights. The edit is exact in weight space: `merge` adds each delta into its
slice, giving a plain transformers model.
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ctxaware.adapters import HeadAdapter
from ctxaware.attention import attention_modules, output_projection
from ctxaware.heads import Head, HeadLayout, heads_by_layer, load_head_selection
from ctxaware.methods.patching import mlp_modules


KV_POLICIES = ("full_group", "any", "none")
TARGETS = ("q", "k", "v", "o")


# --- selections ---------------------------------------------------------------------------------------------------
def check_selection(layout: HeadLayout, heads: list[Head], mlp_layers: list[int]) -> None:
    if not heads and not mlp_layers:
        raise ValueError(
            "empty selection: no head and no MLP to train. Select at least one (`num_heads` > 0 or `num_mlps` > 0), "
            "or check the head selection file."
        )
    for layer in mlp_layers:
        if not 0 <= layer < layout.num_layers:
            raise IndexError(
                f"MLP layer {layer} out of range: the model has {layout.num_layers} layers "
                f"(0..{layout.num_layers - 1})"
            )


def load_component_selection(path: str | Path, layout: HeadLayout) -> tuple[list[Head], list[int]]:
    """Heads and MLP layers from a `head_selection.json` written by the arith_heads recipe, checked against the
    model's layout (`ctxaware.heads.load_head_selection`) and non-empty."""
    heads, payload = load_head_selection(path, layout)
    mlp_layers = list(payload.get("mlp_layers", []))
    check_selection(layout, heads, mlp_layers)
    return heads, mlp_layers


def kv_heads_to_train(layout: HeadLayout, heads: list[int], policy: str) -> list[int]:
    """The key/value heads of one layer whose rows are trained, given its selected query heads (see module doc)."""
    if policy not in KV_POLICIES:
        raise ValueError(f"kv_policy={policy!r}: choose one of {', '.join(KV_POLICIES)}")
    groups = {layout.kv_head(h) for h in heads}
    if policy == "none":
        return []
    if policy == "any":
        return sorted(groups)
    return sorted(
        g for g in groups if all(h in heads for h in range(g * layout.group_size, (g + 1) * layout.group_size))
    )


# --- the adapter --------------------------------------------------------------------------------------------------
def _rows(slices: list[slice]) -> torch.Tensor:
    return torch.cat([torch.arange(s.start, s.stop) for s in slices]) if slices else torch.zeros(0, dtype=torch.long)


class HeadDeltaLayer(nn.Module):
    """One layer's deltas: rows of q/k/v and columns of o_proj for its selected heads, full weights of its MLP."""

    def __init__(self, layout: HeadLayout, heads: list[int], kv_heads: list[int], targets, mlp_shapes: dict | None):
        super().__init__()
        hidden = layout.hidden_size
        self.register_buffer("q_index", _rows([layout.q_rows(h) for h in heads]), persistent=False)
        kv_rows = [slice(g * layout.head_dim, (g + 1) * layout.head_dim) for g in kv_heads]
        self.register_buffer("kv_index", _rows(kv_rows), persistent=False)
        n_q, n_kv = len(self.q_index), len(self.kv_index)
        self.q = nn.Parameter(torch.zeros(n_q, hidden)) if "q" in targets and n_q else None
        self.o = nn.Parameter(torch.zeros(hidden, n_q)) if "o" in targets and n_q else None
        self.k = nn.Parameter(torch.zeros(n_kv, hidden)) if "k" in targets and n_kv else None
        self.v = nn.Parameter(torch.zeros(n_kv, hidden)) if "v" in targets and n_kv else None
        self.mlp = nn.ParameterDict(
            {name: nn.Parameter(torch.zeros(*shape)) for name, shape in (mlp_shapes or {}).items()}
        )


def _mlp_linears(mlp: nn.Module) -> dict[str, nn.Linear]:
    return {name.replace(".", "__"): m for name, m in mlp.named_modules() if isinstance(m, nn.Linear)}


def mlp_shapes(model: nn.Module) -> dict[str, list[int]]:
    """{linear name: [out, in]} of the first layer's MLP (every layer's MLP has the same shapes)."""
    return {name: list(m.weight.shape) for name, m in _mlp_linears(mlp_modules(model)[0]).items()}


class HeadDeltaAdapter(HeadAdapter):
    """Trained deltas on the weight slices of selected heads (q/k/v rows, o_proj columns) and selected MLPs."""

    method = "head_deltas"
    description = (
        "Precise SFT: trained weight deltas restricted to a few attention heads (their q/k/v rows and o_proj columns) "
        "and MLPs, found by activation/path patching. Merges exactly into the base weights. Trained with ctxaware."
    )

    def __init__(
        self,
        layout: HeadLayout,
        heads: list[Head],
        *,
        mlp_layers: list[int] = (),
        mlp_shapes: dict[str, list[int]] | None = None,
        kv_policy: str = "full_group",
        kv_lr_ratio: float = 1.0,
        targets: list[str] = TARGETS,
        **kwargs,
    ):
        super().__init__(layout, heads, **kwargs)
        if not kv_lr_ratio > 0:
            raise ValueError(
                f"kv_lr_ratio={kv_lr_ratio}: choose a ratio > 0 (1: the learning rate of the other slices)."
            )
        self.kv_lr_ratio = float(kv_lr_ratio)
        self.mlp_layers = sorted(set(int(layer) for layer in mlp_layers))
        check_selection(layout, self.heads, self.mlp_layers)
        if self.mlp_layers and not mlp_shapes:
            raise ValueError("selected MLPs need `mlp_shapes` ({name: [out, in]}): build with `for_model`")
        if unknown := set(targets) - set(TARGETS):
            raise ValueError(f"unknown targets {sorted(unknown)}: choose from {', '.join(TARGETS)}")
        self.kv_policy, self.targets, self.mlp_shape_map = kv_policy, list(targets), dict(mlp_shapes or {})
        grouped = heads_by_layer(self.heads)
        for layer in sorted(set(grouped) | set(self.mlp_layers)):
            layer_heads = grouped.get(layer, [])
            self.layers[str(layer)] = HeadDeltaLayer(
                layout,
                layer_heads,
                kv_heads_to_train(layout, layer_heads, kv_policy),
                self.targets,
                self.mlp_shape_map if layer in self.mlp_layers else None,
            )

    @classmethod
    def for_model(
        cls, model: nn.Module, heads: list[Head], mlp_layers: list[int] = (), **kwargs
    ) -> "HeadDeltaAdapter":
        layout = HeadLayout.from_model(model)
        return cls(
            layout, heads, mlp_layers=mlp_layers, mlp_shapes=mlp_shapes(model) if mlp_layers else None, **kwargs
        )

    def hyperparameters(self) -> dict:
        return {
            "mlp_layers": self.mlp_layers,
            "mlp_shapes": self.mlp_shape_map,
            "kv_policy": self.kv_policy,
            "kv_lr_ratio": self.kv_lr_ratio,
            "targets": self.targets,
        }

    def check_compatible(self, model: nn.Module) -> None:
        super().check_compatible(model)
        if self.mlp_layers and (found := mlp_shapes(model)) != self.mlp_shape_map:
            raise ValueError(
                f"This adapter's MLP deltas have shapes {self.mlp_shape_map} but the model's MLPs have {found}: "
                f"load it onto {self.base_model or 'its base model'}."
            )

    def _slices(self, model: nn.Module):
        """(linear module, stored delta, its scale, index, kind) for every trained slice (the delta in effect is
        stored x scale); kind: rows, cols or full."""
        attention, mlps = attention_modules(model), mlp_modules(model)
        for key, layer in self.layers.items():
            attn = attention[int(key)]
            for name, index, scale in (
                ("q", layer.q_index, 1.0),
                ("k", layer.kv_index, self.kv_lr_ratio),
                ("v", layer.kv_index, self.kv_lr_ratio),
            ):
                if getattr(layer, name) is not None:
                    yield getattr(attn, f"{name}_proj"), getattr(layer, name), scale, index, "rows"
            if layer.o is not None:
                yield output_projection(attn), layer.o, 1.0, layer.q_index, "cols"
            linears = _mlp_linears(mlps[int(key)]) if len(layer.mlp) else {}
            for name, delta in layer.mlp.items():
                yield linears[name], delta, 1.0, None, "full"

    def attach(self, model: nn.Module) -> nn.Module:
        """Registers each layer's deltas under its attention module and hooks them on the sliced linears."""
        self.check_compatible(model)
        if self._handles:
            raise RuntimeError("this adapter is already attached: call `detach()` first")
        modules = attention_modules(model)
        if taken := [key for key in self.layers if hasattr(modules[int(key)], "ctxaware_adapter")]:
            raise RuntimeError(f"layers {', '.join(taken)} already carry a ctxaware adapter: detach or merge it first")
        try:  # all or nothing: a failure midway leaves the model as it was
            for key, layer in self.layers.items():
                modules[int(key)].add_module("ctxaware_adapter", layer)
                self._attached_to.append(modules[int(key)])
            for linear, delta, scale, index, kind in self._slices(model):
                self._handles.append(linear.register_forward_hook(_delta_hook(delta, scale, index, kind)))
        except BaseException:
            self.detach()
            raise
        return model

    @torch.no_grad()
    def merge(self, model: nn.Module) -> nn.Module:
        """Adds every delta into its weight slice (in float32, then cast); returns `model`, now a plain model."""
        self.check_compatible(model)
        self.detach()
        for linear, delta, scale, index, kind in self._slices(model):
            weight = linear.weight
            delta = delta.detach().to(weight.device, torch.float32) * scale
            if kind == "rows":
                weight[index] = (weight[index].float() + delta).to(weight.dtype)
            elif kind == "cols":
                weight[:, index] = (weight[:, index].float() + delta).to(weight.dtype)
            else:
                weight.copy_((weight.float() + delta).to(weight.dtype))
        return model


def _delta_hook(delta: nn.Parameter, scale: float, index: torch.Tensor | None, kind: str):
    def hook(module, args, out):
        x = args[0]
        d = (delta if scale == 1.0 else delta * scale).to(x.dtype)
        if kind == "rows":
            return out.index_add(-1, index, F.linear(x, d))
        if kind == "cols":
            return out + F.linear(x.index_select(-1, index), d)
        return out + F.linear(x, d)

    return hook
