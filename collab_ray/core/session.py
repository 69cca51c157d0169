"""`Session`: a decode session that survives eviction, and windowed per-token scoring.

A backend may drop a session at any time (LRU eviction, idle timeout, a replica restart); it then
raises `SessionNotFound`. `Session` mirrors the tokens it fed, so on that error it re-opens the
session with them (one prefill) and retries the call once. Strategies that step several models
(speculative, contrastive, proxy, token-level ensembles) hold one `Session` per model.
"""

from __future__ import annotations

import uuid
from typing import Sequence

import numpy as np

from collab_ray.core.backend import ModelBackend
from collab_ray.core.errors import SessionNotFound
from collab_ray.core.sampling import SamplingParams
from collab_ray.core.types import LogProbs, Proposal


class Session:
    """A KV-cached decode session on one backend; use `await Session.open(...)` and `close()`.

    `tokens` are the ids the session holds; `last` the next-token log-probs [V] after them, when
    the last call returned them (None after `propose`/`rollback`).
    """

    def __init__(self, backend: ModelBackend, session_id: str, tokens: list[int], last: np.ndarray | None):
        self.backend = backend
        self.session_id = session_id
        self.tokens = tokens
        self.last = last
        self.reopened = 0  # times the backend lost the session and it was replayed

    @classmethod
    async def open(cls, backend: ModelBackend, prompt_ids: Sequence[int], session_id: str | None = None) -> Session:
        start = await backend.open_session(list(prompt_ids), session_id=session_id or uuid.uuid4().hex)
        return cls(backend, start.session_id, list(prompt_ids), start.logprobs)

    async def _replay(self) -> None:
        start = await self.backend.open_session(self.tokens, session_id=self.session_id)
        self.session_id = start.session_id
        self.last = start.logprobs
        self.reopened += 1

    async def _call(self, method: str, *args, **kwargs):
        try:
            return await getattr(self.backend, method)(self.session_id, *args, **kwargs)
        except SessionNotFound:
            await self._replay()
            return await getattr(self.backend, method)(self.session_id, *args, **kwargs)

    async def append(self, token_ids: Sequence[int], *, all_positions: bool = False, top_k: int | None = None) -> LogProbs:
        """Feed tokens; next-token log-probs after each ([n, V]) or after the last ([V]); only the
        k best of each row with `top_k` (less to ship from a remote model; `last` is then None)."""
        token_ids = [int(t) for t in token_ids]
        out = await self._call("append", token_ids, all_positions=all_positions, top_k=top_k)
        self.tokens += token_ids
        self.last = None if top_k else out[-1] if all_positions else out
        return out

    async def propose(self, k: int, params: SamplingParams, *, top_k: int | None = None) -> Proposal:
        """Draft k tokens (appended to the session) with the sampling distribution of each."""
        proposal = await self._call("propose", k, params, top_k=top_k)
        self.tokens += [int(t) for t in proposal.tokens]
        self.last = None
        return proposal

    async def rollback(self, length: int) -> None:
        if length >= len(self.tokens):
            return
        if length < 1:
            raise ValueError(f"rollback length {length} must be >= 1")
        del self.tokens[length:]
        self.last = None
        try:
            await self.backend.rollback(self.session_id, length)
        except SessionNotFound:
            await self._replay()

    async def sync(self, tokens: Sequence[int]) -> None:
        """Make the session hold exactly `tokens`: roll back to the common prefix, append the rest."""
        tokens = [int(t) for t in tokens]
        common = 0
        for a, b in zip(self.tokens, tokens):
            if a != b:
                break
            common += 1
        if common == 0:  # nothing shared: start afresh
            self.tokens = tokens
            await self._replay()
            return
        await self.rollback(common)
        if len(tokens) > common:
            await self.append(tokens[common:])

    async def close(self) -> None:
        await self.backend.close_session(self.session_id)


async def token_surprisal(backend: ModelBackend, ids: Sequence[int], window: int, chunk: int = 256) -> np.ndarray:
    """−log P(ids[t] | ids[<t]) for t ≥ 1 ([len(ids) − 1] float32), scored in windows of `window` tokens.

    Texts longer than the model's context are scored window by window; each new window starts
    with the last quarter of the previous one as context, so no token is scored without history.
    """
    ids = [int(i) for i in ids]
    out = np.zeros(max(len(ids) - 1, 0), dtype=np.float32)
    pos = 1  # next position to score
    while pos < len(ids):
        session = await Session.open(backend, ids[max(0, pos - window // 4) : pos])
        try:
            before = session.last  # [V] predicts ids[pos]
            while pos < len(ids) and len(session.tokens) < window:
                n = min(chunk, window - len(session.tokens), len(ids) - pos)
                rows = await session.append(ids[pos : pos + n], all_positions=True)  # [n, V]
                preds = np.concatenate([before[None], rows[:-1]])  # [n, V], row j predicts ids[pos + j]
                out[pos - 1 : pos - 1 + n] = -preds[np.arange(n), ids[pos : pos + n]]
                before = rows[-1]
                pos += n
        finally:
            await session.close()
    return out
