"""`TransformersBackend`: the in-process `ModelBackend` over a transformers causal LM.

All model work runs on one worker thread per model, so calls to different models overlap
while each model's sessions and KV caches are touched by a single thread (no locks).
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
import torch
from transformers import DynamicCache

from collab_ray.core.backend import Prompt
from collab_ray.core.errors import ConfigError
from collab_ray.core.sampling import SamplingParams, log_softmax, make_generator, process_logits, sample
from collab_ray.core.types import Generation, LoglikelihoodResult, LogProbs, ModelInfo, Proposal, SessionStart, TopK, Usage
from collab_ray.models.config import ModelConfig
from collab_ray.models.loader import load
from collab_ray.models.sessions import Session, SessionStore


def _score(logits: torch.Tensor, cont: list[int]) -> LoglikelihoodResult:
    """logits [len(cont), V], row t predicting cont[t] -> summed log-prob and whether cont is greedy."""
    rows = log_softmax(logits)
    target = torch.tensor(cont, device=rows.device)
    picked = rows.gather(-1, target[:, None])[:, 0]
    return LoglikelihoodResult(float(picked.sum()), len(cont), bool((rows.argmax(-1) == target).all()))


def to_logprobs(logprobs: torch.Tensor, top_k: int | None) -> LogProbs:
    """[..., V] float log-probs -> float32 numpy, or TopK [..., k] when `top_k` is set."""
    if top_k:  # k = 1 by max: on ties it picks the first index, as greedy sampling's argmax does
        values, ids = logprobs.max(-1, keepdim=True) if top_k == 1 else torch.topk(logprobs, min(top_k, logprobs.shape[-1]), dim=-1)
        return TopK(ids.cpu().numpy().astype(np.int64), values.float().cpu().numpy())
    return logprobs.float().cpu().numpy()


class TransformersBackend:
    """A `ModelBackend` holding one transformers model (CPU, one GPU, or several via device_map)."""

    def __init__(self, config: ModelConfig | str, **overrides):
        if isinstance(config, str):
            config = ModelConfig(source=config, **overrides)
        elif overrides:
            config = config.model_copy(update=overrides)
        self.config = config
        self.model, self.tokenizer, self.device = load(config)
        self.sessions = SessionStore(config.max_sessions, config.session_ttl_s)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"model-{config.display_name}")
        self._closed = False
        self._info = self._make_info()

    # ---- plumbing -------------------------------------------------------------------------
    async def _run(self, fn, *args, **kwargs):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

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
        limit = self._info.max_context
        if limit is not None and length > limit:
            raise ValueError(f"{what} has {length} tokens, over the model's context of {limit}")

    def _forward(self, ids: list[int], cache, all_positions: bool) -> torch.Tensor:
        """Feed `ids` through a batch-1 cache; logits [n, V] (or [1, V] for the last only)."""
        x = torch.tensor([ids], device=self.device)
        out = self.model(input_ids=x, past_key_values=cache, use_cache=True, logits_to_keep=0 if all_positions else 1)
        return out.logits[0]

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

    # ---- batched generation ---------------------------------------------------------------
    async def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[Generation]:
        return await self._run(self.generate_sync, prompts, params)

    def generate_sync(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[Generation]:
        ids = [self._prompt_ids(p) for p in prompts]
        for i, p in enumerate(ids):
            self._check_context(len(p), f"prompt {i}")
        size = self.config.max_batch_size
        out: list[Generation] = []
        for start in range(0, len(ids), size):
            out += self._generate_batch(ids[start : start + size], params, first_row=start)
        return out

    @torch.inference_mode()
    def _generate_batch(self, prompts: list[list[int]], params: SamplingParams, first_row: int) -> list[Generation]:
        """Left-padded batched decoding; finished rows leave the batch (and the KV cache)."""
        B, L = len(prompts), max(map(len, prompts))
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((B, L), pad, dtype=torch.long)
        mask = torch.zeros((B, L), dtype=torch.long)
        for i, p in enumerate(prompts):
            input_ids[i, L - len(p) :] = torch.tensor(p)
            mask[i, L - len(p) :] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        eos = set() if params.ignore_eos else set(self._info.eos_token_ids)
        limit = self._info.max_context or L + params.max_tokens
        budgets = [min(params.max_tokens, limit - len(p)) for p in prompts]
        generators = [make_generator(None if params.seed is None else params.seed + first_row + i) for i in range(B)]
        rows = [_Row(params.stop) for _ in range(B)]
        active = list(range(B))  # batch row -> prompt index
        cache = DynamicCache()
        logits = self.model(
            input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=cache, logits_to_keep=1
        ).logits[:, -1]
        while True:
            raw = log_softmax(logits)  # [b, V]
            processed = raw if params.greedy else process_logits(logits, params)
            greedy_ids = torch.argmax(raw, dim=-1).tolist() if params.greedy else None
            keep, next_ids = [], []
            for b, i in enumerate(active):
                tok = greedy_ids[b] if params.greedy else sample(processed[b], params, generators[i])
                row = rows[i]
                row.add(tok, float(raw[b, tok]), torch.topk(raw[b], params.logprobs) if params.logprobs else None)
                if tok in eos:
                    row.finish = "stop"
                elif params.stop and row.hit_stop(self.tokenizer):
                    row.finish = "stop"
                elif len(row.ids) >= budgets[i]:
                    row.finish = "length"
                else:
                    keep.append(b)
                    next_ids.append(tok)
            if not keep:
                break
            if len(keep) < len(active):
                index = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(index)
                mask, positions = mask[index], positions[index]
                active = [active[b] for b in keep]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
            logits = self.model(
                input_ids=torch.tensor(next_ids, device=self.device)[:, None],
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
            ).logits[:, -1]
        return [row.result(self.tokenizer, len(p)) for row, p in zip(rows, prompts)]

    # ---- log-likelihood -------------------------------------------------------------------
    async def loglikelihood(self, requests: Sequence[tuple[Prompt, Prompt]]) -> list[LoglikelihoodResult]:
        return await self._run(self.loglikelihood_sync, requests)

    SHARED_CONTEXT_MIN = 64  # context tokens from which several continuations share one pass over it

    def loglikelihood_sync(self, requests: Sequence[tuple[Prompt, Prompt]]) -> list[LoglikelihoodResult]:
        """Pairs with a long context in common (the choices of a multiple-choice item) run the
        context once and the continuations on its KV cache; the rest run in padded batches."""
        pairs = [self._split(ctx, cont) for ctx, cont in requests]
        by_context: dict[tuple[int, ...], list[int]] = {}
        for i, (ctx, _) in enumerate(pairs):
            by_context.setdefault(tuple(ctx), []).append(i)
        out: list[LoglikelihoodResult | None] = [None] * len(pairs)
        size = self.config.max_batch_size
        rest = []
        for ctx, index in by_context.items():
            if len(index) > 1 and len(ctx) >= self.SHARED_CONTEXT_MIN:
                for start in range(0, len(index), size):
                    chunk = index[start : start + size]
                    for i, result in zip(chunk, self._loglikelihood_shared(list(ctx), [pairs[i][1] for i in chunk])):
                        out[i] = result
            else:
                rest += index
        rest.sort()
        for start in range(0, len(rest), size):
            chunk = rest[start : start + size]
            for i, result in zip(chunk, self._loglikelihood_batch([pairs[i] for i in chunk])):
                out[i] = result
        return out

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

    @torch.inference_mode()
    def _loglikelihood_batch(self, pairs: list[tuple[list[int], list[int]]]) -> list[LoglikelihoodResult]:
        """One left-padded forward; sum log P(cont_t | ctx, cont_<t) over the continuation.

        Left padding lines every continuation up at the right end, so the head runs on the last
        max(len(cont)) + 1 positions only: with Gemma's 262k vocabulary the full [B, L, V] logits
        would cost more than the model itself.
        """
        seqs = [ctx + cont for ctx, cont in pairs]
        B, L = len(seqs), max(map(len, seqs))
        keep = max(len(cont) for _, cont in pairs) + 1
        input_ids = torch.full((B, L), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((B, L), dtype=torch.long)
        for i, s in enumerate(seqs):
            input_ids[i, L - len(s) :] = torch.tensor(s)
            mask[i, L - len(s) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(
            input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device), logits_to_keep=keep,
        ).logits  # [B, keep, V]: positions L-keep .. L-1
        return [_score(logits[i, keep - 1 - len(cont) : keep - 1], cont) for i, (_, cont) in enumerate(pairs)]

    @torch.inference_mode()
    def _loglikelihood_shared(self, ctx: list[int], conts: list[list[int]]) -> list[LoglikelihoodResult]:
        """The context once (batch 1), then every continuation but its last token on copies of its cache."""
        cache = DynamicCache()
        first = self._forward(ctx, cache, all_positions=False)[-1:]  # [1, V]: each continuation's first token
        B, M = len(conts), max(map(len, conts)) - 1
        if M == 0:
            return [_score(first, cont) for cont in conts]
        cache.batch_repeat_interleave(B)
        input_ids = torch.full((B, M), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((B, len(ctx) + M), dtype=torch.long)
        mask[:, : len(ctx)] = 1
        for j, cont in enumerate(conts):  # right-padded: padding comes after every real token
            input_ids[j, : len(cont) - 1] = torch.tensor(cont[:-1])
            mask[j, len(ctx) : len(ctx) + len(cont) - 1] = 1
        positions = (len(ctx) + torch.arange(M)).expand(B, M)
        logits = self.model(
            input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device), past_key_values=cache,
        ).logits  # [B, M, V]
        return [_score(torch.cat([first, logits[j, : len(cont) - 1]]), cont) for j, cont in enumerate(conts)]

    # ---- decode sessions ------------------------------------------------------------------
    async def open_session(
        self, prompt_ids: Sequence[int], *, session_id: str | None = None, top_k: int | None = None
    ) -> SessionStart:
        return await self._run(self.open_session_sync, prompt_ids, session_id=session_id, top_k=top_k)

    @torch.inference_mode()
    def open_session_sync(self, prompt_ids, *, session_id=None, top_k=None) -> SessionStart:
        ids = self._check_ids(prompt_ids, "session prompt")
        self._check_context(len(ids), "session prompt")
        session_id = session_id or uuid.uuid4().hex
        self.sessions.pop(session_id)  # re-opening an id (a replay) replaces the old session
        cache = DynamicCache()
        logits = self._forward(ids, cache, all_positions=False)[-1]
        self.sessions.put(session_id, Session(tokens=ids, cache=cache, last_logits=logits))
        return SessionStart(session_id, len(ids), to_logprobs(log_softmax(logits), top_k))

    async def append(
        self, session_id: str, token_ids: Sequence[int], *, all_positions: bool = False, top_k: int | None = None
    ) -> LogProbs:
        return await self._run(self.append_sync, session_id, token_ids, all_positions=all_positions, top_k=top_k)

    @torch.inference_mode()
    def append_sync(self, session_id, token_ids, *, all_positions=False, top_k=None) -> LogProbs:
        s = self.sessions.get(session_id)
        ids = self._check_ids(token_ids, "appended tokens")
        self._check_context(len(s.tokens) + len(ids), f"session {session_id!r}")
        logits = self._feed(s, ids, all_positions)
        s.tokens += ids
        s.last_logits = logits[-1]
        return to_logprobs(log_softmax(logits if all_positions else logits[-1]), top_k)

    async def propose(self, session_id: str, k: int, params: SamplingParams, *, top_k: int | None = None) -> Proposal:
        return await self._run(self.propose_sync, session_id, k, params, top_k=top_k)

    @torch.inference_mode()
    def propose_sync(self, session_id, k, params, *, top_k=None) -> Proposal:
        if k < 1:
            raise ValueError(f"propose needs k >= 1, got {k}")
        s = self.sessions.get(session_id)
        self._check_context(len(s.tokens) + k, f"session {session_id!r}")
        if s.generator is None and params.seed is not None:
            s.generator = make_generator(params.seed, self.device)
        logits = self._last_logits(s)
        tokens, dists = [], []
        for i in range(k):
            q = process_logits(logits, params)  # [V]
            x = sample(q, params, s.generator)
            tokens.append(x)
            dists.append(q)
            if i < k - 1:  # the last token is fed lazily (see Session.cached): often it is rolled back
                logits = self._forward([x], s.cache, all_positions=False)[-1]
        s.tokens += tokens
        s.last_logits = None
        return Proposal(tokens, to_logprobs(torch.stack(dists), top_k))

    def _feed(self, s: Session, ids: list[int], all_positions: bool) -> torch.Tensor:
        """Feed `ids` after the session's tokens, with any tokens the cache lags behind in front;
        logits [len(ids), V] for `ids`' positions (or [1, V], the last only)."""
        if not ids and s.cached == len(s.tokens):  # logits of the last token asked for again: re-feed it
            s.cache.crop(-1)
        lag = s.tokens[s.cached :]
        logits = self._forward(lag + ids, s.cache, all_positions)
        return logits[len(lag) :] if all_positions else logits

    def _last_logits(self, s: Session) -> torch.Tensor:
        if s.last_logits is None:  # after a rollback or a propose
            s.last_logits = self._feed(s, [], all_positions=False)[-1]
        return s.last_logits

    async def rollback(self, session_id: str, length: int) -> None:
        return await self._run(self.rollback_sync, session_id, length)

    def rollback_sync(self, session_id: str, length: int) -> None:
        s = self.sessions.get(session_id)
        if not 1 <= length <= len(s.tokens):
            raise ValueError(f"rollback length {length} outside [1, {len(s.tokens)}] for session {session_id!r}")
        if length < len(s.tokens):
            s.cache.crop(min(length - s.cached, 0))  # a negative count: tokens removed from the end
            del s.tokens[length:]
            s.last_logits = None

    async def close_session(self, session_id: str) -> None:
        return await self._run(self.sessions.pop, session_id)

    async def session_tokens(self, session_id: str) -> list[int]:
        """The tokens a session holds (for inspection and replay)."""
        return await self._run(lambda: list(self.sessions.get(session_id).tokens))

    @property
    def closed(self) -> bool:
        return self._closed

    def shutdown(self) -> None:
        self._closed = True
        self._executor.shutdown(wait=False, cancel_futures=True)


