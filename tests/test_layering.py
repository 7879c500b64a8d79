"""Imports point one way: `ctxaware.kernels` (no transformers) <- the library `ctxaware` <- the harness `ctxaware.eval`
(the checkout's top-level `eval/`) <- recipes and benchmarks. Checked on the source with `ast`, every import statement
at any depth (inside functions too) and every `importlib.import_module` / `__import__` of a literal name; plus the two
name -> module tables through which the library reaches its methods without importing them (adapters, switches)."""

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import ctxaware
import ctxaware.methods
from ctxaware import adapters, switches


LIBRARY = Path(ctxaware.__file__).parent  # the checkout's ctxaware/; eval/ (ctxaware.eval) lies outside it


def module_name(path: Path, root: Path = LIBRARY) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, name: str, is_package: bool = False) -> set[str]:
    """Every module `source` (the module `name`) imports, anywhere in it: `import a.b` gives a.b, `from a import b`
    gives a and a.b (b may be a module), relative imports resolved, literal `import_module("x")` gives x."""
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            function = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if function in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.add(node.args[0].value)
    return found


def is_within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def offenders(root: Path, forbidden: str) -> list[str]:
    """`file: module` for each import of `forbidden` (or a module inside it) by a .py file under `root`."""
    found = []
    for path in sorted(root.rglob("*.py")):
        imports = imported_modules(path.read_text(), module_name(path), path.name == "__init__.py")
        found += [f"{path.relative_to(LIBRARY.parent)}: {m}" for m in sorted(imports) if is_within(m, forbidden)]
    return found


def test_the_checker_sees_every_form_of_import():
    """The mutations the direction test must catch, on a module `ctxaware.methods.x`."""
    forms = [
        "import ctxaware.eval",
        "import ctxaware.eval.hooks as hooks",
        "from ctxaware.eval.hooks import GenerationSetup",
        "from ctxaware import eval",
        "from .. import eval",
        "from ..eval.model import EvalModel",
        "def f():\n    from ctxaware.eval import registry",
        "class A:\n    def f(self):\n        import ctxaware.eval.cli",
        "import importlib\nimportlib.import_module('ctxaware.eval.cli')",
        "__import__('ctxaware.eval')",
    ]
    for source in forms:
        imports = imported_modules(source, "ctxaware.methods.x")
        assert any(is_within(m, "ctxaware.eval") for m in imports), source
    clean = "from ctxaware import evaluation\nimport ctxaware.evaluator\nfrom . import eval_tools\n'ctxaware.eval'"
    assert not any(is_within(m, "ctxaware.eval") for m in imported_modules(clean, "ctxaware.methods.x"))


def test_the_library_never_imports_the_harness():
    """The one place the library names `ctxaware.eval` is the `ctxaware` command's subcommand table
    (`ctxaware/cli.py`, a string dispatched at run time): the entry point above every layer, not an import."""
    assert not (LIBRARY / "eval").exists(), "the checkout's harness is the top-level eval/, outside the library"
    assert offenders(LIBRARY, "ctxaware.eval") == []


def test_kernels_import_neither_transformers_nor_the_rest_of_the_library():
    kernels = LIBRARY / "kernels"
    assert offenders(kernels, "transformers") == []
    library = [
        line for line in offenders(kernels, "ctxaware") if not line.split(": ")[1].startswith("ctxaware.kernels")
    ]
    assert library == []


@pytest.mark.parametrize("module", ["ctxaware/adapters.py", "ctxaware/switches.py"])
def test_registries_reach_methods_only_by_name(module):
    """adapters.py and switches.py import no method module; the methods import them (one way)."""
    path = LIBRARY.parent / module
    imports = imported_modules(path.read_text(), module_name(path))
    assert not [m for m in imports if is_within(m, "ctxaware.methods")]


def import_every_method_module() -> None:
    for info in pkgutil.walk_packages(ctxaware.methods.__path__, "ctxaware.methods."):
        importlib.import_module(info.name)


def test_adapter_table_names_every_method_module():
    import_every_method_module()
    assert set(adapters.ADAPTER_METHODS) == set(adapters.ADAPTER_MODULES)
    for method, module in adapters.ADAPTER_MODULES.items():
        assert adapters.ADAPTER_METHODS[method].__module__ == module
        assert adapters.adapter_class(method) is adapters.ADAPTER_METHODS[method]
    assert adapters.adapter_class("no_such_method") is None


def test_each_switch_is_registered_by_its_method():
    """Every kind besides the default comes from the module `SWITCHES` names, and each names one that registers."""
    import_every_method_module()
    for name, switch in switches.SWITCHES.items():
        kinds = switches.known_kinds(name)
        assert switch.default in kinds and len(kinds) > 1, name
        for kind in kinds:
            if kind != switch.default:
                assert switches._HOOKS[name][kind].__module__ == switch.module, (name, kind)
