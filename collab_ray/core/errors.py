"""Errors shared by every layer. Each names the bad value it refuses."""


class CollabError(Exception):
    """Base class of collab_ray's own errors."""


class ConfigError(CollabError, ValueError):
    """A configuration value (YAML field, model source, dtype, …) is invalid."""


class ModelLoadError(CollabError, RuntimeError):
    """A model source could not be resolved or loaded."""


class SessionNotFound(CollabError, LookupError):
    """The decode session is gone (evicted, closed, replica restarted, routed elsewhere).

    Callers recover by re-opening a session and replaying its tokens.
    """

    def __init__(self, session_id: str):
        super().__init__(session_id)
        self.session_id = session_id

    def __str__(self) -> str:
        return f"session {self.session_id!r} not found (evicted, closed or never opened)"


class ModelUnavailable(CollabError):
    """A model could not answer (replica died, overloaded, or timed out): a 503 at the HTTP API."""


class ModelAtCapacity(ModelUnavailable):
    """A model's KV memory or queue is full; the caller may retry later (a 503 that names the model)."""
