"""Named sources a tune spec can use, registered by the applications built on the tuner.

Model references `PREFIX:NAME` (besides directories and `tiny:NAME`, which the merge reads itself)
and accuracy data `PREFIX:NAME` resolve through these registries. The tuner imports no
application: the multi-task experiment registers `multitask:…`, `multitask-small:…`,
`multitask-hard:…` and `task:…` when `collab_ray.tuning.experiment` is imported (as
`collab-ray tune-merge` does).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from collab_ray.core.errors import ConfigError

if TYPE_CHECKING:
    from collab_ray.tuning.spec import TuneSpec

MODEL_SOURCES: dict[str, Callable[[str], str]] = {}  # prefix -> (full reference -> checkpoint directory)
TASK_SOURCES: dict[str, Callable[[str], list[tuple[str, list[str]]]]] = {}  # prefix -> (NAME -> (prompt, answers) items)


def register_models(prefix: str, resolve: Callable[[str], str]) -> None:
    """Make `PREFIX:NAME` model references resolve with `resolve(ref)` (a directory)."""
    MODEL_SOURCES[prefix] = resolve


def register_tasks(prefix: str, items: Callable[[str], list[tuple[str, list[str]]]]) -> None:
    """Make `PREFIX:NAME` accuracy data resolve to `items(NAME)`: validation (prompt, accepted answers) pairs."""
    TASK_SOURCES[prefix] = items


def resolve_model(ref: str) -> str:
    """A registered `PREFIX:NAME` reference's directory; any other reference unchanged."""
    prefix = ref.partition(":")[0]
    return MODEL_SOURCES[prefix](ref) if ":" in ref and prefix in MODEL_SOURCES else ref


def task_items(source: str) -> list[tuple[str, list[str]]] | None:
    """The items of registered accuracy data `PREFIX:NAME`, or None when `source` has no registered prefix."""
    prefix, colon, name = source.partition(":")
    if not colon or prefix in ("tiny",) or "/" in prefix:
        return None
    if prefix not in TASK_SOURCES:
        if prefix == "task":
            known = ", ".join(TASK_SOURCES) or "none"
            raise ConfigError(f"data {source!r}: no task source {prefix!r} is registered (registered: {known}); import collab_ray.tuning.experiment")
        return None
    return TASK_SOURCES[prefix](name)


def resolve_models(spec: TuneSpec) -> TuneSpec:
    """The spec with registered model references replaced by their checkpoint directories."""
    models = [m.model_copy(update={"model": resolve_model(m.model)}) for m in spec.models]
    base = resolve_model(spec.base_model) if spec.base_model else None
    return spec.model_copy(update={"models": models, "base_model": base})
