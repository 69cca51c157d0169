"""Sampling parameters and the logits processing, as small pure functions over [..., V] tensors."""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator


class SamplingParams(BaseModel):
    """How to turn next-token logits into tokens (OpenAI semantics)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    max_tokens: int = Field(16, ge=1, le=1_000_000, description="Most tokens to generate.")
    temperature: float = Field(1.0, ge=0.0, le=100.0, description="Softmax temperature; 0 means greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling: smallest set with this probability mass.")
    top_k: int = Field(0, ge=0, description="Keep only the k most likely tokens; 0 keeps all.")
    stop: tuple[str, ...] = Field((), description="Strings that end generation; not included in the text.")
    seed: int | None = Field(None, ge=0, description="Seed for reproducible sampling.")
    logprobs: int | None = Field(None, ge=0, le=20, description="Return this many top alternatives per token.")
    ignore_eos: bool = Field(False, description="Keep generating past end-of-sequence tokens.")

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, v):
        if v is None:
            return ()
        if isinstance(v, str):
            v = (v,)
        for s in v:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
        return tuple(v)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """[..., V] logits -> [..., V] float32 log-probs."""
    return torch.log_softmax(logits.float(), dim=-1)


def plausible(logprobs: torch.Tensor, tau: float) -> torch.Tensor:
    """[..., V] log-probs -> [..., V] bool: p ≥ τ · max p, the adaptive plausibility constraint of
    contrastive decoding (Li et al. 2023)."""
    return logprobs >= logprobs.max(dim=-1, keepdim=True).values + math.log(tau)


def top_k_mask(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set everything below the k-th largest logit to -inf. [..., V] -> [..., V]."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_mask(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter (Holtzman et al. 2020): keep the smallest set of tokens with mass ≥ p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # mass of strictly more likely tokens
    drop_sorted = mass_before >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def process_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[..., V] logits -> [..., V] log-probs of the distribution tokens are sampled from.

    Greedy returns the model's own log-probs (the token is their argmax).
    """
    if params.greedy:
        return log_softmax(logits)
    logits = logits.float() / params.temperature
    logits = top_k_mask(logits, params.top_k)
    logits = top_p_mask(logits, params.top_p)
    return log_softmax(logits)


def sample(logprobs: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Draw one token from [V] processed log-probs (argmax when greedy)."""
    if params.greedy:
        return int(torch.argmax(logprobs))
    probs = torch.exp(logprobs)
    return int(torch.multinomial(probs, 1, generator=generator))


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A seeded generator, or None to use torch's global RNG."""
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g
