"""`Engine`: every forward pass of one model, continuously batched across all concurrent callers.

It owns the model's KV memory and one step loop on its own thread. Callers from any thread or
event loop submit work — generation rows, log-likelihood items, and decode-session operations
(open, append with log-probs at every position, propose k draft tokens, rollback, close) — and get
a `concurrent.futures.Future` back. Each step the loop packs whatever is ready, from every caller,
into batched forwards over sequences of different past lengths and different numbers of new tokens,
and hands each caller its rows; work joins and leaves between steps (continuous batching, as vLLM
and SGLang do for plain generation, here for collaboration sessions too). `propose` samples its k
draft tokens one step at a time, batched with every other drafter's.

Scheduling (per step):
- fairness: work is grouped by caller (one `generate` call, one session); the groups served least
  recently go first, one task per group per round, so a 1 000-row request cannot hold the model;
- chunked prefill: a per-step token budget (`max_step_tokens`); long prompts and long appends are fed
  in chunks between decode steps; decode work (≤ `DECODE_MAX` tokens) is never split;
- padding: a step's feeds are sorted by length and cut into forwards whose padded size stays
  within 2× their real tokens, so one long chunk does not pad thirty one-token rows to its length.

KV memory is a budget in tokens (`kv_budget_tokens`, default from the device's memory). New work is
admitted when its tokens fit; otherwise idle sessions (no operation in flight) are evicted, least
recently used first (callers replay evicted sessions), and then the work waits in a bounded queue
and fails with `ModelAtCapacity` (a 503 at the HTTP API) after `queue_timeout_s`. Sessions hold a
lease of `session_ttl_s` that every call renews; the loop sweeps expired ones on its own clock. A
cancelled future drops its work at the next step; a session whose operation was cancelled half-way
is closed (its state no longer matches the caller's).

Cache layout, by measurement (SmolLM2-135M, 2 CPU cores, see DESIGN.md §4 and
benchmarks/results/concurrency.md): per-sequence caches (a tuple of [1, heads, len, dim] tensors
per layer) gathered into a left-padded batch each step and split back as views after it cost
98–101 ms a round for 8 sessions against 300–315 ms for batch-1 forwards, and allow what a single
persistent batch cannot: sessions that fork (shared contexts of multiple-choice items share their
tensors), roll back (a view shorter), and join or leave at any step. A slot pool or paged cache
would save the gather copy (73–81 ms in the same test) but needs attention kernels that read
scattered blocks, which plain transformers on CPU does not have; an engine on vLLM or SGLang gets
that (see ENGINES.md beside this file).
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from transformers import DynamicCache

from collab_ray.core.errors import ModelAtCapacity, SessionNotFound
from collab_ray.core.sampling import SamplingParams, log_softmax, make_generator, process_logits, sample
from collab_ray.models.config import DECODE_MAX
from collab_ray.core.types import Generation, LoglikelihoodResult, LogProbs, Proposal, SessionStart, TopK, Usage

log = logging.getLogger(__name__)

MIN_CHUNK = 16  # smallest prefill chunk worth a place in a step
SHARED_CONTEXT_MIN = 64  # context tokens from which several continuations share one prefill


@dataclass(frozen=True)
class Limits:
    """The engine's limits, resolved from `ModelConfig` (which describes each)."""

    max_batch_size: int
    max_step_tokens: int
    kv_budget_tokens: int
    max_sessions: int
    session_ttl_s: float
    max_queue: int
    queue_timeout_s: float


def to_logprobs(logprobs: torch.Tensor, top_k: int | None) -> LogProbs:
    """[..., V] float log-probs -> float32 numpy, or TopK [..., k] when `top_k` is set."""
    if top_k:  # k = 1 by max: on ties it picks the first index, as greedy sampling's argmax does
        values, ids = logprobs.max(-1, keepdim=True) if top_k == 1 else torch.topk(logprobs, min(top_k, logprobs.shape[-1]), dim=-1)
        return TopK(ids.cpu().numpy().astype(np.int64), values.float().cpu().numpy())
    return logprobs.float().cpu().numpy()


def score(logits: torch.Tensor, cont: list[int]) -> LoglikelihoodResult:
    """logits [len(cont), V], row t predicting cont[t] -> summed log-prob and whether cont is greedy."""
    rows = log_softmax(logits)
    target = torch.tensor(cont, device=rows.device)
    picked = rows.gather(-1, target[:, None])[:, 0]
    return LoglikelihoodResult(float(picked.sum()), len(cont), bool((rows.argmax(-1) == target).all()))


