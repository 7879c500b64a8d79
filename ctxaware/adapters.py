"""The adapter format of the methods that are not LoRA (LoFiT offsets, MoH routers, head-restricted deltas).

An adapter is a folder, like a PEFT adapter's:
- `adapter_config.json`: `format` ("ctxaware"), `method`, `ctxaware_version`, `base_model` and `base_model_revision`,
  `base_layout` (model type and head shapes the weights fit), `heads` (the selected [layer, head] pairs), `shapes`
  (every tensor's shape) and the method's `hyperparameters`. It has no `peft_type`, so PEFT never mistakes it for one.
  `training` records how it was trained (objective, K, learning rates, data), for the reader.
- `adapter_model.safetensors`: the weights (the adapter module's state dict).
- `README.md`: a model card with Hub metadata (library_name, base_model, tags) and an eval results table when given.

A method subclasses `HeadAdapter` with a `method` name, lists its module in `ADAPTER_MODULES` and gets
`save_pretrained`, `from_pretrained` (a local folder or a Hub repo id), `push_to_hub` and base-model checks. Its
per-layer modules live in `self.layers` (keyed by layer index) and, once attached, also under each attention module, so
the trained parameters are the model's parameters (Trainer's optimizer, DDP and FSDP see them with their layer). The
default `attach` feeds each layer's module the pre-o_proj tensor (see `ctxaware.heads`); methods acting elsewhere
override `attach`. `merge` returns a plain transformers model where the method's edit is exact in weight space. Imports
go one way: method modules import this one; this one imports a method's module by name, when a folder of that method is
loaded.
"""

from __future__ import annotations

import importlib
import json
import logging
import tempfile
from pathlib import Path
from typing import ClassVar

from safetensors.torch import load_file, save_file
from torch import nn

import ctxaware
from ctxaware.attention import attention_modules
from ctxaware.datafiles import check_safetensors
from ctxaware.heads import Head, HeadLayout, check_heads, register_pre_o_proj_hooks
from ctxaware.hub import model_card_text, push_folder_to_hub
from ctxaware.io import atomic_directory


logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
MODEL_CARD_NAME = "README.md"
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME, MODEL_CARD_NAME)
FORMAT = "ctxaware"
ATTACHED_ATTR = "ctxaware_adapter"

# Method name (`adapter_config.json`'s "method") -> the module defining its `HeadAdapter` subclass, imported on first
# load of such a folder.
ADAPTER_MODULES: dict[str, str] = {
    "lofit": "ctxaware.methods.lofit",
    "moh": "ctxaware.methods.moh.adapter",
    "head_deltas": "ctxaware.methods.arith_heads",
}
ADAPTER_METHODS: dict[str, type[HeadAdapter]] = {}  # filled by subclassing


