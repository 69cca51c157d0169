"""`speculative`: a draft model proposes k tokens, the target verifies them in one forward pass.

Exact: greedy output equals the target's greedy output token for token, sampled output follows the
target's distribution (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative
Decoding"; Chen et al. 2023, "Accelerating LLM Decoding with Speculative Sampling").

Per round: one `propose` on the draft, one `append(all_positions=True)` on the target, and
rollbacks of both sessions to the accepted length. The target session holds the prompt and every
output token but the last (`pending`), which is fed in front of the next round's draft tokens, so
its log-prob rows line up with the drafts: row i is the target's distribution of draft token i,
row k the bonus token's.

Draft and target with different tokenizers (universal assisted generation, as transformers'
`generate(assistant_model=..., tokenizer=..., assistant_tokenizer=...)`): the draft continues its
own tokenization of the text so far; its drafted text is re-tokenized for the target, and the
target's tokens are verified as deterministic proposals (q = one-hot), which keeps sampling exact.
"""

from __future__ import annotations

import asyncio
from typing import Literal, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from collab_ray.core.backend import ModelBackend
from collab_ray.core.decoding import (
    check_shared_vocabulary,
    open_sessions,
    output_for,
    prompt_ids,
    shares_vocabulary,
)
from collab_ray.core.sampling import SamplingParams, make_generator, process_logits
from collab_ray.core.session import Session
from collab_ray.core.strategy import Emit, Request, Strategy, StrategyResult, register


def greedy_accept(best: Sequence[int], tokens: Sequence[int]) -> tuple[int, int]:
    """Longest prefix of `tokens` equal to the target's argmax, and the target's next token.

    best [k+1]: the target's argmax at draft token i's position, best[k] after all k.
    Returns (n accepted, best[n]) — a correction when n < k, the bonus token when n = k.
    """
    n = 0
    while n < len(tokens) and tokens[n] == best[n]:
        n += 1
    return n, best[n]


def sampled_accept(
    p: torch.Tensor, q: torch.Tensor, tokens: Sequence[int], generator: torch.Generator | None
) -> tuple[int, int]:
    """Speculative sampling: accept x_i with prob min(1, p_i(x_i)/q_i(x_i)); at the first rejection
    sample norm(max(0, p_i − q_i)); when all k are accepted sample a bonus token from p_k.

    p [k+1, V] target log-probs, q [k, V] draft log-probs (both after temperature/top-k/top-p).
    Returns (n accepted, next token). The output is distributed exactly as p (Leviathan et al. 2023, thm. 1).
    """
    k = len(tokens)
    if k:
        index, x = torch.arange(k), torch.tensor(tokens)
        ratio = torch.exp(p[index, x] - q[index, x])  # [k] p(x)/q(x)
        rejected = (torch.rand(k, generator=generator) >= ratio).nonzero()
        if len(rejected):
            n = int(rejected[0])
            residual = (torch.exp(p[n]) - torch.exp(q[n])).clamp(min=0)  # [V]
            if residual.sum() <= 0:  # p == q up to rounding: the residual is p itself
                residual = torch.exp(p[n])
            return n, int(torch.multinomial(residual, 1, generator=generator))
    return k, int(torch.multinomial(torch.exp(p[k]), 1, generator=generator))


class SpeculativeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    k: int = Field(4, ge=1, le=64, description="Draft tokens proposed per round (the starting value when adaptive).")
    adaptive: bool = Field(True, description="Grow k by 2 when every draft token is accepted, shrink it by 1 on a rejection.")
    k_min: int = Field(1, ge=1, le=64, description="Smallest k when adaptive.")
    k_max: int = Field(16, ge=1, le=64, description="Largest k when adaptive.")
    tokenizers: Literal["auto", "shared", "different"] = Field(
        "auto",
        description="'shared': draft and target share token ids; 'different': re-tokenize drafted text for the "
        "target (universal assisted generation); 'auto': compare the two vocabularies.",
    )

    @model_validator(mode="after")
    def _bounds(self):
        if not self.k_min <= self.k <= self.k_max:
            raise ValueError(f"k={self.k} must lie within [k_min={self.k_min}, k_max={self.k_max}]")
        return self


class SharedDrafter:
    """Draft with the target's token ids: the draft session follows the target's output exactly."""

    def __init__(self, session: Session, prompt: list[int]):
        self.session = session
        self.prompt = prompt

    async def propose(self, out: list[int], k: int, params: SamplingParams) -> tuple[list[int], torch.Tensor | None]:
        """Drafts and their distributions q [k, V] (None when greedy: acceptance needs no q)."""
        await self.session.sync(self.prompt + out)
        proposal = await self.session.propose(k, params, top_k=1 if params.greedy else None)
        return list(proposal.tokens), None if params.greedy else torch.tensor(np.asarray(proposal.logprobs))