# ---- sequences and the ragged forward ------------------------------------------------------------
class Seq:
    """One sequence's KV cache: per layer (keys, values) [1, heads, cached, dim], or None when empty.

    Tensors are never written in place (a step makes new ones), so forks share them safely."""

    __slots__ = ("kv",)

    def __init__(self, kv: list | None = None):
        self.kv = kv

    @property
    def cached(self) -> int:
        return 0 if self.kv is None else self.kv[0][0].shape[-2]

    def crop(self, n: int) -> None:
        """Keep the first n cached tokens."""
        if self.kv is not None and n < self.cached:
            self.kv = [(k[..., :n, :], v[..., :n, :]) for k, v in self.kv] if n > 0 else None


@dataclass
class Feed:
    """Tokens fed to one sequence in one step, and which of their positions need next-token logits."""

    seq: Seq
    ids: list[int]
    want: list[int]  # indices into ids


def pack(feeds: list[Feed], waste: float = 2.0) -> list[list[Feed]]:
    """Cut feeds into forwards whose padded token count stays within `waste`× their real tokens
    (+8 tokens of slack), shortest first."""
    order = sorted(feeds, key=lambda f: len(f.ids))
    groups: list[list[Feed]] = []
    real = 0
    for f in order:
        n = len(f.ids)
        if groups and (len(groups[-1]) + 1) * n <= waste * (real + n) + 8:
            groups[-1].append(f)
            real += n
        else:
            groups.append([f])
            real = n
    return groups


class RaggedForward:
    """One batched forward over sequences with different cached lengths and new-token counts.

    Past caches are left-padded to the longest (attention mask 0 there), new tokens right-padded
    (the causal mask keeps real tokens from seeing them); position ids count each row's own tokens.
    Only the wanted positions go through the LM head: with a 262k vocabulary the head costs more
    than the model.
    """

    def __init__(self, model, pad_id: int, device):
        self.model = model
        self.base = getattr(model, model.base_model_prefix)
        self.head = model.get_output_embeddings()
        self.softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
        self.pad_id = pad_id
        self.device = device
        self.direct = self._head_path_matches()

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    @torch.inference_mode()
    def _head_path_matches(self) -> bool:
        """Whether base model + head reproduce the model's own logits (else run the whole model)."""
        x = torch.tensor([[self.pad_id or 0, 1, 2]], device=self.device)
        full = self.model(input_ids=x).logits[0, -1].float()
        mine = self._logits(self.base(input_ids=x).last_hidden_state[0, -1]).float()
        return bool(torch.allclose(full, mine, atol=1e-3, rtol=1e-3))

    @torch.inference_mode()
    def __call__(self, feeds: list[Feed]) -> list[torch.Tensor]:
        """Runs the feeds, extends each sequence's cache, returns each feed's logits [len(want), V]."""
        B = len(feeds)
        P = max(f.seq.cached for f in feeds)
        N = max(len(f.ids) for f in feeds)
        ids = torch.full((B, N), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, P + N), dtype=torch.long)
        pos = torch.empty((B, N), dtype=torch.long)
        for i, f in enumerate(feeds):
            c, n = f.seq.cached, len(f.ids)
            ids[i, :n] = torch.tensor(f.ids)
            mask[i, P - c : P + n] = 1
            pos[i] = torch.arange(c, c + N)
        cache = DynamicCache(ddp_cache_data=self._gather(feeds, P)) if P else DynamicCache()
        kwargs = dict(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
            position_ids=pos.to(self.device), cache=cache, use_cache=True,
        )
        rows = torch.tensor([i for i, f in enumerate(feeds) for _ in f.want], dtype=torch.long)
        cols = torch.tensor([j for f in feeds for j in f.want], dtype=torch.long)
        if self.direct:
            hidden = self.base(**kwargs).last_hidden_state  # [B, N, H]
            logits = self._logits(hidden[rows, cols]) if len(rows) else hidden.new_zeros((0, 1))
        else:  # the model's own head, on the union of wanted columns
            keep = sorted(set(cols.tolist())) or [N - 1]
            index = {c: j for j, c in enumerate(keep)}
            full = self.model(**kwargs, logits_to_keep=torch.tensor(keep, device=self.device)).logits
            logits = full[rows, torch.tensor([index[c] for c in cols.tolist()], dtype=torch.long)]
        for i, f in enumerate(feeds):
            c, n = f.seq.cached, len(f.ids)
            f.seq.kv = [(layer.keys[i : i + 1, :, P - c : P + n], layer.values[i : i + 1, :, P - c : P + n]) for layer in cache.layers]
        out, start = [], 0
        for f in feeds:
            out.append(logits[start : start + len(f.want)])
            start += len(f.want)
        return out

    @staticmethod
    def _gather(feeds: list[Feed], P: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values) [B, heads, P, dim], each row's cache at the right end."""
        ref = next(f.seq.kv for f in feeds if f.seq.kv is not None)
        layers = []
        for layer, (k0, v0) in enumerate(ref):
            keys = k0.new_zeros((len(feeds), k0.shape[1], P, k0.shape[3]))
            values = v0.new_zeros((len(feeds), v0.shape[1], P, v0.shape[3]))
            for i, f in enumerate(feeds):
                if f.seq.kv is not None:
                    k, v = f.seq.kv[layer]
                    keys[i, :, P - k.shape[2] :] = k[0]
                    values[i, :, P - v.shape[2] :] = v[0]
            layers.append((keys, values))
        return layers


