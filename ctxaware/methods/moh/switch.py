"""`ctxaware eval --moh on[:ARGS]`: routes generation and scoring through a MoH router."""

from ctxaware.methods.moh.adapter import MoHAdapter, find_moh_adapter
from ctxaware.switches import GenerationSetup, register_generation_hook


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