class TextDrafter:
    """Draft in another vocabulary: sync the draft by text, re-tokenize its drafted text for the target."""

    TAIL = 4  # tokens of left context re-tokenized with the drafted text, to get the boundary right

    def __init__(self, session: Session, prompt: list[int], draft: ModelBackend, target: ModelBackend, context: int | None):
        self.session = session
        self.prompt = prompt
        self.draft = draft
        self.target = target
        self.context = context

    async def propose(self, out: list[int], k: int, params: SamplingParams) -> tuple[list[int], torch.Tensor | None]:
        text = await self.target.decode(out)
        ids = await self.draft.encode(text, add_special_tokens=False) if text else []
        await self.session.sync(self.prompt + ids)
        if self.context is not None:
            k = min(k, self.context - len(self.session.tokens))
        if k < 1:
            return [], None
        proposal = await self.session.propose(k, params)
        tail = ids[-self.TAIL :]
        drafted = (await self.draft.decode(tail + list(proposal.tokens)))[len(await self.draft.decode(tail)) :]
        tail = out[-self.TAIL :]
        candidates = await self.target.encode(await self.target.decode(tail) + drafted, add_special_tokens=False)
        if candidates[: len(tail)] != tail:  # the boundary re-tokenized differently: no usable draft
            return [], None
        return candidates[len(tail) :][:k], None


@register
class Speculative(Strategy):
    name = "speculative"
    roles = ("draft", "target")
    Params = SpeculativeParams

    async def run(self, models: dict[str, ModelBackend], request: Request, emit: Emit | None = None) -> StrategyResult:
        p: SpeculativeParams = self.params
        params = request.params
        draft, target = models["draft"], models["target"]
        shared = p.tokenizers == "shared"
        if p.tokenizers == "auto":
            shared = await shares_vocabulary(draft, target)
        elif shared:
            await check_shared_vocabulary({"draft": draft, "target": target})
        target_ids = await prompt_ids(target, request)
        draft_ids = target_ids if shared else await prompt_ids(draft, request)
        output = await output_for(target, request, len(target_ids), emit, *([draft] if shared else []))
        generator = make_generator(params.seed)
        k, ks, lengths, proposed = p.k, [], [], 0
        async with open_sessions([(target, target_ids), (draft, draft_ids)]) as (verifier, draft_session):
            if shared:
                drafter = SharedDrafter(draft_session, draft_ids)
            else:
                drafter = TextDrafter(draft_session, draft_ids, draft, target, (await draft.info()).max_context)
            first = torch.tensor(verifier.last)[None]  # [1, V] target's distribution of the first token
            out: list[int] = []
            while True:
                _, (tokens, q) = await asyncio.gather(
                    verifier.rollback(len(target_ids) + max(len(out) - 1, 0)),
                    drafter.propose(out, min(k, output.limit - len(out)), params),
                )
                feed = out[-1:] + tokens  # the pending token, then the drafts
                if params.greedy:  # the target's argmax per position is all greedy acceptance needs
                    best = [int(first[0].argmax())] if not out else []
                    if feed:
                        best += (await verifier.append(feed, all_positions=True, top_k=1)).ids[:, 0].tolist()
                    n, nxt = greedy_accept(best, tokens)
                else:
                    rows = torch.tensor(await verifier.append(feed, all_positions=True)) if feed else first[:0]
                    rows = rows if out else torch.cat([first, rows])  # [len(tokens) + 1, V]
                    if q is None:  # deterministic proposals: q is one-hot on each token
                        q = torch.full((len(tokens), rows.shape[-1]), float("-inf"))
                        q[torch.arange(len(tokens)), torch.tensor(tokens, dtype=torch.long)] = 0.0
                    n, nxt = sampled_accept(process_logits(rows, params), q, tokens, generator)
                ks.append(len(tokens))
                lengths.append(n + 1)
                proposed += len(tokens)
                out += tokens[:n] + [nxt]
                if await output.extend(tokens[:n] + [nxt]):
                    break
                if p.adaptive and tokens:
                    k = min(k + 2, p.k_max) if n == len(tokens) else max(k - 1, p.k_min)
        accepted = sum(lengths) - len(lengths)
        meta = {
            "output_model": "target",
            "tokenizers": "shared" if shared else "different",
            "rounds": len(lengths),
            "proposed": proposed,
            "accepted": accepted,
            "acceptance_rate": accepted / proposed if proposed else 0.0,
            "mean_accepted_length": float(np.mean(lengths)),
            "k": {"first": ks[0], "last": ks[-1], "min": min(ks), "max": max(ks), "mean": float(np.mean(ks))},
            "sessions_replayed": verifier.reopened + draft_session.reopened,
        }
        return output.result(len(target_ids), meta)
