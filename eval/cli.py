"""`ctxaware eval`: evaluate a model (embedded name, path or Hub id, optionally with an adapter) on named tasks.

ctxaware eval --list
ctxaware eval --model ctxaware-tiny --tasks niah,arithmetic --limit 4 --output_path runs/
"""

import argparse
import sys


DEFAULT_TASKS = "default"


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from error


def _float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from error


def register(subparsers) -> None:
    from ctxaware.models import EMBEDDED_MODEL_NAME
    from ctxaware.switches import SWITCHES

    parser = subparsers.add_parser(
        "eval",
        help="evaluate a model on the shared harnesses",
        description="Evaluate a causal LM on ctxaware's tasks. Results JSON follows lm-evaluation-harness's layout.",
    )
    parser.add_argument("--model", default=EMBEDDED_MODEL_NAME, help="embedded model name, model folder or Hub id")
    parser.add_argument("--adapter", help="PEFT LoRA adapter (or ctxaware adapter) folder or Hub id")
    parser.add_argument("--tasks", default=DEFAULT_TASKS, help="comma-separated task names, or `default` for all")
    parser.add_argument("--list", action="store_true", help="list the tasks and exit")
    parser.add_argument(
        "--limit",
        type=int,
        help="records per task (per grid cell or length for niah, passkey, long_ppl); default: each task's own size",
    )
    parser.add_argument("--output_path", help="folder for results JSON, samples JSONL and plots")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--chat_template", choices=["on", "off"], help="force the chat template on or off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--split", default="test", help="split of the world's data, gsm8k and `books` (train/validation/test)"
    )
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    parser.add_argument("--max_new_tokens", type=int, help="override each task's generation length")
    parser.add_argument("--lengths", type=_int_list, help="context lengths for niah, passkey, long_ppl (e.g. 256,512)")
    parser.add_argument("--depths", type=_float_list, help="needle depths in [0, 1] for niah (e.g. 0,0.5,1)")
    parser.add_argument(
        "--haystack_file", help="text for niah, passkey and long_ppl: a UTF-8 file or `books` (its --split portion)"
    )
    parser.add_argument(
        "--indicator",
        help="text (e.g. an indicator token) appended to the questions of niah, counterfactual_qa, knowledge_conflict"
        " and extractive_qa",
    )
    parser.add_argument("--ppl_stride", type=int, help="long_ppl: sliding-window stride (default: full windows)")
    parser.add_argument("--dataset", help="a real data set by name for the tasks that know it (squad, tldr, pg19)")
    parser.add_argument("--reward_model", help="summarization: sequence-classification reward model path or Hub id")
    parser.add_argument("--baseline_samples", help="summarization: baseline run's samples JSONL, for the win rate")
    parser.add_argument("--attention_baseline", help="attention_allocation: another run's results JSON to compare")
    parser.add_argument("--no_progress", action="store_true", help="hide progress bars")
    parser.add_argument(
        "--num_threads", type=int, help="CPU threads for torch (1 is fastest for tiny models on a busy machine)"
    )
    for switch in SWITCHES.values():
        parser.add_argument(
            f"--{switch.name}", default=switch.default, help=f"{switch.help} (default: {switch.default})"
        )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ctxaware.eval.registry import get_task, task_names

    if args.list:
        for name in task_names():
            print(f"{name:<22} {get_task(name).description}")
        return 0
    try:
        options, tasks, switches = _validate(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"ctxaware eval: error: {error}", file=sys.stderr)
        return 2
    return _evaluate(args, options, tasks, switches)


