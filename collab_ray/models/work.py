"""The work an `Engine` step runs: sequences' KV caches, the ragged batched forward, and the tasks
that feed them (session operations, generation rows, scoring items).

A task feeds its `todo` tokens into one sequence, in chunks when the scheduler says so, collects
the logits of the positions it wants, then `consume`s them: a session operation answers its
caller, a generation row samples its next token and feeds it, a shared context forks one scoring
item per continuation. Sampling runs here, on the engine's thread, with the request's histories
(penalties, `min_tokens`, `logit_bias`: core/sampling.py).
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from transformers import DynamicCache

from collab_ray.core.sampling import SamplingParams, log_softmax, make_generator, process_logits, sample
from collab_ray.core.types import Generation, LoglikelihoodResult, LogProbs, Proposal, SessionStart, TopK, Usage

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

    Tensors are never written in place (a step makes new ones), so forks share them safely.
    `row` is (batch, index) while `kv` is row `index` of the batched cache a forward left; setting
    `kv` clears it (and so lets that batch go)."""

    __slots__ = ("_kv", "row")

    def __init__(self, kv: list | None = None):
        self.kv = kv

    @property
    def kv(self) -> list | None:
        return self._kv

    @kv.setter
    def kv(self, value: list | None) -> None:
        self._kv = value
        self.row = None

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
        # rows that all grew by N end at the batched cache's last position: kept for the next step
        batch = [(layer.keys, layer.values) for layer in cache.layers] if all(len(f.ids) == N for f in feeds) else None
        for i, f in enumerate(feeds):
            c, n = f.seq.cached, len(f.ids)
            f.seq.kv = [(layer.keys[i : i + 1, :, P - c : P + n], layer.values[i : i + 1, :, P - c : P + n]) for layer in cache.layers]
            f.seq.row = (batch, i) if batch else None
        out, start = [], 0
        for f in feeds:
            out.append(logits[start : start + len(f.want)])
            start += len(f.want)
        return out

    @staticmethod
    def _gather(feeds: list[Feed], P: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values) [B, heads, P, dim], each row's cache at the right end.

        When the feeds are exactly the rows of the batched cache the last forward left (same rows,
        same order, none cropped or grown since, all grown by the same count there), that cache is
        this layout already and is used as is: steady decoding copies no cache at all. Otherwise
        each row is copied into a fresh left-padded batch (about three quarters of a decode step's
        time for 8 SmolLM2 sessions on CPU, the cost this shortcut removes in steady state).
        """
        row = feeds[0].seq.row
        if row is not None and len(row[0][0][0]) == len(feeds) and row[0][0][0].shape[2] == P:
            batch = row[0]
            if all(f.seq.row is not None and f.seq.row[0] is batch and f.seq.row[1] == i for i, f in enumerate(feeds)):
                return batch
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
    """The unit of fairness: one caller's call (a generate or log-likelihood call, or one session),
    or the generate calls of one request together (`TransformersBackend.generate_batch`)."""

    _ids = itertools.count()

    def __init__(self):
        self.order = next(self._ids)
        self.last_step = -1


class Call:
    """The future of one submitted call whose result gathers the results of several tasks."""

    def __init__(self, future: Future, n: int, finish: Callable[[list], Any] = list, group: Group | None = None):
        self.future = future
        self.results: list = [None] * n
        self.left = n
        self.finish = finish
        self.group = group or Group()

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
        self.prompt_len = len(tokens)
        self.eos_ids: tuple[int, ...] = ()
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

    def rollback(self, length: int) -> None:
        """Keep the first `length` tokens (1 ≤ length ≤ len(tokens))."""
        if not 1 <= length <= len(self.tokens):
            raise ValueError(f"rollback length {length} outside [1, {len(self.tokens)}] for session {self.id!r}")
        if length < len(self.tokens):
            self.seq.crop(length)
            self.tokens = self.tokens[:length]
            self.last_logits = None

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
        self.keep: int | None = None  # roll the session back to this many tokens first
        self.adds: list[int] = []  # then add these (fed by the op's own forward; no log-probs returned)

    def rewind(self) -> None:
        """Apply `keep` and `adds` (a rollback and an append the caller sent along with this op,
        so they cost no round trip of their own)."""
        if self.keep is not None:
            self.session.rollback(self.keep)
        if self.adds:
            self.session.tokens = self.session.tokens + self.adds
            self.session.last_logits = None

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
        history = {}
        if self.params.needs_history:  # the session's prompt is what it was opened (or replayed) with
            history = dict(prompt_ids=s.tokens[: s.prompt_len], output_ids=s.tokens[s.prompt_len :], eos_ids=s.eos_ids)
        q = process_logits(rows[-1], self.params, **history)  # [V]
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
        params = self.params
        if params.greedy and not params.needs_history:
            tok = int(torch.argmax(raw))
        else:
            q = process_logits(logits, params, prompt_ids=self.prompt, output_ids=self.ids, eos_ids=tuple(self.eos))
            tok = sample(q, params, self.generator)
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

    def __init__(self, spawn: Callable[[Task], None], call: Call, ctx: list[int], items: list[tuple[int, list[int]]]):
        super().__init__(Seq())
        self.spawn, self.call, self.group, self.items = spawn, call, call.group, items
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
                self.spawn(ScoreItem(self.call, index, Seq(self.seq.kv), cont[:-1], 0, cont, first))
        self.seq.kv = None

    def fail(self, error):
        self.finished = True
        self.call.fail(error)
