"""Generation-time switches (`--kv_cache`, `--steer`, `--moh`): a registry that the method modules fill in.

Each switch takes a value `KIND[:ARGS]` (e.g. `--kv_cache h2o:0.2`). A kind is a function
`apply(model, args: str, setup: GenerationSetup) -> None` that a method module registers with
`@register_generation_hook(switch, kind)`; it may patch the model (registering the undo on `setup.stack`), add keyword
arguments for `model.generate`, give a factory for a fresh KV cache per batch, or replace `model.generate` itself.

`SWITCHES` declares each switch (flag, default, help) and names the method module that registers its kinds. The
declaration lives here, not in the method, so a command line can offer the flags without importing torch; the module
is imported, by name, the first time a value of that switch is parsed. Consumers (`ctxaware eval`) only read this
module: the kinds arrive with the methods.
"""

import importlib
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field


@dataclass
class GenerationSetup:
    """What the active switches changed: applied to every generate and scoring call of the run."""

    stack: ExitStack = field(default_factory=ExitStack)
    generate_kwargs: dict = field(default_factory=dict)
    # A fresh KV cache: `cache_factory()` per generate batch, `cache_factory(length=L)` per streaming-scoring batch of
    # L-token texts (a budget given as a fraction is then a fraction of L).
    cache_factory: Callable[..., object] | None = None
    # In place of `model.generate` for each generate batch: takes its keyword arguments, returns the sequences.
    generate: Callable[..., object] | None = None
    applied: dict[str, str] = field(default_factory=dict)

    def close(self) -> None:
        self.stack.close()


@dataclass(frozen=True)
class Switch:
    name: str
    help: str
    default: str
    module: str  # the method module that registers this switch's kinds when imported


SWITCHES: dict[str, Switch] = {
    "kv_cache": Switch(
        "kv_cache",
        "KV-cache policy during generation: `full`, `h2o:BUDGET` (heavy hitters + recent + sinks; a fraction of the "
        "prompt kept, or a token count) or `window:BUDGET` (sinks + recent window, StreamingLLM: H2O's baseline at "
        "the same budget); both run attention on the ctxaware kernels. `h2o:BUDGET,slots` / `window:BUDGET,slots` "
        "decode the same tokens in fixed slots, one CUDA graph a step on CUDA (greedy only). long_ppl then streams "
        "each text through the cache token by token (the fraction is of the text's length); log-likelihood scoring "
        "always sees the full context.",
        "full",
        "ctxaware.methods.h2o",
    ),
    "steer": Switch(
        "steer",
        "Attention steering: `none`, or `KIND:ARGS` as registered by the context method "
        "(scale attention outside the user-context span at chosen heads).",
        "none",
        "ctxaware.methods.context",
    ),
    "moh": Switch(
        "moh",
        "Mixture-of-head routing: `off`, or `on[:ARGS]` for models converted by the MoH recipe.",
        "off",
        "ctxaware.methods.moh.switch",
    ),
}

_HOOKS: dict[str, dict[str, Callable]] = {name: {} for name in SWITCHES}


def register_generation_hook(switch: str, kind: str):
    """Registers `apply(model, args, setup)` as the kind `kind` of `switch`."""
    if switch not in SWITCHES:
        raise ValueError(f"Unknown generation switch {switch!r}; known: {', '.join(SWITCHES)}.")

    def decorator(fn: Callable) -> Callable:
        _HOOKS[switch][kind] = fn
        return fn

    return decorator


def _no_change(model, args: str, setup: GenerationSetup) -> None:
    if args:
        raise ValueError("This switch value takes no arguments.")


for _switch in SWITCHES.values():
    _HOOKS[_switch.name][_switch.default] = _no_change


def known_kinds(switch: str) -> list[str]:
    """The kinds of `switch`, after importing the method module that registers them."""
    importlib.import_module(SWITCHES[switch].module)
    return sorted(_HOOKS[switch])


def parse_switch(switch: str, value: str) -> tuple[str, str]:
    if switch not in SWITCHES:
        raise ValueError(f"Unknown generation switch {switch!r}; known: {', '.join(SWITCHES)}.")
    kind, _, args = value.partition(":")
    kinds = known_kinds(switch) if kind not in _HOOKS[switch] else sorted(_HOOKS[switch])
    if kind not in _HOOKS[switch]:
        raise ValueError(
            f"--{switch} {value}: no kind {kind!r} is registered. Available now: {', '.join(kinds)}. Kinds are "
            f"registered with `@register_generation_hook({switch!r}, KIND)` in {SWITCHES[switch].module}."
        )
    return kind, args


def apply_generation_hooks(model, values: dict[str, str | None]) -> GenerationSetup:
    """Applies each switch's requested kind to `model`; close the returned setup to undo model patches."""
    setup = GenerationSetup()
    try:
        for switch, value in values.items():
            value = value or SWITCHES[switch].default
            kind, args = parse_switch(switch, value)
            _HOOKS[switch][kind](model, args, setup)
            setup.applied[switch] = value
    except BaseException:
        setup.close()
        raise
    return setup
