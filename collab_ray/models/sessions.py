"""A bounded store of decode sessions: LRU eviction past `max_sessions`, and an idle timeout."""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from collab_ray.core.errors import SessionNotFound


@dataclass
class Session:
    tokens: list[int]  # the session's tokens; the KV cache covers a prefix of them (see `cached`)
    cache: Any  # transformers DynamicCache
    last_logits: Any  # [V] logits after `tokens`, or None (after a rollback or `propose`: computed on demand)
    generator: Any = None  # torch.Generator of `propose`, seeded on first use
    last_used: float = field(default_factory=time.monotonic)

    @property
    def cached(self) -> int:
        """Tokens in the KV cache. `propose` leaves its last token out of it: that forward pass is
        only needed if the token is kept, and the next call feeds it together with its own tokens."""
        return self.cache.get_seq_length()


class SessionStore:
    def __init__(self, max_sessions: int, ttl_s: float):
        self.max_sessions = max_sessions
        self.ttl_s = ttl_s
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, session_id: str) -> Session:
        self.expire()
        session = self._sessions.get(session_id)
        if session is None:
            raise SessionNotFound(session_id)
        session.last_used = time.monotonic()
        self._sessions.move_to_end(session_id)
        return session

    def put(self, session_id: str, session: Session) -> None:
        self._sessions.pop(session_id, None)
        self._sessions[session_id] = session
        self.expire()
        while len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)
            self.evicted += 1

    def pop(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def expire(self) -> None:
        deadline = time.monotonic() - self.ttl_s
        while self._sessions:
            oldest_id, oldest = next(iter(self._sessions.items()))
            if oldest.last_used >= deadline:
                break
            del self._sessions[oldest_id]
            self.evicted += 1
