"""Triton forward, backward and statistics kernels of `ctxaware.kernels.attention` (semantics in the package doc).

Block-sparse iteration: each query tile walks only the key range its pattern can reach (plus the sink blocks). That
range is split into masked tiles and one contiguous run of tiles the pattern fully allows (`_full_keys`,
`_full_queries`), which loops without any mask code, so the compiler pipelines it like plain causal attention.
Grids are 1-D and start the longest tiles of a group of heads first (`_launch_order`). Softmax uses exp2 with fp32
accumulation.
- forward: out, lse and label_mass in one pass (label_mass is accumulated like the output, with a one-hot dot); with
  head gates each head's query tiles are gathered from its routed rows, so per-token routing skips work in prefill too;
- key_mass: a key-major pass that recomputes the probabilities with the final lse (it needs the final normaliser);
- backward: FlashAttention-2 style, a key-major dk/dv kernel looping over the query heads of its key/value head (no
  atomics under GQA) and a query-major dq kernel, both walking only routed rows when there are head gates (as the
  forward); dO is scaled by the gates once before them, and gate gradients come from delta = rowsum(dO * out) / gate.
  Key tiles holding sinks, which every later query sees, are summed over chunks of queries in parallel first
  (`_bwd_dkdv_sinks_kernel`), so their programs do not outlast the rest of the grid.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ctxaware.kernels.launch import direct_launch
from ctxaware.kernels.patterns import AttentionPattern


LOG2E = 1.4426950408889634  # exp(x) = exp2(x * LOG2E): the kernels' softmax runs in base 2
LN2 = 0.6931471805599453  # log(x) = log2(x) * LN2
# The same two inside @triton.jit functions, which may read a module global only when it is a tl.constexpr instance.
JIT_LOG2E = tl.constexpr(LOG2E)
JIT_LN2 = tl.constexpr(LN2)
MIN_DOT_WIDTH = 16  # the narrowest tl.dot operand: _pow2's floor
INTERPRET_TILE = 16  # every tile edge under TRITON_INTERPRET=1, where large tiles only cost time
_KINDS = {"dense": 0, "s2": 1, "sf": 1, "window": 2}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _pattern_mask(pos, offs_n, shift, G, W, SINKS, KIND: tl.constexpr, CAUSAL: tl.constexpr):
    """Elementwise pattern (and causal) mask of a tile: pos (BM, 1) query positions, offs_n (1, BN) key positions."""
    if KIND == 1:
        allowed = ((pos + shift) // G == (offs_n + shift) // G) | (offs_n < SINKS)
    elif KIND == 2:
        allowed = ((pos - offs_n < W) & (offs_n - pos < W)) | (offs_n < SINKS)
    else:
        allowed = (pos >= 0) & (offs_n >= 0)
    if CAUSAL:
        allowed = allowed & (offs_n <= pos)
    return allowed


@triton.jit
def _key_range(P0, P1, Sk, shift, G, W, KIND: tl.constexpr, CAUSAL: tl.constexpr):
    """[lo, hi): the keys that queries at positions [P0, P1] may reach, sinks aside."""
    lo = P0 * 0
    hi = P0 * 0 + Sk
    if CAUSAL:
        hi = tl.minimum(hi, P1 + 1)
    if KIND == 1:
        lo = tl.maximum((P0 + shift) // G * G - shift, 0)
        if not CAUSAL:
            hi = tl.minimum(hi, ((P1 + shift) // G + 1) * G - shift)
    elif KIND == 2:
        lo = tl.maximum(P0 - W + 1, 0)
        if not CAUSAL:
            hi = tl.minimum(hi, P1 + W)
    return lo, hi


@triton.jit
def _query_range(n0, n1, Sk, shift, G, W, SINKS, KIND: tl.constexpr, CAUSAL: tl.constexpr):
    """[lo, hi): the query positions that may reach keys [n0, n1] (all later ones when the block holds sinks)."""
    lo = n0 * 0
    hi = n0 * 0 + Sk
    if CAUSAL:
        lo = n0
    if KIND == 1:
        hi = tl.where(n0 >= SINKS, tl.minimum(hi, ((n1 + shift) // G + 1) * G - shift), hi)
        if not CAUSAL:
            lo = tl.where(n0 >= SINKS, tl.maximum((n0 + shift) // G * G - shift, 0), lo)
    elif KIND == 2:
        hi = tl.where(n0 >= SINKS, tl.minimum(hi, n1 + W), hi)
        if not CAUSAL:
            lo = tl.where(n0 >= SINKS, tl.maximum(n0 - W + 1, 0), lo)
    return lo, hi


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    """a @ b (+ acc) with fp32 accumulation; a is cast to b's dtype; fp32 inputs stay exact fp32 (no tf32)."""
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a.to(b.dtype), b, acc)


@triton.jit
def _scores2(qk, qk_scale, cap2, SOFTCAP: tl.constexpr):
    """Scores in the exp2 domain, qk * scale * log2(e); with SOFTCAP, soft-capped as cap * tanh(score / cap) (Gemma 2's
    attn_logit_softcapping), cap2 = cap * log2(e). tanh(x) = 2 sigmoid(2x) - 1."""
    if SOFTCAP:
        return cap2 * (2.0 * tl.sigmoid(2.0 * qk * (qk_scale / cap2)) - 1.0)
    return qk * qk_scale


@triton.jit
def _softcap_grad(ds, s2, cap2, SOFTCAP: tl.constexpr):
    """d score / d (scale * qk) = 1 - tanh^2 under soft-capping (s2 = cap2 * tanh), 1 without."""
    if SOFTCAP:
        t = s2 / cap2
        return ds * (1.0 - t * t)
    return ds


