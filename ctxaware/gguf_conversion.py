"""A GGUF file as a plain transformers model folder (safetensors, config, tokenizer with its chat template).

transformers reads GGUF files (through the `gguf` package) and dequantizes them, but a model loaded that way keeps a
`quantization_config` and refuses `save_pretrained`. So the conversion loads once, rebuilds a plain model from the
config without it, copies the weights and saves; afterwards every code path (recipes, PEFT, TRL, the eval harness)
sees an ordinary model folder.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch


SOURCE_RECORD = "ctxaware_source.json"


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def convert_gguf(
    gguf_path: str | Path, out_dir: str | Path, *, dtype: torch.dtype = torch.bfloat16, source: dict | None = None
):
    """Writes the model of `gguf_path` into `out_dir` (which must not exist yet) as `dtype` safetensors.

    `source` (where the file came from) is recorded in `ctxaware_source.json` beside the weights, with the file's
    sha256. Progress goes to stderr: transformers shows a bar over the tensors it dequantizes.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists already; convert into a new folder.")
    print(
        f"ctxaware: converting {gguf_path.name} into a {str(dtype).removeprefix('torch.')} model folder",
        file=sys.stderr,
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    except (ValueError, KeyError, OSError) as error:
        raise ValueError(f"{gguf_path} could not be read as a GGUF causal LM: {error}") from error
    config = loaded.config
    del config.quantization_config  # what makes transformers refuse to save the model
    config.name_or_path = str(gguf_path.name)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # A tied lm_head may be absent from one side; anything else means the rebuilt model is not the loaded one.
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or set(unexpected) - tied:
        raise ValueError(f"Converting {gguf_path}: weights do not match (missing {missing}, unexpected {unexpected}).")
    model.generation_config = loaded.generation_config
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    out_dir.mkdir(parents=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    _keep_add_bos_token(tokenizer, out_dir)
    record = {"gguf_file": gguf_path.name, "sha256": file_sha256(gguf_path), "dtype": str(dtype), **(source or {})}
    (out_dir / SOURCE_RECORD).write_text(json.dumps(record, indent=2))
    return out_dir


def _keep_add_bos_token(tokenizer, out_dir: Path) -> None:
    """GGUF files declare whether BOS starts plain text (`tokenizer.ggml.add_bos_token`; SmolLM2: no, its BOS is the
    chat turn marker). transformers keeps no such flag through `save_pretrained`, so it is written as
    `PLAIN_TEXT_BOS_KEY`, which `ctxaware.generation.encode_prompt` reads."""
    from ctxaware.generation import PLAIN_TEXT_BOS_KEY

    declared = tokenizer.init_kwargs.get("add_bos_token")
    if declared is None:
        return
    path = out_dir / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config[PLAIN_TEXT_BOS_KEY] = bool(declared)
    path.write_text(json.dumps(config, indent=2))
