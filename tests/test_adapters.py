"""The ctxaware adapter format: folder contents, round trips, Hub push/pull at the huggingface_hub boundary, errors."""

import json

import pytest
import torch

from ctxaware.adapters import ADAPTER_FILES, HeadAdapter, load_adapter
from ctxaware.heads import HeadLayout
from ctxaware.methods.lofit import LoFiTAdapter
from tests.tiny_models import tiny_model


HEADS = [(0, 1), (1, 0), (1, 3)]


def trained_adapter(model, heads=HEADS, **kwargs) -> LoFiTAdapter:
    adapter = LoFiTAdapter(HeadLayout.from_model(model), heads, base_model="org/tiny", base_model_revision="abc123")
    with torch.no_grad():
        for layer in adapter.layers.values():
            layer.offset.normal_()
    return adapter


@pytest.mark.parametrize("family,gqa", [("llama", True), ("qwen2", False), ("gemma", True)])
def test_round_trip_gives_equal_outputs(tmp_path, family, gqa):
    model = tiny_model(family, gqa=gqa).eval()
    ids = torch.randint(3, 300, (2, 9))
    base = model(ids).logits
    adapter = trained_adapter(model)
    adapter.attach(model)
    adapted = model(ids).logits
    assert not torch.allclose(adapted, base)
    adapter.save_pretrained(tmp_path / "adapter")

    fresh = tiny_model(family, gqa=gqa).eval()  # same seed: the same base weights
    loaded = HeadAdapter.from_pretrained(tmp_path / "adapter", fresh)
    assert isinstance(loaded, LoFiTAdapter) and loaded.heads == HEADS
    torch.testing.assert_close(fresh(ids).logits, adapted)
    assert not any(p.requires_grad for p in loaded.parameters())
    loaded.detach()
    torch.testing.assert_close(fresh(ids).logits, base)


def test_folder_contents_config_and_card(tmp_path):
    model = tiny_model("llama")
    adapter = trained_adapter(model)
    folder = adapter.save_pretrained(tmp_path / "adapter", eval_results={"counterfactual_qa": {"accuracy": 0.75}})
    assert sorted(p.name for p in folder.iterdir()) == sorted(ADAPTER_FILES)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["format"] == "ctxaware" and config["method"] == "lofit" and "peft_type" not in config
    assert config["base_model"] == "org/tiny" and config["base_model_revision"] == "abc123"
    assert config["heads"] == [list(h) for h in HEADS]
    assert config["base_layout"] == HeadLayout.from_model(model).to_dict()
    assert config["shapes"] == {"layers.0.offset": [1, 8], "layers.1.offset": [2, 8]}
    assert config["hyperparameters"] == {"scales": False, "offsets": True, "init_std": 1e-3}
    card = (folder / "README.md").read_text()
    front_matter = card.split("---")[1]
    assert "library_name: ctxaware" in front_matter and "base_model: org/tiny" in front_matter
    assert "- lofit" in front_matter and "- ctxaware" in front_matter
    assert "| counterfactual_qa | accuracy | 0.75 |" in card