# ---- work ----------------------------------------------------------------------------------------
class Group:
    """The unit of fairness: one caller's call (a generate or log-likelihood call, or one session)."""

    _ids = itertools.count()

    def __init__(self):
        self.order = next(self._ids)
        self.last_step = -1


class Call:
    """The future of one submitted call whose result gathers the results of several tasks."""

    def __init__(self, future: Future, n: int, finish: Callable[[list], Any] = list):
        self.future = future
        self.results: list = [None] * n
        self.left = n
        self.finish = finish
        self.group = Group()

    @property
    def cancelled(self) -> bool:
        return self.future.done()

    def set(self, i: int, value) -> None:
        self.results[i] = value
        self.left -= 1
        if self.left == 0 and not self.future.done():
            self.future.set_result(self.finish(self.results))

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)


class Task:
    """Work on one sequence: feed `todo` (in chunks if long), collect the logits of positions
    `want_from` onwards, then `consume` them (which may set new `todo`, or finish)."""

    group: Group
    kv_reserved = 0  # tokens of KV this task holds beyond a session's own

    def __init__(self, seq: Seq):
        self.seq = seq
        self.todo: list[int] = []
        self.want_from = 0
        self.fed = 0
        self.rows: list[torch.Tensor] = []
        self.finished = False

    @property
    def cancelled(self) -> bool:
        raise NotImplementedError

    @property
    def left(self) -> int:
        return len(self.todo) - self.fed

    def feed(self, budget: int) -> Feed:
        n = min(self.left, budget)
        start = self.fed
        want = [j - start for j in range(max(start, self.want_from), start + n)]
        return Feed(self.seq, self.todo[start : start + n], want)

    def done(self, feed: Feed, logits: torch.Tensor) -> None:
        self.fed += len(feed.ids)
        if len(feed.want):
            self.rows.append(logits)
        if self.fed == len(self.todo):
            rows = torch.cat(self.rows) if len(self.rows) > 1 else self.rows[0]
            self.todo, self.fed, self.rows = [], 0, []
            self.consume(rows)

    def set_todo(self, ids: list[int], want_from: int) -> None:
        self.todo, self.want_from, self.fed, self.rows = ids, want_from, 0, []

    def consume(self, rows: torch.Tensor) -> None:
        raise NotImplementedError

    def fail(self, error: BaseException) -> None:
        raise NotImplementedError


class Session:
    """A decode session: its tokens (the cache covers a prefix: `propose` leaves its last token
    unfed, as it is often rolled back), lease and queue of operations."""

    def __init__(self, session_id: str, tokens: list[int], ttl_s: float):
        self.id = session_id
        self.seq = Seq()
        self.tokens = tokens
        self.last_logits: torch.Tensor | None = None  # [V] after `tokens`, when known
        self.generator: torch.Generator | None = None
        self.ops: deque[SessionOp] = deque()
        self.group = Group()
        self.ttl_s = ttl_s
        self.expires = time.monotonic() + ttl_s
        self.last_used = time.monotonic()

    def renew(self) -> None:
        self.last_used = time.monotonic()
        self.expires = self.last_used + self.ttl_s

    def lag(self) -> list[int]:
        """Tokens to feed to get the logits after `tokens` (the last one again if all are cached)."""
        if self.seq.cached >= len(self.tokens):
            self.seq.crop(len(self.tokens) - 1)
        return self.tokens[self.seq.cached :]


