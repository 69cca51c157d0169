"""`Engine`: every forward pass of one model, continuously batched across all concurrent callers.

It owns the model's KV memory and one step loop on its own thread. Callers from any thread or
event loop submit work — generation rows, log-likelihood items, and decode-session operations
(open, append with log-probs at every position, propose k draft tokens, rollback, close) — and get
a `concurrent.futures.Future` back. Each step the loop packs whatever is ready, from every caller,
into batched forwards over sequences of different past lengths and different numbers of new tokens,
and hands each caller its rows; work joins and leaves between steps (continuous batching, as vLLM
and SGLang do for plain generation, here for collaboration sessions too). `propose` samples its k
draft tokens one step at a time, batched with every other drafter's. This module is the
scheduler (admission, fairness, leases, the loop); work.py is what a step runs (sequences' caches,
the ragged forward, the tasks), as vLLM splits scheduler and model runner.

Scheduling (per step):
- fairness: work is grouped by caller (one `generate` call, one session); the groups served least
  recently go first, one task per group per round, so a 1 000-row request cannot hold the model;
- chunked prefill: a per-step token budget (`max_step_tokens`); long prompts and long appends are fed
  in chunks between decode steps, at most `max_prefill_beside_decode` tokens of them in a step that
  has decode work (on CPU each prompt token costs about what a decode row does, so a big chunk
  would multiply every decoding request's step time); decode work (≤ `DECODE_MAX` tokens) is
  never split;
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
that (see ENGINES.md beside this file). In steady decoding (the same rows step after step, each
grown by one token) the batched cache the last forward left is already that layout and is reused
as is (`RaggedForward._gather`): 16 requests × 64 tokens went from 13–17 to 17–18 tok/s through the
engine (interleaved, load 11); the copy is paid only when rows join, leave or roll back.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

from collab_ray.core.errors import ModelAtCapacity, SessionNotFound
from collab_ray.core.sampling import SamplingParams
from collab_ray.models.config import DECODE_MAX
from collab_ray.models.work import (
    AppendOp, Call, Feed, GenRow, Group, ImmediateOp, OpenOp, ProposeOp, RaggedForward, ScoreItem, Seq, Session,
    SessionOp, SharedContext, Task, pack,
)

log = logging.getLogger(__name__)

MIN_CHUNK = 16  # smallest prefill chunk worth a place in a step
SHARED_CONTEXT_MIN = 64  # context tokens from which several continuations share one prefill
RETURN_WAIT = 0.25  # share of the last step's time to wait for the sessions it answered to come back
RETURN_WAIT_MAX = 0.05  # seconds


@dataclass(frozen=True)
class Limits:
    """The engine's limits, resolved from `ModelConfig` (which describes each)."""

    max_batch_size: int
    max_step_tokens: int
    max_prefill_beside_decode: int
    kv_budget_tokens: int
    max_sessions: int
    session_ttl_s: float
    max_queue: int
    queue_timeout_s: float


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

    def __init__(self, model, tokenizer, device, limits: Limits, name: str = "model", eos_ids: tuple[int, ...] = ()):
        self.model, self.tokenizer, self.device, self.limits, self.name = model, tokenizer, device, limits, name
        self.eos_ids = eos_ids
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
        self._returning: set[str] = set()  # sessions whose operation the last step finished
        self._to_start: set[str] = set()  # sessions whose next operation may be ready to start
        self._step_end = 0.0
        self._step_time = 0.0
        self._thread = threading.Thread(target=self._loop, name=f"engine-{name}", daemon=True)
        self._thread.start()

    # ---- public API: each returns a concurrent Future -----------------------------------------
    def generate(
        self, prompts: list[list[int]], params: SamplingParams, eos: set[int], budgets: list[int], group: Group | None = None
    ) -> Future:
        """Generation rows; they share `group` for fairness when given (the calls of one request)."""
        future: Future = Future()
        call = Call(future, len(prompts), group=group)
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
                tasks.append(SharedContext(lambda task: self.tasks.append(task), call, list(ctx), [(i, pairs[i][1]) for i in index]))
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
            s.eos_ids = self.eos_ids
            self.sessions[session_id] = s
            s.ops.append(OpenOp(s, future, top_k))
            self._to_start.add(session_id)

        def fail(e):
            if not future.done():
                future.set_exception(e)

        self._submit(Pending(len(ids), admit, fail, future.done, 0, "a session", opens_session=True))
        return future

    def append(
        self, session_id: str, ids: list[int], all_positions: bool, top_k: int | None, limit: int, keep: int | None = None
    ) -> Future:
        """Feed `ids` (after rolling back to `keep` tokens); fails if the session would pass `limit` tokens."""
        return self._op(session_id, lambda s, f: AppendOp(s, f, ids, all_positions, top_k), len(ids), limit, keep)

    def propose(
        self, session_id: str, k: int, params: SamplingParams, top_k: int | None, limit: int,
        keep: int | None = None, feed: list[int] | None = None,
    ) -> Future:
        """Draft k tokens (after rolling back to `keep` tokens and adding `feed`); fails if the
        session would pass `limit` tokens."""
        return self._op(session_id, lambda s, f: ProposeOp(s, f, k, params, top_k), k, limit, keep, feed)

    def rollback(self, session_id: str, length: int) -> Future:
        return self._op(session_id, lambda s, f: ImmediateOp(s, f, lambda s: s.rollback(length)))

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
                f"model {self.name!r}: {pending.what} would take {pending.tokens} tokens of KV cache, more than its "
                f"budget of {self.limits.kv_budget_tokens} (kv_budget_tokens)"
            )
        pending.deadline = time.monotonic() + self.limits.queue_timeout_s
        self._inbox.put(pending)

    def _op(
        self, session_id: str, make: Callable[[Session, Future], SessionOp], grow: int = 0, limit: int = 0,
        keep: int | None = None, feed: list[int] | None = None,
    ) -> Future:
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
            op.keep, op.adds = keep, list(feed or ())
            s.ops.append(op)
            self._to_start.add(session_id)

        self._inbox.put(enqueue)
        return future

    # ---- the loop (engine thread) -------------------------------------------------------------
    def _loop(self) -> None:
        last_sweep = 0.0
        every = min(0.5, self.limits.session_ttl_s / 4)
        while not self._closed:
            try:
                busy = bool(self.tasks) or bool(self._to_start)
                self._drain(block=every if not busy else 0)
                now = time.monotonic()
                if now - last_sweep >= every:
                    self._sweep(now)
                    last_sweep = now
                self._admit(now)
                self._start_ops()
                self.tasks = [t for t in self.tasks if not t.finished and not self._abandon(t)]
                wait = self._returning_wait(now)
                if wait > 0:
                    self._drain(block=wait)
                    continue
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

    def _returning_wait(self, now: float) -> float:
        """Seconds to wait for sessions served last step to send their next operation.

        A caller answered by a step sends its next operation a moment later; stepping at once would
        run a few rows now and the rest in a second forward. Waiting up to a quarter of the last
        step's time (at most `RETURN_WAIT_MAX`) keeps concurrent sessions in one batch.
        """
        if not self._returning:
            return 0.0
        self._returning = {i for i in self._returning if (s := self.sessions.get(i)) is not None and not s.ops}
        deadline = self._step_end + min(RETURN_WAIT * self._step_time, RETURN_WAIT_MAX)
        if not self._returning or now >= deadline:
            self._returning.clear()
            return 0.0
        return deadline - now

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
            if not self.waiting and self._make_room(item):
                item.admit()
            elif len(self.waiting) >= self.limits.max_queue:
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
        """Start the head operation of each session that got one (not a scan of every session)."""
        ready, self._to_start = self._to_start, set()
        for session_id in ready:
            s = self.sessions.get(session_id)
            while s is not None and s.ops and not s.ops[0].started and self.sessions.get(s.id) is s:
                op = s.ops[0]
                op.started = True
                if op.cancelled:
                    s.ops.popleft()
                    continue
                try:
                    op.rewind()
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
        if picked:  # beside decode work, prefill gets at most `max_prefill_beside_decode` tokens
            tokens = min(tokens, lim.max_prefill_beside_decode)
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
        start = time.monotonic()
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
            if isinstance(t, OpenOp) and t.future.cancelled() and self.sessions.get(t.session.id) is t.session:
                del self.sessions[t.session.id]  # opened for a caller that went away meanwhile
                self._drop(t.session, SessionNotFound(t.session.id))
                continue
            if t.finished and isinstance(t, SessionOp):
                t.session.renew()
                if t.session.ops and t.session.ops[0] is t:
                    t.session.ops.popleft()
                if t.session.ops:
                    self._to_start.add(t.session.id)
                self._returning.add(t.session.id)
        self._step_end = time.monotonic()
        self._step_time = self._step_end - start

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
