"""What decode-time strategies share: the output buffer (eos, stop strings, max_tokens, streaming),
opening sessions on several models, rendering a request, and the shared-vocabulary check."""

from __future__ import annotations

import asyncio
import uuid
from contextlib import asynccontextmanager
from typing import AsyncIterator, Sequence

from collab_ray.core.backend import ModelBackend
from collab_ray.core.errors import ConfigError
from collab_ray.core.sampling import (
    SamplingParams,
)
from collab_ray.core.session import Session
from collab_ray.core.strategy import Emit, Request, StrategyResult, render_prompt
from collab_ray.core.types import Generation, Usage


class TextOutput:
    """Generated tokens of one model and their text; decides when generation ends.

    `extend` cuts at an end-of-sequence token (kept in `token_ids`, as `generate` does), at
    `limit` tokens, and at the first stop string (the text ends before it), and emits the text
    that can no longer change: it holds back a possible stop-string prefix and an incomplete
    UTF-8 character.
    """

    def __init__(self, backend: ModelBackend, params: SamplingParams, eos_ids: Sequence[int], limit: int, emit: Emit | None):
        self.backend = backend
        self.params = params
        self.eos = set() if params.ignore_eos else set(eos_ids)
        self.limit = limit
        self.emit = emit
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self._emitted = 0
        self._searched = 0  # text length already searched for stop strings

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    async def extend(self, tokens: Sequence[int]) -> bool:
        """Add tokens until generation ends; returns whether it has."""
        for tok in tokens:
            if self.done:
                break
            self.token_ids.append(int(tok))
            if tok in self.eos:
                self.finish_reason = "stop"
            elif len(self.token_ids) >= self.limit:
                self.finish_reason = "length"
        if not (self.done or self.params.stop or self.emit is not None):
            return False  # nothing needs the text yet: skip a decode call per step
        text = await self.backend.decode(self.token_ids)
        hold = 0
        if self.params.stop:
            longest = max(map(len, self.params.stop))
            start = max(0, self._searched - longest + 1)
            self._searched = len(text)
            hits = [i for i in (text.find(s, start) for s in self.params.stop) if i >= 0]
            if hits:
                text = text[: min(hits)]
                self.finish_reason = "stop"
            hold = longest - 1
        if not self.done:
            final = len(text.rstrip("\ufffd"))
            text_final = max(self._emitted, final - hold)
        else:
            text_final = len(text)
        self.text = text
        if self.emit is not None and text_final > self._emitted:
            await self.emit(text[self._emitted : text_final])
            self._emitted = text_final
        return self.done

    def result(self, prompt_tokens: int, meta: dict) -> StrategyResult:
        return StrategyResult(
            text=self.text,
            finish_reason=self.finish_reason or "length",
            usage=Usage(prompt_tokens, len(self.token_ids)),
            token_ids=self.token_ids,
            meta=meta,
        )


async def answer(gen: Generation, emit: Emit | None, meta: dict, text: str | None = None) -> StrategyResult:
    """The result of a strategy whose answer is one generation (`text` replaces its text, dropping
    the token ids that no longer spell it); streams it as one delta."""
    text = gen.text if text is None else text
    if emit is not None:
        await emit(text)
    same = text == gen.text
    return StrategyResult(
        text=text,
        finish_reason=gen.finish_reason,
        usage=gen.usage,
        token_ids=gen.token_ids if same else None,
        logprobs=gen.logprobs if same else None,
        meta=meta,
    )


def user_text(request: Request) -> str:
    """The text a user asked: the prompt, or the content of the last user message."""
    if request.messages is None:
        return request.prompt
    users = [m["content"] for m in request.messages if m["role"] == "user"]
    if not users:
        raise ValueError(f"the request needs a user message, got roles {[m['role'] for m in request.messages]}")
    return users[-1]


def with_user_text(request: Request, text: str) -> Request:
    """The request with `user_text` replaced by `text`."""
    if request.messages is None:
        return Request(prompt=text, params=request.params)
    messages = [dict(m) for m in request.messages]
    last = max(i for i, m in enumerate(messages) if m["role"] == "user")
    messages[last]["content"] = text
    return Request(messages=messages, params=request.params)


async def prompt_ids(backend: ModelBackend, request: Request) -> list[int]:
    """The request rendered for `backend` (chat template or plain prompt) as its token ids."""
    return await backend.encode(await render_prompt(backend, request))


async def output_for(backend: ModelBackend, request: Request, prompt_len: int, emit: Emit | None, *others: ModelBackend) -> TextOutput:
    """A `TextOutput` in `backend`'s vocabulary, limited by max_tokens and every model's context."""
    infos = await asyncio.gather(*(b.info() for b in (backend, *others)))
    limit = request.params.max_tokens
    for info in infos:
        if info.max_context is not None:
            limit = min(limit, info.max_context - prompt_len)
    if limit < 1:
        raise ValueError(f"prompt has {prompt_len} tokens, leaving no room in the context of {infos[0].name!r}")
    return TextOutput(backend, request.params, infos[0].eos_token_ids, limit, emit)


@asynccontextmanager
async def open_sessions(prompts: Sequence[tuple[ModelBackend, Sequence[int]]]) -> AsyncIterator[list[Session]]:
    """Open one session per (backend, prompt ids) concurrently; close them all on exit, also when
    the request is cancelled while some are still opening (the close survives the cancellation)."""
    ids = [uuid.uuid4().hex for _ in prompts]  # known before opening, so every one is closed
    opening = [asyncio.ensure_future(Session.open(b, p, session_id)) for (b, p), session_id in zip(prompts, ids)]
    try:
        await asyncio.gather(*opening)
        yield [t.result() for t in opening]
    finally:
        for t in opening:
            t.cancel()
        closing = (b.close_session(session_id) for (b, _), session_id in zip(prompts, ids))
        await asyncio.shield(asyncio.gather(*closing, return_exceptions=True))


_SHARED: dict[tuple, bool] = {}  # (name, vocab size) of two models -> same token strings


async def shares_vocabulary(a: ModelBackend, b: ModelBackend) -> bool:
    """Whether token ids mean the same strings in both models (compared once per pair of models)."""
    key = tuple((info.name, info.vocab_size) for info in await asyncio.gather(a.info(), b.info()))
    if key not in _SHARED:
        strings_a, strings_b = await asyncio.gather(a.token_strings(), b.token_strings())
        _SHARED[key] = strings_a == strings_b
    return _SHARED[key]


async def check_shared_vocabulary(models: dict[str, ModelBackend]) -> None:
    """Refuse models whose token ids do not mean the same strings (ConfigError names the pair)."""
    (first, *others) = models
    for name in others:
        if not await shares_vocabulary(models[first], models[name]):
            raise ConfigError(f"models {first!r} and {name!r} do not share a vocabulary, which this strategy needs")
