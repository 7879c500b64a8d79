"""benchmarks/device/lanes.sh: detached lanes run from the repository root with LANE_OUT set, record their exit
codes, and every call copies what they wrote to $OUT (logs as files, results folders as lanes.tgz without model
weights), so a lane's result survives the call that started it; a call with nothing to run stops at once."""

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "device" / "lanes.sh"
PACK = ROOT / "benchmarks" / "device" / "pack_out.sh"

pytestmark = pytest.mark.skipif(shutil.which("setsid") is None, reason="needs setsid (util-linux)")


def _lanes(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    out = tmp_path / "call_out"
    out.mkdir(exist_ok=True)
    setup = tmp_path / "setup.sh"  # not the GPU machine's (it installs wheels and links packages in the checkout)
    setup.write_text("export LANE_SETUP_SOURCED=1\n")
    env = {**os.environ, "LANES_ROOT": str(tmp_path / "lanes"), "OUT": str(out), "LANES_SETUP": str(setup)}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def _returned(tmp_path: Path, member: str) -> str:
    """A file of the lanes' results as the device returns it: inside $OUT/lanes.tgz."""
    with tarfile.open(tmp_path / "call_out" / "lanes.tgz") as archive:
        return archive.extractfile(f"lanes/{member}").read().decode()


def test_lanes_run_detached_and_report(tmp_path):
    lanes = tmp_path / "lanes.tsv"
    lanes.write_text(
        'ok\techo "quoted $((6 * 7))" > "$LANE_OUT/result.txt" && test -f pyproject.toml && test -n "$LANE_SETUP_SOURCED"'
        ' && mkdir -p "$LANE_OUT/a/b" && echo w > "$LANE_OUT/a/b/model.safetensors"\n'
        "# skipped\tfalse\n"
        "fails\techo before; exit 3\n"
    )
    started = _lanes(tmp_path, "start", str(lanes), "30")
    assert started.returncode == 0, started.stderr
    assert "started lane ok" in started.stdout and "started lane fails" in started.stdout
    assert "skipped" not in started.stdout
    copied = tmp_path / "call_out" / "lanes"
    assert (copied / "ok" / "rc").read_text().strip() == "0"
    assert _returned(tmp_path, "ok/out/result.txt").strip() == "quoted 42"
    with tarfile.open(tmp_path / "call_out" / "lanes.tgz") as archive:
        assert not [name for name in archive.getnames() if name.endswith(".safetensors")]
    assert (copied / "fails" / "rc").read_text().strip() == "3"
    assert "before" in (copied / "fails" / "log").read_text()
    assert "lane fails: ended rc=3" in started.stdout


def test_poll_waits_for_a_running_lane(tmp_path):
    lanes = tmp_path / "lanes.tsv"
    lanes.write_text('slow\tsleep 3; echo done > "$LANE_OUT/x"\n')
    started = _lanes(tmp_path, "start", str(lanes), "0")
    assert "lane slow: running" in started.stdout
    polled = _lanes(tmp_path, "poll", "30")
    assert "lane slow: ended rc=0" in polled.stdout
    assert _returned(tmp_path, "slow/out/x").strip() == "done"


@pytest.mark.parametrize("content", [None, "# only a comment\n\n"])
def test_start_without_lanes_stops_at_once(tmp_path, content):
    """A missing or empty lanes file once made a call wait its whole WAIT for lanes that never started."""
    lanes = tmp_path / "lanes.tsv"
    if content is not None:
        lanes.write_text(content)
    started = _lanes(tmp_path, "start", str(lanes), "50")
    assert started.returncode == 2 and "name<TAB>command" in started.stderr


def test_poll_without_lanes_stops_at_once(tmp_path):
    polled = _lanes(tmp_path, "poll", "50")
    assert polled.returncode == 2 and "start them again" in polled.stderr


def test_a_checkout_run_from_pythonpath_imports_the_mapped_packages(tmp_path):
    """benchmarks/device/package_links.sh: on the GPU machine the checkout is not installed, and `ctxaware fetch`
    (the SmolLM2 conversion) imports ctxaware.eval through the CLI; without the links it stopped there."""
    ignore = shutil.ignore_patterns("__pycache__", "eval", "data")  # links a run of the script here may have left
    shutil.copytree(ROOT / "ctxaware", tmp_path / "ctxaware", ignore=ignore)
    shutil.copytree(ROOT / "benchmarks" / "device", tmp_path / "benchmarks" / "device")
    for name in ("eval", "data"):
        (tmp_path / name).symlink_to(ROOT / name)
    probe = [
        sys.executable,
        "-c",
        "import ctxaware.eval.cli, ctxaware.data, ctxaware.cli; ctxaware.cli.build_parser(); "
        "print(ctxaware.eval.__file__); print(ctxaware.data.__file__)",
    ]
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}  # here an editable install also maps ctxaware.eval: the
    subprocess.run(["bash", "benchmarks/device/package_links.sh"], cwd=tmp_path, check=True, timeout=60)
    after = subprocess.run(probe, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert after.returncode == 0, after.stderr
    served = after.stdout.split()  # the copy's links must serve both, not the editable install
    assert served == [str(tmp_path / "ctxaware" / name / "__init__.py") for name in ("eval", "data")], served


def _pack(out: Path | None) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "OUT"} | ({"OUT": str(out)} if out else {})
    return subprocess.run(["bash", str(PACK)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def _returned_files(out: Path) -> list[str]:
    return sorted(str(path.relative_to(out)) for path in out.rglob("*") if path.is_file())


def test_pack_out_leaves_what_the_device_returns_as_it_is(tmp_path):
    for name in ("a.log", "b/c.json", "b/d/e.md"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    packed = _pack(tmp_path)
    assert packed.returncode == 0, packed.stderr
    assert _returned_files(tmp_path) == ["a.log", "b/c.json", "b/d/e.md"]


@pytest.mark.parametrize("layout", ["too many", "too deep"])
def test_pack_out_packs_what_the_device_would_leave_out(tmp_path, layout):
    """More than 8 files, or one 3 folders down: all but the top-level archives and weights go into out.tgz."""
    names = [f"ab/run{i}.log" for i in range(9)] if layout == "too many" else ["x.log", "a/b/c/deep.json"]
    for name in [*names, "lanes.tgz", "model/w.safetensors"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    packed = _pack(tmp_path)
    assert packed.returncode == 0, packed.stderr
    assert _returned_files(tmp_path) == ["lanes.tgz", "model/w.safetensors", "out.tgz"]
    with tarfile.open(tmp_path / "out.tgz") as archive:
        members = sorted(m.name.removeprefix("./") for m in archive.getmembers() if m.isfile())
        assert members == sorted(names)
        assert all(archive.extractfile(f"./{name}").read().decode() == name for name in names)


def test_pack_out_without_out_stops(tmp_path):
    packed = _pack(None)
    assert packed.returncode == 2 and "$OUT" in packed.stderr


def test_many_lanes_come_back_within_the_device_s_file_limit(tmp_path):
    """Four lanes' cmd, log and rc (12 files) and lanes.tgz: once more than a call returns (8 files)."""
    lanes = tmp_path / "lanes.tsv"
    lanes.write_text("".join(f'l{i}\techo {i} > "$LANE_OUT/r"\n' for i in range(4)))
    started = _lanes(tmp_path, "start", str(lanes), "30")
    assert started.returncode == 0, started.stderr
    out = tmp_path / "call_out"
    assert _returned_files(out) == ["lanes.tgz", "out.tgz"]
    assert _returned(tmp_path, "l3/out/r").strip() == "3"
    with tarfile.open(out / "out.tgz") as archive:
        assert archive.extractfile("./lanes/l2/rc").read().decode().strip() == "0"