@triton.jit
def _full_keys(P0, P1, lo_block, hi, Sk, shift, G, W, BN: tl.constexpr, KIND: tl.constexpr, CAUSAL: tl.constexpr):
    """[f_lo, f_hi): the BN-aligned key tiles inside [lo_block, hi) that every query of positions [P0, P1] may reach.

    They run without a mask; the tiles around them (and the sink tiles) run masked. Sinks are left to the masked part.
    """
    a_lo = P0 * 0
    a_hi = P0 * 0 + Sk
    if KIND == 1:
        gs = (P0 + shift) // G * G - shift
        one_group = (P1 + shift) // G * G - shift == gs
        a_lo = tl.maximum(gs, 0)
        a_hi = tl.where(one_group, tl.minimum(gs + G, Sk), 0)
    elif KIND == 2:
        a_lo = tl.maximum(P1 - W + 1, 0)
        a_hi = tl.minimum(P0 + W, Sk)
    if CAUSAL:
        a_hi = tl.minimum(a_hi, P0 + 1)
    f_lo = tl.minimum(tl.maximum((a_lo + BN - 1) // BN * BN, lo_block), hi)
    f_hi = tl.maximum(tl.minimum(a_hi // BN * BN, hi), f_lo)
    return f_lo, f_hi


@triton.jit
def _full_queries(n0, n1, m_lo, m_hi, Sk, q_offset, shift, G, W, SINKS, BM: tl.constexpr, KIND: tl.constexpr,
                  CAUSAL: tl.constexpr):  # fmt: skip
    """[f_lo, f_hi): the BM-aligned query-row tiles inside [m_lo, m_hi) whose every query may reach keys [n0, n1]."""
    b_lo = n0 * 0
    b_hi = n0 * 0 + Sk
    if KIND == 1:
        gs = (n0 + shift) // G * G - shift
        one_group = (n1 + shift) // G * G - shift == gs
        b_lo = tl.where(n1 < SINKS, 0, tl.maximum(gs, 0))
        b_hi = tl.where(n1 < SINKS, Sk, tl.where(one_group, tl.minimum(gs + G, Sk), 0))
    elif KIND == 2:
        b_lo = tl.where(n1 < SINKS, 0, tl.maximum(n1 - W + 1, 0))
        b_hi = tl.where(n1 < SINKS, Sk, tl.minimum(n0 + W, Sk))
    if CAUSAL:
        b_lo = tl.maximum(b_lo, n1)
    b_hi = tl.where(n1 < Sk, b_hi, 0)  # a ragged last key tile is always masked
    b_lo = tl.maximum(b_lo - q_offset, 0)
    b_hi = tl.maximum(b_hi - q_offset, 0)
    f_lo = tl.minimum(tl.maximum((b_lo + BM - 1) // BM * BM, m_lo), m_hi)
    f_hi = tl.maximum(tl.minimum(b_hi // BM * BM, m_hi), f_lo)
    return f_lo, f_hi


@triton.jit
def _launch_order(n_tiles, HEAD_GROUP):
    """(head, t) of this program in a 1-D grid of n_tiles tiles per (batch, head): t = 0 is a head's longest tile.

    Heads vary fastest within groups of HEAD_GROUP heads, so the longest tiles of a group start before any shorter
    one (the end of a launch does not wait for one head's long tile, which decides short launches), while only one
    group's K and V are read at a time (they stay in L2, which decides long ones); see `_head_group`."""
    return _launch_order_of(tl.program_id(0), tl.num_programs(0), n_tiles, HEAD_GROUP)


@triton.jit
def _launch_order_of(pid, n_programs, n_tiles, HEAD_GROUP):
    """`_launch_order` of program pid among n_programs."""
    group = pid // (HEAD_GROUP * n_tiles)
    heads = tl.minimum(HEAD_GROUP, n_programs // n_tiles - group * HEAD_GROUP)
    inner = pid - group * HEAD_GROUP * n_tiles
    return group * HEAD_GROUP + inner % heads, inner // heads


@triton.jit
def _query_tile(ROWS, RANK, bh, t, Sq, q_offset, Sk, BM: tl.constexpr, GATHER: tl.constexpr):
    """(row indices, in-range mask, first and last routed position) of the query tile with launch rank t (0: the
    head's last, longest one). GATHER: the tile is BM slots of this head's row permutation ROWS, routed rows first
    (RANK[Sq] of them), so rows with a zero gate take no space in the tiles that do work; the tiles past them, which
    run last, only store those rows' empty results."""
    if GATHER:
        count = tl.load(RANK + bh.to(tl.int64) * (Sq + 1) + Sq)
        routed_tiles = tl.cdiv(count, BM)
        pid_m = tl.where(t < routed_tiles, routed_tiles - 1 - t, t)
        slot = pid_m * BM + tl.arange(0, BM)
        row_in = slot < Sq
        routed = slot < count
        offs_m = tl.load(ROWS + bh.to(tl.int64) * Sq + slot, mask=row_in, other=0)
        P0 = q_offset + tl.min(tl.where(routed, offs_m, Sq), 0)
        P1 = q_offset + tl.max(tl.where(routed, offs_m, 0), 0)
    else:
        pid_m = tl.cdiv(Sq, BM) - 1 - t
        offs_m = pid_m * BM + tl.arange(0, BM)
        row_in = offs_m < Sq
        P0 = q_offset + pid_m * BM
        P1 = tl.minimum(P0 + BM, Sk) - 1
    return offs_m, row_in, P0, P1


@triton.jit
def _query_program(
    ROWS, RANK, Hq, Sq, Sk, kv_group, G, n_unshifted, HEAD_GROUP, BM: tl.constexpr, GATHER: tl.constexpr
):
    """What a query-major program (the forward, the dq backward) works on: (batch * head, batch, query head, kv head,
    its SF shift, then `_query_tile`'s rows and in-range mask, the rows' positions among the keys, the first / last)."""
    bh, t = _launch_order(tl.cdiv(Sq, BM), HEAD_GROUP)
    b = (bh // Hq).to(tl.int64)
    h = bh % Hq
    kvh = (h // kv_group).to(tl.int64)
    shift = (h >= n_unshifted).to(tl.int32) * (G // 2)
    q_offset = Sk - Sq
    offs_m, row_in, P0, P1 = _query_tile(ROWS, RANK, bh, t, Sq, q_offset, Sk, BM, GATHER)
    return bh, b, h, kvh, shift, offs_m, row_in, q_offset + offs_m, P0, P1


@triton.jit
def _fwd_tiles(
    acc, lab_acc, m_i, l_i, q, k_base, v_base, PAD, DOC, LAB, b, pos, row_ok, q_doc, start, stop,
    skn, svn, Sk, shift, G, W, SINKS, qk_scale, cap2, score_rows, row_in,
    D: tl.constexpr, DP: tl.constexpr, BN: tl.constexpr, KIND: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_PAD: tl.constexpr, HAS_DOC: tl.constexpr, HAS_LABELS: tl.constexpr, LP: tl.constexpr,
    IEEE: tl.constexpr, SOFTCAP: tl.constexpr, SAVE_SCORES: tl.constexpr,
    MASKED: tl.constexpr,
):  # fmt: skip
    """Online-softmax update over key tiles [start, stop); MASKED=False tiles are known to be fully allowed.
    SAVE_SCORES: each score (base 2, -inf where masked) also goes to score_rows + key, for key_mass in decode."""
    offs_d = tl.arange(0, DP)
    for n0 in range(start, stop, BN):
        offs_n = n0 + tl.arange(0, BN)
        col_in = offs_n < Sk
        k = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None], mask=col_in[None, :] & (offs_d[:, None] < D),
                    other=0.0)  # fmt: skip
        qk = _dot(q, k, None, IEEE)  # unscaled: the scale goes into the row maximum and one FMA below
        row_scale = qk_scale
        if SOFTCAP:  # the cap is not linear: every score is scaled and capped first
            qk = _scores2(qk, qk_scale, cap2, SOFTCAP)
            row_scale = 1.0
        if HAS_PAD:
            k_real = tl.load(PAD + b * Sk + offs_n, mask=col_in, other=0) != 0
        if MASKED:
            mask = _pattern_mask(pos[:, None], offs_n[None, :], shift, G, W, SINKS, KIND, CAUSAL)
            mask = mask & col_in[None, :] & row_ok[:, None]
            if HAS_PAD:
                mask = mask & k_real[None, :]
            if HAS_DOC:
                k_doc = tl.load(DOC + b * Sk + offs_n, mask=col_in, other=-2)
                mask = mask & (q_doc[:, None] == k_doc[None, :])
            qk = tl.where(mask, qk, float("-inf"))
        elif HAS_PAD:
            qk = tl.where(k_real[None, :], qk, float("-inf"))
        if SAVE_SCORES:
            tl.store(score_rows + offs_n[None, :], qk * row_scale, mask=row_in[:, None] & col_in[None, :])
        m_new = tl.maximum(m_i, tl.max(qk, 1) * row_scale)
        m_safe = m_new
        if MASKED or HAS_PAD:  # a row may have seen no allowed key yet
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk * row_scale - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :], mask=col_in[:, None] & (offs_d[None, :] < D),
                    other=0.0)  # fmt: skip
        acc = _dot(p, v, acc * alpha[:, None], IEEE)
        if HAS_LABELS:
            lab = tl.load(LAB + b * Sk + offs_n, mask=col_in, other=-1)
            onehot = (lab[:, None] == tl.arange(0, LP)[None, :]).to(v.dtype)
            lab_acc = _dot(p, onehot, lab_acc * alpha[:, None], IEEE)
        m_i = m_new
    return acc, lab_acc, m_i, l_i


@direct_launch
@triton.jit
def _fwd_kernel(
    Q, K, V, Out, LSE, PAD, DOC, GATE, LAB, LMASS, ROWS, RANK, SCORES,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
    Hq, Sq, Sk, kv_group, qk_scale, cap2, G, W, SINKS, n_unshifted, HEAD_GROUP,
    D: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, KIND: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, HAS_DOC: tl.constexpr, HAS_GATE: tl.constexpr,
    HAS_LABELS: tl.constexpr, NUM_LABELS: tl.constexpr, LP: tl.constexpr,
    IEEE: tl.constexpr, SOFTCAP: tl.constexpr, GATHER: tl.constexpr, SAVE_SCORES: tl.constexpr,
):  # fmt: skip
    bh, b, h, kvh, shift, offs_m, row_in, pos, P0, P1 = _query_program(
        ROWS, RANK, Hq, Sq, Sk, kv_group, G, n_unshifted, HEAD_GROUP, BM, GATHER
    )
    offs_d = tl.arange(0, DP)

    q = tl.load(
        Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :],
        mask=row_in[:, None] & (offs_d[None, :] < D),
        other=0.0,
    )
    row_ok = row_in
    if HAS_PAD:
        row_ok = row_ok & (tl.load(PAD + b * Sk + pos, mask=row_in, other=0) != 0)
    # gated-off rows are computed with the others (in unmasked tiles too) and dropped at the end: masking them would
    # send every tile with one zero gate down the masked path, which per-token routing does to almost every tile
    gated_on = row_ok
    if HAS_GATE:
        gate = tl.load(GATE + b * Sq * Hq + offs_m * Hq + h, mask=row_in, other=0.0).to(tl.float32)
        gated_on = row_ok & (gate != 0)
    q_doc = pos
    if HAS_DOC:
        q_doc = tl.load(DOC + b * Sk + pos, mask=row_in, other=-1)
    rows_all_ok = tl.min((row_ok | ~row_in).to(tl.int32), 0) > 0
    any_row = tl.max(gated_on.to(tl.int32), 0) > 0

    lo, hi = _key_range(P0, P1, Sk, shift, G, W, KIND, CAUSAL)
    hi = tl.where(any_row, hi, 0)  # tiles of padding / zero gates do no work
    lo_block = lo // BN * BN
    sink_hi = tl.minimum(tl.minimum(SINKS, lo_block), hi)
    f_lo, f_hi = _full_keys(P0, P1, lo_block, hi, Sk, shift, G, W, BN, KIND, CAUSAL)
    if HAS_DOC:  # document boundaries can cut any tile
        f_hi = f_lo
    f_hi = tl.where(rows_all_ok, f_hi, f_lo)

    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, DP], tl.float32)
    lab_acc = tl.zeros([BM, LP], tl.float32)
    k_base = K + b * skb + kvh * skh
    v_base = V + b * svb + kvh * svh
    score_rows = SCORES + (bh.to(tl.int64) * Sq + offs_m[:, None]) * Sk  # read only with SAVE_SCORES
    # sink tiles left of the group, masked tiles before the fully allowed ones, those unmasked, masked ones after
    acc, lab_acc, m_i, l_i = _fwd_tiles(
        acc, lab_acc, m_i, l_i, q, k_base, v_base, PAD, DOC, LAB, b, pos, row_ok, q_doc, 0, sink_hi,
        skn, svn, Sk, shift, G, W, SINKS, qk_scale, cap2, score_rows, row_in, D, DP, BN, KIND, CAUSAL, HAS_PAD, HAS_DOC,
        HAS_LABELS, LP, IEEE, SOFTCAP, SAVE_SCORES, True,
    )  # fmt: skip
    acc, lab_acc, m_i, l_i = _fwd_tiles(
        acc, lab_acc, m_i, l_i, q, k_base, v_base, PAD, DOC, LAB, b, pos, row_ok, q_doc, lo_block, f_lo,
        skn, svn, Sk, shift, G, W, SINKS, qk_scale, cap2, score_rows, row_in, D, DP, BN, KIND, CAUSAL, HAS_PAD, HAS_DOC,
        HAS_LABELS, LP, IEEE, SOFTCAP, SAVE_SCORES, True,
    )  # fmt: skip
    acc, lab_acc, m_i, l_i = _fwd_tiles(
        acc, lab_acc, m_i, l_i, q, k_base, v_base, PAD, DOC, LAB, b, pos, row_ok, q_doc, f_lo, f_hi,
        skn, svn, Sk, shift, G, W, SINKS, qk_scale, cap2, score_rows, row_in, D, DP, BN, KIND, CAUSAL, HAS_PAD, HAS_DOC,
        HAS_LABELS, LP, IEEE, SOFTCAP, SAVE_SCORES, False,
    )  # fmt: skip
    acc, lab_acc, m_i, l_i = _fwd_tiles(
        acc, lab_acc, m_i, l_i, q, k_base, v_base, PAD, DOC, LAB, b, pos, row_ok, q_doc, f_hi, hi,
        skn, svn, Sk, shift, G, W, SINKS, qk_scale, cap2, score_rows, row_in, D, DP, BN, KIND, CAUSAL, HAS_PAD, HAS_DOC,
        HAS_LABELS, LP, IEEE, SOFTCAP, SAVE_SCORES, True,
    )  # fmt: skip

    live = (l_i > 0) & gated_on
    l_safe = tl.where(live, l_i, 1.0)
    out = acc / l_safe[:, None]  # gated-off rows: acc is finite and the gate is 0
    if HAS_GATE:
        out = out * gate[:, None]
    lse = tl.where(live, (m_i + tl.math.log2(l_safe)) * JIT_LN2, float("-inf"))
    tl.store(
        Out + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :],
        out.to(Out.dtype.element_ty),
        mask=row_in[:, None] & (offs_d[None, :] < D),
    )
    tl.store(LSE + bh.to(tl.int64) * Sq + offs_m, lse, mask=row_in)
    if HAS_LABELS:
        offs_l = tl.arange(0, LP)
        lab_ptr = LMASS + (bh.to(tl.int64) * Sq + offs_m[:, None]) * NUM_LABELS + offs_l[None, :]
        lab = tl.where(live[:, None], lab_acc / l_safe[:, None], 0.0)
        tl.store(lab_ptr, lab, mask=row_in[:, None] & (offs_l[None, :] < NUM_LABELS))


@triton.jit
def _key_columns(PAD, DOC, b, offs_n, Sk, HAS_PAD: tl.constexpr, HAS_DOC: tl.constexpr):
    """A key-major program's keys: (in range, may be attended (in range, not padding), document id, or the position
    without packing; -2 out of range, never a query's document)."""
    col_in = offs_n < Sk
    col_ok = col_in
    if HAS_PAD:
        col_ok = col_ok & (tl.load(PAD + b * Sk + offs_n, mask=col_in, other=0) != 0)
    k_doc = offs_n
    if HAS_DOC:
        k_doc = tl.load(DOC + b * Sk + offs_n, mask=col_in, other=-2)
    return col_in, col_ok, k_doc


@triton.jit
def _key_mass_tiles(
    mass, k, Q, LSE, DOC, b, h, bh, offs_n, col_ok, k_doc, start, stop,
    sqb, sqh, sqm, Sq, Sk, q_offset, shift, G, W, SINKS, qk_scale, cap2,
    D: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr, KIND: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_DOC: tl.constexpr, IEEE: tl.constexpr, SOFTCAP: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """Adds the probabilities of query tiles [start, stop) to `mass` (BM, BN), recomputed from the final lse; the
    caller sums it over queries once (a sum over the query axis per tile costs a cross-warp reduction each time)."""
    offs_d = tl.arange(0, DP)
    for m0 in range(start, stop, BM):
        offs_m = m0 + tl.arange(0, BM)
        row_in = offs_m < Sq
        pos = q_offset + offs_m
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :],
                    mask=row_in[:, None] & (offs_d[None, :] < D), other=0.0)  # fmt: skip
        lse = tl.load(LSE + bh.to(tl.int64) * Sq + offs_m, mask=row_in, other=float("-inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * JIT_LOG2E)  # dead rows give p = 0
        p = tl.math.exp2(_scores2(_dot(q, k, None, IEEE), qk_scale, cap2, SOFTCAP) - lse2[:, None])
        if MASKED:
            mask = _pattern_mask(pos[:, None], offs_n[None, :], shift, G, W, SINKS, KIND, CAUSAL) & col_ok[None, :]
            if HAS_DOC:
                q_doc = tl.load(DOC + b * Sk + pos, mask=row_in, other=-1)
                mask = mask & (q_doc[:, None] == k_doc[None, :])
            p = tl.where(mask, p, 0.0)
        mass += p
    return mass


@direct_launch
@triton.jit
def _key_mass_kernel(
    Q, K, LSE, PAD, DOC, MASS,
    sqb, sqh, sqm, skb, skh, skn,
    Hq, Sq, Sk, kv_group, qk_scale, cap2, G, W, SINKS, n_unshifted, HEAD_GROUP,
    D: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, KIND: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, HAS_DOC: tl.constexpr, IEEE: tl.constexpr, SOFTCAP: tl.constexpr,
):  # fmt: skip
    bh, pid_n = _launch_order(tl.cdiv(Sk, BN), HEAD_GROUP)  # causal: the first key tiles are the longest
    b = (bh // Hq).to(tl.int64)
    h = bh % Hq
    kvh = (h // kv_group).to(tl.int64)
    q_offset = Sk - Sq
    shift = (h >= n_unshifted).to(tl.int32) * (G // 2)
    n0 = pid_n * BN
    n1 = tl.minimum(n0 + BN, Sk) - 1
    offs_n = n0 + tl.arange(0, BN)
    offs_d = tl.arange(0, DP)
    col_in, col_ok, k_doc = _key_columns(PAD, DOC, b, offs_n, Sk, HAS_PAD, HAS_DOC)
    k = tl.load(
        K + b * skb + kvh * skh + offs_n[None, :] * skn + offs_d[:, None],
        mask=col_in[None, :] & (offs_d[:, None] < D),
        other=0.0,
    )
    p_lo, p_hi = _query_range(n0, n1, Sk, shift, G, W, SINKS, KIND, CAUSAL)
    m_lo = tl.maximum(p_lo - q_offset, 0) // BM * BM
    m_hi = tl.minimum(p_hi - q_offset, Sq)
    f_lo, f_hi = _full_queries(n0, n0 + BN - 1, m_lo, m_hi, Sk, q_offset, shift, G, W, SINKS, BM, KIND, CAUSAL)
    if HAS_PAD | HAS_DOC:
        f_hi = f_lo
    mass = tl.zeros([BM, BN], tl.float32)
    mass = _key_mass_tiles(
        mass, k, Q, LSE, DOC, b, h, bh, offs_n, col_ok, k_doc, m_lo, f_lo, sqb, sqh, sqm, Sq, Sk, q_offset, shift, G,
        W, SINKS, qk_scale, cap2, D, DP, BM, KIND, CAUSAL, HAS_DOC, IEEE, SOFTCAP, True,
    )  # fmt: skip
    mass = _key_mass_tiles(
        mass, k, Q, LSE, DOC, b, h, bh, offs_n, col_ok, k_doc, f_lo, f_hi, sqb, sqh, sqm, Sq, Sk, q_offset, shift, G,
        W, SINKS, qk_scale, cap2, D, DP, BM, KIND, CAUSAL, HAS_DOC, IEEE, SOFTCAP, False,
    )  # fmt: skip
    mass = _key_mass_tiles(
        mass, k, Q, LSE, DOC, b, h, bh, offs_n, col_ok, k_doc, f_hi, m_hi, sqb, sqh, sqm, Sq, Sk, q_offset, shift, G,
        W, SINKS, qk_scale, cap2, D, DP, BM, KIND, CAUSAL, HAS_DOC, IEEE, SOFTCAP, True,
    )  # fmt: skip
    tl.store(MASS + bh.to(tl.int64) * Sk + offs_n, tl.sum(mass, 0), mask=col_in)


@triton.jit
def _dkdv_tiles(
    dk, dv, k, v, Q, DO, LSE, DELTA, DOC, ROWS, b, h, bh, offs_n, col_ok, k_doc, start, stop,
    sqb, sqh, sqm, sdob, sdoh, sdom, Sq, Sk, q_offset, shift, G, W, SINKS, qk_scale, cap2,
    D: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr, KIND: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_DOC: tl.constexpr, IEEE: tl.constexpr, SOFTCAP: tl.constexpr, MASKED: tl.constexpr, GATHER: tl.constexpr,
):  # fmt: skip
    """Accumulates dk, dv of one key tile over query tiles [start, stop) of query head h (GATHER: slots of its
    routed rows, each loop's last tile cut at stop)."""
    offs_d = tl.arange(0, DP)
    for m0 in range(start, stop, BM):
        if GATHER:
            slot = m0 + tl.arange(0, BM)
            row_in = slot < stop
            offs_m = tl.load(ROWS + bh * Sq + slot, mask=row_in, other=0)
        else:
            offs_m = m0 + tl.arange(0, BM)
            row_in = offs_m < Sq
        pos = q_offset + offs_m
        lse = tl.load(LSE + bh * Sq + offs_m, mask=row_in, other=float("-inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * JIT_LOG2E)
        row_mask = row_in[:, None] & (offs_d[None, :] < D)
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :], mask=row_mask, other=0.0)
        do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdom + offs_d[None, :], mask=row_mask, other=0.0)
        delta = tl.load(DELTA + bh * Sq + offs_m, mask=row_in, other=0.0)
        sT = _scores2(_dot(k, tl.trans(q), None, IEEE), qk_scale, cap2, SOFTCAP)
        pT = tl.math.exp2(sT - lse2[None, :])
        if MASKED:
            maskT = _pattern_mask(pos[None, :], offs_n[:, None], shift, G, W, SINKS, KIND, CAUSAL) & col_ok[:, None]
            if HAS_DOC:
                q_doc = tl.load(DOC + b * Sk + pos, mask=row_in, other=-1)
                maskT = maskT & (k_doc[:, None] == q_doc[None, :])
            pT = tl.where(maskT, pT, 0.0)
        dv = _dot(pT, do, dv, IEEE)
        dpT = _dot(v, tl.trans(do), None, IEEE)
        dsT = _softcap_grad(pT * (dpT - delta[None, :]), sT, cap2, SOFTCAP)
        dk = _dot(dsT, q, dk, IEEE)
    return dk, dv


@triton.jit
def _key_tile(
    K, V, PAD, DOC, b, kvh, offs_n, offs_d, skb, skh, skn, svb, svh, svn, Sk,
    D: tl.constexpr, HAS_PAD: tl.constexpr, HAS_DOC: tl.constexpr,
):  # fmt: skip
    """A backward program's key tile: (k, v, their load mask, keys that may be attended (in range, not padding), each
    key's document id, or its position without packing)."""
    col_in, col_ok, k_doc = _key_columns(PAD, DOC, b, offs_n, Sk, HAS_PAD, HAS_DOC)
    kv_mask = col_in[:, None] & (offs_d[None, :] < D)
    k = tl.load(K + b * skb + kvh * skh + offs_n[:, None] * skn + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b * svb + kvh * svh + offs_n[:, None] * svn + offs_d[None, :], mask=kv_mask, other=0.0)
    return k, v, kv_mask, col_ok, k_doc


@direct_launch
@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, PAD, DOC, ROWS, RANK, DK, DV, PART_K, PART_V,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom,
    Hq, Hkv, Sq, Sk, kv_group, qk_scale, scale, cap2, G, W, SINKS, n_unshifted, HEAD_GROUP, n_chunks,
    HEAD_SPLIT, split_stride,
    D: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, KIND: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, HAS_DOC: tl.constexpr,
    IEEE: tl.constexpr, SOFTCAP: tl.constexpr, GATHER: tl.constexpr, SINK_SPLIT: tl.constexpr,
):  # fmt: skip
    """dK, dV of one key tile. SINK_SPLIT: a tile holding sink keys, which every later query sees, was summed in chunks
    of queries by `_bwd_dkdv_sinks_kernel` (PART_K, PART_V); this program only adds the chunks up. HEAD_SPLIT > 1:
    the tile's query heads are shared out over HEAD_SPLIT programs side by side, each writing its partial sums to
    DK, DV + part * split_stride (fp32), which the host adds up."""
    pid = tl.program_id(0)
    part = pid % HEAD_SPLIT
    bkv, pid_n = _launch_order_of(pid // HEAD_SPLIT, tl.num_programs(0) // HEAD_SPLIT, tl.cdiv(Sk, BN), HEAD_GROUP)
    b = (bkv // Hkv).to(tl.int64)
    kvh = (bkv % Hkv).to(tl.int64)
    q_offset = Sk - Sq
    n0 = pid_n * BN
    n1 = tl.minimum(n0 + BN, Sk) - 1
    offs_n = n0 + tl.arange(0, BN)
    offs_d = tl.arange(0, DP)
    k, v, kv_mask, col_ok, k_doc = _key_tile(
        K, V, PAD, DOC, b, kvh, offs_n, offs_d, skb, skh, skn, svb, svh, svn, Sk, D, HAS_PAD, HAS_DOC
    )
    dk = tl.zeros([BN, DP], tl.float32)
    dv = tl.zeros([BN, DP], tl.float32)
    per_part = kv_group // HEAD_SPLIT
    first, stop = part * per_part, part * per_part + per_part
    if SINK_SPLIT:  # noqa: SIM102 (compiled out without the split; the inner test runs per program)
        if n0 < SINKS:
            stop = first
            chunk = ((bkv * tl.cdiv(SINKS, BN) + pid_n) * n_chunks * BN + offs_n[:, None] - n0) * DP + offs_d[None, :]
            for c in range(n_chunks):
                dk += tl.load(PART_K + chunk + c * BN * DP)
                dv += tl.load(PART_V + chunk + c * BN * DP)
    for hh in range(first, stop):
        h = kvh * kv_group + hh
        bh = b * Hq + h
        shift = (h >= n_unshifted).to(tl.int32) * (G // 2)
        p_lo, p_hi = _query_range(n0, n1, Sk, shift, G, W, SINKS, KIND, CAUSAL)
        m_lo = tl.maximum(p_lo - q_offset, 0) // BM * BM
        m_hi = tl.minimum(p_hi - q_offset, Sq)
        f_lo, f_hi = _full_queries(n0, n0 + BN - 1, m_lo, m_hi, Sk, q_offset, shift, G, W, SINKS, BM, KIND, CAUSAL)
        if HAS_PAD | HAS_DOC:
            f_hi = f_lo
        if GATHER:  # the same bounds as slots among this head's routed rows (rank is monotone)
            rank = RANK + bh * (Sq + 1)
            m_lo = tl.load(rank + tl.minimum(tl.maximum(m_lo, 0), Sq))
            f_lo = tl.load(rank + tl.minimum(tl.maximum(f_lo, 0), Sq))
            f_hi = tl.load(rank + tl.minimum(tl.maximum(f_hi, 0), Sq))
            m_hi = tl.load(rank + tl.minimum(tl.maximum(m_hi, 0), Sq))
        dk, dv = _dkdv_tiles(
            dk, dv, k, v, Q, DO, LSE, DELTA, DOC, ROWS, b, h, bh, offs_n, col_ok, k_doc, m_lo, f_lo,
            sqb, sqh, sqm, sdob, sdoh, sdom, Sq, Sk, q_offset, shift, G, W, SINKS, qk_scale, cap2,
            D, DP, BM, KIND, CAUSAL, HAS_DOC, IEEE, SOFTCAP, True, GATHER,
        )  # fmt: skip
        dk, dv = _dkdv_tiles(
            dk, dv, k, v, Q, DO, LSE, DELTA, DOC, ROWS, b, h, bh, offs_n, col_ok, k_doc, f_lo, f_hi,
            sqb, sqh, sqm, sdob, sdoh, sdom, Sq, Sk, q_offset, shift, G, W, SINKS, qk_scale, cap2,
            D, DP, BM, KIND, CAUSAL, HAS_DOC, IEEE, SOFTCAP, False, GATHER,
        )  # fmt: skip
        dk, dv = _dkdv_tiles(
            dk, dv, k, v, Q, DO, LSE, DELTA, DOC, ROWS, b, h, bh, offs_n, col_ok, k_doc, f_hi, m_hi,
            sqb, sqh, sqm, sdob, sdoh, sdom, Sq, Sk, q_offset, shift, G, W, SINKS, qk_scale, cap2,
            D, DP, BM, KIND, CAUSAL, HAS_DOC, IEEE, SOFTCAP, True, GATHER,
        )  # fmt: skip
    out_off = part.to(tl.int64) * split_stride + bkv.to(tl.int64) * Sk * D + offs_n[:, None] * D + offs_d[None, :]
    tl.store(DK + out_off, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


@direct_launch
@triton.jit
def _bwd_dkdv_sinks_kernel(
    Q, K, V, DO, LSE, DELTA, PAD, DOC, PART_K, PART_V,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom,
    Hq, Hkv, Sq, Sk, kv_group, qk_scale, cap2, G, W, SINKS, n_unshifted, n_chunks, CHUNK,
    D: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, KIND: tl.constexpr,
    HAS_PAD: tl.constexpr, HAS_DOC: tl.constexpr, IEEE: tl.constexpr, SOFTCAP: tl.constexpr,
):  # fmt: skip
    """Causal dK, dV of the key tiles holding sinks, each over one chunk of CHUNK query rows: every query after a sink
    sees it, so one program per tile would loop over all Sq rows for each head of its group while the other tiles
    loop over one group of rows; the chunks run side by side. Writes fp32 partial sums (dK unscaled) to PART_K, PART_V
    [B * Hkv, sink tiles, n_chunks, BN, DP], which `_bwd_dkdv_kernel` adds up."""
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(SINKS, BN)
    c = pid % n_chunks
    pid_n = pid // n_chunks % n_tiles
    bkv = pid // (n_chunks * n_tiles)
    b = (bkv // Hkv).to(tl.int64)
    kvh = (bkv % Hkv).to(tl.int64)
    q_offset = Sk - Sq
    n0 = pid_n * BN
    offs_n = n0 + tl.arange(0, BN)
    offs_d = tl.arange(0, DP)
    k, v, _, col_ok, k_doc = _key_tile(
        K, V, PAD, DOC, b, kvh, offs_n, offs_d, skb, skh, skn, svb, svh, svn, Sk, D, HAS_PAD, HAS_DOC
    )
    start = tl.maximum(tl.maximum(n0 - q_offset, 0) // BM * BM, c * CHUNK)  # causal: queries from the tile on
    stop = tl.minimum(c * CHUNK + CHUNK, Sq)
    dk = tl.zeros([BN, DP], tl.float32)
    dv = tl.zeros([BN, DP], tl.float32)
    for hh in range(kv_group):
        h = kvh * kv_group + hh
        shift = (h >= n_unshifted).to(tl.int32) * (G // 2)
        dk, dv = _dkdv_tiles(
            dk, dv, k, v, Q, DO, LSE, DELTA, DOC, LSE, b, h, b * Hq + h, offs_n, col_ok, k_doc, start, stop,
            sqb, sqh, sqm, sdob, sdoh, sdom, Sq, Sk, q_offset, shift, G, W, SINKS, qk_scale, cap2,
            D, DP, BM, KIND, True, HAS_DOC, IEEE, SOFTCAP, True, False,
        )  # fmt: skip
    out_off = (pid * BN + offs_n[:, None] - n0) * DP + offs_d[None, :]
    tl.store(PART_K + out_off, dk)
    tl.store(PART_V + out_off, dv)


@triton.jit
def _dq_tiles(
    dq, q, do, lse2, delta, k_base, v_base, PAD, DOC, b, pos, q_doc, start, stop,
    skn, svn, Sk, shift, G, W, SINKS, qk_scale, cap2,
    D: tl.constexpr, DP: tl.constexpr, BN: tl.constexpr, KIND: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_PAD: tl.constexpr, HAS_DOC: tl.constexpr, IEEE: tl.constexpr, SOFTCAP: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """Accumulates dq of one query tile over key tiles [start, stop)."""
    offs_d = tl.arange(0, DP)
    for n0 in range(start, stop, BN):
        offs_n = n0 + tl.arange(0, BN)
        col_in = offs_n < Sk
        kv_mask = col_in[:, None] & (offs_d[None, :] < D)
        k = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :], mask=kv_mask, other=0.0)
        s2 = _scores2(_dot(q, tl.trans(k), None, IEEE), qk_scale, cap2, SOFTCAP)
        p = tl.math.exp2(s2 - lse2[:, None])
        if MASKED:
            mask = _pattern_mask(pos[:, None], offs_n[None, :], shift, G, W, SINKS, KIND, CAUSAL) & col_in[None, :]
            if HAS_PAD:
                mask = mask & (tl.load(PAD + b * Sk + offs_n, mask=col_in, other=0) != 0)[None, :]
            if HAS_DOC:
                k_doc = tl.load(DOC + b * Sk + offs_n, mask=col_in, other=-2)
                mask = mask & (q_doc[:, None] == k_doc[None, :])
            p = tl.where(mask, p, 0.0)
        dp = _dot(do, tl.trans(v), None, IEEE)
        ds = _softcap_grad(p * (dp - delta[:, None]), s2, cap2, SOFTCAP)
        dq = _dot(ds, k, dq, IEEE)
    return dq


@direct_launch
@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, PAD, DOC, ROWS, RANK, DQ,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom,
    Hq, Sq, Sk, kv_group, qk_scale, scale, cap2, G, W, SINKS, n_unshifted, HEAD_GROUP,
    D: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, KIND: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, HAS_DOC: tl.constexpr,
    IEEE: tl.constexpr, SOFTCAP: tl.constexpr, GATHER: tl.constexpr,
):  # fmt: skip
    bh, b, h, kvh, shift, offs_m, row_in, pos, P0, P1 = _query_program(
        ROWS, RANK, Hq, Sq, Sk, kv_group, G, n_unshifted, HEAD_GROUP, BM, GATHER
    )
    offs_d = tl.arange(0, DP)
    row_mask = row_in[:, None] & (offs_d[None, :] < D)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :], mask=row_mask, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdom + offs_d[None, :], mask=row_mask, other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * Sq + offs_m, mask=row_in, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * JIT_LOG2E)
    delta = tl.load(DELTA + bh.to(tl.int64) * Sq + offs_m, mask=row_in, other=0.0)
    q_doc = pos
    if HAS_DOC:
        q_doc = tl.load(DOC + b * Sk + pos, mask=row_in, other=-1)

    lo, hi = _key_range(P0, P1, Sk, shift, G, W, KIND, CAUSAL)
    hi = tl.where(tl.max(lse, 0) > float("-inf"), hi, 0)
    lo_block = lo // BN * BN
    sink_hi = tl.minimum(tl.minimum(SINKS, lo_block), hi)
    f_lo, f_hi = _full_keys(P0, P1, lo_block, hi, Sk, shift, G, W, BN, KIND, CAUSAL)
    if HAS_PAD | HAS_DOC:
        f_hi = f_lo
    dq = tl.zeros([BM, DP], tl.float32)
    k_base = K + b * skb + kvh * skh
    v_base = V + b * svb + kvh * svh
    dq = _dq_tiles(
        dq, q, do, lse2, delta, k_base, v_base, PAD, DOC, b, pos, q_doc, 0, sink_hi,
        skn, svn, Sk, shift, G, W, SINKS, qk_scale, cap2, D, DP, BN, KIND, CAUSAL, HAS_PAD, HAS_DOC, IEEE, SOFTCAP, True,
    )  # fmt: skip
    dq = _dq_tiles(
        dq, q, do, lse2, delta, k_base, v_base, PAD, DOC, b, pos, q_doc, lo_block, f_lo,
        skn, svn, Sk, shift, G, W, SINKS, qk_scale, cap2, D, DP, BN, KIND, CAUSAL, HAS_PAD, HAS_DOC, IEEE, SOFTCAP, True,
    )  # fmt: skip
    dq = _dq_tiles(
        dq, q, do, lse2, delta, k_base, v_base, PAD, DOC, b, pos, q_doc, f_lo, f_hi,
        skn, svn, Sk, shift, G, W, SINKS, qk_scale, cap2, D, DP, BN, KIND, CAUSAL, HAS_PAD, HAS_DOC, IEEE, SOFTCAP, False,
    )  # fmt: skip
    dq = _dq_tiles(
        dq, q, do, lse2, delta, k_base, v_base, PAD, DOC, b, pos, q_doc, f_hi, hi,
        skn, svn, Sk, shift, G, W, SINKS, qk_scale, cap2, D, DP, BN, KIND, CAUSAL, HAS_PAD, HAS_DOC, IEEE, SOFTCAP, True,
    )  # fmt: skip
    tl.store(
        DQ + bh.to(tl.int64) * Sq * D + offs_m[:, None] * D + offs_d[None, :],
        (dq * scale).to(DQ.dtype.element_ty),
        mask=row_mask,
    )


@direct_launch
@triton.jit
def _bwd_delta_kernel(
    OUT, DO, DELTA, GATE, DGATE, DO_ATT, Sq, Hq, D: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr,
    HAS_GATE: tl.constexpr,
):  # fmt: skip
    """delta = rowsum(dO * O) in fp32 (O and dO contiguous (B, H, Sq, D)); one pass instead of four in PyTorch. Gated
    (gates (B, Sq, H)): the same pass writes the gates' gradient delta / g (0 where g = 0) and dO_att = g dO, the
    gradient of the ungated attention output, which the dK/dV and dQ kernels read (delta is the same for it: the
    gate cancels between g dO and O / g)."""
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    bh = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, DP)
    row_in = offs_m < Sq
    mask = row_in[:, None] & (offs_d[None, :] < D)
    off = bh * Sq * D + offs_m[:, None] * D + offs_d[None, :]
    o = tl.load(OUT + off, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + off, mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    tl.store(DELTA + bh * Sq + offs_m, delta, mask=row_in)
    if HAS_GATE:
        gate_off = (bh // Hq) * Sq * Hq + offs_m * Hq + bh % Hq
        g = tl.load(GATE + gate_off, mask=row_in, other=0.0).to(tl.float32)
        routed = g != 0
        dgate = tl.where(routed, delta / tl.where(routed, g, 1.0), 0.0)
        tl.store(DGATE + gate_off, dgate.to(DGATE.dtype.element_ty), mask=row_in)
        # a product of two 16-bit floats is exact in fp32: this rounds once, as PyTorch's dout * gate does
        tl.store(DO_ATT + off, (do * g[:, None]).to(DO_ATT.dtype.element_ty), mask=mask)


@direct_launch
@triton.jit
def _sum_head_split_kernel(DK_PART, DV_PART, DK, DV, n, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    """dK and dV from the gated backward's per-query-head fp32 partials (SPLIT, n): summed in fp32, cast once."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    dk = tl.zeros([BLOCK], tl.float32)
    dv = tl.zeros([BLOCK], tl.float32)
    for part in tl.static_range(SPLIT):
        dk += tl.load(DK_PART + part * n + offs, mask=valid, other=0.0)
        dv += tl.load(DV_PART + part * n + offs, mask=valid, other=0.0)
    tl.store(DK + offs, dk.to(DK.dtype.element_ty), mask=valid)
    tl.store(DV + offs, dv.to(DV.dtype.element_ty), mask=valid)


@direct_launch
@triton.jit
def _routed_rows_kernel(GATE, ROWS, RANK, Sq, Hq, BLOCK: tl.constexpr):
    """Stream compaction of one (batch, head) by a running prefix count: ROWS gets the rows whose gate is nonzero in
    its first slots, ascending, and the others from its last slot down; RANK[i] is how many routed rows come before
    row i (RANK[Sq]: all of them)."""
    bh = tl.program_id(0).to(tl.int64)
    b = bh // Hq
    h = bh % Hq
    count = tl.full([], 0, tl.int32)
    for m0 in range(0, Sq, BLOCK):
        offs = m0 + tl.arange(0, BLOCK)
        on = (tl.load(GATE + (b * Sq + offs) * Hq + h, mask=offs < Sq, other=0.0) != 0).to(tl.int32)
        before = count + tl.cumsum(on, 0) - on
        slot = tl.where(on != 0, before, Sq - 1 - (offs - before))
        tl.store(ROWS + bh * Sq + slot, offs, mask=offs < Sq)
        tl.store(RANK + bh * (Sq + 1) + offs, before, mask=offs < Sq)
        count += tl.sum(on, 0)
    tl.store(RANK + bh * (Sq + 1) + Sq, count)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    """The smallest power of two >= n, at least MIN_DOT_WIDTH (the narrowest tl.dot operand). Plain Python: Triton's own helpers
    are slower from host code, which runs once per layer and call."""
    return max(MIN_DOT_WIDTH, 1 << (n - 1).bit_length())


def _pattern_args(pattern: AttentionPattern | None, hq: int, sk: int) -> dict:
    pattern = pattern or AttentionPattern.dense()
    return dict(
        G=max(pattern.resolve_group_size(sk), 1),
        W=pattern.window or 1,
        SINKS=pattern.sinks,
        n_unshifted=hq - pattern.num_shifted_heads(hq),
        KIND=_KINDS[pattern.kind],
    )


# (kernel, sparse pattern) -> (BM, BN, num_warps[, num_stages; default 3]) for 16-bit inputs: the fastest of
# `benchmarks/attention_tiles.py`'s sweep on the H200 at 16k tokens (benchmarks/results/attention_tiles*.md, the mass
# kernel's in RESULTS.md); sparse = s2, sf or window.
_TILES_D128 = {
    ("fwd", False): (128, 128, 8), ("fwd", True): (128, 64, 8), ("mass", False): (64, 128, 8),
    ("mass", True): (64, 64, 4, 2), ("dkdv", False): (64, 128, 8), ("dkdv", True): (32, 64, 4),
    ("dq", False): (128, 64, 8), ("dq", True): (128, 64, 8),
}  # fmt: skip
_TILES_D64 = {
    ("fwd", False): (64, 64, 4), ("fwd", True): (128, 64, 4), ("mass", False): (64, 128, 8),
    ("mass", True): (64, 128, 8), ("dkdv", False): (64, 64, 4), ("dkdv", True): (32, 64, 4),
    ("dq", False): (128, 64, 4), ("dq", True): (64, 32, 4),
}  # fmt: skip
SWEPT_MAX_HEAD_DIM = 128  # the sweep's tiles serve 16-bit inputs up to this head_dim
DEFAULT_NUM_STAGES = 3  # a swept entry without its own
LABELS_MAX_BN = 64  # key-tile width with key labels at D=128: the one-hot label tile needs the shared memory
# Elsewhere (fp32, head_dim > 128) tiles small enough for registers and shared memory, in fewer pipeline stages:
FALLBACK_TILES = {"fwd": (64, 32), "mass": (32, 64), "dkdv": (16, 64), "dq": (64, 16)}  # (BM, BN)
FALLBACK_NUM_STAGES = 2
FALLBACK_NUM_WARPS = 4
FALLBACK_NUM_WARPS_WIDE = 8  # head_dim >= 128, and the mass kernel at any head_dim
BWD_DELTA_BM = 64  # query rows per program of the backward's delta = rowsum(dO * O) kernel
SUM_SPLIT_BLOCK = 1024  # elements per program of the gated backward's dK/dV partials sum
ROUTED_ROWS_BLOCK = 1024  # rows per step of the routed-rows scan (one program per (batch, head))
KEY_MASS_SCORE_ROWS = 16  # key_mass from the forward's saved scores up to this many queries (decode), else a pass
SINK_CHUNK_ROWS = 1024  # query rows per program of the sink tiles' dK, dV (`_bwd_dkdv_sinks_kernel`); a multiple of BM


def _blocks(kernel: str, sq: int, d: int, dtype: torch.dtype, sparse: bool, labels: bool = False) -> dict:
    """Tile sizes: swept ones for 16-bit head_dim <= 128, smaller ones where registers / shared memory run out."""
    if _interpreting():
        return dict(BM=INTERPRET_TILE, BN=INTERPRET_TILE)
    small_m = _pow2(sq)
    if d <= SWEPT_MAX_HEAD_DIM and dtype != torch.float32:
        bm, bn, warps, *stages = (_TILES_D64 if d <= 64 else _TILES_D128)[kernel, sparse]
        if labels:  # the one-hot label tile needs shared memory that 128-wide key tiles at D=128 leave no room for
            bn = min(bn, LABELS_MAX_BN)
        return dict(
            BM=min(bm, small_m), BN=bn, num_warps=warps, num_stages=stages[0] if stages else DEFAULT_NUM_STAGES
        )
    wide = kernel == "mass" or d >= 128
    bm, bn = FALLBACK_TILES[kernel]
    warps = FALLBACK_NUM_WARPS_WIDE if wide else FALLBACK_NUM_WARPS
    return dict(BM=min(bm, small_m), BN=bn, num_warps=warps, num_stages=FALLBACK_NUM_STAGES)


# K and V bytes one launch group of heads reads (`_launch_order`): about two thirds of the H200's 50 MiB L2. All heads
# in one group ran the dense forward 5-10% faster at 4k tokens and 5-8% slower at 16k-32k with 32 heads of 128
# (K/V of 256-512 MiB); timed with this budget in RESULTS.md.
_GROUP_KV_BYTES = 32 * 2**20


def _head_group(n_heads: int, heads_per_kv: int, k: torch.Tensor) -> int:
    """Heads per launch group: the query heads of as many kv heads as keep their K and V within _GROUP_KV_BYTES."""
    kv_bytes = 2 * k.shape[2] * k.shape[3] * k.element_size()
    return min(n_heads, max(1, _GROUP_KV_BYTES // kv_bytes) * heads_per_kv)


def _empty(shape, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Every kernel output is allocated here (tests poison it with NaN to catch elements a kernel leaves unwritten)."""
    return torch.empty(shape, device=like.device, dtype=dtype or like.dtype)


def _routed_rows(head_gates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows (B, Hq, Sq) int32: a permutation of each head's query rows, those with a nonzero gate ascending in its
    first count slots, the others after them; rank (B, Hq, Sq + 1) int32: the slot of routed row i, i.e. how many
    routed rows precede it; rank[..., Sq] = count). Query tiles then hold routed rows only, and the tiles past them
    write the other rows' empty results (nothing is pre-filled). One kernel: with a stable argsort instead, gated
    attention at 4k tokens ran slower than dense on the H200 (RESULTS.md)."""
    b, sq, hq = head_gates.shape
    rows = _empty((b, hq, sq), head_gates, torch.int32)
    rank = _empty((b, hq, sq + 1), head_gates, torch.int32)
    _routed_rows_kernel[(b * hq,)](
        head_gates, rows, rank, sq, hq, BLOCK=INTERPRET_TILE if _interpreting() else ROUTED_ROWS_BLOCK
    )
    return rows, rank


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _forward(q, k, v, head_gates, opts):
    """The forward's launches: ((out, lse, key_mass or None, label_mass or None), what the backward needs)."""
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    dp = _pow2(d)
    pat = _pattern_args(opts["pattern"], hq, sk)
    pad, doc, labels = opts["pad"], opts["doc"], opts["labels"]
    num_labels = opts["num_labels"] or 1
    ieee = q.dtype == torch.float32
    dummy = q.new_empty(1, dtype=torch.int32)
    softcap = opts["softcap"]
    flags = dict(D=d, DP=dp, CAUSAL=opts["causal"], HAS_PAD=pad is not None, HAS_DOC=doc is not None, IEEE=ieee, **pat)
    flags["SOFTCAP"] = softcap is not None
    cap2 = softcap * LOG2E if softcap is not None else 1.0
    out = _empty(q.shape, q)
    lse = _empty((b, hq, sq), q, torch.float32)
    label_mass = _empty((b, hq, sq, num_labels), q, torch.float32) if labels is not None else None
    qk_scale = opts["scale"] * LOG2E
    cfg = _blocks("fwd", sq, d, q.dtype, flags["KIND"] != 0, labels=labels is not None)
    rows = rank = dummy
    gather = head_gates is not None and sq > cfg["BM"]
    if gather:  # tiles of each head's routed rows: work in proportion to the routed fraction, however scattered
        rows, rank = _routed_rows(head_gates)
    query_heads = dict(HEAD_GROUP=_head_group(b * hq, hq // hkv, k))
    # key_mass of a few queries (decode): the forward keeps its scores, and the mass is exp2(score - lse) summed over
    # them, instead of a second pass that reads every key again (half a forward's memory traffic in decode)
    save_scores = opts["key_mass"] and sq <= min(KEY_MASS_SCORE_ROWS, cfg["BM"])
    # filled first (not `_empty`): the keys a query tile never visits keep -inf, no mass
    scores = torch.full((b, hq, sq, sk), float("-inf"), device=q.device) if save_scores else lse
    _fwd_kernel[(b * hq * _cdiv(sq, cfg["BM"]),)](
        q, k, v, out, lse,
        pad if pad is not None else dummy, doc if doc is not None else dummy,
        head_gates if head_gates is not None else dummy, labels if labels is not None else dummy,
        label_mass if label_mass is not None else lse, rows, rank, scores,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        hq, sq, sk, hq // hkv, qk_scale, cap2,
        HAS_GATE=head_gates is not None, HAS_LABELS=labels is not None, NUM_LABELS=num_labels,
        LP=_pow2(num_labels), GATHER=gather, SAVE_SCORES=save_scores, **query_heads, **flags, **cfg,
    )  # fmt: skip
    mass = None
    if save_scores:  # dead or gated-off rows (lse -inf) add nothing
        lse2 = torch.where(lse == float("-inf"), float("inf"), lse * LOG2E)
        mass = torch.exp2(scores - lse2[..., None]).sum(-2)
    elif opts["key_mass"]:
        mass = _empty((b, hq, sk), q, torch.float32)
        cfg = _blocks("mass", sq, d, q.dtype, flags["KIND"] != 0)
        _key_mass_kernel[(b * hq * _cdiv(sk, cfg["BN"]),)](
            q, k, lse, pad if pad is not None else dummy, doc if doc is not None else dummy, mass,
            *_strides(q), *_strides(k), hq, sq, sk, hq // hkv, qk_scale, cap2, **query_heads, **flags, **cfg,
        )  # fmt: skip
    routed = (rows, rank) if gather else (None, None)  # the backward walks the same rows
    saved = (q, k, v, out, lse, head_gates, pad, doc, *routed)
    return (out, lse, mass, label_mass), (saved, dict(flags=flags, qk_scale=qk_scale, scale=opts["scale"], cap2=cap2))


class _TritonAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, head_gates, opts):
        outs, (saved, ctx.opts) = _forward(q, k, v, head_gates, opts)
        ctx.save_for_backward(*saved)
        ctx.mark_non_differentiable(*[t for t in outs[1:] if t is not None])
        return outs

    @staticmethod
    def backward(ctx, dout, *_):
        q, k, v, out, lse, head_gates, pad, doc, rows, rank = ctx.saved_tensors
        flags, qk_scale, scale, cap2 = (ctx.opts[key] for key in ("flags", "qk_scale", "scale", "cap2"))
        b, hq, sq, d = q.shape
        hkv, sk = k.shape[1], k.shape[2]
        dout = dout.contiguous()
        delta = _empty((b, hq, sq), q, torch.float32)  # = rowsum(dO_att * O_att): gates cancel
        dummy = q.new_empty(1, dtype=torch.int32)
        gather = head_gates is not None  # as in the forward: query tiles of routed rows; the others' dq is 0
        dgates = _empty(head_gates.shape, head_gates) if gather else None
        # gated: the ungated attention output's gradient g dO, once (not per tile in the kernels' loops)
        dout_att = _empty(dout.shape, dout) if gather else dout
        bm = INTERPRET_TILE if _interpreting() else BWD_DELTA_BM
        _bwd_delta_kernel[(_cdiv(sq, bm), b * hq)](
            out, dout, delta, *((head_gates, dgates, dout_att) if gather else (dummy,) * 3), sq, hq,
            D=d, DP=_pow2(d), BM=bm, HAS_GATE=gather,
        )  # fmt: skip
        dout = dout_att
        if not gather:
            rows = rank = dummy
        elif rows is None:  # the forward had one query tile and did not gather
            rows, rank = _routed_rows(head_gates)
        common = (
            *_strides(q), *_strides(k), *_strides(v), *_strides(dout),
        )  # fmt: skip
        extra = (pad if pad is not None else dummy, doc if doc is not None else dummy)
        # gated: each kv head's query heads in programs side by side, summed after. A kv head whose query heads are
        # all shared (always on) would otherwise do the dense work in one program per key tile while the others idle
        head_split = hq // hkv if gather else 1
        split_shape, split_dtype = ((head_split,), torch.float32) if head_split > 1 else ((), None)
        dk = _empty((*split_shape, b, hkv, sk, d), k, split_dtype)
        dv = _empty((*split_shape, b, hkv, sk, d), v, split_dtype)
        cfg = _blocks("dkdv", sq, d, q.dtype, flags["KIND"] != 0)
        chunk = 2 * INTERPRET_TILE if _interpreting() else SINK_CHUNK_ROWS
        n_chunks = _cdiv(sq, chunk)
        # sink keys (every later query sees them): their tiles' queries in chunks side by side, not in one program
        split = flags["CAUSAL"] and flags["SINKS"] > 0 and flags["KIND"] != 0 and not gather and n_chunks > 1
        part_k = part_v = lse
        if split:
            n_sink_programs = b * hkv * _cdiv(flags["SINKS"], cfg["BN"]) * n_chunks
            part_k = _empty((n_sink_programs, cfg["BN"], flags["DP"]), q, torch.float32)
            part_v = _empty((n_sink_programs, cfg["BN"], flags["DP"]), q, torch.float32)
            sink_flags = {name: flags[name] for name in ("D", "DP", "KIND", "HAS_PAD", "HAS_DOC", "IEEE", "SOFTCAP")}
            _bwd_dkdv_sinks_kernel[(n_sink_programs,)](
                q, k, v, dout, lse, delta, *extra, part_k, part_v, *common,
                hq, hkv, sq, sk, hq // hkv, qk_scale, cap2, flags["G"], flags["W"], flags["SINKS"],
                flags["n_unshifted"], n_chunks, chunk, **sink_flags, **cfg,
            )  # fmt: skip
        _bwd_dkdv_kernel[(b * hkv * _cdiv(sk, cfg["BN"]) * head_split,)](
            q, k, v, dout, lse, delta, *extra, rows, rank, dk, dv, part_k, part_v, *common,
            hq, hkv, sq, sk, hq // hkv, qk_scale, scale, cap2, GATHER=gather, HEAD_GROUP=_head_group(b * hkv, 1, k),
            n_chunks=n_chunks, HEAD_SPLIT=head_split, split_stride=dk[0].numel() if head_split > 1 else 0,
            SINK_SPLIT=split, **flags, **cfg,
        )  # fmt: skip
        if head_split > 1:
            n, block = dk[0].numel(), SUM_SPLIT_BLOCK
            parts_k, parts_v = dk, dv
            dk, dv = _empty(parts_k.shape[1:], k), _empty(parts_v.shape[1:], v)
            _sum_head_split_kernel[(_cdiv(n, block),)](parts_k, parts_v, dk, dv, n, SPLIT=head_split, BLOCK=block)
        dq = _empty((b, hq, sq, d), q)
        cfg = _blocks("dq", sq, d, q.dtype, flags["KIND"] != 0)
        _bwd_dq_kernel[(b * hq * _cdiv(sq, cfg["BM"]),)](
            q, k, v, dout, lse, delta, *extra, rows, rank, dq, *common,
            hq, sq, sk, hq // hkv, qk_scale, scale, cap2, GATHER=gather, HEAD_GROUP=_head_group(b * hq, hq // hkv, k),
            **flags, **cfg,
        )  # fmt: skip
        return dq, dk, dv, dgates, None


def triton_attention(
    q,
    k,
    v,
    *,
    scale,
    causal,
    pattern,
    key_padding_mask,
    doc_ids,
    head_gates,
    key_mass,
    key_labels,
    num_labels,
    softcap=None,
):
    """Triton path of `attention`; returns (out, lse, key_mass or None, label_mass or None)."""
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    opts = dict(
        scale=float(scale),
        causal=bool(causal),
        pattern=pattern,
        pad=key_padding_mask.to(torch.int8).contiguous() if key_padding_mask is not None else None,
        doc=doc_ids.to(torch.int32).contiguous() if doc_ids is not None else None,
        labels=key_labels.to(torch.int32).contiguous() if key_labels is not None else None,
        num_labels=num_labels,
        key_mass=key_mass,
        softcap=float(softcap) if softcap is not None else None,
    )
    gates = head_gates.contiguous() if head_gates is not None else None
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, gates)):
        return _TritonAttention.apply(q, k, v, gates, opts)
    return _forward(q, k, v, gates, opts)[0]  # nothing to differentiate: no autograd node to build
