"""The Triton kernels against the PyTorch reference at real sizes on the GPU (`pytest -m gpu tests/gpu`)."""

import pytest
import torch

from ctxaware.kernels import AttentionPattern, attention


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

PATTERNS = {
    "dense": None,
    "s2": AttentionPattern.s2(256),
    "sf": AttentionPattern.sf(256, sinks=4),
    "window": AttentionPattern.sliding_window(300, sinks=4),
}


def _inputs(b, hq, hkv, sq, sk, d, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, hq, sq, d, device="cuda", dtype=dtype, generator=gen).requires_grad_()
    k = torch.randn(b, hkv, sk, d, device="cuda", dtype=dtype, generator=gen).requires_grad_()
    v = torch.randn(b, hkv, sk, d, device="cuda", dtype=dtype, generator=gen).requires_grad_()
    return q, k, v


def _compare(q, k, v, tol, grads=True, **kw):
    outs = {}
    for backend in ("reference", "triton"):
        out, stats = attention(q, k, v, backend=backend, return_lse=True, **kw)
        torch.manual_seed(3)
        dout = torch.randn_like(out)
        diff = [q, k, v] + ([kw["head_gates"]] if kw.get("head_gates") is not None else [])
        outs[backend] = (out, stats, torch.autograd.grad(out, diff, dout) if grads else ())
    (o1, s1, g1), (o2, s2, g2) = outs["reference"], outs["triton"]
    assert not o2.isnan().any()
    torch.testing.assert_close(o2.float(), o1.float(), atol=tol, rtol=tol)
    live = s1.lse > float("-inf")
    assert torch.equal(live, s2.lse > float("-inf"))
    torch.testing.assert_close(s2.lse[live], s1.lse[live], atol=1e-2, rtol=1e-3)
    for name in ("key_mass", "label_mass"):
        if getattr(s1, name) is not None:
            torch.testing.assert_close(getattr(s2, name), getattr(s1, name), atol=tol * 4, rtol=tol)
    for a, b in zip(g1, g2):
        scale = a.float().abs().max().clamp_min(1)
        assert ((a.float() - b.float()).abs().max() / scale) < tol * 2


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("heads", [(8, 8), (8, 2)])
@pytest.mark.parametrize("stats", [True, False])  # the label tile changes the forward's tile sizes
def test_patterns_bf16(pattern, heads, stats):
    q, k, v = _inputs(2, heads[0], heads[1], 1000, 1000, 128, torch.bfloat16)
    labels = torch.randint(0, 3, (2, 1000), device="cuda") if stats else None
    _compare(
        q, k, v, 2e-2, pattern=PATTERNS[pattern], key_mass=stats, key_labels=labels, num_labels=3 if stats else None
    )


@pytest.mark.parametrize("dtype,d", [(torch.float16, 64), (torch.float32, 80), (torch.bfloat16, 256)])
def test_dtypes_and_head_dims(dtype, d):
    q, k, v = _inputs(1, 4, 2, 517, 517, d, dtype)
    _compare(q, k, v, 1e-4 if dtype == torch.float32 else 2e-2, pattern=PATTERNS["sf"])


def test_padding_packing_gates():
    q, k, v = _inputs(2, 8, 4, 700, 700, 64, torch.bfloat16)
    pad = torch.ones(2, 700, dtype=torch.bool, device="cuda")
    pad[0, :123] = False
    pad[1, 650:] = False
    doc = (torch.arange(700, device="cuda")[None] >= torch.tensor([[300], [450]], device="cuda")).int()
    gates = torch.rand(2, 700, 8, device="cuda")
    gates[:, :256, :3] = 0
    gates[0, 400:, 5] = 0
    gates.requires_grad_()
    _compare(q, k, v, 2e-2, pattern=PATTERNS["sf"], key_padding_mask=pad, doc_ids=doc, head_gates=gates, key_mass=True)


