"""`ServeBackend`: the `ModelBackend` protocol over a Ray Serve `DeploymentHandle`.

The same strategy code that runs on in-process backends runs across deployments through this.

Session operations are coalesced: the operations that concurrent requests issue to one model in
the same event-loop tick (a few hops of it, so `asyncio.gather`ed children join too) travel as
one `session_batch` call, and the engine on the replica runs them in one step. At most
`MAX_IN_FLIGHT` such batches are out per shard; operations issued meanwhile wait and go together
when one comes back, which pulls requests that started apart into step (with sends on every tick
instead, 16 concurrent speculative requests still made 0.5 calls per token per model: they
stayed in as many phases as they started in). Long prefills travel alone, so no short operation
waits for one. Round trips per generated token fall as concurrency rises.

Affinity: each session belongs to a shard (crc32 of its id modulo `shards`), and a shard's calls
carry the shard as routing key (consistent-hash router: a shard sticks to one replica), so one
batch only holds sessions of one replica. One shard for a one-replica model; several per replica
otherwise, to spread sessions. Correctness never depends on that: the client keeps each session's
tokens, and when a replica answers `SessionNotFound` (evicted, lease expired, restarted, or routed
elsewhere) it re-opens the session there by replaying them, then repeats the call.

Generation calls are coalesced per request: the `generate` calls that one HTTP request fans out
(a list of prompts, `n` choices; the ingress marks each request with `request_scope`) in the same
tick travel as one `generate_batch` call. Measured on deploy/tiny.yaml: a 64-prompt × n=4
completions request made 256 calls, filled the model's `max_ongoing_requests`, and an 8-token
request sent beside it waited at Ray Serve's router for a whole generation (429× its idle
latency). Calls of different requests are never merged, so a batch lives in its request's own
cancellation scope: a cancelled request cancels its generation rows and no one else's.

Bookkeeping is bounded: a session's tokens are dropped when it closes (closing happens even when
the request is cancelled), and the oldest entries go past `max_tracked` sessions.
"""

from __future__ import annotations

import asyncio
import contextvars
import uuid
import zlib
from collections import OrderedDict
from typing import Sequence

from ray.exceptions import ActorDiedError, ActorUnavailableError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from collab_ray.core.errors import ModelAtCapacity, ModelUnavailable, SessionNotFound
from collab_ray.core.sampling import SamplingParams
from collab_ray.core.types import Proposal, SessionStart

UNAVAILABLE = (ActorDiedError, ActorUnavailableError, DeploymentUnavailableError, BackPressureError)
COALESCE_HOPS = 3  # event-loop hops an operation waits for others to join its batch
MAX_IN_FLIGHT = 1  # batches of short operations out at once per shard; operations issued meanwhile wait and join
LONG_OP = 64  # tokens from which an open or append is a prefill, sent on its own

# the HTTP request a call belongs to (set by the ingress per request; None outside one)
REQUEST_SCOPE: contextvars.ContextVar[str | None] = contextvars.ContextVar("collab_ray_request", default=None)


def _long(method: str, args: tuple) -> bool:
    return method in ("open_session", "append") and len(args[0]) > LONG_OP

__all__ = ["ServeBackend", "ModelUnavailable", "REQUEST_SCOPE"]


