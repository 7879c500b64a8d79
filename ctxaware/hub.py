"""Model cards and Hub uploads: the one place every recipe and adapter writes its README.md and pushes a folder."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ctxaware.io import write_text


def model_card_text(
    *,
    title: str,
    base_model: str | None,
    description: str,
    results: dict[str, dict[str, float]] | None = None,
    tags: Iterable[str] = (),
    library_name: str = "peft",
    datasets: Iterable[str] = (),
    usage: str | None = None,
) -> str:
    """README.md text: Hub metadata (library, base model, tags, datasets), the title, the description, a results
    table (`results[task][metric] = value`) and a usage snippet."""
    lines = ["---", f"library_name: {library_name}"]
    lines += [f"base_model: {base_model}"] if base_model else []
    lines += ["tags:"] + [f"- {tag}" for tag in dict.fromkeys(("ctxaware", *tags))]
    datasets = list(datasets)
    lines += ["datasets:"] + [f"- {name}" for name in datasets] if datasets else []
    lines += ["---", "", f"# {title}", "", description.strip(), ""]
    if results:
        lines += ["## Evaluation", "", "| task | metric | value |", "|---|---|---|"]
        for task, metrics in results.items():
            lines += [f"| {task} | {metric} | {value:.4g} |" for metric, value in metrics.items()]
        lines.append("")
    if usage:
        lines += ["## Usage", "", "```python", usage.strip(), "```", ""]
    return "\n".join(lines)


def write_model_card(folder: str | Path, **card) -> Path:
    """`folder`/README.md from `model_card_text(**card)`, written atomically."""
    path = Path(folder) / "README.md"
    write_text(path, model_card_text(**card))
    return path


def push_folder_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload with ctxaware",
):
    """Creates `repo_id` if needed and uploads `folder` (adapter, card, results) in one commit; returns the repo URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message=commit_message)
    return repo_url