class SessionOp(Task):
    """An operation on a session; ops of one session run one after another, in order."""

    def __init__(self, session: Session, future: Future):
        super().__init__(session.seq)
        self.session = session
        self.future = future
        self.group = session.group
        self.started = False
        self.limit = (0, 0)  # (tokens the op adds, most tokens the session may hold): checked at start

    def check_limit(self) -> None:
        grow, limit = self.limit
        if grow and len(self.session.tokens) + grow > limit:
            raise ValueError(
                f"session {self.session.id!r} would hold {len(self.session.tokens) + grow} tokens, over the limit of {limit}"
            )

    @property
    def cancelled(self) -> bool:
        return self.future.done()

    def start(self) -> None:
        """Called when the op reaches the head of its session's queue; sets `todo` or finishes."""
        raise NotImplementedError

    def finish(self, value) -> None:
        self.finished = True
        if not self.future.done():
            self.future.set_result(value)

    def fail(self, error: BaseException) -> None:
        self.finished = True
        if not self.future.done():
            self.future.set_exception(error)


class OpenOp(SessionOp):
    def __init__(self, session: Session, future: Future, top_k: int | None):
        super().__init__(session, future)
        self.top_k = top_k

    def start(self) -> None:
        self.set_todo(list(self.session.tokens), len(self.session.tokens) - 1)

    def consume(self, rows):
        self.session.last_logits = rows[-1]
        self.finish(SessionStart(self.session.id, len(self.session.tokens), to_logprobs(log_softmax(rows[-1]), self.top_k)))


class AppendOp(SessionOp):
    def __init__(self, session, future, ids: list[int], all_positions: bool, top_k: int | None):
        super().__init__(session, future)
        self.ids, self.all_positions, self.top_k = ids, all_positions, top_k

    def start(self) -> None:
        s = self.session
        lag = s.tokens[s.seq.cached :]
        s.tokens = s.tokens + self.ids
        feed = lag + self.ids
        self.set_todo(feed, len(lag) if self.all_positions else len(feed) - 1)

    def consume(self, rows):
        self.session.last_logits = rows[-1]
        self.finish(to_logprobs(log_softmax(rows if self.all_positions else rows[-1]), self.top_k))


class ProposeOp(SessionOp):
    """k draft tokens, sampled one step at a time; the last one is left unfed (lazy)."""

    def __init__(self, session, future, k: int, params: SamplingParams, top_k: int | None):
        super().__init__(session, future)
        self.k, self.params, self.top_k = k, params, top_k
        self.tokens: list[int] = []
        self.dists: list[torch.Tensor] = []

    def start(self) -> None:
        s = self.session
        if s.last_logits is not None:
            self.consume(s.last_logits[None])
        else:
            lag = s.lag()
            self.set_todo(lag, len(lag) - 1)

    def consume(self, rows):
        s = self.session
        if s.generator is None and self.params.seed is not None:
            s.generator = make_generator(self.params.seed, rows.device)
        q = process_logits(rows[-1], self.params)  # [V]
        x = sample(q, self.params, s.generator)
        self.tokens.append(x)
        self.dists.append(q)
        s.tokens = s.tokens + [x]
        s.last_logits = None
        if len(self.tokens) == self.k:
            self.finish(Proposal(self.tokens, to_logprobs(torch.stack(self.dists), self.top_k)))
        else:
            self.set_todo([x], 0)


class ImmediateOp(SessionOp):
    """An operation with no forward pass (rollback, tokens)."""

    def __init__(self, session, future, fn: Callable[[Session], Any]):
        super().__init__(session, future)
        self.fn = fn

    def start(self) -> None:
        self.finish(self.fn(self.session))


class GenRow(Task):
    """One generation row: prefill its prompt (chunked), then decode one token per step."""

    def __init__(self, call: Call, index: int, prompt: list[int], params: SamplingParams, eos: set[int],
                 budget: int, seed: int | None, tokenizer):
        super().__init__(Seq())
        self.call, self.index, self.group = call, index, call.group
        self.prompt, self.params, self.eos, self.budget, self.tokenizer = prompt, params, eos, budget, tokenizer
        self.seed = seed
        self.generator: torch.Generator | None = None
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.top: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.stop_at: int | None = None
        self.checked = 0
        self.finish_reason: str | None = None
        self.kv_reserved = len(prompt) + budget
        self.set_todo(prompt, len(prompt) - 1)

    @property
    def cancelled(self) -> bool:
        return self.call.cancelled

    def consume(self, rows):
        logits = rows[-1]
        if self.generator is None and self.seed is not None:
            self.generator = make_generator(self.seed, logits.device)
        raw = log_softmax(logits)
        tok = int(torch.argmax(raw)) if self.params.greedy else sample(process_logits(logits, self.params), self.params, self.generator)
        self.ids.append(tok)
        self.logprobs.append(float(raw[tok]))
        if self.params.logprobs:
            self.top.append(torch.topk(raw, self.params.logprobs))
        if tok in self.eos or (self.params.stop and self._hit_stop()):
            self.finish_reason = "stop"
        elif len(self.ids) >= self.budget:
            self.finish_reason = "length"
        if self.finish_reason is None:
            self.set_todo([tok], 0)
        else:
            self.finished = True
            self.seq.kv = None
            self.call.set(self.index, self._result())

    def _hit_stop(self) -> bool:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        start = max(0, self.checked - max(map(len, self.params.stop)) + 1)  # a match must end in new text
        self.checked = len(text)
        hits = [i for i in (text.find(s, start) for s in self.params.stop) if i >= 0]
        if hits:
            self.stop_at = min(hits)
        return bool(hits)

    def _result(self) -> Generation:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.stop_at is not None:
            text = text[: self.stop_at]
        top = None
        if self.top:
            values, ids = (torch.stack(t) for t in zip(*self.top))
            top = TopK(ids.cpu().numpy().astype(np.int64), values.float().cpu().numpy())
        return Generation(text, self.ids, self.logprobs, self.finish_reason, Usage(len(self.prompt), len(self.ids)), top)

    def fail(self, error):
        self.finished = True
        self.call.fail(error)


