"""What every speed benchmark records about the tree it timed."""

import os
import subprocess
from pathlib import Path


def git_commit() -> str:
    """The benchmarked commit: CTXAWARE_GIT_COMMIT where the tree travelled without its repository (a `git archive`
    copy on the GPU machine), else `git rev-parse HEAD`; empty when neither is known."""
    if commit := os.environ.get("CTXAWARE_GIT_COMMIT"):
        return commit
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        )
    except OSError:  # no git on the machine
        return ""
    return result.stdout.strip()
