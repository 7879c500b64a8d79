"""MoH (mixture-of-head attention): a dense model's query heads become shared heads, always on, and routed heads, of
which a router picks the top k per token; the attention kernel skips every (token, head) whose gate is exactly 0.

One module per job, each importing only the ones before it:
- `router`: `MoHRouter`, one layer's gates (learned or query-norm), the load-balance loss and chunk routing.
- `calibration`: head importance on the dense model (`head_ablation_kl`) and routers fitted to it
  (`fit_router_weights`).
- `adapter`: `MoHAdapter`, the routers of every layer as a ctxaware adapter (conversion of a dense model, attach and
  detach, save and load, training signals), `find_moh_adapter` and `logit_change`.
- `switch`: `ctxaware eval --moh on[:ARGS]`.
"""
