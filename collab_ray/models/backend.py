"""`TransformersBackend`: the in-process `ModelBackend` over a transformers causal LM.

Tokenizer work runs in the caller; every forward pass goes through the model's `Engine`
(engine.py), which batches the work of all concurrent callers step by step. The Ray Serve model
server wraps this same class, so tests, batch jobs and serving run one code path.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Sequence

from collab_ray.core.backend import Prompt
from collab_ray.core.errors import ConfigError
from collab_ray.core.sampling import SamplingParams
from collab_ray.core.types import Generation, LoglikelihoodResult, LogProbs, ModelInfo, Proposal, SessionStart
from collab_ray.models.config import ModelConfig
from collab_ray.models.engine import Engine, Limits, default_kv_budget
from collab_ray.models.work import Group
from collab_ray.models.loader import load


class TransformersBackend:
    """A `ModelBackend` holding one transformers model (CPU, one GPU, or several via device_map)."""

    def __init__(self, config: ModelConfig | str, **overrides):
        if isinstance(config, str):
            config = ModelConfig(source=config, **overrides)
        elif overrides:
            config = config.model_copy(update=overrides)
        self.config = config
        self.model, self.tokenizer, self.device = load(config)
        self._info = self._make_info()
        gpu = str(self.device).startswith("cuda")
        limits = Limits(
            max_batch_size=config.max_batch_size,
            max_step_tokens=config.max_step_tokens or (2048 if gpu else 128),
            max_prefill_beside_decode=config.max_prefill_beside_decode or (512 if gpu else 16),
            kv_budget_tokens=config.kv_budget_tokens or default_kv_budget(self.model, self.device),
            max_sessions=config.max_sessions,
            session_ttl_s=config.session_ttl_s,
            max_queue=config.max_queue,
            queue_timeout_s=config.queue_timeout_s,
        )
        self.engine = Engine(self.model, self.tokenizer, self.device, limits, config.display_name, self._info.eos_token_ids)
        self.max_prompt = min(x for x in (config.max_prompt_tokens, self._info.max_context, 1 << 62) if x is not None)

    async def _wait(self, future):
        return await asyncio.wrap_future(future)

    def _make_info(self) -> ModelInfo:
        tok, cfg = self.tokenizer, self.model.config.get_text_config()
        head = self.model.get_output_embeddings()
        vocab = head.weight.shape[0] if head is not None else cfg.vocab_size
        eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
        gen_eos = self.model.generation_config.eos_token_id
        eos |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        return ModelInfo(
            name=self.config.display_name,
            vocab_size=int(vocab),
            eos_token_ids=tuple(sorted(eos)),
            bos_token_id=tok.bos_token_id,
            pad_token_id=tok.pad_token_id,
            special_token_ids=tuple(sorted(tok.all_special_ids)),
            has_chat_template=tok.chat_template is not None,
            max_context=getattr(cfg, "max_position_embeddings", None),
            meta={"source": self.config.source, "device": str(self.device), "dtype": str(self.model.dtype)},
        )

    def _check_ids(self, ids: Sequence[int], what: str) -> list[int]:
        ids = [int(i) for i in ids]
        if not ids:
            raise ValueError(f"{what} is empty")
        bad = [i for i in ids if not 0 <= i < self._info.vocab_size]
        if bad:
            raise ValueError(f"{what} has token ids outside [0, {self._info.vocab_size}): {bad[:5]}")
        return ids

    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        return self._check_ids(prompt, "prompt")

    def _check_context(self, length: int, what: str) -> None:
        if length > self.max_prompt:
            limit = self.config.max_prompt_tokens
            which = "this server's max_prompt_tokens" if limit is not None and limit == self.max_prompt else "the model's context"
            raise ValueError(f"{what} has {length} tokens, over {which} of {self.max_prompt}")

    def _check_items(self, n: int, what: str) -> None:
        if not 1 <= n <= self.config.max_items_per_call:
            raise ValueError(f"{what}: {n} items, outside [1, {self.config.max_items_per_call}] (max_items_per_call)")

    # ---- tokenizer ------------------------------------------------------------------------
    async def info(self) -> ModelInfo:
        return self._info

    async def token_strings(self) -> list[str]:
        strings = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
        return [s or "" for s in strings] + [""] * (self._info.vocab_size - len(strings))

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    async def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    async def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self.tokenizer.chat_template is None:
            raise ConfigError(f"model {self._info.name!r} has no chat template; send a plain completion prompt")
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    # ---- batched generation and scoring: one engine call each -----------------------------
    async def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[Generation]:
        return await self._wait(self.submit_generate(prompts, params))

    async def generate_batch(self, calls: Sequence[tuple[Sequence[Prompt], SamplingParams]]) -> list:
        """Several `generate` calls of one request (its prompts × `n` choices): each call's result
        or its exception, in order. They share one fairness group, so beside other callers the
        request gets the share one call gets (as separate groups, 256 rows of one request took 8
        of every 9 rows of a step and an 8-token request beside it waited 50× its idle latency)."""
        group = Group()

        async def one(prompts, params):
            return await self._wait(self.submit_generate(prompts, params, group))

        return await asyncio.gather(*(one(p, sp) for p, sp in calls), return_exceptions=True)

    def generate_sync(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[Generation]:
        return self.submit_generate(prompts, params).result()

    def submit_generate(self, prompts: Sequence[Prompt], params: SamplingParams, group: Group | None = None):
        """Check every prompt (before any model work) and queue the rows (in `group` for fairness,
        else a group of their own); a concurrent Future."""
        self._check_items(len(prompts), "generate")
        ids = [self._prompt_ids(p) for p in prompts]
        for i, p in enumerate(ids):
            self._check_context(len(p), f"prompt {i}")
        eos = set() if params.ignore_eos else set(self._info.eos_token_ids)
        limit = self._info.max_context
        budgets = [max(1, min(params.max_tokens, limit - len(p))) if limit else params.max_tokens for p in ids]
        return self.engine.generate(ids, params, eos, budgets, group)

    async def loglikelihood(self, requests: Sequence[tuple[Prompt, Prompt]]) -> list[LoglikelihoodResult]:
        return await self._wait(self.submit_loglikelihood(requests))

    def loglikelihood_sync(self, requests: Sequence[tuple[Prompt, Prompt]]) -> list[LoglikelihoodResult]:
        return self.submit_loglikelihood(requests).result()

    def submit_loglikelihood(self, requests: Sequence[tuple[Prompt, Prompt]]):
        """Pairs with a long context in common (the choices of a multiple-choice item) run the
        context once and the continuations on forks of its KV cache."""
        self._check_items(len(requests), "loglikelihood")
        return self.engine.loglikelihood([self._split(ctx, cont) for ctx, cont in requests])

    def _split(self, context: Prompt, continuation: Prompt) -> tuple[list[int], list[int]]:
        """Token ids of (context, continuation); trailing spaces of a text context move to the continuation."""
        if isinstance(context, str) and isinstance(continuation, str):
            stripped = context.rstrip(" ")
            continuation = context[len(stripped) :] + continuation
            context = stripped
        ctx = self.tokenizer.encode(context, add_special_tokens=True) if isinstance(context, str) else list(context)
        if not ctx:  # condition on a start token, as lm-eval does
            start = self._info.bos_token_id if self._info.bos_token_id is not None else self._info.eos_token_ids[0]
            ctx = [start]
        if isinstance(continuation, str):
            cont = self.tokenizer.encode(continuation, add_special_tokens=False)
        else:
            cont = list(continuation)
        self._check_ids(ctx, "context")
        self._check_ids(cont, "continuation")
        limit = self._info.max_context
        if limit is not None and len(ctx) + len(cont) > limit:
            if len(cont) >= limit:
                raise ValueError(f"continuation has {len(cont)} tokens, over the model's context of {limit}")
            ctx = ctx[-(limit - len(cont)) :]
        return ctx, cont

    # ---- decode sessions ------------------------------------------------------------------
    async def open_session(
        self, prompt_ids: Sequence[int], *, session_id: str | None = None, top_k: int | None = None
    ) -> SessionStart:
        ids = self._check_ids(prompt_ids, "session prompt")
        self._check_context(len(ids), "session prompt")
        return await self._wait(self.engine.open_session(session_id or uuid.uuid4().hex, ids, top_k))

    async def append(
        self, session_id: str, token_ids: Sequence[int], *, all_positions: bool = False, top_k: int | None = None,
        keep: int | None = None,
    ) -> LogProbs:
        ids = self._check_ids(token_ids, "appended tokens")
        return await self._wait(self.engine.append(session_id, ids, all_positions, top_k, self.max_prompt, keep))

    async def propose(
        self, session_id: str, k: int, params: SamplingParams, *, top_k: int | None = None,
        keep: int | None = None, feed: Sequence[int] = (),
    ) -> Proposal:
        if k < 1:
            raise ValueError(f"propose needs k >= 1, got {k}")
        feed = self._check_ids(feed, "fed tokens") if feed else []
        return await self._wait(self.engine.propose(session_id, k, params, top_k, self.max_prompt, keep, feed))

    async def rollback(self, session_id: str, length: int) -> None:
        return await self._wait(self.engine.rollback(session_id, length))

    async def close_session(self, session_id: str) -> None:
        return await self._wait(self.engine.close_session(session_id))

    async def session_tokens(self, session_id: str) -> list[int]:
        """The tokens a session holds (for inspection and replay)."""
        return await self._wait(self.engine.session_tokens(session_id))

    def stats(self, fresh: bool = False) -> dict:
        """The engine's gauges and counters: open sessions, KV tokens in use, queue depth, …"""
        return self.engine.stats(fresh)

    @property
    def closed(self) -> bool:
        return self.engine.closed

    def shutdown(self) -> None:
        self.engine.shutdown()
