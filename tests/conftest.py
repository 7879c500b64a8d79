import os
import zlib

import pytest


# Triton kernels run in the interpreter on machines without a GPU. The variable is read when a kernel is defined,
# so it has to be set before any test module imports ctxaware.kernels.
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device: run `make test-gpu` on the GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def stable_seed(request) -> int:
    """Seeds torch's global generator from the test's id: each test and case draws its own random inputs, the same
    ones on every run and machine, so a failure reproduces by rerunning it. crc32, because `hash()` of a string
    changes from one process to the next."""
    import torch

    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    return seed


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tests.tiny_models import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """A tiny random Llama (64-token context, tied embeddings) and its tokenizer in a folder, as a user's model."""
    from tests.tiny_models import build_tiny_tokenizer, tiny_model

    tokenizer = build_tiny_tokenizer()
    model = tiny_model(
        "llama",
        max_position_embeddings=64,
        vocab_size=len(tokenizer),
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    folder = tmp_path_factory.mktemp("tiny-base")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