@pytest.mark.parametrize("pattern", ["dense", "sf"])
def test_per_token_routed_gates(pattern):
    """Half the heads per token, as an MoH router picks them: the forward's tiles gather each head's routed rows."""
    q, k, v = _inputs(2, 8, 2, 1000, 1000, 128, torch.bfloat16)
    gen = torch.Generator(device="cuda").manual_seed(1)
    routed = torch.rand(2, 1000, 8, device="cuda", generator=gen).argsort(-1) < 4
    gates = (torch.rand(2, 1000, 8, device="cuda", generator=gen) * routed).requires_grad_()
    labels = torch.randint(0, 3, (2, 1000), device="cuda", generator=gen)
    _compare(
        q, k, v, 2e-2, pattern=PATTERNS[pattern], head_gates=gates, key_mass=True, key_labels=labels, num_labels=3
    )


@pytest.mark.parametrize("sq", [1, 7, 64])
def test_decode(sq):
    q, k, v = _inputs(2, 8, 2, sq, 3000, 128, torch.bfloat16)
    labels = torch.randint(0, 5, (2, 3000), device="cuda")
    _compare(q, k, v, 2e-2, grads=False, pattern=PATTERNS["sf"], key_mass=True, key_labels=labels, num_labels=5)


if __name__ == "__main__":  # for a machine without pytest: run every case, report failures
    import itertools
    import traceback

    cases = [(test_patterns_bf16, c) for c in itertools.product(PATTERNS, [(8, 8), (8, 2)], [True, False])]
    cases += [
        (test_dtypes_and_head_dims, a) for a in [(torch.float16, 64), (torch.float32, 80), (torch.bfloat16, 256)]
    ]
    cases += [(test_padding_packing_gates, ())] + [(test_per_token_routed_gates, (p,)) for p in ("dense", "sf")]
    cases += [(test_decode, (sq,)) for sq in (1, 7, 64)]
    failed = 0
    for fn, fn_args in cases:
        try:
            fn(*fn_args)
            print("PASS", fn.__name__, fn_args, flush=True)
        except Exception:
            failed += 1
            print("FAIL", fn.__name__, fn_args, traceback.format_exc(), flush=True)
    print(f"{len(cases) - failed} passed, {failed} failed")


@pytest.mark.parametrize("pattern", ["dense", "sf", "window"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_soft_capping(pattern, dtype):
    """Gemma 2's logit soft-capping (cap * tanh(score / cap)) with a cap that bites: forward, backward, statistics."""
    q, k, v = _inputs(2, 8, 2, 1000, 1000, 128, dtype)
    labels = torch.randint(0, 3, (2, 1000), device="cuda")
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    with torch.no_grad():
        q.mul_(4)  # scores well past the cap
    _compare(q, k, v, tol, pattern=PATTERNS[pattern], softcap=2.0, key_mass=True, key_labels=labels, num_labels=3)
    decode, _ = attention(q[:, :, -1:], k, v, pattern=PATTERNS[pattern], softcap=2.0)
    full, _ = attention(q, k, v, pattern=PATTERNS[pattern], softcap=2.0)
    torch.testing.assert_close(decode.float(), full[:, :, -1:].float(), atol=tol, rtol=tol)


def test_direct_launches_match_triton_launches_across_specialisations():
    """The second call of each shape goes to the compiled kernel directly (`ctxaware.kernels.launch`); a view 2 bytes
    off 16-byte alignment and an odd length must each get their own compile, not reuse the aligned kernel."""
    q, k, v = _inputs(1, 4, 2, 777, 777, 64, torch.bfloat16)
    buffer = torch.randn(1, 4, 777 * 64 + 1, device="cuda", dtype=torch.bfloat16)
    shifted = buffer[..., 1:].view(1, 4, 777, 64).requires_grad_()  # stride(-1) == 1, so the kernels read it as is
    assert shifted.data_ptr() % 16 != 0
    for query in (q, q, shifted, shifted, q[:, :, :500], q[:, :, :500]):
        ks, vs = k[:, :, : query.shape[2]], v[:, :, : query.shape[2]]
        _compare(query, ks, vs, 2e-2, pattern=PATTERNS["sf"])
    from ctxaware.kernels.triton_attention import _fwd_kernel

    keys = list(_fwd_kernel._compiled)  # an aligned and a misaligned bf16 pointer (Q's) each have their kernel
    assert any((torch.bfloat16, False) in key for key in keys) and any((torch.bfloat16, True) in key for key in keys)
