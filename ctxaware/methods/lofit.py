"""LoFiT: per-head scales and offsets on the attention output before `o_proj`, and their exact merge.

Head h of layer l has output x_h (D values) in o_proj's input. LoFiT replaces it with (1 + A_h) * x_h + v_h: stage 1
learns the scales A on every head (init N(0, 1e-3), L1 penalty) and ranks heads by ||A_h||; stage 2 learns offsets v
only on the top K heads. Under GQA the heads are the query heads (each owns its slice of o_proj's input).

Both edits are exact in weight space: o_proj((1 + A) * x + v) = (W diag(1 + A)) x + (b + W v). Merging scales o_proj's
columns and folds the offsets into an o_proj bias; families whose o_proj has no bias get one through their config
(`attention_bias`, which also adds zero q/k/v biases), or, for Mistral and Qwen2 (whose o_proj never takes a bias),
become the equivalent Llama model with `attention_bias=True`. The merged model saves and reloads with AutoModel.
"""

import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

from ctxaware.adapters import HeadAdapter
from ctxaware.attention import attention_modules, output_projection
from ctxaware.heads import Head, HeadLayout, heads_by_layer, split_heads


class LoFiTLayer(nn.Module):
    """One layer's scales and/or offsets on its selected query heads; other heads pass through untouched."""

    def __init__(
        self, num_heads: int, head_dim: int, heads: list[int], *, scales: bool, offsets: bool, init_std: float
    ):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.register_buffer("head_index", torch.tensor(heads, dtype=torch.long), persistent=False)
        self.scale = nn.Parameter(torch.randn(len(heads), head_dim) * init_std) if scales else None
        self.offset = nn.Parameter(torch.zeros(len(heads), head_dim)) if offsets else None

    def full(self, values: torch.Tensor, fill: float) -> torch.Tensor:
        """(num_heads, head_dim): `values` at the selected heads, `fill` elsewhere."""
        base = torch.full((self.num_heads, self.head_dim), fill, dtype=values.dtype, device=values.device)
        return base.index_copy(0, self.head_index, values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        heads = split_heads(x, self.head_dim)
        if self.scale is not None:
            heads = heads * self.full(1 + self.scale.to(x.dtype), 1.0)
        if self.offset is not None:
            heads = heads + self.full(self.offset.to(x.dtype), 0.0)
        return heads.flatten(-2)


class LoFiTAdapter(HeadAdapter):
    """Per-head scales (stage 1) and/or offsets (stage 2) on the pre-o_proj head outputs."""

    method = "lofit"
    description = (
        "LoFiT (localized fine-tuning on representations): learned offset vectors added to the outputs of a few "
        "attention heads before `o_proj` (and, for a stage-1 adapter, per-head scales). Trained with ctxaware."
    )

    def __init__(
        self,
        layout: HeadLayout,
        heads: list[Head],
        *,
        scales: bool = False,
        offsets: bool = True,
        init_std: float = 1e-3,
        **kwargs,
    ):
        super().__init__(layout, heads, **kwargs)
        if not (scales or offsets):
            raise ValueError("a LoFiT adapter needs scales, offsets or both")
        self.scales, self.offsets, self.init_std = scales, offsets, init_std
        for layer, layer_heads in heads_by_layer(self.heads).items():
            self.layers[str(layer)] = LoFiTLayer(
                layout.num_heads, layout.head_dim, layer_heads, scales=scales, offsets=offsets, init_std=init_std
            )

    def hyperparameters(self) -> dict:
        return {"scales": self.scales, "offsets": self.offsets, "init_std": self.init_std}

    def scale_norms(self) -> torch.Tensor:
        """(layers, heads): ||A_h|| for every head (0 where the adapter has no scale): stage 1's ranking score."""
        norms = torch.zeros(self.layout.num_layers, self.layout.num_heads)
        for key, layer in self.layers.items():
            if layer.scale is not None:
                norms[int(key), layer.head_index.cpu()] = layer.scale.detach().float().norm(dim=-1).cpu()
        return norms

    def l1_penalty(self) -> torch.Tensor:
        """Sum of |A| over all scales (stage 1's sparsity term)."""
        return sum(layer.scale.abs().sum() for layer in self.layers.values() if layer.scale is not None)

    @torch.no_grad()
    def merge(self, model: nn.Module) -> nn.Module:
        """Folds scales into o_proj's columns and offsets into its bias; returns a plain transformers model (a new
        object for Mistral/Qwen2, which become Llama; otherwise `model` itself, edited in place)."""
        self.check_compatible(model)
        self.detach()
        model = with_o_proj_bias(model)
        modules = attention_modules(model)
        for key, layer in self.layers.items():
            o_proj = output_projection(modules[int(key)])
            weight = o_proj.weight.float()
            if layer.offset is not None:
                offsets = layer.full(layer.offset.detach().float().to(weight.device), 0.0).flatten()
                o_proj.bias += (weight @ offsets).to(o_proj.bias.dtype)
            if layer.scale is not None:
                scales = layer.full(1 + layer.scale.detach().float().to(weight.device), 1.0).flatten()
                o_proj.weight.copy_(weight * scales)
        return model


# Families whose o_proj takes no bias in any configuration, and the family they are exactly equal to with one.
BIASLESS_FAMILIES = {"mistral": "llama", "qwen2": "llama"}


@torch.no_grad()
def with_o_proj_bias(model: nn.Module) -> nn.Module:
    """`model` with a bias on every o_proj (zeros where it had none), expressed in its config so that `save_pretrained`
    and `AutoModelForCausalLM.from_pretrained` round-trip it."""
    modules = attention_modules(model)
    if all(output_projection(m).bias is not None for m in modules):
        return model
    config = model.config
    if hasattr(config, "attention_bias"):
        config.attention_bias = True
        with torch.device("meta"):
            reference = AutoModelForCausalLM.from_config(config)
        missing = [
            name
            for name, module in reference.named_modules()
            if isinstance(module, nn.Linear) and module.bias is not None and model.get_submodule(name).bias is None
        ]
        for name in missing:
            _add_zero_bias(model.get_submodule(name))
        if all(output_projection(m).bias is not None for m in modules):
            return model
    if config.model_type in BIASLESS_FAMILIES:
        return _as_llama_with_bias(model)
    raise ValueError(
        f"{config.model_type}'s config cannot give o_proj a bias, so merged offsets would not reload: keep the adapter "
        "unmerged (`HeadAdapter.from_pretrained(path, model)`), or add this family to BIASLESS_FAMILIES with the "
        "family it equals once o_proj has a bias."
    )


def _add_zero_bias(linear: nn.Linear) -> None:
    linear.bias = nn.Parameter(
        torch.zeros(linear.out_features, dtype=linear.weight.dtype, device=linear.weight.device)
    )


def _as_llama_with_bias(model: nn.Module) -> nn.Module:
    config = model.config
    layer_types = getattr(config, "layer_types", None) or ["sliding_attention"]
    if getattr(config, "sliding_window", None) is not None and any(kind != "full_attention" for kind in layer_types):
        raise ValueError(
            f"This {config.model_type} model uses sliding-window attention, which Llama lacks, so the merged model "
            "cannot be expressed as Llama with an o_proj bias. Set `model.config.sliding_window = None` if your "
            "sequences never exceed the window, or keep the adapter unmerged."
        )
    text = config.to_dict()
    for key in (
        "model_type",
        "architectures",
        "sliding_window",
        "use_sliding_window",
        "max_window_layers",
        "layer_types",
    ):
        text.pop(key, None)
    text["attention_bias"] = True
    llama_config = LlamaConfig(**text)
    parameter = next(model.parameters())
    merged = AutoModelForCausalLM.from_config(
        llama_config, dtype=parameter.dtype, attn_implementation=config._attn_implementation
    ).to(parameter.device)
    missing, unexpected = merged.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not name.endswith(".bias") for name in missing):
        raise RuntimeError(
            f"{config.model_type} -> llama conversion failed: missing {missing}, unexpected {unexpected}"
        )
    for name in missing:
        merged.get_parameter(name).zero_()
    merged.generation_config = model.generation_config
    merged.config._name_or_path = config._name_or_path
    return merged
