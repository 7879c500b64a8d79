"""`--fused_layers`: refused naming the fix where it cannot run; where it can, liger's layers (not its loss) are
applied to the loaded model and recorded."""

import sys
import types

import pytest
import torch

from ctxaware import fused_layers


def test_refused_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="needs a CUDA GPU.*drop --fused_layers"):
        fused_layers.check_fused_layers("llama")


@pytest.fixture
def fake_liger(monkeypatch):
    """A liger-kernel stand-in that records each call (the real kernels need a GPU)."""
    calls = []

    def apply_liger_kernel_to_llama(rope=True, cross_entropy=False, fused_linear_cross_entropy=True, rms_norm=True,
                                    swiglu=True, model=None):  # fmt: skip
        calls.append(dict(rope=rope, cross_entropy=cross_entropy, fused_linear_cross_entropy=fused_linear_cross_entropy,
                          rms_norm=rms_norm, swiglu=swiglu, model=model))  # fmt: skip

    monkey_patch = types.ModuleType("liger_kernel.transformers.monkey_patch")
    monkey_patch.MODEL_TYPE_TO_APPLY_LIGER_FN = {"llama": apply_liger_kernel_to_llama}
    for name, module in (
        ("liger_kernel", types.ModuleType("liger_kernel")),
        ("liger_kernel.transformers", types.ModuleType("liger_kernel.transformers")),
        ("liger_kernel.transformers.monkey_patch", monkey_patch),
    ):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return calls


def test_layers_are_fused_and_the_loss_is_left_to_the_trainer(fake_liger):
    model = types.SimpleNamespace(config=types.SimpleNamespace(model_type="llama"))
    record = fused_layers.apply_fused_layers(model)
    (call,) = fake_liger
    assert call["model"] is model and call["rope"] and call["rms_norm"] and call["swiglu"]
    assert not call["cross_entropy"] and not call["fused_linear_cross_entropy"]  # liger's default would fuse the loss
    assert record == {"library": "liger-kernel", "model_type": "llama", **fused_layers.FUSED}


def test_unsupported_family_and_missing_library_are_refused(fake_liger, monkeypatch):
    with pytest.raises(ValueError, match="no fused layers for model type 'gpt2'"):
        fused_layers.check_fused_layers("gpt2")
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.monkey_patch", None)  # import fails
    with pytest.raises(ValueError, match=r"pip install 'ctxaware\[fused\]'"):
        fused_layers.check_fused_layers("llama")