class ScoreItem(Task):
    """log P(cont | ctx): feed ctx + cont[:-1] (or only cont[:-1] on a fork of a shared context)."""

    def __init__(self, call: Call, index: int, seq: Seq, ids: list[int], want_from: int, cont: list[int],
                 first: torch.Tensor | None = None):
        super().__init__(seq)
        self.call, self.index, self.group, self.cont, self.first = call, index, call.group, cont, first
        self.kv_reserved = len(ids)
        self.set_todo(ids, want_from)

    @property
    def cancelled(self) -> bool:
        return self.call.cancelled

    def consume(self, rows):
        if self.first is not None:
            rows = torch.cat([self.first, rows])
        self.finished = True
        self.seq.kv = None
        self.call.set(self.index, score(rows, self.cont))

    def fail(self, error):
        self.finished = True
        self.call.fail(error)


class SharedContext(Task):
    """Prefill a context once, then fork one `ScoreItem` per continuation onto its cache."""

    def __init__(self, engine: Engine, call: Call, ctx: list[int], items: list[tuple[int, list[int]]]):
        super().__init__(Seq())
        self.engine, self.call, self.group, self.items = engine, call, call.group, items
        self.kv_reserved = len(ctx)
        self.set_todo(ctx, len(ctx) - 1)

    @property
    def cancelled(self) -> bool:
        return self.call.cancelled

    def consume(self, rows):
        self.finished = True
        first = rows[-1:]
        for index, cont in self.items:
            if len(cont) == 1:
                self.call.set(index, score(first, cont))
            else:
                self.engine.tasks.append(ScoreItem(self.call, index, Seq(self.seq.kv), cont[:-1], 0, cont, first))
        self.seq.kv = None

    def fail(self, error):
        self.finished = True
        self.call.fail(error)


@dataclass
class Pending:
    """Admission: work waiting until its KV tokens fit the budget."""

    tokens: int
    admit: Callable[[], None]
    fail: Callable[[BaseException], None]
    cancelled: Callable[[], bool]
    deadline: float
    what: str = ""
    opens_session: bool = False
    since: float = field(default_factory=time.monotonic)


