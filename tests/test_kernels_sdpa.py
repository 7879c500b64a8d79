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
