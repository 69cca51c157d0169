"""`ServeBackend`: the `ModelBackend` protocol over a Ray Serve `DeploymentHandle`.

The same strategy code that runs on in-process backends runs across deployments through this.
Session calls carry the session id as the routing key (consistent-hash router: a session sticks to
one replica). Correctness never depends on that: the client keeps each session's tokens, and when
a replica answers `SessionNotFound` (evicted, restarted, or the call was routed elsewhere) it
re-opens the session there by replaying them, then repeats the call.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Sequence

from ray.exceptions import ActorDiedError, ActorUnavailableError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from collab_ray.core.errors import CollabError, SessionNotFound
from collab_ray.core.sampling import SamplingParams
from collab_ray.core.types import Proposal, SessionStart

UNAVAILABLE = (ActorDiedError, ActorUnavailableError, DeploymentUnavailableError, BackPressureError)


class ModelUnavailable(CollabError):
    """A model deployment could not answer (replica died, overloaded, or timed out)."""


class ServeBackend:
    def __init__(self, handle: DeploymentHandle, name: str, call_timeout_s: float = 120.0, retries: int = 2):
        self.handle = handle
        self.name = name
        self.call_timeout_s = call_timeout_s
        self.retries = retries
        self._tokens: dict[str, list[int]] = {}  # each open session's tokens, for replay
        self._handles: dict[str, DeploymentHandle] = {}  # each open session's routed handle
        self._info = None
        self._strings = None
        self.replays = 0

    async def _call(self, method: str, *args, routing_key: str | None = None, **kwargs):
        handle = self.handle if routing_key is None else self._routed(routing_key)
        for attempt in range(self.retries + 1):
            try:
                return await asyncio.wait_for(getattr(handle, method).remote(*args, **kwargs), self.call_timeout_s)
            except UNAVAILABLE as e:
                if attempt == self.retries:
                    raise ModelUnavailable(f"model {self.name!r} unavailable for {method}: {type(e).__name__}: {e}") from e
                await asyncio.sleep(0.5 * 2**attempt)
            except asyncio.TimeoutError:
                raise ModelUnavailable(f"model {self.name!r}: {method} timed out after {self.call_timeout_s}s") from None

    def _routed(self, session_id: str) -> DeploymentHandle:
        """The handle whose calls carry `session_id` as routing key (made once per session)."""
        if session_id not in self._handles:
            self._handles[session_id] = self.handle.options(session_id=session_id)
        return self._handles[session_id]

    # ---- stateless calls ----------------------------------------------------------------------
    async def info(self):
        if self._info is None:
            self._info = await self._call("info")
        return self._info

    async def token_strings(self) -> list[str]:
        if self._strings is None:
            self._strings = await self._call("token_strings")
        return self._strings

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return await self._call("encode", text, add_special_tokens)

    async def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return await self._call("decode", list(token_ids), skip_special_tokens)

    async def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return await self._call("apply_chat_template", messages, add_generation_prompt)

    async def generate(self, prompts, params: SamplingParams):
        return await self._call("generate", list(prompts), params)

    async def loglikelihood(self, requests):
        return await self._call("loglikelihood", list(requests))

    # ---- sessions -----------------------------------------------------------------------------
    async def _session_call(self, session_id: str, method: str, *args, **kwargs):
        """Call a session method; on SessionNotFound re-open the session by replay and call again."""
        try:
            return await self._call(method, session_id, *args, routing_key=session_id, **kwargs)
        except (SessionNotFound, ModelUnavailable):
            await self._replay(session_id, self._tokens_of(session_id))
            return await self._call(method, session_id, *args, routing_key=session_id, **kwargs)

    def _tokens_of(self, session_id: str) -> list[int]:
        if session_id not in self._tokens:
            raise SessionNotFound(session_id)
        return self._tokens[session_id]

    async def _replay(self, session_id: str, tokens: list[int]) -> None:
        await self._call("open_session", tokens, session_id=session_id, routing_key=session_id)
        self.replays += 1

    async def open_session(self, prompt_ids, *, session_id: str | None = None, top_k: int | None = None) -> SessionStart:
        session_id = session_id or uuid.uuid4().hex
        start = await self._call("open_session", list(prompt_ids), session_id=session_id, top_k=top_k, routing_key=session_id)
        self._tokens[session_id] = list(prompt_ids)
        return start

    async def append(self, session_id: str, token_ids, *, all_positions: bool = False, top_k: int | None = None):
        out = await self._session_call(session_id, "append", list(token_ids), all_positions=all_positions, top_k=top_k)
        self._tokens[session_id] += list(token_ids)
        return out

    async def propose(self, session_id: str, k: int, params: SamplingParams, *, top_k: int | None = None) -> Proposal:
        proposal = await self._session_call(session_id, "propose", k, params, top_k=top_k)
        self._tokens[session_id] += proposal.tokens
        return proposal

    async def rollback(self, session_id: str, length: int) -> None:
        tokens = self._tokens_of(session_id)
        if not 1 <= length <= len(tokens):
            raise ValueError(f"rollback length {length} outside [1, {len(tokens)}] for session {session_id!r}")
        try:
            await self._call("rollback", session_id, length, routing_key=session_id)
        except (SessionNotFound, ModelUnavailable):
            await self._replay(session_id, tokens[:length])
        del tokens[length:]

    async def close_session(self, session_id: str) -> None:
        self._tokens.pop(session_id, None)
        try:
            await self._call("close_session", session_id, routing_key=session_id)
        except ModelUnavailable:
            pass  # the replica is gone, and the session with it
        finally:
            self._handles.pop(session_id, None)
