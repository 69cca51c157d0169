"""Core types, sampling and the `ModelBackend` protocol. Imports neither Ray nor transformers.

Names are imported on first use (PEP 562), so that `collab_ray.core.errors` and the other light
modules load without torch: the `collab-ray` CLI imports them to build its parser and must start fast.
"""

from importlib import import_module

_EXPORTS = {
    "ModelBackend": "collab_ray.core.backend",
    "CollabError": "collab_ray.core.errors",
    "ConfigError": "collab_ray.core.errors",
    "ModelLoadError": "collab_ray.core.errors",
    "SessionNotFound": "collab_ray.core.errors",
    "SamplingParams": "collab_ray.core.sampling",
    "Generation": "collab_ray.core.types",
    "LoglikelihoodResult": "collab_ray.core.types",
    "ModelInfo": "collab_ray.core.types",
    "Proposal": "collab_ray.core.types",
    "SessionStart": "collab_ray.core.types",
    "TopK": "collab_ray.core.types",
    "Usage": "collab_ray.core.types",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
