"""Activation and path patching at head and MLP granularity, on any family whose attention ctxaware hooks.

Components: each query head's output before `o_proj` (its D columns of o_proj's input, see `ctxaware.heads`) and
each layer's MLP output. Data: pairs of a clean and a corrupted prompt that tokenise to the same length and differ in
a few tokens (e.g. one operand), each with its answer.

Metric: the logit difference at the final position, LD = logit(first token of the clean answer) - logit(first token
of the corrupted answer), where "first token" is the first token at which the two answers' tokenisations differ
(a shared prefix, such as a lone space token, is appended to both prompts). Effects are normalised so that 0 means
"no effect" and 1 means "this component alone moves LD all the way":

    effect = (mean LD_patched - mean LD_base) / (mean LD_source - mean LD_base)

- `corrupted_into_clean` (noising): base run clean, the component's activation taken from the corrupted run; an
  effect of 1 means corrupting this component alone destroys the answer.
- `clean_into_corrupted` (denoising): base run corrupted, activation from the clean run; 1 means restoring it alone
  recovers the answer.
Activation patching replaces the component's activation (at every position, or only the final one with
`positions="last"`) and lets every later component react (total effect). Path patching to the final position
replaces it while every other head and MLP is frozen at its
base-run activation, so the change reaches the final position's logits only through the residual stream (the
component's direct effect on the answer).
"""

import json
import math
import re
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ctxaware.attention import attention_modules
from ctxaware.generation import encode_prompt
from ctxaware.heads import Head, HeadLayout, plot_head_scores, register_pre_o_proj_hooks
from ctxaware.io import write_text


DIRECTIONS = ("corrupted_into_clean", "clean_into_corrupted")
KINDS = ("activation", "path")


def mlp_modules(model: nn.Module) -> list[nn.Module]:
    """Each decoder layer's MLP, in layer order (the module next to the attention module, named `mlp`)."""
    layers = sorted(
        (m for m in model.modules() if hasattr(m, "self_attn") and hasattr(m, "mlp")),
        key=lambda m: m.self_attn.layer_idx,
    )
    if len(layers) != len(attention_modules(model)):
        raise ValueError(
            f"found {len(layers)} decoder layers with `self_attn` and `mlp` in {type(model).__name__} but "
            f"{len(attention_modules(model))} attention modules: this family's MLPs cannot be located"
        )
    return [layer.mlp for layer in layers]


# --- data ---------------------------------------------------------------------------------------------------------
@dataclass
class PatchingBatch:
    """Pairs of equal token length: clean and corrupted ids (N, S) and the two answer tokens (N,) scored at -1."""

    clean_ids: torch.Tensor
    corrupted_ids: torch.Tensor
    answer_ids: torch.Tensor
    corrupted_answer_ids: torch.Tensor

    def to(self, device) -> "PatchingBatch":
        return PatchingBatch(*(t.to(device) for t in vars(self).values()))


def build_batches(
    pairs: list[dict], tokenizer, *, batch_size: int = 64, add_bos: bool = True, drop_mismatched: bool = False
) -> list[PatchingBatch]:
    """Tokenises pairs {"clean", "corrupted", "answer", "corrupted_answer"} (answers follow the prompt after one
    space) into batches of equal length. A corrupted prompt whose token count differs from its clean prompt's is an
    error (patching compares them position by position) unless `drop_mismatched`."""
    rows: dict[int, list[tuple]] = {}
    for index, pair in enumerate(pairs):
        clean = encode_prompt(tokenizer, pair["clean"], add_bos=add_bos)
        corrupted = encode_prompt(tokenizer, pair["corrupted"], add_bos=add_bos)
        if len(clean) != len(corrupted):
            if drop_mismatched:
                continue
            raise ValueError(
                f"pair {index}: the corrupted prompt {pair['corrupted']!r} tokenises to {len(corrupted)} tokens but "
                f"the clean prompt {pair['clean']!r} to {len(clean)}; patching compares them position by position. "
                "Corrupt operands without changing their digit count and use operators that are one token for this "
                "tokenizer, or pass drop_mismatched=True (`--drop_mismatched`) to skip such pairs."
            )
        answer = tokenizer(" " + str(pair["answer"]), add_special_tokens=False)["input_ids"]
        other = tokenizer(" " + str(pair["corrupted_answer"]), add_special_tokens=False)["input_ids"]
        shared = 0
        while shared < min(len(answer), len(other)) and answer[shared] == other[shared]:
            shared += 1
        if shared == min(len(answer), len(other)):
            raise ValueError(
                f"pair {index}: answers {pair['answer']!r} and {pair['corrupted_answer']!r} tokenise to no differing "
                "token; a corrupted prompt must change the answer's first digit."
            )
        prefix = answer[:shared]
        rows.setdefault(len(clean) + shared, []).append(
            (clean + prefix, corrupted + prefix, answer[shared], other[shared])
        )
    if not rows:
        raise ValueError("no usable pairs: every corrupted prompt tokenised to a different length than its clean one.")
    batches = []
    for length in sorted(rows):
        group = rows[length]
        for start in range(0, len(group), batch_size):
            chunk = group[start : start + batch_size]
            batches.append(PatchingBatch(*(torch.tensor([row[i] for row in chunk]) for i in range(4))))
    return batches


