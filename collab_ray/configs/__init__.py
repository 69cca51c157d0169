"""Collaboration configs that ship inside the package, so the CLI finds them wherever it is installed.

`demo.yaml` (the real packaged models, every strategy: `collab-ray demo`), `tiny.yaml` (tiny
llama checkpoints: tests and smoke runs, `collab-ray serve tiny`) and `specialists.yaml` (the
multitask-hard base and fine-tunes, kept apart: route, rank, cascade, fuse, vote) live here, with
the fitted files they name (`routers/demo.npz`, `routers/specialists.npz`, `scorers/specialists.npz`).
Every command that takes a config accepts either a path or one of these names; the repository's
`deploy/*.yaml`, `deploy/routers` and `deploy/scorers` are links to these files (one copy of each).
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent


def names() -> list[str]:
    """The packaged config names (`demo`, `specialists`, `tiny`)."""
    return sorted(p.stem for p in HERE.glob("*.yaml"))


def packaged_config(name: str) -> Path:
    """The file of packaged config `name`; ValueError naming it and the available ones."""
    path = HERE / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"no packaged config {name!r}; available: {', '.join(names())}")
    return path


def resolve(config: str | Path) -> Path:
    """A config path as given, or the packaged config of that name (`demo`, `tiny`) when no such file exists."""
    path = Path(config)
    if not path.exists() and isinstance(config, str) and config in names():
        return packaged_config(config)
    return path