class ServeBackend:
    def __init__(
        self,
        handle: DeploymentHandle,
        name: str,
        call_timeout_s: float = 120.0,
        retries: int = 2,
        shards: int = 1,
        max_tracked: int = 65536,
    ):
        self.handle = handle
        self.name = name
        self.call_timeout_s = call_timeout_s
        self.retries = retries
        self.shards = shards
        self.max_tracked = max_tracked
        self._tokens: OrderedDict[str, list[int]] = OrderedDict()  # each open session's tokens, for replay
        self._handles: dict[str, DeploymentHandle] = {}  # each shard's routed handle
        self._pending: dict[str, list] = {}  # shard -> operations waiting to be sent together
        self._in_flight: dict[str, int] = {}  # shard -> batches sent and not yet answered
        self._flushing: set[str] = set()  # shards whose pending operations are about to be sent
        self._generating: dict[str, list] = {}  # request scope -> generate calls waiting to go together
        self._loop = None  # the event loop the batching state above belongs to
        self._info = None
        self._strings = None
        self.replays = 0
        self.calls = 0  # handle calls made (round trips)
        self.session_ops = 0  # session operations sent (each batch carries several)

    async def _call(self, method: str, *args, routing_key: str | None = None, **kwargs):
        handle = self.handle if routing_key is None else self._routed(routing_key)
        for attempt in range(self.retries + 1):
            try:
                self.calls += 1
                return await asyncio.wait_for(getattr(handle, method).remote(*args, **kwargs), self.call_timeout_s)
            except UNAVAILABLE as e:
                if attempt == self.retries:
                    raise ModelUnavailable(f"model {self.name!r} unavailable for {method}: {type(e).__name__}") from e
                await asyncio.sleep(0.5 * 2**attempt)
            except asyncio.TimeoutError:
                raise ModelUnavailable(f"model {self.name!r}: {method} timed out after {self.call_timeout_s}s") from None

    def _routed(self, shard: str) -> DeploymentHandle:
        """The handle whose calls carry `shard` as routing key (made once per shard)."""
        if shard not in self._handles:
            self._handles[shard] = self.handle.options(session_id=shard)
        return self._handles[shard]

    def shard(self, session_id: str) -> str:
        return f"{self.name}/{zlib.crc32(session_id.encode()) % self.shards}"

    # ---- coalesced session operations -----------------------------------------------------------
    def _loop_now(self):
        """The running loop; batching state of a loop that is gone is dropped (it never comes back)."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop = loop
            self._pending, self._in_flight, self._flushing, self._generating = {}, {}, set(), {}
        return loop

    async def _op(self, method: str, session_id: str, *args, **kwargs):
        """One session operation, sent with the others of its shard (see the module docstring)."""
        loop = self._loop_now()
        future = loop.create_future()
        shard = self.shard(session_id)
        op = (method, (session_id, *args), kwargs, future)
        if _long(method, args):  # a long prefill travels alone: short operations never wait for it
            self._launch(shard, [op], counted=False)
        else:
            self._pending.setdefault(shard, []).append(op)
            self._flush_soon(loop, shard)
        return await future

    def _flush_soon(self, loop, shard: str) -> None:
        """Send the shard's pending operations a few loop hops from now (so operations that the
        same wake-up releases join them), unless MAX_IN_FLIGHT batches are out: then the batch
        grows until one comes back, which is what keeps concurrent requests in step."""
        if shard not in self._flushing and self._in_flight.get(shard, 0) < MAX_IN_FLIGHT:
            self._flushing.add(shard)
            _after_hops(loop, COALESCE_HOPS, self._flush, shard)

    def _flush(self, shard: str) -> None:
        self._flushing.discard(shard)
        batch = self._pending.pop(shard, None)
        if batch:
            self._launch(shard, batch, counted=True)

    def _launch(self, shard: str, batch: list, counted: bool) -> None:
        if counted:
            self._in_flight[shard] = self._in_flight.get(shard, 0) + 1
        # a fresh context: Ray Serve cancels the calls a request made when it is cancelled, and
        # this batch carries other requests' operations (and the closes of the cancelled one)
        asyncio.get_running_loop().create_task(self._send(shard, batch, counted), context=contextvars.Context())

    async def _send(self, shard: str, batch: list, counted: bool) -> None:
        self.session_ops += len(batch)
        try:
            results = await self._call("session_batch", [op[:3] for op in batch], routing_key=shard)
        except BaseException as e:
            results = [e] * len(batch)
            if not isinstance(e, Exception):
                raise
        finally:
            if counted:
                self._in_flight[shard] -= 1
                if self._pending.get(shard):
                    self._flush_soon(asyncio.get_running_loop(), shard)
        for (method, args, _, future), result in zip(batch, results):
            if future.done():  # the caller went away: a session it opened is closed again
                if method == "open_session" and not isinstance(result, BaseException):
                    self._forget(args[0])
                    asyncio.ensure_future(self._close_quietly(args[0]))
            elif isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

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
        """Outside a request scope, one call; inside, joined with the request's other `generate`
        calls of this tick into one `generate_batch` call (see the module docstring)."""
        scope = REQUEST_SCOPE.get()
        if scope is None:
            return await self._call("generate", list(prompts), params)
        loop = self._loop_now()
        future = loop.create_future()
        calls = self._generating.setdefault(scope, [])
        calls.append((list(prompts), params, future))
        if len(calls) == 1:
            _after_hops(loop, COALESCE_HOPS, self._send_generate, scope)
        return await future

    def _send_generate(self, scope: str) -> None:
        calls = self._generating.pop(scope)
        if len(calls) == 1:  # nothing joined: a plain `generate` call
            prompts, params, _ = calls[0]
            task = asyncio.ensure_future(self._call("generate", prompts, params))
        else:
            task = asyncio.ensure_future(self._call("generate_batch", [(p, sp) for p, sp, _ in calls]))
        futures = [f for _, _, f in calls]
        task.add_done_callback(lambda t: _settle(futures, t, batched=len(calls) > 1))
        for f in futures:  # when every caller has gone, the model stops generating for them
            f.add_done_callback(lambda _: all(f.cancelled() for f in futures) and task.cancel())

    async def loglikelihood(self, requests):
        return await self._call("loglikelihood", list(requests))

    # ---- sessions -----------------------------------------------------------------------------
    async def _session_call(self, session_id: str, method: str, *args, keep: int | None = None, feed=(), **kwargs):
        """A session operation, after rolling back to `keep` tokens and adding `feed` when given;
        when the replica lost the session, re-open it by replaying what the operation expects to
        find, and call again. The client's record of the session's tokens follows."""
        tokens = self._tokens_of(session_id)
        if keep is not None and not 1 <= keep <= len(tokens):
            raise ValueError(f"rollback length {keep} outside [1, {len(tokens)}] for session {session_id!r}")
        feed = list(feed)
        rewind = {k: v for k, v in (("keep", keep), ("feed", feed)) if v}
        try:
            out = await self._op(method, session_id, *args, **kwargs, **rewind)
        except ModelAtCapacity:
            raise
        except (SessionNotFound, ModelUnavailable):
            await self._replay(session_id, tokens[: len(tokens) if keep is None else keep] + feed)
            out = await self._op(method, session_id, *args, **kwargs)
        if keep is not None:
            del tokens[keep:]
        tokens.extend(feed)
        return out

    def _tokens_of(self, session_id: str) -> list[int]:
        if session_id not in self._tokens:
            raise SessionNotFound(session_id)
        return self._tokens[session_id]

    def _track(self, session_id: str, tokens: list[int]) -> None:
        self._tokens[session_id] = tokens
        self._tokens.move_to_end(session_id)
        while len(self._tokens) > self.max_tracked:
            self._tokens.popitem(last=False)

    def _forget(self, session_id: str) -> None:
        self._tokens.pop(session_id, None)

    async def _replay(self, session_id: str, tokens: list[int]) -> None:
        await self._op("open_session", session_id, tokens)
        self.replays += 1

    async def open_session(self, prompt_ids, *, session_id: str | None = None, top_k: int | None = None) -> SessionStart:
        session_id = session_id or uuid.uuid4().hex
        start = await self._op("open_session", session_id, list(prompt_ids), top_k=top_k)
        self._track(session_id, list(prompt_ids))
        return start

    async def append(
        self, session_id: str, token_ids, *, all_positions: bool = False, top_k: int | None = None, keep: int | None = None
    ):
        out = await self._session_call(session_id, "append", list(token_ids), all_positions=all_positions, top_k=top_k, keep=keep)
        self._tokens_of(session_id).extend(token_ids)
        return out

    async def propose(
        self, session_id: str, k: int, params: SamplingParams, *, top_k: int | None = None, keep: int | None = None, feed=()
    ) -> Proposal:
        proposal = await self._session_call(session_id, "propose", k, params, top_k=top_k, keep=keep, feed=feed)
        self._tokens_of(session_id).extend(proposal.tokens)
        return proposal

    async def rollback(self, session_id: str, length: int) -> None:
        tokens = self._tokens_of(session_id)
        if not 1 <= length <= len(tokens):
            raise ValueError(f"rollback length {length} outside [1, {len(tokens)}] for session {session_id!r}")
        try:
            await self._op("rollback", session_id, length)
        except ModelAtCapacity:
            raise
        except (SessionNotFound, ModelUnavailable):
            await self._replay(session_id, tokens[:length])
        del tokens[length:]

    async def close_session(self, session_id: str) -> None:
        """Forget the session at once and close it on its replica; a cancelled caller does not
        stop the close."""
        self._forget(session_id)
        await asyncio.shield(self._close_quietly(session_id))

    async def _close_quietly(self, session_id: str) -> None:
        try:
            await self._op("close_session", session_id)
        except ModelUnavailable:
            pass  # the replica is gone, and the session with it

    async def stats(self) -> dict:
        """The engine gauges of one replica of this model (the one the call lands on)."""
        return await self._call("stats")


def _after_hops(loop, hops: int, fn, *args) -> None:
    """Call `fn(*args)` `hops` event-loop iterations from now (what was woken meanwhile joins in)."""
    if hops:
        loop.call_soon(_after_hops, loop, hops - 1, fn, *args)
    else:
        fn(*args)


def _settle(futures: list, task: asyncio.Task, batched: bool) -> None:
    """Hand each caller its result (a batch answers a list, each entry a result or an exception)."""
    if task.cancelled():
        for future in futures:
            future.cancel()
        return
    if task.exception() is not None:
        results = [task.exception()] * len(futures)
    else:
        results = task.result() if batched else [task.result()]
    for future, result in zip(futures, results):
        if future.done():
            continue
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)
