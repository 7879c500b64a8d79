"""Triton attention kernels and their PyTorch references (no transformers import here).

`attention(q, k, v, ...)` takes q (B, Hq, Sq, D), k and v (B, Hkv, Sk, D), Hq a multiple of Hkv (query head h reads
key/value head h // (Hq // Hkv)), and returns (out, AttentionStats). Backends (`backend="auto"` by default):
- plain dense attention (no pattern, padding, packing, gates, statistics or soft-cap; a full square or one decode
  query) goes to PyTorch's fused SDPA, cuDNN / flash on a GPU (faster than our dense kernel on Hopper); so does one
  gated decode query with no gradient, its output scaled by each head's gate;
- otherwise, on CUDA, the Triton kernels (forward and backward, fp32 accumulation, bf16/fp16/fp32 inputs);
- on CPU, the PyTorch reference when statistics are asked for, otherwise the same boolean mask through PyTorch's
  fused SDPA (`backend="sdpa"`, 4x faster at 2k tokens).
`backend="triton"` forces ours (benchmarks time it so), `"reference"` the materialised softmax. All follow the
semantics below; `AttentionStats.backend` says which ran.

Positions. Keys sit at absolute positions j = 0..Sk-1; queries are the last Sq positions: query row i has position
p = (Sk - Sq) + i (prefill when Sq == Sk, decode / KV cache when Sq < Sk, down to Sq = 1). Every pattern is defined
on these absolute positions, so decode sees exactly the rows that prefill would.

Mask. Query p may attend to key j iff ALL of:
    causal:   j <= p                                  (only when causal=True)
    pattern:  allowed(h, p, j) below                  (h = query head)
    padding:  pad[j] and pad[p]                       (key_padding_mask, True = real token; left or right padding)
    packing:  doc[j] == doc[p]                        (doc_ids; no attention across documents)
    gate:     gate[p, h] != 0                         (head_gates)

allowed(h, p, j) per `AttentionPattern.kind` (G = group size, W = window, K = sinks, n = Hq):
    dense:    True
    s2:       (p // G == j // G)                          for heads h <  n - floor(n * shifted_head_fraction)
              ((p + G/2) // G == (j + G/2) // G)          for the other (shifted) heads, G even
    sf:       s2(h, p, j) or j < K                        (K defaults to 4; with causal, a sink j is seen iff j <= p)
    window:   (p - W < j < p + W) or j < K                (with causal this is p - W < j <= p)

So S^2's shifted groups are [0, G/2), [G/2, 3G/2), ...: no wrap-around, nothing leaks from the end of the sequence
to its start. A length that G does not divide is handled: the last group (unshifted or shifted) is just shorter.
`group_size_ratio` resolves G = ratio * Sk per call (rounded to an even int); pass `group_size` for decode, where Sk
grows. Which heads are shifted is decided on query heads, so under GQA the query heads of one key/value head may
differ. G below the kernel block size is correct (masks are elementwise), just less sparse.
With causal=False the formulas are the same without the causal term. Positions are absolute in a packed row too:
S^2 groups and sinks count from the row's start, not from each document's start.

Output. With s_pj = scale * <q_p, k_j> (scale > 0, default D**-0.5), soft-capped to c * tanh(s_pj / c) when
`softcap` = c > 0 is given (Gemma 2's attn_logit_softcapping; FlashAttention's and FlexAttention's score_mod), and
P_pj = softmax over the allowed j:
    out[b, h, i] = gate[b, i, h] * sum_j P_pj v_j                     (gate = 1 without head_gates)
    lse[b, h, i] = log sum_{allowed j} exp(s_pj)                     (natural log, fp32)
A row with no allowed key (a padding query, a gated-off token, a fully masked row) gives out = 0 and lse = -inf,
no NaN, and contributes nothing to the statistics or to the gradients. A gate of exactly 0 switches that
(token, head) off: the forward's query tiles hold only each head's rows with nonzero gates (no work for the others),
and its gate gradient is 0; other gates get d out / d gate.

Statistics (no S x S buffer, not differentiable, fp32):
    key_mass[b, h, j]      = sum_i P_ij                              (per-key mass summed over queries: H2O)
    label_mass[b, h, i, l] = sum_{j: key_labels[b, j] == l} P_ij     (per query, mass on each key span label)
Sum label_mass over the query rows of a span to get span-to-span mass (context-dependency scoring).
"""

from ctxaware.kernels.api import AttentionStats, attention
from ctxaware.kernels.patterns import AttentionPattern, pattern_mask
from ctxaware.kernels.reference import reference_attention


__all__ = ["AttentionPattern", "AttentionStats", "attention", "pattern_mask", "reference_attention"]
