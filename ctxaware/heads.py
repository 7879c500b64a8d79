"""Attention heads as units: the model's head layout, per-head slices of q/k/v/o_proj, head selections, and hooks on
each head's output before `o_proj`.

"Pre-o_proj" is the input of `o_proj`, shaped (B, S, Hq * D): the concatenation of every query head's attention
output, head h in columns h*D:(h+1)*D. It is the same in every family and attention implementation, so method code
hooks it (`register_pre_o_proj_hooks`) instead of forking modeling files. Under GQA a query head h reads the key and
value head h // (Hq / Hkv): its q_proj rows and o_proj columns are its own, its k/v rows are shared by its group.
"""

import json
import math
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ctxaware.attention import attention_modules, output_projection


Head = tuple[int, int]  # (layer, query head)


@dataclass(frozen=True)
class HeadLayout:
    """The shapes that decide whether per-head weights fit a model."""

    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int

    @classmethod
    def from_config(cls, config) -> "HeadLayout":
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        num_heads = config.num_attention_heads
        return cls(
            model_type=config.model_type,
            num_layers=config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // num_heads,
            hidden_size=config.hidden_size,
        )

    @classmethod
    def from_model(cls, model: nn.Module) -> "HeadLayout":
        return cls.from_config(model.config)

    @property
    def total_heads(self) -> int:
        return self.num_layers * self.num_heads

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 for MHA)."""
        return self.num_heads // self.num_kv_heads

    def check_head(self, layer: int, head: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise IndexError(
                f"layer {layer} out of range: the model has {self.num_layers} layers (0..{self.num_layers - 1})"
            )
        if not 0 <= head < self.num_heads:
            raise IndexError(
                f"head {head} out of range: each layer has {self.num_heads} query heads (0..{self.num_heads - 1})"
            )

    def kv_head(self, head: int) -> int:
        return head // self.group_size

    def q_rows(self, head: int) -> slice:
        """Rows of q_proj's weight (and bias) that produce query head `head`."""
        return slice(head * self.head_dim, (head + 1) * self.head_dim)

    def kv_rows(self, head: int) -> slice:
        """Rows of k_proj/v_proj that query head `head` reads (shared with the rest of its GQA group)."""
        kv = self.kv_head(head)
        return slice(kv * self.head_dim, (kv + 1) * self.head_dim)

    def o_cols(self, head: int) -> slice:
        """Columns of o_proj's weight that read query head `head`'s output."""
        return self.q_rows(head)

    def to_dict(self) -> dict:
        return asdict(self)

    def differences(self, other: "HeadLayout") -> dict[str, tuple]:
        """{field: (self's value, other's value)} for every field that differs."""
        mine, theirs = asdict(self), asdict(other)
        return {key: (mine[key], theirs[key]) for key in mine if mine[key] != theirs[key]}


def resolve_head_count(k: float, total: int) -> int:
    """K as a count (k >= 1, a whole number) or a fraction of `total` heads (0 < k < 1, at least one). A fraction is a
    budget, so it rounds down: 5% of SmolLM2's 270 heads is 13, not 14 (5.2%)."""
    if 0 < k < 1:
        return max(1, math.floor(k * total + 1e-9))  # the epsilon keeps 0.07 * 100 at 7 despite float error
    if k >= 1 and float(k).is_integer():
        if k > total:
            raise ValueError(
                f"K={int(k)} heads requested but the model has only {total}: pass K <= {total}, or a fraction."
            )
        return int(k)
    raise ValueError(f"K={k} is neither a head count (a whole number >= 1) nor a fraction in (0, 1).")


def top_heads(scores: torch.Tensor, k: float) -> list[Head]:
    """The K (count or fraction) heads with the largest scores in a (layers, heads) tensor, sorted by (layer, head)."""
    count = resolve_head_count(k, scores.numel())
    flat = torch.topk(scores.detach().flatten().float(), count).indices.tolist()
    return sorted(divmod(index, scores.shape[1]) for index in flat)


