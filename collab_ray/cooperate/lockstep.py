"""The lock-step decode loop of contrastive, proxy and verify: every model steps with the same token."""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

import torch

from collab_ray.core.backend import ModelBackend
from collab_ray.core.decoding import (
    TextOutput,
    check_shared_vocabulary,
    open_sessions,
    output_for,
    prompt_ids,
)
from collab_ray.core.sampling import make_generator, process_logits, sample
from collab_ray.core.session import Session
from collab_ray.core.strategy import Emit, Request, StrategyResult

# (next-token log-probs [V] of each stepped model, prompt ids, generated ids) -> scores [V]
Scorer = Callable[[list[torch.Tensor], list[int], list[int]], Awaitable[torch.Tensor]]


async def lockstep(sessions: list[Session], prompt: list[int], score: Scorer, output: TextOutput) -> None:
    """Step every session with the same token: token = sample(process(score(rows))), until `output` ends.

    One `append` per model per token, concurrently; the prompt is never sent again.
    """
    params = output.params
    generator = make_generator(params.seed)
    rows = [torch.tensor(s.last) for s in sessions]
    while True:
        scores = await score(rows, prompt, output.token_ids)  # [V]
        token = sample(process_logits(scores, params), params, generator)
        if await output.extend([token]):
            return
        rows = [torch.tensor(r) for r in await asyncio.gather(*(s.append([token]) for s in sessions))]


async def run_lockstep(
    stepped: dict[str, ModelBackend], request: Request, emit: Emit | None, score: Scorer, meta: dict
) -> StrategyResult:
    """Decode with models that share a vocabulary, one token for all per step; the first model's
    chat template renders the prompt and its tokens are the output."""
    await check_shared_vocabulary(stepped)
    (first, *others) = stepped
    ids = await prompt_ids(stepped[first], request)
    output = await output_for(stepped[first], request, len(ids), emit, *(stepped[o] for o in others))
    async with open_sessions([(b, ids) for b in stepped.values()]) as sessions:
        await lockstep(sessions, ids, score, output)
    return output.result(len(ids), {"output_model": first, **meta})
