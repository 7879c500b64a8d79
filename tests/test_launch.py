"""tests/launch.py tolerates gloo's teardown abort only when the run wrote its last file, and nothing else."""

import pytest

from tests.launch import accelerate_launch


ABORTS_AT_EXIT = """
import os, sys
from pathlib import Path
if len(sys.argv) > 1:
    Path(sys.argv[1]).write_text("done")
sys.stderr.write("terminate called without an active exception\\n")
sys.stderr.flush()
os.abort()
"""


def test_a_teardown_abort_counts_only_after_the_last_output(tmp_path):
    script = tmp_path / "aborts_at_exit.py"
    script.write_text(ABORTS_AT_EXIT)
    marker = tmp_path / "last_output.json"
    with pytest.raises(AssertionError, match="exited"):
        accelerate_launch(script, finished=marker, timeout=120)  # aborted before writing it
    accelerate_launch(script, str(marker), finished=marker, timeout=120)
    with pytest.raises(AssertionError, match="exited"):
        accelerate_launch(script, str(marker), timeout=120)  # no `finished`: every failure raises
