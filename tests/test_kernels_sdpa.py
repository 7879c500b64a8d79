"""The CPU run-time path (`backend="sdpa"`, the default on CPU without statistics) against the reference: same
outputs and gradients for every pattern, GQA, padding, packing, gates with zeros and decode."""

import pytest
import torch

from ctxaware.kernels import AttentionPattern, attention


pytestmark = pytest.mark.usefixtures("stable_seed")  # every random input reproduces (tests/conftest.py)

PATTERNS = {
    "dense": None,
    "s2": AttentionPattern.s2(group_size=10),
    "sf": AttentionPattern.sf(group_size_ratio=0.25, sinks=3),
    "window": AttentionPattern.sliding_window(7, sinks=2),
}


def _inputs(generator, b=2, hq=4, hkv=2, sq=37, sk=37, d=16):
    q = torch.randn(b, hq, sq, d, generator=generator, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, hkv, sk, d, generator=generator, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, hkv, sk, d, generator=generator, dtype=torch.float64, requires_grad=True)
    return q, k, v


def _run(backend, q, k, v, **options):
    out, _ = attention(q, k, v, backend=backend, **options)
    grads = torch.autograd.grad(out.sum(), [q, k, v, *([options["head_gates"]] if "head_gates" in options else [])])
    return out, grads


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
@pytest.mark.parametrize("case", ["plain", "padding", "packing", "gates", "decode"])
def test_sdpa_backend_matches_reference(pattern, case, stable_seed):
    generator = torch.Generator().manual_seed(stable_seed)
    q, k, v = _inputs(generator, sq=5 if case == "decode" else 37)
    options = {"pattern": PATTERNS[pattern]}
    if case == "padding":
        mask = torch.ones(2, 37, dtype=torch.bool)
        mask[0, :6] = False  # left padding: six dead query rows
        mask[1, -4:] = False
        options["key_padding_mask"] = mask
    if case == "packing":
        options["doc_ids"] = torch.tensor([[0] * 15 + [1] * 22, [0] * 30 + [1] * 7])
    if case == "gates":
        gates = torch.rand(2, 37, 4, generator=generator, dtype=torch.float64)
        gates[gates < 0.3] = 0
        options["head_gates"] = gates.requires_grad_()
    out_ref, grads_ref = _run("reference", q, k, v, **options)
    out, grads = _run("sdpa", q, k, v, **options)
    torch.testing.assert_close(out, out_ref)
    for grad, grad_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(grad, grad_ref)


def test_auto_backend_picks_sdpa_on_cpu_only_without_statistics():
    q, k, v = _inputs(torch.Generator().manual_seed(0))
    out_auto, stats = attention(q, k, v)
    assert stats.lse is None and stats.key_mass is None
    torch.testing.assert_close(out_auto, attention(q, k, v, backend="sdpa")[0], rtol=0, atol=0)
    _, stats = attention(q, k, v, key_mass=True)  # statistics: the reference computes them
    assert stats.key_mass.shape == (2, 4, 37)
    with pytest.raises(ValueError, match="returns no statistics"):
        attention(q, k, v, backend="sdpa", return_lse=True)


@pytest.mark.parametrize("case", ["square", "one_decode_query", "non_causal_queries", "gqa_square"], ids=str)
def test_plain_dense_calls_take_sdpa_without_a_mask_and_match_the_reference(case, stable_seed):
    """The backend policy: plain dense attention goes to PyTorch's fused SDPA (on a GPU too), same numbers."""
    generator = torch.Generator().manual_seed(stable_seed)
    sq, causal, hkv = {
        "square": (37, True, 4),
        "one_decode_query": (1, True, 2),
        "non_causal_queries": (5, False, 2),
        "gqa_square": (23, True, 1),
    }[case]
    q, k, v = _inputs(generator, hkv=hkv, sq=sq, sk=37 if case != "gqa_square" else 23)
    out, stats = attention(q, k, v, causal=causal)
    assert stats.backend == "sdpa"
    out_ref, _ = attention(q, k, v, causal=causal, backend="reference")
    torch.testing.assert_close(out, out_ref)
    grads = torch.autograd.grad(out.sum(), [q, k, v])
    grads_ref = torch.autograd.grad(out_ref.sum(), [q, k, v])
    for grad, grad_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(grad, grad_ref)


def test_only_plain_dense_calls_leave_the_triton_kernels():
    """What keeps a call on our kernels on a GPU: a pattern, padding, packing, gates, statistics, soft-capping, or
    several queries at the end of a longer key sequence (SDPA's causal flag aligns them top-left)."""
    from ctxaware.kernels.api import _plain_dense

    q, k, v = _inputs(torch.Generator().manual_seed(0), sq=37)
    plain = dict(pattern=None, key_padding_mask=None, doc_ids=None, head_gates=None, statistics=False, softcap=None)
    assert _plain_dense(q, k, v, True, **plain)
    assert _plain_dense(q, k, v, True, **{**plain, "pattern": AttentionPattern(kind="dense")})
    assert _plain_dense(q[:, :, -1:], k, v, True, **plain)
    assert not _plain_dense(q[:, :, -5:], k, v, True, **plain)
    for name, value in [
        ("pattern", PATTERNS["sf"]),
        ("key_padding_mask", torch.ones(2, 37, dtype=torch.bool)),
        ("doc_ids", torch.zeros(2, 37, dtype=torch.long)),
        ("head_gates", torch.ones(2, 37, 4)),
        ("statistics", True),
        ("softcap", 30.0),
    ]:
        assert not _plain_dense(q, k, v, True, **{**plain, name: value}), name


def test_gated_decode_without_gradients_takes_fused_sdpa_scaled_by_the_gates():
    """MoH's decode step: one query, gates (0 switches a head off, other values scale it), nothing to
    differentiate: the fused SDPA output scaled per head, equal to the reference; with gradients, or with several
    queries, gates keep the call on the kernels that skip the switched-off work."""
    q, k, v = _inputs(torch.Generator().manual_seed(0), sq=1)
    gates = torch.tensor([[[0.0, 1.0, 0.5, 2.0]], [[1.0, 0.0, 0.0, 1.5]]], dtype=torch.float64)
    with torch.no_grad():
        out, stats = attention(q, k, v, head_gates=gates)
        expected, _ = attention(q, k, v, head_gates=gates, backend="reference")
    assert stats.backend == "sdpa"
    torch.testing.assert_close(out, expected)
    assert torch.equal(out[0, 0], torch.zeros_like(out[0, 0]))  # switched off: exactly zero
    from ctxaware.kernels.api import _plain_dense

    options = dict(pattern=None, key_padding_mask=None, doc_ids=None, statistics=False, softcap=None)
    with torch.no_grad():
        assert _plain_dense(q, k, v, True, head_gates=gates, **options)
        square = q.expand(-1, -1, 37, -1)  # a full causal square, gated: the kernels skip switched-off rows' work
        assert not _plain_dense(square, k, v, True, head_gates=gates.expand(-1, 37, -1), **options)
    assert not _plain_dense(q, k, v, True, head_gates=gates, **options)  # q, k, v require grad
