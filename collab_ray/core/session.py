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
from collab_ray.core.types import LogProbs, Proposal, TopK


class Session:
    """A KV-cached decode session on one backend; use `await Session.open(...)` and `close()`.

    `tokens` are the ids the session holds; `last` the next-token log-probs [V] after them, when
    the last call returned them (None after `propose`/`rollback`/`sync`).

    `rollback` and `sync` make no call of their own: the backend gets them with the next `append`
    or `propose` (`keep`, `feed`), so a speculative round costs one round trip per model instead
    of four (measured over Ray Serve: rollback, append and propose were sequential round trips on
    the draft, each a batch of the coordinator's coalescing).
    """

    def __init__(self, backend: ModelBackend, session_id: str, tokens: list[int], last: np.ndarray | None):
        self.backend = backend
        self.session_id = session_id
        self.tokens = tokens
        self.last = last
        self.reopened = 0  # times the backend lost the session and it was replayed
        # not yet sent: the backend holds its tokens[:keep] (all when None) + feed == self.tokens
        self._keep: int | None = None
        self._feed: list[int] = []

    @classmethod
    async def open(cls, backend: ModelBackend, prompt_ids: Sequence[int], session_id: str | None = None) -> Session:
        start = await backend.open_session(list(prompt_ids), session_id=session_id or uuid.uuid4().hex)
        return cls(backend, start.session_id, list(prompt_ids), start.logprobs)

    async def _replay(self) -> None:
        self._keep, self._feed = None, []
        start = await self.backend.open_session(self.tokens, session_id=self.session_id)
        self.session_id = start.session_id
        self.last = start.logprobs
        self.reopened += 1

    def _pending(self, with_feed: bool) -> dict:
        """The pending rollback as call arguments (with the fed tokens where the call takes them), cleared."""
        rewind = {"keep": self._keep} if self._keep is not None else {}
        if with_feed and self._feed:
            rewind["feed"] = self._feed
        self._keep = None
        if with_feed:
            self._feed = []
        return rewind

    async def append(self, token_ids: Sequence[int], *, all_positions: bool = False, top_k: int | None = None) -> LogProbs:
        """Feed tokens; next-token log-probs after each ([n, V]) or after the last ([V]); only the
        k best of each row with `top_k` (less to ship from a remote model; `last` is then None)."""
        token_ids = [int(t) for t in token_ids]
        fed, self._feed = self._feed, []  # tokens `sync` added go in front; their rows are dropped
        try:
            out = await self.backend.append(
                self.session_id, fed + token_ids, all_positions=all_positions, top_k=top_k, **self._pending(False)
            )
        except SessionNotFound:
            await self._replay()  # `tokens` hold the fed ones
            fed = []
            out = await self.backend.append(self.session_id, token_ids, all_positions=all_positions, top_k=top_k)
        if all_positions and fed:
            out = TopK(out.ids[len(fed) :], out.logprobs[len(fed) :]) if isinstance(out, TopK) else out[len(fed) :]
        self.tokens += token_ids
        self.last = None if top_k else out[-1] if all_positions else out
        return out

    async def propose(self, k: int, params: SamplingParams, *, top_k: int | None = None) -> Proposal:
        """Draft k tokens (appended to the session) with the sampling distribution of each."""
        try:
            proposal = await self.backend.propose(self.session_id, k, params, top_k=top_k, **self._pending(True))
        except SessionNotFound:
            await self._replay()  # `tokens` hold what the pending rollback leaves
            proposal = await self.backend.propose(self.session_id, k, params, top_k=top_k)
        self.tokens += [int(t) for t in proposal.tokens]
        self.last = None
        return proposal

    async def rollback(self, length: int) -> None:
        """Keep the first `length` tokens (sent with the next call)."""
        if length >= len(self.tokens):
            return
        if length < 1:
            raise ValueError(f"rollback length {length} must be >= 1")
        held = len(self.tokens) - len(self._feed)  # tokens the backend will hold before the feed
        if length >= held:
            self._feed = self._feed[: length - held]
        else:
            self._keep, self._feed = length, []
        del self.tokens[length:]
        self.last = None

    async def sync(self, tokens: Sequence[int]) -> None:
        """Make the session hold exactly `tokens`: roll back to the common prefix, add the rest
        (both sent with the next call)."""
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
        self._feed += tokens[common:]
        self.tokens += tokens[common:]
        if len(tokens) > common:
            self.last = None

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
