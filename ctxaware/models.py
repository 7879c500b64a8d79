"""Loading models and tokenizers by name: the embedded tiny model, a local path, or a Hub id, through one code path."""

from pathlib import Path

from ctxaware.data import DATA_DIR
from ctxaware.datafiles import check_safetensors


EMBEDDED_MODEL_NAME = "ctxaware-tiny"
EMBEDDED_MODEL_DIR = DATA_DIR / "tiny-model"


def resolve_model_path(name_or_path: str) -> str:
    """Maps the embedded model's short name to its shipped folder; paths and Hub ids pass through unchanged."""
    if name_or_path == EMBEDDED_MODEL_NAME:
        if not (EMBEDDED_MODEL_DIR / "config.json").is_file():
            raise FileNotFoundError(
                f"The embedded model is missing from {EMBEDDED_MODEL_DIR}. Reinstall ctxaware, or rebuild it with "
                "`python recipes/pretrain_tiny.py` on a GPU."
            )
        return str(EMBEDDED_MODEL_DIR)
    if Path(name_or_path).exists() and not (Path(name_or_path) / "config.json").is_file():
        raise FileNotFoundError(f"{name_or_path} exists but holds no config.json: pass a model folder or a Hub id.")
    if Path(name_or_path).is_dir():
        check_safetensors(name_or_path)
    return name_or_path