def test_save_replaces_atomically_and_failure_keeps_the_old_folder(tmp_path, monkeypatch):
    model = tiny_model("llama")
    adapter = trained_adapter(model)
    adapter.save_pretrained(tmp_path / "adapter")
    before = (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("ctxaware.adapters.save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        trained_adapter(model).save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


class FakeHfApi:
    """Records the calls made at the huggingface_hub boundary and snapshots the uploaded folder."""

    instances: list["FakeHfApi"] = []

    def __init__(self, token=None):
        self.token, self.calls, self.uploaded = token, [], {}
        FakeHfApi.instances.append(self)

    def create_repo(self, repo_id, **kwargs):
        from huggingface_hub import RepoUrl

        self.calls.append(("create_repo", repo_id, kwargs))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        from pathlib import Path

        self.calls.append(("upload_folder", repo_id, kwargs))
        self.uploaded = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}


def test_push_to_hub_uploads_exactly_the_saved_folder(tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.HfApi", FakeHfApi)
    adapter = trained_adapter(tiny_model("llama"))
    adapter.push_to_hub("me/tiny-lofit", private=True, token="t0k", eval_results={"qa": {"accuracy": 0.5}})
    api = FakeHfApi.instances[-1]
    assert api.token == "t0k"
    assert [call[:2] for call in api.calls] == [("create_repo", "me/tiny-lofit"), ("upload_folder", "me/tiny-lofit")]
    assert api.calls[0][2] == {"private": True, "exist_ok": True, "repo_type": "model"}
    saved = adapter.save_pretrained(tmp_path / "local", eval_results={"qa": {"accuracy": 0.5}})
    assert api.uploaded == {p.name: p.read_bytes() for p in saved.iterdir()}


def test_from_pretrained_hub_id_goes_through_snapshot_download(tmp_path, monkeypatch):
    model = tiny_model("llama").eval()
    folder = trained_adapter(model).save_pretrained(tmp_path / "adapter")
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(folder)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    adapter = HeadAdapter.from_pretrained("me/tiny-lofit", model, revision="v1")
    assert calls == [("me/tiny-lofit", {"revision": "v1", "token": None, "allow_patterns": list(ADAPTER_FILES)})]
    assert adapter.heads == HEADS


def test_eval_dispatch_loads_the_format(tmp_path):
    from ctxaware.models import load_adapter as eval_load_adapter

    model = tiny_model("llama").eval()
    ids = torch.randint(3, 300, (1, 6))
    adapter = trained_adapter(model)
    adapter.save_pretrained(tmp_path / "adapter")
    adapter.attach(model)
    expected = model(ids).logits
    adapter.detach()
    fresh = eval_load_adapter(tiny_model("llama").eval(), str(tmp_path / "adapter"), base_name="org/tiny")
    torch.testing.assert_close(fresh(ids).logits, expected)


def test_base_model_mismatch_names_the_base_and_the_fix(tmp_path):
    trained_adapter(tiny_model("llama", num_heads=4)).save_pretrained(tmp_path / "adapter")
    other = tiny_model("llama", num_heads=2, head_dim=16)
    with pytest.raises(
        ValueError, match=r"trained on org/tiny .*num_heads: adapter 4 vs model 2.*Load it onto org/tiny"
    ):
        load_adapter(other, str(tmp_path / "adapter"))
    with pytest.raises(ValueError, match="model_type: adapter llama vs model qwen3"):
        load_adapter(tiny_model("qwen3"), str(tmp_path / "adapter"))


def test_selection_from_another_shape_and_bad_folders(tmp_path):
    layout = HeadLayout.from_model(tiny_model("llama"))
    with pytest.raises(IndexError, match="4 query heads"):
        LoFiTAdapter(layout, [(0, 4)])
    with pytest.raises(FileNotFoundError, match="not a folder"):
        HeadAdapter.from_pretrained(tmp_path / "missing")
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    with pytest.raises(ValueError, match="PEFT adapter"):
        HeadAdapter.from_pretrained(tmp_path / "peft")
    folder = trained_adapter(tiny_model("llama")).save_pretrained(tmp_path / "edited")
    config = json.loads((folder / "adapter_config.json").read_text())
    config["heads"] = [[0, 1]]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do not match its adapter_config.json"):
        HeadAdapter.from_pretrained(folder)


def test_attaching_twice_is_an_error():
    model = tiny_model("llama")
    adapter = trained_adapter(model)
    adapter.attach(model)
    with pytest.raises(RuntimeError, match="already attached"):
        adapter.attach(model)
    with pytest.raises(RuntimeError, match="layers 0, 1 already carry a ctxaware adapter"):
        trained_adapter(model).attach(model)
    adapter.detach()
    trained_adapter(model).attach(model)
