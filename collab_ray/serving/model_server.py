"""`ModelServer`: one model behind a Ray Serve deployment (a plain class; `serve.deployment` is applied in app.py).

Every call goes straight to the model's engine (collab_ray/models/engine.py), which batches the
work of all concurrent callers step by step: no `@serve.batch` window, no per-call forward.
`session_batch` takes many session operations in one call (the coordinator coalesces the
operations its requests issue in the same tick), so a round of 32 concurrent speculative requests
costs one call per model, not 32; `generate_batch` takes the generation calls one request fans out. `stats` publishes the engine's gauges.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Sequence

from collab_ray.config import ModelDeployment
from collab_ray.core.sampling import SamplingParams
from collab_ray.models.backend import TransformersBackend

log = logging.getLogger(__name__)

SESSION_METHODS = ("open_session", "append", "propose", "rollback", "close_session", "session_tokens")


class ModelServer:
    def __init__(self, config: dict, name: str | None = None):
        self.config = ModelDeployment.model_validate(config)
        self.backend = TransformersBackend(self.config)
        if name:  # errors (e.g. at capacity) name the model as the collaboration config does
            self.backend.engine.name = name

    async def check_health(self) -> None:
        if self.backend.closed:
            raise RuntimeError(f"model {self.config.display_name!r} is shut down")

    async def stats(self) -> dict:
        """Open sessions, KV tokens in use and capacity, queue depth, running work, counters."""
        return {"model": self.config.display_name, **self.backend.stats()}

    async def generate(self, prompts: Sequence, params: SamplingParams):
        return await self.backend.generate(list(prompts), params)

    async def generate_batch(self, calls: list[tuple[Sequence, SamplingParams]]) -> list:
        """Several `generate` calls of one request (prompts × n choices, coalesced by the
        coordinator) in one round trip, one fairness group in the engine; each call's result or its
        exception, in order."""
        return await self.backend.generate_batch([(list(p), sp) for p, sp in calls])

    async def loglikelihood(self, requests: Sequence):
        return await self.backend.loglikelihood(list(requests))

    async def session_batch(self, ops: list[tuple[str, tuple, dict]]) -> list:
        """Run session operations `(method, args, kwargs)` concurrently (ops of one session keep
        their order in the engine); each item's result or its exception, in order."""
        for method, _, _ in ops:
            if method not in SESSION_METHODS:
                raise ValueError(f"session_batch: {method!r} is not a session method {SESSION_METHODS}")
        results = await asyncio.gather(*(self._session_fn(m)(*a, **kw) for m, a, kw in ops), return_exceptions=True)
        log.debug("session_batch: %d ops", len(ops))
        return results

    def _session_fn(self, method: str):
        """The backend method of a batched op; every op's first argument is its session id."""
        if method == "open_session":
            return lambda session_id, ids, **kw: self.backend.open_session(ids, session_id=session_id, **kw)
        return getattr(self.backend, method)

    # ---- everything else goes straight to the backend ---------------------------------------
    async def info(self):
        return await self.backend.info()

    async def token_strings(self):
        return await self.backend.token_strings()

    async def encode(self, text, add_special_tokens=True):
        return await self.backend.encode(text, add_special_tokens)

    async def decode(self, token_ids, skip_special_tokens=True):
        return await self.backend.decode(token_ids, skip_special_tokens)

    async def apply_chat_template(self, messages, add_generation_prompt=True):
        return await self.backend.apply_chat_template(messages, add_generation_prompt)

    async def open_session(self, prompt_ids, *, session_id=None, top_k=None):
        return await self.backend.open_session(prompt_ids, session_id=session_id, top_k=top_k)

    async def append(self, session_id, token_ids, *, all_positions=False, top_k=None, keep=None):
        return await self.backend.append(session_id, token_ids, all_positions=all_positions, top_k=top_k, keep=keep)

    async def propose(self, session_id, k, params, *, top_k=None, keep=None, feed=()):
        return await self.backend.propose(session_id, k, params, top_k=top_k, keep=keep, feed=feed)

    async def rollback(self, session_id, length):
        return await self.backend.rollback(session_id, length)

    async def close_session(self, session_id):
        return await self.backend.close_session(session_id)

    async def session_tokens(self, session_id):
        return await self.backend.session_tokens(session_id)