class HeadAdapter(nn.Module):
    """Per-head weights selected on one base model layout. Subclasses set `method`, fill `self.layers` and implement
    `hyperparameters()` plus a constructor accepting `(layout, heads, **hyperparameters)`."""

    method: ClassVar[str]
    description: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "method" in cls.__dict__:
            ADAPTER_METHODS[cls.method] = cls

    def __init__(
        self,
        layout: HeadLayout,
        heads: list[Head],
        *,
        base_model: str | None = None,
        base_model_revision: str | None = None,
        training: dict | None = None,
    ):
        super().__init__()
        self.layout = layout
        self.heads = check_heads(heads, layout)
        self.base_model = base_model
        self.base_model_revision = base_model_revision
        self.training_config = training or {}
        self.layers = nn.ModuleDict()
        self._handles: list = []
        self._attached_to: list[nn.Module] = []

    # --- what a method provides ---------------------------------------------------------------------------------
    def hyperparameters(self) -> dict:
        """JSON-serialisable keyword arguments that rebuild this adapter with `cls(layout, heads, **them)`."""
        return {}

    def merge(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError(f"the {self.method} adapter's edit is not exact in weight space: it cannot merge")

    # --- attaching ------------------------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> nn.Module:
        """Registers each layer's module under its attention module and hooks it on the pre-o_proj tensor."""
        self.check_compatible(model)
        if self._handles:
            raise RuntimeError("this adapter is already attached: call `detach()` first")
        modules = attention_modules(model)
        if taken := [key for key in self.layers if hasattr(modules[int(key)], ATTACHED_ATTR)]:
            raise RuntimeError(
                f"layers {', '.join(taken)} already carry a ctxaware adapter: detach it (`adapter.detach()`) or merge "
                "it first"
            )
        try:  # all or nothing: a failure midway leaves the model as it was
            for key, layer_module in self.layers.items():
                modules[int(key)].add_module(ATTACHED_ATTR, layer_module)
                self._attached_to.append(modules[int(key)])
            self._handles = register_pre_o_proj_hooks(
                model, lambda layer, x: self.layers[str(layer)](x), self._layer_ids
            )
        except BaseException:
            self.detach()
            raise
        return model

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        for module in self._attached_to:
            delattr(module, ATTACHED_ATTR)
        self._handles, self._attached_to = [], []

    @property
    def _layer_ids(self) -> list[int]:
        return sorted(int(key) for key in self.layers)

    def check_compatible(self, model: nn.Module) -> None:
        """Raises ValueError when `model`'s layout differs from the base model's; warns when only the name does."""
        layout = HeadLayout.from_model(model)
        base = self.base_model or "its base model"
        if differences := self.layout.differences(layout):
            listed = ", ".join(
                f"{key}: adapter {mine} vs model {theirs}" for key, (mine, theirs) in differences.items()
            )
            raise ValueError(
                f"This {self.method} adapter was trained on {base} and does not fit this model ({listed}). "
                f"Load it onto {base}, or retrain it on this model."
            )
        name = getattr(model.config, "_name_or_path", None)
        if self.base_model and name and Path(name).name != Path(self.base_model).name:
            logger.warning(
                "Adapter base model %s and model %s have different names but the same shapes; make sure they are the "
                "same weights.",
                self.base_model,
                name,
            )

    # --- the folder -----------------------------------------------------------------------------------------------
    def adapter_config(self) -> dict:
        return {
            "format": FORMAT,
            "method": self.method,
            "ctxaware_version": ctxaware.__version__,
            "base_model": self.base_model,
            "base_model_revision": self.base_model_revision,
            "base_layout": self.layout.to_dict(),
            "heads": [list(head) for head in self.heads],
            "shapes": {name: list(tensor.shape) for name, tensor in self.state_dict().items()},
            "hyperparameters": self.hyperparameters(),
            "training": self.training_config,
        }

    def model_card(self, eval_results: dict[str, dict[str, float]] | None = None, tags: list[str] = ()) -> str:
        n_params = sum(p.numel() for p in self.parameters())
        layout = self.layout
        facts = (
            f"- heads: {len(self.heads)} of {layout.total_heads} ({layout.num_layers} layers x {layout.num_heads} "
            f"query heads, {layout.num_kv_heads} key/value heads)\n- trained parameters: {n_params:,}\n"
            f"- ctxaware {ctxaware.__version__}"
        )
        usage = (
            "from transformers import AutoModelForCausalLM\nfrom ctxaware.adapters import HeadAdapter\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{self.base_model}")\n'
            'adapter = HeadAdapter.from_pretrained("<this repo or folder>", model)'
        )
        return model_card_text(
            title=f"{self.method} adapter for {self.base_model or 'its base model'}",
            base_model=self.base_model,
            description=f"{self.description}\n\n{facts}",
            results=eval_results,
            tags=[self.method, *tags],
            library_name="ctxaware",
            usage=usage,
        )

    def save_pretrained(
        self,
        save_directory: str | Path,
        *,
        eval_results: dict[str, dict[str, float]] | None = None,
        tags: list[str] = (),
    ) -> Path:
        """Writes the folder to a temporary sibling, then renames it into place (an existing folder is replaced)."""
        target = Path(save_directory)
        with atomic_directory(target) as tmp:
            state = {name: tensor.detach().cpu().contiguous() for name, tensor in self.state_dict().items()}
            save_file(state, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
            (tmp / CONFIG_NAME).write_text(json.dumps(self.adapter_config(), indent=2) + "\n")
            (tmp / MODEL_CARD_NAME).write_text(self.model_card(eval_results, list(tags)))
        return target

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | Path,
        model: nn.Module | None = None,
        *,
        revision: str | None = None,
        token: str | None = None,
    ) -> HeadAdapter:
        """Loads an adapter folder or Hub repo; with `model`, checks it fits and attaches it (trainable off)."""
        folder = _resolve_folder(path_or_repo_id, revision=revision, token=token)
        config = read_adapter_config(folder)
        method_cls = adapter_class(config["method"])
        if method_cls is None:
            raise ValueError(f"{path_or_repo_id} is a {config['method']!r} adapter, a method this ctxaware lacks.")
        if cls is not HeadAdapter and not issubclass(method_cls, cls):
            raise ValueError(f"{path_or_repo_id} is a {config['method']} adapter, not a {cls.method} one.")
        adapter = method_cls(
            HeadLayout(**config["base_layout"]),
            [tuple(head) for head in config["heads"]],
            base_model=config.get("base_model"),
            base_model_revision=config.get("base_model_revision"),
            training=config.get("training"),
            **config.get("hyperparameters", {}),
        )
        check_safetensors(folder / WEIGHTS_NAME)
        state = load_file(folder / WEIGHTS_NAME)
        expected = {name: list(t.shape) for name, t in adapter.state_dict().items()}
        found = {name: list(t.shape) for name, t in state.items()}
        if expected != found:
            raise ValueError(
                f"{path_or_repo_id}: the weights do not match its adapter_config.json (expected {expected}, found "
                f"{found}); the folder is corrupt or was edited by hand: save it again."
            )
        adapter.load_state_dict(state)
        adapter.requires_grad_(False)
        if model is not None:
            param = next(model.parameters())
            adapter.to(param.device)
            adapter.attach(model)
        return adapter

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str | None = None,
        eval_results: dict[str, dict[str, float]] | None = None,
        tags: list[str] = (),
    ):
        """Creates the repo if needed and uploads the adapter folder (the same files as `save_pretrained`)."""
        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save_pretrained(Path(tmp) / "adapter", eval_results=eval_results, tags=tags)
            message = commit_message or f"Upload {self.method} adapter"
            return push_folder_to_hub(folder, repo_id, private=private, token=token, commit_message=message)


