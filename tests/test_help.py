"""`--help` works on every recipe, every benchmark script and every `ctxaware` subcommand (argparse formats each help
string with %, so one bare % in a field's help crashes it)."""

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ctxaware.cli import SUBCOMMAND_MODULES


REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(
    str(p.relative_to(REPO_ROOT))
    for p in [*REPO_ROOT.glob("recipes/*.py"), *REPO_ROOT.glob("benchmarks/*.py")]
    if 'if __name__ == "__main__":' in p.read_text()
)
COMMANDS = [[script] for script in SCRIPTS] + [["-m", "ctxaware.cli"]]
COMMANDS += [["-m", "ctxaware.cli", name] for name in SUBCOMMAND_MODULES]


def _help(command: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *command, "--help"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_every_script_and_subcommand_prints_its_help():
    assert any("recipes/" in s for s in SCRIPTS) and any("benchmarks/" in s for s in SCRIPTS)
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(map(" ".join, COMMANDS), pool.map(_help, COMMANDS)))
    failed = {name: r.stderr[-800:] for name, r in results.items() if r.returncode != 0 or "usage:" not in r.stdout}
    assert not failed, failed
