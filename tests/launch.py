"""Runs scripts through `accelerate launch` on CPU in a subprocess, as a user would; imports benchmark scripts as
modules for tests of their logic."""

import importlib
import os
import subprocess
import sys
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parents[1]


def load_benchmark(script: str):
    """`benchmarks/<script>.py` as a module; the scripts import their helpers (`science_common`, `bench_common`)
    from their own folder."""
    folder = str(REPO_ROOT / "benchmarks")
    sys.path.insert(0, folder)
    try:
        return importlib.import_module(script)
    finally:
        sys.path.remove(folder)


def accelerate_launch(
    script: str | Path,
    *args: str,
    num_processes: int = 1,
    config_file: str | None = None,
    timeout: float = 600,
    env: dict | None = None,
    finished: Path | None = None,
) -> subprocess.CompletedProcess:
    """Launches `script` from the repository root on CPU, optionally with one of recipes/accelerate/*.yaml; raises
    with the child's output if it fails. With `finished` (a file the run writes last), a multi-process run whose rank
    aborted in gloo's teardown at interpreter exit ("terminate called without an active exception", about 1 CI run
    in 20, after every output was written: see tests/scripts/ddp_smoke.py) counts as finished when that file exists;
    the caller's own checks then read its outputs."""
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if config_file:
        command += ["--config_file", config_file]
    command += ["--num_processes", str(num_processes), "--num_machines", "1", "--mixed_precision", "no"]
    command += ["--dynamo_backend", "no"]
    # Several processes go through torchrun (`--multi_gpu`); ACCELERATE_USE_CPU=1 then makes them one gloo group.
    if num_processes > 1:
        command += ["--main_process_port", str(_free_port())] + ([] if config_file else ["--multi_gpu"])
    else:
        command += ["--cpu"]
    command += [str(script), *args]
    child_env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO_ROOT),
        "ACCELERATE_USE_CPU": "1",
        **(env or {}),
    }
    result = subprocess.run(command, cwd=REPO_ROOT, env=child_env, capture_output=True, text=True, timeout=timeout)
    teardown_abort = "terminate called without an active exception" in result.stderr
    if result.returncode != 0 and not (teardown_abort and finished is not None and finished.exists()):
        raise AssertionError(
            f"`{' '.join(command)}` exited {result.returncode}\n--- stdout ---\n{result.stdout[-6000:]}\n"
            f"--- stderr ---\n{result.stderr[-6000:]}"
        )
    return result


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
