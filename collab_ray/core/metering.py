"""Per-model accounting of a pipeline run: calls, tokens and latency, for the response's `collab` field."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Sequence

from collab_ray.core.backend import ModelBackend


@dataclass
class ModelStats:
    calls: int = 0
    prompt_tokens: int = 0  # tokens the model read (prompts, contexts, appended tokens)
    completion_tokens: int = 0  # tokens the model produced (generated or proposed)
    latency_s: float = 0.0  # wall time spent waiting on this model

    def as_dict(self) -> dict:
        return asdict(self)


class MeteredBackend:
    """A `ModelBackend` that forwards every call to `inner` and records what it cost."""

    def __init__(self, inner: ModelBackend):
        self.inner = inner
        self.stats = ModelStats()

    async def _timed(self, coro, read: int = 0, produced: int = 0):
        start = time.perf_counter()
        try:
            return await coro
        finally:
            self.stats.calls += 1
            self.stats.latency_s += time.perf_counter() - start
            self.stats.prompt_tokens += read
            self.stats.completion_tokens += produced

    # tokenizer calls are cheap bookkeeping, not counted as model calls
    async def info(self):
        return await self.inner.info()

    async def token_strings(self):
        return await self.inner.token_strings()

    async def encode(self, text, add_special_tokens=True):
        return await self.inner.encode(text, add_special_tokens)

    async def decode(self, token_ids, skip_special_tokens=True):
        return await self.inner.decode(token_ids, skip_special_tokens)

    async def apply_chat_template(self, messages, add_generation_prompt=True):
        return await self.inner.apply_chat_template(messages, add_generation_prompt)

    async def generate(self, prompts: Sequence, params):
        gens = await self._timed(self.inner.generate(prompts, params))
        self.stats.prompt_tokens += sum(g.usage.prompt_tokens for g in gens)
        self.stats.completion_tokens += sum(g.usage.completion_tokens for g in gens)
        return gens

    async def loglikelihood(self, requests):
        results = await self._timed(self.inner.loglikelihood(requests))
        self.stats.prompt_tokens += sum(r.num_tokens for r in results)
        return results

    async def open_session(self, prompt_ids, *, session_id=None, top_k=None):
        return await self._timed(
            self.inner.open_session(prompt_ids, session_id=session_id, top_k=top_k), read=len(prompt_ids)
        )

    async def append(self, session_id, token_ids, *, all_positions=False, top_k=None, **rewind):
        return await self._timed(
            self.inner.append(session_id, token_ids, all_positions=all_positions, top_k=top_k, **rewind), read=len(token_ids)
        )

    async def propose(self, session_id, k, params, *, top_k=None, **rewind):
        return await self._timed(
            self.inner.propose(session_id, k, params, top_k=top_k, **rewind), read=len(rewind.get("feed", ())), produced=k
        )

    async def rollback(self, session_id, length):
        return await self._timed(self.inner.rollback(session_id, length))

    async def close_session(self, session_id):
        return await self.inner.close_session(session_id)