# ---- the engine ----------------------------------------------------------------------------------
class Engine:
    """The step loop of one model. Thread-safe: every public method may be called from any thread."""

    def __init__(self, model, tokenizer, device, limits: Limits, name: str = "model"):
        self.model, self.tokenizer, self.device, self.limits, self.name = model, tokenizer, device, limits, name
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self.forward = RaggedForward(model, pad, device)
        self.sessions: OrderedDict[str, Session] = OrderedDict()  # least recently used first
        self.tasks: list[Task] = []  # running work (session ops at the head of their queue, rows, items)
        self.waiting: deque[Pending] = deque()  # admission queue
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self.step_count = 0
        self.counters = {"forwards": 0, "tokens": 0, "evicted": 0, "expired": 0, "rejected": 0}
        self._stats: dict = {}
        self._thread = threading.Thread(target=self._loop, name=f"engine-{name}", daemon=True)
        self._thread.start()

    # ---- public API: each returns a concurrent Future -----------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams, eos: set[int], budgets: list[int]) -> Future:
        future: Future = Future()
        call = Call(future, len(prompts))
        seeds = [None if params.seed is None else params.seed + i for i in range(len(prompts))]
        rows = [GenRow(call, i, p, params, eos, b, s, self.tokenizer) for i, (p, b, s) in enumerate(zip(prompts, budgets, seeds))]
        need = sum(r.kv_reserved for r in rows)
        self._submit(Pending(need, lambda: self.tasks.extend(rows), call.fail, lambda: call.cancelled, 0, f"{len(rows)} generation rows"))
        return future

    def loglikelihood(self, pairs: list[tuple[list[int], list[int]]]) -> Future:
        future: Future = Future()
        call = Call(future, len(pairs))
        by_context: dict[tuple[int, ...], list[int]] = {}
        for i, (ctx, _) in enumerate(pairs):
            by_context.setdefault(tuple(ctx), []).append(i)
        tasks: list[Task] = []
        for ctx, index in by_context.items():
            if len(index) > 1 and len(ctx) >= SHARED_CONTEXT_MIN:
                tasks.append(SharedContext(self, call, list(ctx), [(i, pairs[i][1]) for i in index]))
            else:
                for i in index:
                    c, cont = pairs[i]
                    tasks.append(ScoreItem(call, i, Seq(), c + cont[:-1], len(c) - 1, cont))
        need = sum(len(c) + len(cont) for c, cont in pairs)
        self._submit(Pending(need, lambda: self.tasks.extend(tasks), call.fail, lambda: call.cancelled, 0, f"{len(pairs)} scoring items"))
        return future

    def open_session(self, session_id: str, ids: list[int], top_k: int | None) -> Future:
        future: Future = Future()

        def admit():
            old = self.sessions.pop(session_id, None)  # re-opening an id (a replay) replaces it
            if old is not None:
                self._drop(old, SessionNotFound(session_id))
            s = Session(session_id, list(ids), self.limits.session_ttl_s)
            self.sessions[session_id] = s
            s.ops.append(OpenOp(s, future, top_k))

        def fail(e):
            if not future.done():
                future.set_exception(e)

        self._submit(Pending(len(ids), admit, fail, future.done, 0, "a session", opens_session=True))
        return future

    def append(self, session_id: str, ids: list[int], all_positions: bool, top_k: int | None, limit: int) -> Future:
        """Feed `ids`; fails if the session would pass `limit` tokens."""
        return self._op(session_id, lambda s, f: AppendOp(s, f, ids, all_positions, top_k), len(ids), limit)

    def propose(self, session_id: str, k: int, params: SamplingParams, top_k: int | None, limit: int) -> Future:
        """Draft k tokens; fails if the session would pass `limit` tokens."""
        return self._op(session_id, lambda s, f: ProposeOp(s, f, k, params, top_k), k, limit)

    def rollback(self, session_id: str, length: int) -> Future:
        return self._op(session_id, lambda s, f: ImmediateOp(s, f, lambda s: _rollback(s, length)))

    def session_tokens(self, session_id: str) -> Future:
        return self._op(session_id, lambda s, f: ImmediateOp(s, f, lambda s: list(s.tokens)))

    def close_session(self, session_id: str) -> Future:
        future: Future = Future()

        def close():
            s = self.sessions.pop(session_id, None)
            if s is not None:
                self._drop(s, SessionNotFound(session_id))
            future.set_result(None)

        self._inbox.put(close)
        return future

    def stats(self, fresh: bool = False) -> dict:
        """Gauges and counters: open sessions, KV tokens in use, queue depth, running tasks. The
        snapshot of the last step, or with `fresh` one taken by the loop now (waits for a step)."""
        if not fresh:
            return dict(self._stats)
        future: Future = Future()
        self._inbox.put(lambda: future.set_result(self._snapshot()))
        return future.result(timeout=60)

    @property
    def closed(self) -> bool:
        return self._closed

    def shutdown(self) -> None:
        self._closed = True
        self._inbox.put(lambda: None)

    # ---- submission (caller threads) ----------------------------------------------------------
    def _submit(self, pending: Pending) -> None:
        if self._closed:
            raise RuntimeError(f"model {self.name!r} is shut down")
        if pending.tokens > self.limits.kv_budget_tokens:
            raise ModelAtCapacity(
                f"model {self.name!r}: {pending.what} need {pending.tokens} tokens of KV cache, more than its "
                f"budget of {self.limits.kv_budget_tokens} (kv_budget_tokens)"
            )
        pending.deadline = time.monotonic() + self.limits.queue_timeout_s
        self._inbox.put(pending)

    def _op(self, session_id: str, make: Callable[[Session, Future], SessionOp], grow: int = 0, limit: int = 0) -> Future:
        future: Future = Future()

        def enqueue():
            s = self.sessions.get(session_id)
            if s is None:
                future.set_exception(SessionNotFound(session_id))
                return
            s.renew()
            self.sessions.move_to_end(session_id)
            op = make(s, future)
            op.limit = (grow, limit)
            s.ops.append(op)

        self._inbox.put(enqueue)
        return future

    # ---- the loop (engine thread) -------------------------------------------------------------
    def _loop(self) -> None:
        last_sweep = 0.0
        every = min(0.5, self.limits.session_ttl_s / 4)
        while not self._closed:
            try:
                busy = bool(self.tasks) or any(s.ops for s in self.sessions.values())
                self._drain(block=every if not busy else 0)
                now = time.monotonic()
                if now - last_sweep >= every:
                    self._sweep(now)
                    last_sweep = now
                self._admit(now)
                self._start_ops()
                self.tasks = [t for t in self.tasks if not t.finished and not self._abandon(t)]
                work = self._schedule()
                if work:
                    self._step(work)
                self._publish()
            except Exception:  # a bug must not stop the model: log it, fail what was running
                log.exception("engine %s: step failed", self.name)
                for t in self.tasks:
                    self._fail_task(t, RuntimeError(f"model {self.name!r}: internal error in the engine step"))
                self.tasks = []
        error = RuntimeError(f"model {self.name!r} is shut down")
        for t in self.tasks:
            t.fail(error)
        for s in self.sessions.values():
            self._drop(s, error)
        for p in self.waiting:
            p.fail(error)

    def _drain(self, block: float) -> None:
        """Take what callers sent; wait up to `block` seconds for the first item."""
        try:
            item = self._inbox.get(timeout=block) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._accept(item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _accept(self, item) -> None:
        if isinstance(item, Pending):
            if len(self.waiting) >= self.limits.max_queue:
                self.counters["rejected"] += 1
                item.fail(ModelAtCapacity(f"model {self.name!r} is at capacity: {len(self.waiting)} calls already queued (max_queue)"))
            else:
                self.waiting.append(item)
        else:
            try:
                item()
            except Exception as e:  # a bug in a callback must not stop the loop
                log.exception("engine %s: callback failed: %s", self.name, e)

    def kv_in_use(self) -> int:
        return sum(s.seq.cached for s in self.sessions.values()) + sum(t.kv_reserved for t in self.tasks)

    def _admit(self, now: float) -> None:
        while self.waiting:
            p = self.waiting[0]
            if p.cancelled():
                self.waiting.popleft()
                continue
            if self._make_room(p):
                self.waiting.popleft()
                p.admit()
                continue
            if now < p.deadline:
                return
            self.waiting.popleft()
            self.counters["rejected"] += 1
            p.fail(ModelAtCapacity(
                f"model {self.name!r} is at capacity: {p.what} waited {now - p.since:.0f}s for {p.tokens} tokens "
                f"of KV cache (in use {self.kv_in_use()} of {self.limits.kv_budget_tokens}, "
                f"{len(self.sessions)} of {self.limits.max_sessions} sessions)"
            ))

    def _make_room(self, p: Pending) -> bool:
        """Whether `p` fits, after evicting idle sessions if needed."""
        short = p.tokens - (self.limits.kv_budget_tokens - self.kv_in_use())
        extra = len(self.sessions) + 1 - self.limits.max_sessions if p.opens_session else 0
        if short > 0 or extra > 0:
            self._evict_idle(short, extra)
        room = p.tokens <= self.limits.kv_budget_tokens - self.kv_in_use()
        return room and (not p.opens_session or len(self.sessions) < self.limits.max_sessions)

    def _evict_idle(self, tokens: int, sessions: int = 0) -> int:
        """Evict idle sessions, least recently used first, until `tokens` are freed and `sessions`
        sessions gone; returns the tokens freed."""
        freed, gone = 0, 0
        for s in list(self.sessions.values()):
            if freed >= tokens and gone >= sessions:
                break
            if not s.ops:
                freed += s.seq.cached
                gone += 1
                del self.sessions[s.id]
                self.counters["evicted"] += 1
        return freed

    def _sweep(self, now: float) -> None:
        for s in list(self.sessions.values()):
            if s.expires < now and not s.ops:
                del self.sessions[s.id]
                self.counters["expired"] += 1

    def _start_ops(self) -> None:
        for s in list(self.sessions.values()):
            while s.ops and not s.ops[0].started and self.sessions.get(s.id) is s:
                op = s.ops[0]
                op.started = True
                if op.cancelled:
                    s.ops.popleft()
                    continue
                try:
                    op.check_limit()
                    op.start()
                except Exception as e:
                    op.fail(e)
                if op.finished:
                    s.ops.popleft()
                else:
                    self.tasks.append(op)

    def _abandon(self, t: Task) -> bool:
        """Drop a task whose caller went away; a half-done session op closes its session."""
        if not t.cancelled:
            return False
        if isinstance(t, SessionOp):
            if self.sessions.get(t.session.id) is t.session:
                del self.sessions[t.session.id]
            self._drop(t.session, SessionNotFound(t.session.id))
        t.finished = True
        t.seq.kv = None
        return True

    def _drop(self, s: Session, error: BaseException) -> None:
        for op in s.ops:
            op.fail(error)
        s.ops.clear()
        s.seq.kv = None

    def _schedule(self) -> list[tuple[Task, Feed]]:
        """Pick this step's feeds: decode work round-robin over groups (least recently served
        first), then prefill chunks in the token budget left."""
        lim = self.limits
        by_group: dict[Group, list[Task]] = {}
        for t in self.tasks:
            if t.left > 0:
                by_group.setdefault(t.group, []).append(t)
        if not by_group:
            return []
        order = sorted(by_group, key=lambda g: (g.last_step, g.order))
        tokens, picked = lim.max_step_tokens, []
        queues = [deque(t for t in by_group[g] if t.left <= DECODE_MAX) for g in order]
        while len(picked) < lim.max_batch_size and any(queues):
            for q in queues:
                if q and len(picked) < lim.max_batch_size and q[0].left <= tokens:
                    t = q.popleft()
                    tokens -= t.left
                    picked.append((t, t.left))
                elif q:
                    q.clear()  # does not fit this step
        for g in order:
            for t in by_group[g]:
                if t.left > DECODE_MAX and len(picked) < lim.max_batch_size and (tokens >= MIN_CHUNK or not picked):
                    n = min(t.left, max(tokens, MIN_CHUNK))
                    tokens -= n
                    picked.append((t, n))
        for t, _ in picked:
            t.group.last_step = self.step_count
        return [(t, t.feed(n)) for t, n in picked]

    def _step(self, work: list[tuple[Task, Feed]]) -> None:
        self.step_count += 1
        by_feed = {id(f): t for t, f in work}
        for batch in pack([f for _, f in work]):
            try:
                outs = self.forward(batch)
            except Exception as e:
                log.exception("engine %s: forward of %d rows failed", self.name, len(batch))
                for f in batch:
                    self._fail_task(by_feed[id(f)], e)
                continue
            self.counters["forwards"] += 1
            self.counters["tokens"] += sum(len(f.ids) for f in batch)
            for f, logits in zip(batch, outs):
                t = by_feed[id(f)]
                try:
                    t.done(f, logits)
                except Exception as e:
                    self._fail_task(t, e)
        for t, _ in work:
            if t.finished and isinstance(t, SessionOp):
                t.session.renew()
                if t.session.ops and t.session.ops[0] is t:
                    t.session.ops.popleft()

    def _fail_task(self, t: Task, e: BaseException) -> None:
        t.fail(e)
        t.seq.kv = None
        if isinstance(t, SessionOp):
            self.sessions.pop(t.session.id, None)
            self._drop(t.session, SessionNotFound(t.session.id))

    def _publish(self) -> None:
        self._stats = self._snapshot()

    def _snapshot(self) -> dict:
        return {
            "sessions_open": len(self.sessions),
            "kv_tokens": self.kv_in_use(),
            "kv_capacity_tokens": self.limits.kv_budget_tokens,
            "queue_depth": len(self.waiting) + sum(max(len(s.ops) - 1, 0) for s in self.sessions.values()),
            "running": len(self.tasks),
            "steps": self.step_count,
            **self.counters,
        }


def _rollback(s: Session, length: int) -> None:
    if not 1 <= length <= len(s.tokens):
        raise ValueError(f"rollback length {length} outside [1, {len(s.tokens)}] for session {s.id!r}")
    if length < len(s.tokens):
        s.seq.crop(length)
        s.tokens = s.tokens[:length]
        s.last_logits = None


def default_kv_budget(model, device) -> int:
    """KV tokens that fit in a share of the device's memory: 80% of what is free on a GPU after
    the weights, a quarter of the machine's available memory on CPU."""
    cfg = model.config.get_text_config()
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_token = 2 * cfg.num_hidden_layers * heads * head_dim * torch.finfo(model.dtype).bits // 8
    if str(device).startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        memory = 0.8 * free
    else:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):  # no such figure on this OS: a share of all memory
            available = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2
        memory = available / 4
    return max(int(memory // per_token), 4096)
