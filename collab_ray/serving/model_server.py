"""`ModelServer`: one model behind a Ray Serve deployment (a plain class; `serve.deployment` is applied in app.py).

Concurrent `generate`/`loglikelihood` calls from many requests are batched with `@serve.batch`;
session calls go straight to the backend, whose KV caches live in this replica.
"""

from __future__ import annotations

from typing import Sequence

from ray import serve

from collab_ray.config import ModelDeployment
from collab_ray.core.sampling import SamplingParams
from collab_ray.models.backend import TransformersBackend


class ModelServer:
    def __init__(self, config: dict):
        self.config = ModelDeployment.model_validate(config)
        self.backend = TransformersBackend(self.config)
        self._generate_batched.set_max_batch_size(self.config.max_batch_size)
        self._generate_batched.set_batch_wait_timeout_s(self.config.batch_wait_timeout_s)
        self._loglikelihood_batched.set_max_batch_size(self.config.max_batch_size)
        self._loglikelihood_batched.set_batch_wait_timeout_s(self.config.batch_wait_timeout_s)

    async def check_health(self) -> None:
        if self.backend.closed:
            raise RuntimeError(f"model {self.config.display_name!r} is shut down")

    # ---- batched calls: one item per caller; a failing item never fails its neighbours ----
    async def generate(self, prompts: Sequence, params: SamplingParams):
        return _raise_if_error(await self._generate_batched(list(prompts), params))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def _generate_batched(self, prompt_lists: list[list], params_list: list[SamplingParams]) -> list:
        results: list = [None] * len(prompt_lists)
        groups: dict = {}
        for i, params in enumerate(params_list):  # seeded calls stay alone: a row's seed depends on its index
            groups.setdefault(params if params.seed is None else (params, i), []).append(i)
        for items in groups.values():
            params = params_list[items[0]]
            flat = [p for i in items for p in prompt_lists[i]]
            try:
                gens = await self.backend.generate(flat, params)
            except Exception:  # find the bad item(s) one by one
                for i in items:
                    results[i] = await _or_error(self.backend.generate(prompt_lists[i], params))
                continue
            for i in items:
                results[i], gens = gens[: len(prompt_lists[i])], gens[len(prompt_lists[i]) :]
        return results

    async def loglikelihood(self, requests: Sequence):
        return _raise_if_error(await self._loglikelihood_batched(list(requests)))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def _loglikelihood_batched(self, request_lists: list[list]) -> list:
        flat = [r for requests in request_lists for r in requests]
        try:
            scores = await self.backend.loglikelihood(flat)
        except Exception:
            return [await _or_error(self.backend.loglikelihood(requests)) for requests in request_lists]
        out = []
        for requests in request_lists:
            out.append(scores[: len(requests)])
            scores = scores[len(requests) :]
        return out

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

    async def append(self, session_id, token_ids, *, all_positions=False, top_k=None):
        return await self.backend.append(session_id, token_ids, all_positions=all_positions, top_k=top_k)

    async def propose(self, session_id, k, params, *, top_k=None):
        return await self.backend.propose(session_id, k, params, top_k=top_k)

    async def rollback(self, session_id, length):
        return await self.backend.rollback(session_id, length)

    async def close_session(self, session_id):
        return await self.backend.close_session(session_id)

    async def session_tokens(self, session_id):
        return await self.backend.session_tokens(session_id)


async def _or_error(coro):
    try:
        return await coro
    except Exception as e:  # handed back to that one caller by _raise_if_error
        return e


def _raise_if_error(result):
    if isinstance(result, Exception):
        raise result
    return result