def random_heads(layout: HeadLayout, k: float, seed: int = 0, exclude: Iterable[Head] = ()) -> list[Head]:
    """K heads (count or fraction of all heads) drawn with `seed` among those not in `exclude`, sorted."""
    excluded = {tuple(head) for head in exclude}
    pool = [head for head in all_heads(layout) if head not in excluded]
    count = resolve_head_count(k, layout.total_heads)
    if count > len(pool):
        raise ValueError(
            f"K={count} random heads cannot avoid the {len(excluded)} excluded heads: only {len(pool)} remain. "
            "Lower K or exclude fewer heads."
        )
    return sorted(random.Random(seed).sample(pool, count))


def all_heads(layout: HeadLayout) -> list[Head]:
    return [(layer, head) for layer in range(layout.num_layers) for head in range(layout.num_heads)]


def heads_by_layer(heads: Iterable[Head]) -> dict[int, list[int]]:
    grouped: dict[int, list[int]] = {}
    for layer, head in sorted(heads):
        grouped.setdefault(layer, []).append(head)
    return grouped


def check_heads(heads: Iterable[Head], layout: HeadLayout) -> list[Head]:
    """Validated, deduplicated and sorted; an index out of range raises IndexError naming the model's shape."""
    heads = sorted({(int(layer), int(head)) for layer, head in heads})
    for layer, head in heads:
        layout.check_head(layer, head)
    return heads


def split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(..., H * D) -> (..., H, D)."""
    return x.unflatten(-1, (x.shape[-1] // head_dim, head_dim))


def register_pre_o_proj_hooks(
    model: nn.Module, hook: Callable[[int, torch.Tensor], torch.Tensor], layers: Iterable[int] | None = None
) -> list[RemovableHandle]:
    """Calls `hook(layer_idx, x)` on the input x (B, S, Hq * D) of each selected layer's o_proj and feeds o_proj what
    it returns. Remove the hooks with `handle.remove()`."""
    modules = attention_modules(model)
    selected = range(len(modules)) if layers is None else layers
    if bad := [layer for layer in selected if not 0 <= layer < len(modules)]:
        raise IndexError(f"layer {bad[0]} out of range: the model has {len(modules)} attention layers")
    handles = []
    for layer in selected:

        def pre_hook(module, args, layer=layer):
            return (hook(layer, args[0]), *args[1:])

        handles.append(output_projection(modules[layer]).register_forward_pre_hook(pre_hook))
    return handles


def save_head_selection(path: str | Path, heads: Iterable[Head], layout: HeadLayout, **extra) -> None:
    """A readable JSON artefact: the heads as [layer, head] pairs and grouped by layer, with the model's layout."""
    heads = list(heads)
    payload = {
        "num_selected": len(heads),
        "total_heads": layout.total_heads,
        "heads": [list(h) for h in heads],
        "by_layer": {str(layer): hs for layer, hs in heads_by_layer(heads).items()},
        "layout": layout.to_dict(),
        **extra,
    }
    text = json.dumps(payload, indent=2)
    # Innermost lists of numbers ([layer, head] pairs, score rows) on one line each.
    text = re.sub(r"\[\s+([^\[\]{}\"]*?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    Path(path).write_text(text + "\n")


def load_head_selection(path: str | Path, layout: HeadLayout) -> tuple[list[Head], dict]:
    """The heads of a `head_selection.json` (written by `save_head_selection`) and its whole payload (a method's
    extra fields), checked against the model's layout: a selection made on another model shape is an error."""
    payload = json.loads(Path(path).read_text())
    saved = payload.get("layout")
    if saved is None:
        raise ValueError(f"{path} records no model layout: write it with `ctxaware.heads.save_head_selection`.")
    if differences := HeadLayout(**saved).differences(layout):
        listed = ", ".join(f"{k}: selection {a} vs model {b}" for k, (a, b) in differences.items())
        raise ValueError(
            f"{path} selects heads of another model shape ({listed}). Make the selection on this model, or pass the "
            "model the selection was made on."
        )
    return check_heads(payload["heads"], layout), payload


def plot_head_scores(path: str | Path, scores: torch.Tensor, selected: Iterable[Head] = (), title: str = "") -> None:
    """A layer x head heat map of `scores` (layers, heads) with the selected heads outlined, written to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    scores = scores.detach().float().cpu()
    layers, heads = scores.shape
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * heads + 2), max(3, 0.3 * layers + 1.5)))
    image = ax.imshow(scores.numpy(), aspect="auto", cmap="viridis", origin="lower")
    for layer, head in selected:
        ax.add_patch(Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
