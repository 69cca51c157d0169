"""Core types, sampling and the `ModelBackend` protocol. Imports neither Ray nor transformers."""

from collab_ray.core.backend import ModelBackend
from collab_ray.core.errors import CollabError, ConfigError, ModelLoadError, SessionNotFound
from collab_ray.core.sampling import SamplingParams
from collab_ray.core.types import (
    Generation,
    LoglikelihoodResult,
    ModelInfo,
    Proposal,
    SessionStart,
    TopK,
    Usage,
)

__all__ = [
    "CollabError",
    "ConfigError",
    "Generation",
    "LoglikelihoodResult",
    "ModelBackend",
    "ModelInfo",
    "ModelLoadError",
    "Proposal",
    "SamplingParams",
    "SessionNotFound",
    "SessionStart",
    "TopK",
    "Usage",
]
