"""The model under evaluation: loading (embedded name, path or Hub id, plus an adapter), prompt formatting, and the
batched generate / score calls the tasks use.

Tasks talk to an `EvalModel`, never to `model.generate` directly, so a test can swap in a stub whose answers are
known and check a metric exactly.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from ctxaware import generation
from ctxaware.eval.hooks import GenerationSetup


@dataclass
class StreamedNLL:
    """One sequence scored through a KV cache: summed NLL, tokens scored, K/V bytes held at the end and the bytes a
    full cache of the same tokens would hold (both per sequence)."""

    nll: float
    tokens: int
    kv_bytes: float
    kv_full_bytes: float


class EvalModel:
    def __init__(self, model, tokenizer, *, batch_size: int = 8, setup: GenerationSetup | None = None, progress=True):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.setup = setup or GenerationSetup()
        self.progress = progress

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode(self, text: str, *, chat: bool, system: str | None = None) -> list[int]:
        """Token ids of a prompt: `text` as the user turn of the chat template, or as plain text after BOS."""
        if not chat:
            return generation.encode_prompt(self.tokenizer, text)
        if not self.has_chat_template:
            raise ValueError(
                "This tokenizer has no chat template: run with `--chat_template off`, or evaluate a chat model."
            )
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        rendered = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return generation.encode_prompt(self.tokenizer, rendered, add_bos=False)

    def encode_continuation(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, desc: str = "generate") -> list[str]:
        return generation.generate(
            self.model,
            self.tokenizer,
            prompts,
            max_new_tokens=max_new_tokens,
            batch_size=self.batch_size,
            generate_kwargs=self.setup.generate_kwargs,
            cache_factory=self.setup.cache_factory,
            desc=desc,
            progress=self.progress,
        )

    def loglikelihood(self, requests: list[tuple[list[int], list[int]]], *, desc: str = "score"):
        return generation.loglikelihood(
            self.model, self.tokenizer, requests, batch_size=self.batch_size, desc=desc, progress=self.progress
        )

    def token_nll(self, ids: list[int], *, window: int, stride: int | None = None) -> tuple[float, int]:
        return generation.token_nll(self.model, ids, window=window, stride=stride)

    @property
    def has_kv_cache(self) -> bool:
        """Whether a `--kv_cache` switch set a cache (scoring then streams the text through it)."""
        return self.setup.cache_factory is not None

    def streaming_nll(self, sequences: list[list[int]], *, desc: str = "stream") -> list[StreamedNLL]:
        """Each sequence (all of one length) fed through a fresh cache of the `--kv_cache` switch, `batch_size` rows
        at a time, as generation would feed it (`generation.streaming_token_nll`)."""
        from tqdm.auto import tqdm

        length = len(sequences[0])
        if any(len(s) != length for s in sequences):
            raise ValueError("streaming_nll takes sequences of one length: group them by length first")
        results = []
        starts = range(0, len(sequences), self.batch_size)
        for start in tqdm(starts, desc=desc, disable=not self.progress, leave=False):
            rows = sequences[start : start + self.batch_size]
            cache = self.setup.cache_factory(length=length)
            nlls, tokens = generation.streaming_token_nll(self.model, rows, cache)
            held, full = generation.kv_cache_bytes(cache)
            results += [StreamedNLL(nll, tokens, held / len(rows), full / len(rows)) for nll in nlls]
        return results


def load_model(name_or_path: str, *, adapter: str | None = None, dtype: str = "auto", device: str | None = None):
    """Loads a causal LM and its tokenizer by embedded name, local path or Hub id, then applies `adapter`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ctxaware.models import resolve_model_path

    path = resolve_model_path(name_or_path)
    if _looks_like_path(name_or_path) and not Path(path).exists():
        raise FileNotFoundError(
            f"Model path {name_or_path} does not exist: pass a model folder, a Hub id, or the embedded "
            "`ctxaware-tiny`."
        )
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        overrides = adapter_config_overrides(adapter) if adapter else {}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **overrides)
    except OSError as error:
        raise FileNotFoundError(
            f"Could not load model {name_or_path!r}: {error}\nPass a local model folder, a Hub id available offline, "
            "or the embedded `ctxaware-tiny`."
        ) from error
    if adapter and _read_adapter_config(adapter, "tokenizer_config.json") is not None:
        # An adapter that ships its tokenizer (e.g. conditional SFT's indicator token) is evaluated with it, on a
        # base whose embeddings are resized to hold the added rows the adapter carries.
        tokenizer = AutoTokenizer.from_pretrained(adapter)
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if adapter:
        model = load_adapter(model, adapter, base_name=name_or_path)
    return model.to(device).eval(), tokenizer


def adapter_config_overrides(adapter: str) -> dict:
    """Base-config changes an adapter was trained with (a SinkLoRA adapter's extended context and RoPE scaling)."""
    from ctxaware.methods import sinklora

    metadata = _read_adapter_config(adapter, sinklora.METADATA_NAME)
    return sinklora.base_config_overrides(metadata) if metadata else {}


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).suffix != ""


def _read_adapter_config(adapter: str, filename: str) -> dict | None:
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
    if _looks_like_path(adapter) and not Path(adapter).exists():
        raise FileNotFoundError(f"Adapter {adapter} does not exist: pass an adapter folder or a Hub id.")
    config = _read_adapter_config(adapter, "adapter_config.json")
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