def read_adapter_config(folder: str | Path) -> dict:
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no {CONFIG_NAME}: pass a folder written by `save_pretrained`.")
    config = json.loads(path.read_text())
    if config.get("format") != FORMAT:
        kind = "a PEFT adapter: load it with peft.PeftModel" if "peft_type" in config else "not a ctxaware adapter"
        raise ValueError(f"{folder} is {kind}.")
    return config


def load_adapter(model: nn.Module, path_or_repo_id: str, *, revision: str | None = None) -> nn.Module:
    """Attaches the adapter at `path_or_repo_id` to `model` and returns the model (the eval loader's entry point)."""
    HeadAdapter.from_pretrained(path_or_repo_id, model, revision=revision)
    return model


def _resolve_folder(path_or_repo_id: str | Path, *, revision: str | None, token: str | None) -> Path:
    path = Path(path_or_repo_id)
    if path.is_dir():
        return path
    text = str(path_or_repo_id)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise FileNotFoundError(
            f"Adapter {text} is not a folder: pass an adapter folder or a Hub repo id (owner/name)."
        )
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(text, revision=revision, token=token, allow_patterns=list(ADAPTER_FILES)))


def adapter_class(method: str) -> type[HeadAdapter] | None:
    """The `HeadAdapter` subclass of `method`, importing its module from `ADAPTER_MODULES` if needed."""
    if method not in ADAPTER_METHODS and method in ADAPTER_MODULES:
        importlib.import_module(ADAPTER_MODULES[method])
    return ADAPTER_METHODS.get(method)


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