def logit_difference(logits: torch.Tensor, batch: PatchingBatch) -> torch.Tensor:
    """(N,): logit of the clean answer's token minus the corrupted answer's, at the final position."""
    last = logits[:, -1].float()
    return (
        last.gather(-1, batch.answer_ids[:, None])[:, 0] - last.gather(-1, batch.corrupted_answer_ids[:, None])[:, 0]
    )


# --- hooks --------------------------------------------------------------------------------------------------------
Activations = dict[tuple[str, int], torch.Tensor]  # ("attn", layer): pre-o_proj input; ("mlp", layer): MLP output


@contextmanager
def patched(
    model: nn.Module,
    attn: dict[int, Callable[[torch.Tensor], torch.Tensor]] | None = None,
    mlp: dict[int, Callable[[torch.Tensor], torch.Tensor]] | None = None,
):
    """Within the block, layer l's pre-o_proj tensor becomes `attn[l](x)` and its MLP output `mlp[l](y)`."""
    attn, mlp = attn or {}, mlp or {}
    handles = register_pre_o_proj_hooks(model, lambda layer, x: attn[layer](x), sorted(attn)) if attn else []
    mlps = mlp_modules(model) if mlp else []
    for layer, fn in mlp.items():
        handles.append(mlps[layer].register_forward_hook(lambda module, args, out, fn=fn: fn(out)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def run_with_cache(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, Activations]:
    """Logits and every layer's pre-o_proj input and MLP output."""
    cache: Activations = {}

    def keep(kind: str, layer: int):
        def fn(x):
            cache[(kind, layer)] = x.detach().clone()
            return x

        return fn

    layers = range(len(attention_modules(model)))
    with patched(model, {i: keep("attn", i) for i in layers}, {i: keep("mlp", i) for i in layers}):
        logits = model(input_ids=ids, use_cache=False).logits
    return logits, cache


def _patch_rows(
    base: torch.Tensor | None, patches: list[tuple[slice, slice, torch.Tensor]], positions: slice, copies: int
):
    """A hook for a forward over `copies` stacked copies of the batch: the input (or `base` tiled, for path patching)
    with each (rows, columns, source) patch's columns taken from `source` at `positions` in its own rows."""

    def fn(x):
        x = (base.to(x.dtype).repeat(copies, 1, 1) if base is not None else x).clone()
        for rows, columns, source in patches:
            x[rows, positions, columns] = source[:, positions, columns].to(x.dtype)
        return x

    return fn


POSITIONS = {"all": slice(None), "last": slice(-1, None)}


@torch.no_grad()
def patched_logit_differences(
    model: nn.Module,
    base_ids: torch.Tensor,
    base: Activations,
    source: Activations,
    batch: PatchingBatch,
    components: list[tuple[str, int, int | None]],
    *,
    layout: HeadLayout,
    kind: str = "activation",
    positions: str = "all",
    rows_per_forward: int = 64,
    on_components: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """(components, N): LD of the base run with each component ("head", layer, head) or ("mlp", layer, None) taken
    from `source` at `positions` ("all" or "last"). `kind` "path" freezes every other component at `base` (the
    direct effect on the final logits).

    Components are patched `rows_per_forward // N` at a time, each in its own copy of the batch within one forward
    (rows never interact, so this equals one forward per component; small batches run several times faster).
    `on_components(k)` is called after each forward of k components (progress)."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: choose one of {', '.join(KINDS)}")
    if positions not in POSITIONS:
        raise ValueError(f"positions={positions!r}: choose one of {', '.join(POSITIONS)}")
    for component, _, _ in components:
        if component not in ("head", "mlp"):
            raise ValueError(f"unknown component {component!r}: 'head' or 'mlp'")
    where, n = POSITIONS[positions], base_ids.shape[0]
    per_forward = max(1, rows_per_forward // n)
    results = []
    for start in range(0, len(components), per_forward):
        group = components[start : start + per_forward]
        patches: dict[tuple[str, int], list] = {}
        for copy, (component, layer, head) in enumerate(group):
            key = ("attn" if component == "head" else "mlp", layer)
            columns = layout.o_cols(head) if component == "head" else slice(None)
            patches.setdefault(key, []).append((slice(copy * n, (copy + 1) * n), columns, source[key]))
        # path patching freezes every component at its base value; activation patching hooks only the patched ones
        hooked = [(k, i) for k in ("attn", "mlp") for i in range(layout.num_layers)] if kind == "path" else patches
        hooks = {
            key: _patch_rows(base[key] if kind == "path" else None, patches.get(key, []), where, len(group))
            for key in hooked
        }
        attn = {layer: fn for (what, layer), fn in hooks.items() if what == "attn"}
        mlp = {layer: fn for (what, layer), fn in hooks.items() if what == "mlp"}
        with patched(model, attn, mlp):
            logits = model(input_ids=base_ids.repeat(len(group), 1), use_cache=False).logits
        copies = PatchingBatch(*(t.repeat(len(group), *[1] * (t.dim() - 1)) for t in vars(batch).values()))
        results.append(logit_difference(logits, copies).view(len(group), n))
        if on_components is not None:
            on_components(len(group))
    return torch.cat(results)


# --- results ------------------------------------------------------------------------------------------------------
def head_concentration(head_effects: torch.Tensor, shares: Iterable[float] = (0.5, 0.8)) -> dict:
    """How concentrated the summed |head effect| is. For each share, the fewest heads (largest |effect| first) that
    carry at least that share; and `under_5pct`: the share carried by the largest set of heads that is still fewer
    than 5% of all heads (the paper's claim, "fewer than 5% of heads explain most of the effect", holds when that
    share exceeds 0.5)."""
    magnitudes = head_effects.abs().flatten().sort(descending=True).values
    count, total = magnitudes.numel(), magnitudes.sum().item()
    cumulative = magnitudes.cumsum(0) / total if total > 0 else torch.ones_like(magnitudes)
    result = {"total_heads": count}
    for share in shares:
        needed = min(count, int((cumulative < share - 1e-9).sum().item()) + 1)
        result[f"heads_for_{round(share * 100)}pct"] = {"heads": needed, "fraction": needed / count}
    under = max(1, math.ceil(0.05 * count) - 1)
    result["under_5pct"] = {"heads": under, "fraction": under / count, "share": cumulative[under - 1].item()}
    return result


@dataclass
class PatchingResult:
    """Normalised effects of every head (layers, heads) and MLP (layers,) for one direction and kind."""

    direction: str
    kind: str
    head_effects: torch.Tensor
    mlp_effects: torch.Tensor
    clean_logit_diff: float
    corrupted_logit_diff: float
    num_pairs: int
    positions: str = "all"
    metric: str = field(
        default="logit(first token of the clean answer) - logit(first differing token of the corrupted answer) at "
        "the final position; effect = (LD_patched - LD_base) / (LD_source - LD_base), means over pairs"
    )

    def ranked(self) -> list[dict]:
        """Every component, largest |effect| first."""
        entries = [
            {"component": "head", "layer": layer, "head": head, "effect": self.head_effects[layer, head].item()}
            for layer in range(self.head_effects.shape[0])
            for head in range(self.head_effects.shape[1])
        ]
        entries += [
            {"component": "mlp", "layer": layer, "head": None, "effect": value.item()}
            for layer, value in enumerate(self.mlp_effects)
        ]
        return sorted(entries, key=lambda e: -abs(e["effect"]))

    def concentration(self) -> dict:
        return head_concentration(self.head_effects)

    def to_dict(self) -> dict:
        return {
            "direction": self.direction,
            "kind": self.kind,
            "positions": self.positions,
            "metric": self.metric,
            "num_pairs": self.num_pairs,
            "clean_logit_diff": self.clean_logit_diff,
            "corrupted_logit_diff": self.corrupted_logit_diff,
            "concentration": self.concentration(),
            "head_effects": self.head_effects.tolist(),
            "mlp_effects": self.mlp_effects.tolist(),
            "ranked": self.ranked(),
        }

    @classmethod
    def load(cls, path: str | Path) -> "PatchingResult":
        """A result written by `save` (its `<name>.json`): the effects and the run's description, not the pairs."""
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def from_dict(cls, data: dict) -> "PatchingResult":
        """The inverse of `to_dict`."""
        fields_ = ("direction", "kind", "positions", "metric", "num_pairs", "clean_logit_diff", "corrupted_logit_diff")
        return cls(
            head_effects=torch.tensor(data["head_effects"]),
            mlp_effects=torch.tensor(data["mlp_effects"]),
            **{name: data[name] for name in fields_},
        )

    @staticmethod
    def file_name(kind: str, direction: str, positions: str = "all") -> str:
        """The stem `save` gives a run of this kind, direction and positions."""
        suffix = "" if positions == "all" else f"_{positions}"
        return f"{kind}_{direction}{suffix}"

    @property
    def name(self) -> str:
        return self.file_name(self.kind, self.direction, self.positions)

    def save(self, folder: str | Path, selected: Iterable[Head] = ()) -> dict[str, Path]:
        """Writes `<name>.json` (ranked list, effects, concentration) and `<name>.png` (layer x head heat map)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = {"json": folder / f"{self.name}.json", "png": folder / f"{self.name}.png"}
        text = json.dumps(self.to_dict(), indent=2)
        text = re.sub(r"\[\s+([^\[\]{}\"]*?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
        write_text(paths["json"], text + "\n")
        title = f"{self.kind} patching, {self.direction.replace('_', ' ')} (normalised LD effect)"
        plot_head_scores(paths["png"], self.head_effects, selected, title=title)
        return paths


@torch.no_grad()
def patch_all(
    model: nn.Module,
    batches: list[PatchingBatch],
    *,
    direction: str = "corrupted_into_clean",
    kind: str = "activation",
    positions: str = "all",
    heads: bool = True,
    mlps: bool = True,
    progress: bool = True,
    rows_per_forward: int = 64,
) -> PatchingResult:
    """Effects of every head and MLP, for one direction and kind, over all batches; `positions` "last" patches the
    final position only (where the answer is read), "all" every position. Each batch's components are patched
    `rows_per_forward // N` to a forward (see `patched_logit_differences`); a progress bar counts components."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r}: choose one of {', '.join(DIRECTIONS)}")
    layout = HeadLayout.from_model(model)
    components = [("head", i, h) for i in range(layout.num_layers) for h in range(layout.num_heads) if heads]
    components += [("mlp", i, None) for i in range(layout.num_layers) if mlps]
    device = next(model.parameters()).device
    model.eval()
    sums = torch.zeros(len(components), dtype=torch.float64)
    clean_sum = corrupted_sum = 0.0
    count = 0
    bar = tqdm(total=len(batches) * len(components), desc=f"patching {kind}:{direction}", disable=not progress)
    for batch in batches:
        batch = batch.to(device)
        clean_logits, clean_cache = run_with_cache(model, batch.clean_ids)
        corrupted_logits, corrupted_cache = run_with_cache(model, batch.corrupted_ids)
        clean_sum += logit_difference(clean_logits, batch).double().sum().item()
        corrupted_sum += logit_difference(corrupted_logits, batch).double().sum().item()
        count += batch.clean_ids.shape[0]
        if direction == "corrupted_into_clean":
            base_ids, base, source = batch.clean_ids, clean_cache, corrupted_cache
        else:
            base_ids, base, source = batch.corrupted_ids, corrupted_cache, clean_cache
        diffs = patched_logit_differences(
            model,
            base_ids,
            base,
            source,
            batch,
            components,
            layout=layout,
            kind=kind,
            positions=positions,
            rows_per_forward=rows_per_forward,
            on_components=bar.update,
        )
        sums += diffs.double().sum(-1).cpu()
    bar.close()
    clean, corrupted = clean_sum / count, corrupted_sum / count
    base_mean, source_mean = (clean, corrupted) if direction == "corrupted_into_clean" else (corrupted, clean)
    if abs(source_mean - base_mean) < 1e-6:
        raise ValueError(
            f"the clean and corrupted runs have the same mean logit difference ({clean:.4g}): the corruption does not "
            "change the model's answer, so effects cannot be normalised. Use pairs the model answers correctly when "
            "clean (`keep_correct`) or a stronger corruption."
        )
    effects = ((sums / count) - base_mean) / (source_mean - base_mean)
    n_heads = layout.total_heads if heads else 0
    head_effects = effects[:n_heads].float().reshape(layout.num_layers, -1) if heads else torch.zeros(0)
    mlp_effects = effects[n_heads:].float() if mlps else torch.zeros(0)
    return PatchingResult(direction, kind, head_effects, mlp_effects, clean, corrupted, count, positions)


@torch.no_grad()
def keep_answered(model: nn.Module, batches: list[PatchingBatch]) -> list[PatchingBatch]:
    """The pairs whose clean run prefers the clean answer's token (LD > 0) and corrupted run the corrupted one."""
    device = next(model.parameters()).device
    kept = []
    for batch in batches:
        batch = batch.to(device)
        clean = logit_difference(model(input_ids=batch.clean_ids, use_cache=False).logits, batch)
        corrupted = logit_difference(model(input_ids=batch.corrupted_ids, use_cache=False).logits, batch)
        mask = (clean > 0) & (corrupted < 0)
        if mask.any():
            kept.append(PatchingBatch(*(t[mask] for t in vars(batch).values())))
    if not kept:
        raise ValueError(
            "the model answers none of the clean prompts (with the corrupted answer preferred on the corrupted "
            "prompt): patching would measure noise. Use easier prompts (fewer digits) or `keep_correct: false`."
        )
    return kept
