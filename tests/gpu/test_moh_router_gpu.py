"""The fused MoH router kernel (CUDA inference path) against the PyTorch router (`pytest -m gpu tests/gpu`)."""

import pytest
import torch

from ctxaware.methods.moh.router import MoHRouter


pytestmark = [
    pytest.mark.usefixtures("stable_seed"),  # every random input reproduces (tests/conftest.py)
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("shared, top_k", [([], 4), ([0, 1, 2, 3, 4, 5, 6, 7], 8), ([10], 3)])
@pytest.mark.parametrize("batch, tokens", [(3, 17), (1, 1), (8, 1)])
def test_inference_gates_equal_the_training_path(shared, top_k, batch, tokens):
    """1B-sized router (hidden 2048, 32 heads), bf16 activations: no_grad takes the kernel, grad mode PyTorch. A
    prefill's 51 tokens and decode steps of 1 and 8 (the kernel's wide-block path)."""
    router = MoHRouter(2048, 32, 64, shared, top_k=top_k, variant="learned", init_std=1.0, lr_ratio=0.01).cuda()
    with torch.no_grad():
        for param in router.parameters():
            param.normal_(0, 0.05 / 0.01)
    x = torch.randn(batch, tokens, 2048, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(batch, tokens, 32 * 64, device="cuda", dtype=torch.bfloat16)
    expected = router.token_gates(x, q)
    with torch.no_grad():
        fused = router.token_gates(x, q)
    assert torch.equal(fused != 0, expected != 0)
    torch.testing.assert_close(fused.float(), expected.detach().float(), rtol=1e-2, atol=1e-2)
