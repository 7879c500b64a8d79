"""The task registry: each task module registers one `Task` subclass under its name with `@register_task`."""

import importlib
from dataclasses import dataclass, field
from typing import Any, ClassVar


# Task modules imported on first use of the registry, so that `ctxaware eval --help` imports none of them.
TASK_MODULES = (
    "niah",
    "counterfactual_qa",
    "extractive_qa",
    "passkey",
    "long_ppl",
    "arithmetic",
    "summarization",
    "attention_allocation",
    "gsm8k",
    "knowledge_conflict",
)

_TASKS: dict[str, type["Task"]] = {}


@dataclass
class EvalOptions:
    """Everything a task may read besides the model; `None` means "the task's default"."""

    limit: int | None = None
    batch_size: int = 8
    chat_template: str | None = None  # "on", "off", or None for the task's own default
    seed: int = 0
    split: str = "test"
    max_new_tokens: int | None = None
    lengths: list[int] | None = None  # niah, passkey, long_ppl
    depths: list[float] | None = None  # niah
    haystack_file: str | None = None  # niah, passkey, long_ppl: a text file or a named source (`books`)
    indicator: str | None = None  # niah, counterfactual_qa, knowledge_conflict, extractive_qa: appended to questions
    ppl_stride: int | None = None  # long_ppl: None scores each length as one full window
    dataset: str | None = None  # a real data set by name, for tasks that support one
    reward_model: str | None = None  # summarization
    baseline_samples: str | None = None  # summarization: samples JSONL of the baseline run
    attention_baseline: str | None = None  # attention_allocation: results JSON of another model
    progress: bool = True


@dataclass
class TaskResult:
    """Scalar metrics (and their standard errors where meaningful), per-sample records, and plots to write.

    `plots` maps a short name to a function that writes a PNG to the path it is given; `extra` holds JSON-ready
    structures (grids, matrices) that go into the results file next to the metrics.
    """

    metrics: dict[str, float]
    samples: list[dict]
    stderrs: dict[str, float] = field(default_factory=dict)
    plots: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


class Task:
    """One evaluation: `load` returns its records (at most `options.limit`), `evaluate` scores a model on them."""

    name: ClassVar[str]
    version: ClassVar[int] = 1
    description: ClassVar[str] = ""
    # Records evaluated when `--limit` is not given: the synthetic sets are as large as asked, so the default is a
    # size that keeps the whole suite at a few minutes on CPU. None: the task's own default (grid tasks).
    default_limit: ClassVar[int | None] = None
    # Metric name -> whether higher is better; metrics not listed count as higher-is-better.
    higher_is_better: ClassVar[dict[str, bool]] = {}

    def higher_is_better_for(self, metric: str) -> bool:
        return self.higher_is_better.get(metric, True)

    def load(self, lm, options: EvalOptions) -> list[dict]:
        raise NotImplementedError

    def evaluate(self, lm, records: list[dict], options: EvalOptions) -> TaskResult:
        raise NotImplementedError

    def config(self, options: EvalOptions) -> dict:
        """The options this task actually used, for the `configs` section of the results."""
        return {"task": self.name, "description": self.description}


def register_task(cls: type[Task]) -> type[Task]:
    if cls.name in _TASKS and _TASKS[cls.name] is not cls:
        raise ValueError(f"Two tasks are registered as {cls.name!r}: {_TASKS[cls.name]} and {cls}.")
    _TASKS[cls.name] = cls
    return cls


def _import_tasks() -> None:
    for module in TASK_MODULES:
        importlib.import_module(f"ctxaware.eval.{module}")


def task_names() -> list[str]:
    _import_tasks()
    return sorted(_TASKS)


def get_task(name: str) -> Task:
    _import_tasks()
    if name not in _TASKS:
        raise ValueError(
            f"Unknown task {name!r}. Known tasks: {', '.join(sorted(_TASKS))} (see `ctxaware eval --list`)."
        )
    return _TASKS[name]()