def _validate(args):
    """Everything that can be checked before the model loads, so bad input fails in a second, not a minute."""
    from pathlib import Path

    from ctxaware import texts
    from ctxaware.eval.registry import EvalOptions, get_task, task_names
    from ctxaware.eval.runner import check_dataset
    from ctxaware.switches import SWITCHES, parse_switch

    if args.limit is not None and args.limit <= 0:
        raise ValueError(f"--limit must be a positive integer, got {args.limit}; omit it to evaluate every record.")
    if args.num_threads is not None and args.num_threads <= 0:
        raise ValueError(f"--num_threads must be a positive integer, got {args.num_threads}.")
    if args.batch_size <= 0:
        raise ValueError(f"--batch_size must be a positive integer, got {args.batch_size}.")
    if args.lengths is not None and (not args.lengths or min(args.lengths) < 2):
        raise ValueError(
            f"--lengths {','.join(map(str, args.lengths))}: every context length must be at least 2 tokens (a text "
            "of one token has nothing to score); e.g. --lengths 256,512"
        )
    names = task_names() if args.tasks == DEFAULT_TASKS else [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not names:
        raise ValueError(f"--tasks is empty; choose from {', '.join(task_names())}.")
    for name in names:
        get_task(name)
    check_dataset(names, args.dataset)
    if args.haystack_file and not texts.is_text_source(args.haystack_file):
        raise FileNotFoundError(
            f"--haystack_file {args.haystack_file} does not exist and is not a named source "
            f"({', '.join(texts.TEXT_SOURCES)}): pass an existing UTF-8 file or a source name."
        )
    for flag in ("baseline_samples", "attention_baseline"):
        value = getattr(args, flag)
        if value and not Path(value).is_file():
            raise FileNotFoundError(f"--{flag} {value} does not exist: pass the path of an existing file.")
    switches = {name: getattr(args, name) for name in SWITCHES}
    for name, value in switches.items():
        parse_switch(name, value)
    options = EvalOptions(
        limit=args.limit,
        batch_size=args.batch_size,
        chat_template=args.chat_template,
        seed=args.seed,
        split=args.split,
        max_new_tokens=args.max_new_tokens,
        lengths=args.lengths,
        depths=args.depths,
        haystack_file=args.haystack_file,
        indicator=args.indicator,
        ppl_stride=args.ppl_stride,
        dataset=args.dataset,
        reward_model=args.reward_model,
        baseline_samples=args.baseline_samples,
        attention_baseline=args.attention_baseline,
        progress=not args.no_progress,
    )
    return options, names, switches


def warn_beyond_context(model, lengths: list[int] | None) -> None:
    """Lengths past the model's trained context measure extrapolation and can be slow: say so before the work."""
    context = getattr(model.config, "max_position_embeddings", None)
    if lengths and context and max(lengths) > context:
        print(
            f"ctxaware eval: warning: --lengths up to {max(lengths)} exceed the model's context of {context} tokens "
            "(max_position_embeddings): those lengths measure extrapolation beyond the trained positions, and take "
            "time and memory quadratic in the length",
            file=sys.stderr,
        )


def _evaluate(args, options, tasks, switches) -> int:
    from ctxaware.eval.model import EvalModel
    from ctxaware.eval.output import format_table
    from ctxaware.eval.runner import evaluate, write_outputs
    from ctxaware.models import load_model
    from ctxaware.switches import apply_generation_hooks

    if args.num_threads:
        import torch

        torch.set_num_threads(args.num_threads)
    try:
        model, tokenizer = load_model(args.model, adapter=args.adapter, dtype=args.dtype, device=args.device)
    except (FileNotFoundError, ValueError, NotImplementedError) as error:
        print(f"ctxaware eval: error: {error}", file=sys.stderr)
        return 2
    try:
        setup = apply_generation_hooks(model, switches)  # checks each switch against the model before any work
    except (ValueError, FileNotFoundError) as error:
        print(f"ctxaware eval: error: {error}", file=sys.stderr)
        return 2
    warn_beyond_context(model, options.lengths)
    try:
        lm = EvalModel(model, tokenizer, batch_size=options.batch_size, setup=setup, progress=options.progress)
        config = {
            "model": args.model,
            "adapter": args.adapter,
            "device": str(model.device),
            "dtype": str(model.dtype),
            "generation_hooks": setup.applied,
        }
        try:
            results, outcomes = evaluate(lm, tasks, options, config=config)
        except (FileNotFoundError, ValueError) as error:
            print(f"ctxaware eval: error: {error}", file=sys.stderr)
            return 2
    finally:
        setup.close()
    print(format_table(results))
    if args.output_path:
        written = write_outputs(results, outcomes, args.output_path)
        print(f"\nResults: {written['results']}")
    return 0