class _Row:
    """One sequence of a generate batch: its tokens, log-probs and stop state."""

    def __init__(self, stop: tuple[str, ...]):
        self.stop = stop
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.top: list[tuple[torch.Tensor, torch.Tensor]] = []  # (values [k], ids [k]) per token
        self.finish: str | None = None
        self.stop_at: int | None = None  # text offset where a stop string begins
        self._checked = 0  # text length already searched for stop strings

    def add(self, tok: int, logprob: float, top: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        self.ids.append(tok)
        self.logprobs.append(logprob)
        if top is not None:
            self.top.append(top)

    def hit_stop(self, tokenizer) -> bool:
        text = tokenizer.decode(self.ids, skip_special_tokens=True)
        start = max(0, self._checked - max(map(len, self.stop)) + 1)  # a match must end in new text
        self._checked = len(text)
        hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.stop_at = min(hits)
        return bool(hits)

    def result(self, tokenizer, prompt_len: int) -> Generation:
        text = tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.stop_at is not None:
            text = text[: self.stop_at]
        top = None
        if self.top:
            values, ids = (torch.stack(t) for t in zip(*self.top))
            top = TopK(ids.cpu().numpy().astype(np.int64), values.float().cpu().numpy())
        return Generation(
            text=text,
            token_ids=self.ids,
            logprobs=self.logprobs,
            finish_reason=self.finish or "length",
            usage=Usage(prompt_len, len(self.ids)),
            top_logprobs=top,
        )
