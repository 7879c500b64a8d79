"""Every YAML under recipes/configs/<recipe>/ parses into its recipe's dataclasses (recipes/<recipe>.py exposes them
as CONFIG_CLASSES), and the shared convention holds: YAML sets defaults, CLI flags override them, unknown keys fail."""

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from trl import TrlParser


RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
CONFIG_FILES = sorted((RECIPES_DIR / "configs").glob("*/*.yaml"))


def load_recipe(name: str):
    path = RECIPES_DIR / f"{name}.py"
    assert path.is_file(), f"recipes/configs/{name}/ has no recipe recipes/{name}.py"
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("config_file", CONFIG_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_config_parses(config_file):
    recipe = load_recipe(config_file.parent.name)
    parsed = TrlParser(recipe.CONFIG_CLASSES).parse_args_and_config(args=["--config", str(config_file)])
    assert [type(c) for c in parsed] == list(recipe.CONFIG_CLASSES)


@dataclass
class ToyArguments:
    model_name_or_path: str = field(default="ctxaware-tiny", metadata={"help": "Model to tune."})
    group_size_ratio: float = field(default=0.25, metadata={"help": "Group size as a fraction of the length."})
    sinks: int = 4


def test_yaml_sets_defaults_and_cli_overrides(tmp_path):
    config = tmp_path / "toy.yaml"
    config.write_text("group_size_ratio: 0.125\nsinks: 8\n")
    (args,) = TrlParser([ToyArguments]).parse_args_and_config(args=["--config", str(config), "--sinks", "2"])
    assert args.group_size_ratio == 0.125  # from the YAML
    assert args.sinks == 2  # the CLI wins over the YAML
    assert args.model_name_or_path == "ctxaware-tiny"  # untouched default


def test_unknown_yaml_key_fails(tmp_path):
    config = tmp_path / "toy.yaml"
    config.write_text("sink_tokens: 8\n")
    with pytest.raises(ValueError, match="sink_tokens"):
        TrlParser([ToyArguments]).parse_args_and_config(args=["--config", str(config)])


RECIPE_NAMES = sorted(p.stem for p in RECIPES_DIR.glob("*.py"))


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_every_recipe_parses_with_trl_and_maps_bad_input_to_exit_2(name):
    """One entry point: TrlParser over CONFIG_CLASSES (so --config YAML works) inside `usage_errors`."""
    source = (RECIPES_DIR / f"{name}.py").read_text()
    entry = f'    with usage_errors("{name}"):\n        main(*TrlParser(CONFIG_CLASSES).parse_args_and_config())\n'
    assert source.endswith(entry)


@pytest.mark.parametrize(
    "name, unread",
    [
        ("arith_heads", ["dtype", "use_peft"]),
        ("lofit", ["dtype", "use_peft"]),
        ("moh", ["dtype", "use_peft"]),
        ("sinklora", ["use_dora", "load_in_8bit"]),
        ("context_sft", ["load_in_4bit", "use_bnb_nested_quant"]),
        ("rlhf_summarize", ["model_revision", "load_in_8bit"]),
    ],
)
def test_model_options_a_recipe_does_not_read_are_refused(name, unread, tmp_path):
    from ctxaware.training import check_model_options

    recipe = load_recipe(name)
    parser = TrlParser(recipe.CONFIG_CLASSES)
    *_, model_args = parser.parse_args_and_config(args=["--output_dir", str(tmp_path), "--model_name_or_path", "x"])
    check_model_options(model_args, recipe.MODEL_OPTIONS)  # its own options, set: fine
    assert not set(unread) & set(recipe.MODEL_OPTIONS)
    flags = ["--output_dir", str(tmp_path), f"--{unread[0]}", "bfloat16" if unread[0] == "dtype" else "true"]
    *_, model_args = parser.parse_args_and_config(args=[*flags, f"--{unread[1]}", "true"])
    message = f"--{unread[0]}, --{unread[1]}: this recipe does not use those options"
    with pytest.raises(ValueError, match=message):
        check_model_options(model_args, recipe.MODEL_OPTIONS)
