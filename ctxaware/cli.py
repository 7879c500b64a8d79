"""The `ctxaware` command line: one subcommand per tool (`eval`, `score`, ...).

Each subcommand lives in its own module, which exposes `register(subparsers)`: it adds its parser and sets
`func=callable(args) -> int` as a default. Modules are imported here only to build the parser, and must keep heavy
imports (torch, transformers) inside their `func`, so that `ctxaware --help` stays fast.
"""

import argparse
import importlib
import sys

from ctxaware import __version__


# Subcommand name -> module exposing `register(subparsers)`.
SUBCOMMAND_MODULES: dict[str, str] = {
    "eval": "ctxaware.eval.cli",
    "score": "ctxaware.score_cli",
    "fetch": "ctxaware.model_fetch",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ctxaware",
        description="Attention-level fine-tuning recipes and their evaluation harnesses. "
        "Recipes run with `accelerate launch recipes/<name>.py`.",
    )
    parser.add_argument("--version", action="version", version=f"ctxaware {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for module_name in SUBCOMMAND_MODULES.values():
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
