"""`compress`: a small model prunes a long prompt to a target share of its tokens, keeping the
most surprising (informative) ones, then the large model answers the shorter prompt (Jiang et al.
2023, "LLMLingua: Compressing Prompts for Accelerated Inference of Large Language Models").

The prompt is cut into segments at blank lines. The first `keep_first` segments (the instruction)
and the last `keep_last` (the question) are kept whole; the remaining budget is spread over the
other segments in proportion to their length, and each keeps its highest-surprisal tokens.
Prompts longer than the small model's context are scored in windows (`token_surprisal`). Prompts
shorter than `min_tokens` go to the large model unchanged: a short one is all question, and pruning
it would lose the question while saving almost nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from collab_ray.core.backend import ModelBackend
from collab_ray.core.decoding import answer, user_text, with_user_text
from collab_ray.core.session import token_surprisal
from collab_ray.core.strategy import (
    Emit,
    Request,
    Strategy,
    StrategyResult,
    register,
    render_prompt,
)


def select_tokens(surprisal: np.ndarray, segments: list[tuple[int, int, bool]], keep: int) -> np.ndarray:
    """Which tokens to keep: all of the fixed segments, then per other segment its most surprising
    tokens, with the budget `keep` − fixed spread in proportion to segment length.

    surprisal: [n] −log p of each token; segments: (start, end, fixed) covering [0, n) -> [n] bool.
    """
    mask = np.zeros(len(surprisal), dtype=bool)
    free = [(s, e) for s, e, fixed in segments if not fixed]
    for s, e, fixed in segments:
        mask[s:e] = fixed
    free_total = sum(e - s for s, e in free)
    budget = max(keep - int(mask.sum()), 0)
    for s, e in free:
        share = min(round(budget * (e - s) / free_total), e - s) if free_total else 0
        top = np.argsort(-surprisal[s:e], kind="stable")[:share]
        mask[s + top] = True
    return mask


@dataclass
class Compression:
    text: str
    original_tokens: int
    compressed_tokens: int

    @property
    def ratio(self) -> float:
        return self.compressed_tokens / self.original_tokens


async def compress_text(
    backend: ModelBackend, text: str, ratio: float, keep_first: int, keep_last: int, window: int, rounds: int = 3, min_tokens: int = 0
) -> Compression:
    """Prune `text` to about `ratio` of its tokens (as the compressor tokenizes it); unchanged when
    it has fewer than `min_tokens`.

    The kept pieces are decoded and re-tokenized, which merges or splits a few tokens; up to
    `rounds` corrections rescale the budget until the re-tokenized ratio is on target.
    """
    original = len(await backend.encode(text, add_special_tokens=False))
    if original < min_tokens:
        return Compression(text, original, original)
    parts = [p for p in re.split(r"(?<=\n\n)", text) if p]
    pieces = [await backend.encode(p, add_special_tokens=False) for p in parts]
    fixed = len(parts) > keep_first + keep_last
    bounds, start = [], 0
    for i, ids in enumerate(pieces):
        bounds.append((start, start + len(ids), fixed and (i < keep_first or i >= len(parts) - keep_last)))
        start += len(ids)
    ids = [i for p in pieces for i in p]
    info = await backend.info()
    lead = [info.bos_token_id] if info.bos_token_id is not None else ids[:1]
    surprisal = await token_surprisal(backend, lead + ids, min(window, info.max_context or window))  # [len(ids)]
    if info.bos_token_id is None:
        surprisal[0] = np.inf  # the first token has no context: always keep it
    keep, best = ratio * len(ids), None
    for _ in range(rounds):
        mask = select_tokens(surprisal, bounds, round(keep))
        kept = ""
        for s, e, _ in bounds:
            kept += await backend.decode([ids[j] for j in range(s, e) if mask[j]])
        result = Compression(kept, original, len(await backend.encode(kept, add_special_tokens=False)))
        if best is None or abs(result.ratio - ratio) < abs(best.ratio - ratio):
            best = result
        if abs(result.ratio - ratio) <= 0.02 * ratio:
            break
        keep *= ratio / result.ratio
    return best


class CompressParams(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    ratio: float = Field(0.5, gt=0.0, le=1.0, description="Share of the prompt's tokens (compressor tokenizer) to keep.")
    keep_first: int = Field(1, ge=0, description="Leading blank-line-separated segments kept whole (the instruction).")
    keep_last: int = Field(1, ge=0, description="Trailing segments kept whole (the question).")
    window: int = Field(512, ge=16, le=32768, description="Tokens per scoring window of the compressor (capped by its context).")
    min_tokens: int = Field(64, ge=0, description="Prompts shorter than this (compressor tokens) are sent unchanged.")


@register
class Compress(Strategy):
    name = "compress"
    roles = ("compressor", "target")
    Params = CompressParams

    async def run(self, models: dict[str, ModelBackend], request: Request, emit: Emit | None = None) -> StrategyResult:
        p: CompressParams = self.params
        compressor, target = models["compressor"], models["target"]
        c = await compress_text(compressor, user_text(request), p.ratio, p.keep_first, p.keep_last, p.window, min_tokens=p.min_tokens)
        (gen,) = await target.generate([await render_prompt(target, with_user_text(request, c.text))], request.params)
        return await answer(
            gen,
            emit,
            {
                "output_model": "target",
                "compression": {
                    "target_ratio": p.ratio,
                    "achieved_ratio": c.ratio,
                    "original_tokens": c.original_tokens,
                    "compressed_tokens": c.compressed_tokens,
                    "skipped": c.original_tokens < p.min_tokens,
                },
                "compressed_prompt": c.text,
            },
        )
